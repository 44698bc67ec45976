"""Train a multi-task radiograph classifier on Ray Train (data-parallel), or the synthetic demo with no --data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray.config import DEMO_TRAIN_DEFAULTS, TrainConfig, load_yaml, replace_from  # noqa: E402
from mura_ray.runtime import run_main  # noqa: E402

_BOOL = argparse.BooleanOptionalAction


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/train.py",
        description="Train a multi-task (abnormality + body part) radiograph classifier with Ray Train. "
        "Without --data it trains on built-in synthetic radiographs (a demo, not MURA). Recipes: jobs/configs/.",
    )
    a = p.add_argument
    a("--config", help="YAML recipe of options (flag names with - or _); command-line flags override it")
    a("--data", help="ingested dataset from jobs/ingest.py, local or s3:// (default: the synthetic demo set)")
    a("--out", help="run directory, local or s3:// (default runs/<backbone>-<time>); re-using one resumes it")
    a("--backbone", help="any timm model name (efficientnet_b0, resnet50, densenet169, ...) or custom_cnn "
      "(default efficientnet_b0; custom_cnn for the demo)")
    a("--epochs", type=int, help="maximum epochs (default 30; 15 for the demo)")
    a("--batch-size", type=int, help="images per worker per step, at least 2 (default 32)")
    a("--lr", type=float,
      help="peak AdamW learning rate, cosine schedule after warm-up (default 1e-3; 3e-3 for the demo)")
    a("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    a("--warmup-epochs", type=int, help="linear warm-up epochs (default 1)")
    a("--image-size", type=int, help="input side in pixels, aspect preserved and padded (default 224; 64 demo)")
    a("--workers", type=int, help="data-parallel workers, one GPU each when GPUs are used (default 1)")
    a("--gpu", choices=["auto", "yes", "no"], help="use GPUs: auto when the cluster has them (default auto); "
      "use yes on autoscaling clusters whose GPU nodes start from zero")
    a("--cpus-per-worker", type=float, help="CPUs reserved per Train worker, also its torch threads on CPU "
      "(default 1; 2 for the demo)")
    a("--amp", action=_BOOL, help="mixed precision on GPU (default on)")
    a("--pretrained", action=_BOOL, help="load timm's ImageNet weights from the hub")
    a("--pretrained-file", help="load weights from a local .safetensors/.pth file (air-gapped clusters)")
    a("--freeze", choices=["none", "all", "all-but-last"],
      help="freeze the feature extractor: all, or all but its last stage (default none)")
    a("--multitask", action=_BOOL, help="train the auxiliary body-part head (default on)")
    a("--body-part-embedding", action=_BOOL, help="feed the body-part embedding to the abnormality head (default on)")
    a("--dropout", type=float, help="dropout in the heads (default 0.3; 0.2 for the demo)")
    a("--body-part-weight", type=float, help="weight of the body-part loss (default 0.5)")
    a("--loss", choices=["bce", "weighted", "focal"], help="abnormality loss (default bce)")
    a("--focal-gamma", type=float, help="focal loss gamma (default 2)")
    a("--patience", type=int, help="early stopping: epochs without a better val loss (default 5; 4 for the demo)")
    a("--num-to-keep", type=int,
      help="checkpoints kept, the best by --select-metric (default 2), plus the latest for resuming")
    a("--select-metric", choices=["val_loss", "val_auc", "val_kappa"],
      help="validation metric that picks the kept and the exported checkpoint (default val_loss)")
    a("--max-failures", type=int, help="worker-group restarts allowed, resuming from the last checkpoint (default 2)")
    a("--threshold", type=float, help="operating threshold stored with the model (default 0.5)")
    a("--seed", type=int, help="seed of the weight initialisation and of the per-epoch file order (default 0); "
      "augmentation and the order of rows within a file are drawn fresh by each decode task, so two runs match "
      "in distribution, not bit for bit")
    a("--demo-images", type=int, help="size of the synthetic demo set when no --data (default 2000)")
    return p


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the demo's defaults when no data is given, then the --config recipe, then flags."""
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    recipe = load_yaml(args.config) if args.config else {}
    cfg = TrainConfig()
    if not (given.get("data") or recipe.get("data")):
        cfg = replace_from(cfg, DEMO_TRAIN_DEFAULTS, source="demo defaults")
    cfg = replace_from(cfg, recipe, source=f"--config {args.config}")
    return replace_from(cfg, given, source="command line").validate()


def _run(args: argparse.Namespace) -> int:
    from mura_ray.train import fit

    result = fit(build_config(args))
    print(f"model:  {result['model_dir']}")
    if "report_dir" in result:
        print(f"report: {result['report_dir']}")
        print("test:   " + "  ".join(f"{k} {v:.4f}" for k, v in result["test"].items() if v is not None))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser(), argv,
                    rerun="run it again with the same --out to resume from the last finished epoch")


if __name__ == "__main__":
    sys.exit(main())
