"""Search hyper-parameters with Ray Tune (ASHA), each trial a Ray Train run; the synthetic demo with no --data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray.config import TuneConfig, replace_from  # noqa: E402
from mura_ray.runtime import run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/tune.py",
        description="Search training options with Ray Tune: every trial trains like jobs/train.py, ASHA stops weak "
        "trials early, and the best trial is exported and scored on the test split. Re-running the same command "
        "with the same --out resumes an interrupted search. Without --data it searches on built-in synthetic "
        "radiographs (a demo, not MURA).",
    )
    a = p.add_argument
    a("--data", help="ingested dataset from jobs/ingest.py, local or s3:// (default: the synthetic demo set)")
    a("--out", help="search directory, local or s3:// (default runs/tune): trials, leaderboard.{csv,md}, best/, "
      "comparison.md; re-using one resumes that search")
    a("--space", help="search space YAML (default: mura_ray/tune_space.yaml, which documents the grammar)")
    a("--backbones", type=lambda s: tuple(b.strip() for b in s.split(",") if b.strip()),
      help="comma-separated backbones searched as a grid, overriding the space (e.g. custom_cnn,resnet50; "
      "custom_cnn,resnet18 for the demo)")
    a("--num-samples", type=int, help="trials per grid point (default 8; 2 for the demo)")
    a("--epochs", type=int, help="maximum epochs per trial (default 10; 3 for the demo)")
    a("--workers-per-trial", type=int, help="data-parallel Train workers of each trial (default 1)")
    a("--max-concurrent", type=int, help="trials running at once (default 2)")
    a("--metric", choices=["val_auc", "val_loss", "val_kappa"],
      help="what ASHA and the leaderboard rank by: val_auc and val_kappa higher, val_loss lower (default val_auc)")
    a("--image-size", type=int, help="fix every trial's input side in pixels, overriding the space (48 for the demo)")
    a("--mlflow-uri", help="MLflow tracking URI (file:///path or http://server): one run per trial")
    a("--gpu", choices=["auto", "yes", "no"], help="use GPUs: auto when the cluster has them (default auto)")
    a("--cpus-per-worker", type=float, help="CPUs reserved per Train worker (default 1)")
    a("--grace-period", type=int, help="ASHA: epochs every trial runs before it may be stopped (default 1)")
    a("--reduction-factor", type=int, help="ASHA: keep 1/factor of the trials at each rung (default 2)")
    a("--seed", type=int, help="seed of the sampling; trial N of the search trains with seed + N, shown in the "
      "leaderboard's seed column (default 0)")
    a("--demo-images", type=int, help="size of the synthetic demo set when no --data (default 600)")
    return p


def build_config(args: argparse.Namespace) -> TuneConfig:
    """Defaults, then the demo's defaults when no data is given, then the flags."""
    from mura_ray.tune import DEMO_TUNE_DEFAULTS

    given: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
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
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser(), argv, rerun="run the same command again to resume the search")


if __name__ == "__main__":
    sys.exit(main())
