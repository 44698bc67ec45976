"""Train a multi-task radiograph classifier on Ray Train (data-parallel), or the synthetic demo with no --data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray.config import (  # noqa: E402
    DEMO_TRAIN_DEFAULTS,
    TrainConfig,
    add_config_arguments,
    load_yaml,
    options_given,
    replace_from,
)
from mura_ray.runtime import run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/train.py",
        description="Train a multi-task (abnormality + body part) radiograph classifier with Ray Train. "
        "Without --data it trains on built-in synthetic radiographs (a demo, not MURA). Recipes: jobs/configs/.",
    )
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML recipe of options (flag names with - or _); command-line flags override it")
    add_config_arguments(p, TrainConfig, demo=DEMO_TRAIN_DEFAULTS)
    return p


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the demo's defaults when no data is given, then the --config recipe, then flags."""
    given = options_given(args, TrainConfig)
    recipe = load_yaml(args.config) if args.config else {}
    cfg = TrainConfig()
    if not (given.get("data") or recipe.get("data")):
        cfg = replace_from(cfg, DEMO_TRAIN_DEFAULTS, source="demo defaults")
    cfg = replace_from(cfg, recipe, source=f"--config {args.config}")
    return replace_from(cfg, given, source="command line").validate()


def _run(args: argparse.Namespace) -> int:
    from mura_ray.score import choose_model_threshold, score_test_split
    from mura_ray.train import fit

    cfg = build_config(args)
    result = fit(cfg)
    print(f"model:  {result['model_dir']}")
    chosen = choose_model_threshold(result["model_dir"], result["data"], result["run_dir"], cfg.threshold_policy,
                                    cfg.threshold)
    print(f"threshold: {chosen['threshold']:.4f} ({chosen['threshold_policy']})")
    if result["has_test"]:  # train, then score the test split into RUN_DIR/test with its report in RUN_DIR/report
        test = score_test_split(result["model_dir"], result["data"], result["run_dir"])
        print(f"report: {result['run_dir'].rstrip('/')}/report")
        print("test:   " + "  ".join(f"{k} {v:.4f}" for k, v in test.items() if v is not None))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser(), argv,
                    rerun="run it again with the same --out to resume from the last finished epoch")


if __name__ == "__main__":
    sys.exit(main())
