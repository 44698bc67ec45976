"""Ingest radiograph archives (MURA-v1.1, ImageFolder-style sets, raw trees, DICOM exports) into Parquet, local or
on S3."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray import storage  # noqa: E402
from mura_ray.config import IngestConfig, add_config_arguments, options_given  # noqa: E402
from mura_ray.runtime import run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/ingest.py",
        description="Turn a radiograph archive into a Parquet dataset (DEST/<split>/*.parquet, "
        "DEST/ingest_summary.json, DEST/errors.jsonl). S3 endpoint and credentials come from the AWS environment.",
    )
    add_config_arguments(p, IngestConfig)
    return p


def build_config(args: argparse.Namespace) -> IngestConfig:
    given = options_given(args, IngestConfig)
    # Local paths absolute here, on the driver: relative ones would be resolved in each Ray worker's directory.
    given["root"], given["out"] = storage.absolute(given["root"]), storage.absolute(given["out"])
    return IngestConfig(**given).validate()


def _run(args: argparse.Namespace) -> int:
    from mura_ray.data.ingest import IngestFailed, format_summary, ingest

    cfg = build_config(args)
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
