"""Score radiographs with exported model(s) on Ray Data: predictions Parquet, and a report when labelled."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray.config import ScoreConfig  # noqa: E402
from mura_ray.runtime import run_main  # noqa: E402


def pool_size(text: str) -> tuple[int, int | None]:
    """`N` (a fixed pool) or `MIN-MAX` (autoscaling), as (min, max or None)."""
    low, sep, high = text.partition("-")
    try:
        sizes = (int(low), int(high) if sep else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX (e.g. 4 or 1-8), got {text!r}") from None
    if sizes[0] < 1 or (sizes[1] is not None and sizes[1] < sizes[0]):
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/score.py",
        description="Batch-score an ingested split or a folder/prefix of raw PNG/JPEG images. Safe to re-run: "
        "only images not yet in DEST are scored, and no row is ever duplicated.",
    )
    a = p.add_argument
    a("--model", action="append", required=True, dest="models",
      help="exported model directory (RUN_DIR/model), local or s3://; repeat for an ensemble (mean probability)")
    a("--input", required=True, help="ingested Parquet split (DEST/test) or folder of images, local or s3://")
    a("--out", required=True, help="destination: predictions/, manifest.json, report/ (when labelled)")
    a("--batch-size", type=int, default=64, help="images per model call (default 64)")
    a("--concurrency", type=pool_size, default=(1, None), metavar="N|MIN-MAX",
      help="scoring actors, each with a copy of the model(s) (default 1); MIN-MAX (e.g. 1-8): a pool that grows "
      "while input waits, as far as the cluster has or its autoscaler adds room (one GPU each with --gpu)")
    a("--gpu", choices=["auto", "yes", "no"], default="auto", help="one GPU per actor: auto when present")
    a("--cpus-per-actor", type=float, default=1.0, help="CPUs per scoring actor (default 1); images are decoded "
      "by 1-CPU tasks in front of GPU actors, inside CPU actors of 1 CPU")
    a("--no-amp", action="store_true", help="score in float32 on GPU too (default: bfloat16/float16 autocast on "
      "GPU; CPU scoring is always float32)")
    a("--tta", action="store_true", help="test-time augmentation: average over a horizontal flip (a re-run into "
      "the same --out must use the same setting)")
    a("--threshold", type=float, help="operating threshold (default: the model's own); recorded in manifest.json, "
      "where jobs/report.py finds it; a re-run into the same --out must use the same threshold")
    a("--bootstrap", type=int, default=200, help="bootstrap resamples for the report's 95%% CIs (0 disables)")
    a("--chunk-size", type=int, default=20000, dest="chunk_images",
      help="images per committed chunk; an interruption loses at most one chunk (default 20000)")
    a("--explain", type=int, default=0, metavar="N",
      help="add Grad-CAM heatmaps of N most confident true positives, false negatives and false positives to "
      "the report (needs pip install 'mura_ray[explain]'; default 0: none)")
    a("--no-report", action="store_true", help="skip the metric report even when the input has labels")
    return p


def _run(args: argparse.Namespace) -> int:
    from mura_ray.score import score

    cfg = ScoreConfig(
        models=tuple(args.models), input=args.input, out=args.out, batch_size=args.batch_size,
        concurrency=args.concurrency[0], max_concurrency=args.concurrency[1], gpu=args.gpu, tta=args.tta,
        threshold=args.threshold,
        bootstrap=args.bootstrap, report=not args.no_report, cpus_per_actor=args.cpus_per_actor,
        chunk_images=args.chunk_images, explain=args.explain, amp=not args.no_amp,
    )
    summary = score(cfg)
    repeated = summary["skipped_duplicates"]
    print(f"scored {summary['scored']} images, skipped {summary['skipped_already_done']} already done"
          + (f" and {repeated} repeated in the input" if repeated else "")
          + f", failed {summary['failed']}; predictions: {summary['predictions']}")
    if "report" in summary:
        print(f"report: {summary['report']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser(), argv,
                    rerun="what was committed is kept: run the same command again to score the rest")


if __name__ == "__main__":
    sys.exit(main())
