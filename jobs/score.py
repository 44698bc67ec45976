"""Score radiographs with exported model(s) on Ray Data: predictions Parquet, a report (metrics when labelled) with
drift from the model's validation split, and a line in OUT/history.jsonl."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray.config import ScoreConfig, add_config_arguments, options_given  # noqa: E402
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
        description="Batch-score an ingested split or a folder/prefix of raw PNG/JPEG images or DICOM files. Safe "
        "to re-run: only images not yet in DEST are scored, and no row is ever duplicated.",
    )
    # --model is repeated for an ensemble; --concurrency MIN-MAX sets max_concurrency too.
    add_config_arguments(p, ScoreConfig, skip=("max_concurrency",),
                         models={"action": "append", "nargs": None, "metavar": "MODEL_DIR"},
                         concurrency={"type": pool_size, "metavar": "N|MIN-MAX"}, explain={"metavar": "N"})
    return p


def build_config(args: argparse.Namespace) -> ScoreConfig:
    given = options_given(args, ScoreConfig)
    if "concurrency" in given:
        given["concurrency"], given["max_concurrency"] = given["concurrency"]
    return ScoreConfig(**given)


def _run(args: argparse.Namespace) -> int:
    from mura_ray.score import score

    cfg = build_config(args)
    summary = score(cfg)
    repeated = summary["skipped_duplicates"]
    print(f"scored {summary['scored']} images, skipped {summary['skipped_already_done']} already done"
          + (f" and {repeated} repeated in the input" if repeated else "")
          + f", failed {summary['failed']}; predictions: {summary['predictions']}")
    if "report" in summary:
        print(f"report: {summary['report']}")
    drift = summary.get("drift")
    if drift:
        status = {"flagged": "FLAGGED (" + "; ".join(drift["reasons"]) + ")", "ok": "not flagged"}
        print(f"drift: {status.get(drift['status'], drift.get('note', drift['status']))}")
        if drift["flagged"] and cfg.fail_on_drift:
            return DRIFT_EXIT_CODE
    return 0


DRIFT_EXIT_CODE = 3
"""The exit code of a run with --fail-on-drift whose drift is flagged (2: an error, 0: done)."""


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, build_parser(), argv,
                    rerun="what was committed is kept: run the same command again to score the rest")


if __name__ == "__main__":
    sys.exit(main())
