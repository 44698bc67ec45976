"""Ingest radiograph archives (MURA-v1.1, ImageFolder-style sets, raw trees) into Parquet, local or on S3."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray import storage  # noqa: E402
from mura_ray.config import IngestConfig  # noqa: E402
from mura_ray.runtime import run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/ingest.py",
        description="Turn a radiograph archive into a Parquet dataset (DEST/<split>/*.parquet, "
        "DEST/ingest_summary.json, DEST/errors.jsonl). S3 endpoint and credentials come from the AWS environment.",
    )
    p.add_argument("--source", required=True, choices=["mura", "folder", "images"],
                   help="mura: MURA-v1.1 and its CSVs; folder: {train,val,test}/{class}/ image folders; "
                   "images: any tree of PNG/JPEG for bulk scoring (no labels, split test)")
    p.add_argument("--root", required=True, help="the archive: MURA-v1.1 or its parent, or a folder (local or s3://)")
    p.add_argument("--out", required=True, help="destination dataset folder (local or s3://)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of MURA train patients moved to the val split (default 0.2)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the patient-level train/val split and of the train split's row order (default 0)")
    p.add_argument("--max-error-rate", type=float, default=0.01,
                   help="exit non-zero when more than this share of images is unusable (default 0.01)")
    p.add_argument("--body-part", default=None, help="body part of every image of a --source folder set, e.g. WRIST")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset at --out, once the new one is complete (a failed run leaves it); "
                   "an --out holding anything but an ingested dataset is refused")
    p.add_argument("--file-mb", type=int, default=64,
                   help="most image MiB per Parquet file (default 64); files are written 64 images at a time")
    p.add_argument("--rows-per-file", type=int, default=256,
                   help="most images per Parquet file (default 256). Training shuffles by reading the train split's "
                   "files in a new order each epoch, so a split wants many files: lower it for small sets")
    return p


def _run(args: argparse.Namespace) -> int:
    from mura_ray.data.ingest import IngestFailed, format_summary, ingest

    # Local paths absolute here, on the driver: relative ones would be resolved in each Ray worker's directory.
    cfg = IngestConfig(
        source=args.source, root=storage.absolute(args.root), out=storage.absolute(args.out),
        val_fraction=args.val_fraction, seed=args.seed,
        max_error_rate=args.max_error_rate, body_part=args.body_part, overwrite=args.overwrite,
        file_mb=args.file_mb, rows_per_file=args.rows_per_file,
    ).validate()
    try:  # Ray is started by ingest(), once --root and --out have passed their checks
        summary = ingest(cfg)
    except IngestFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"dataset written to {cfg.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser(), argv,
                    rerun="run it again with --overwrite to replace what it left unfinished")


if __name__ == "__main__":
    sys.exit(main())
