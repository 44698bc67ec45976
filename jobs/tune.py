"""Search hyper-parameters with Ray Tune (ASHA), each trial a Ray Train run; the synthetic demo with no --data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray.config import (  # noqa: E402
    DEMO_TUNE_DEFAULTS,
    TuneConfig,
    add_config_arguments,
    options_given,
    replace_from,
)
from mura_ray.runtime import run_main  # noqa: E402


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/tune.py",
        description="Search training options with Ray Tune: every trial trains like jobs/train.py, ASHA stops weak "
        "trials early, and the best trial is exported and scored on the test split. Re-running the same command "
        "with the same --out resumes an interrupted search. Without --data it searches on built-in synthetic "
        "radiographs (a demo, not MURA).",
    )
    add_config_arguments(p, TuneConfig, demo=DEMO_TUNE_DEFAULTS, skip=("extra",),
                         backbones={"type": _names, "nargs": None, "metavar": "NAME,NAME"})
    return p


def build_config(args: argparse.Namespace) -> TuneConfig:
    """Defaults, then the demo's defaults when no data is given, then the flags."""
    given = options_given(args, TuneConfig)
    cfg = TuneConfig()
    if not given.get("data"):
        cfg = replace_from(cfg, DEMO_TUNE_DEFAULTS, source="demo defaults")
    return replace_from(cfg, given, source="command line").validate()


def _run(args: argparse.Namespace) -> int:
    from mura_ray.tune import tune

    result = tune(build_config(args))
    print(result["leaderboard_md"])
    if result["interrupted"]:
        print(f"interrupted: run the same command again to resume the search in {result['out']}", file=sys.stderr)
        return 130
    print(f"leaderboard: {result['out']}/leaderboard.md")
    print(f"best model:  {result['best']['model_dir']}")
    if "report_dir" in result["best"]:
        print(f"report:      {result['best']['report_dir']}")
        print(f"comparison:  {result['comparison']}")
    if "ensemble" in result:
        print(f"ensemble:    {result['ensemble']['model_dir']} (top {len(result['ensemble']['trial_ids'])} trials)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser(), argv, rerun="run the same command again to resume the search")


if __name__ == "__main__":
    sys.exit(main())
