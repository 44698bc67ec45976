"""Report benchmark: seconds to build and write the metric report (`build_report` + `write_report`, figures
included) from N synthetic predictions, on one core. The report runs as one Ray task after scoring, so its cost is
serial; the target is under 60 s for 1,000,000 predictions. Reading the predictions Parquet (`load_predictions`)
is timed separately. Prints one JSON line.

    .venv/bin/python benchmarks/report.py                       # 10k, 100k and 1M predictions, pinned to one core
    .venv/bin/python benchmarks/report.py --sizes 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Any

from _common import emit, load_1m, median, setup_logging

logger = logging.getLogger("benchmarks.report")

IMAGES_PER_STUDY = 2.7
"""MURA has 40,561 images in 14,863 studies."""
ERROR_RATE = 0.002
"""Share of rows that failed to decode (they carry an error and no prediction)."""


def synthetic_predictions(n: int, seed: int = 0):
    """The scoring job's prediction columns for `n` images: studies of ~2.7 views, 7 body parts, informative
    probabilities (so the curves and metrics are not degenerate) and a few decode errors."""
    import numpy as np
    import pandas as pd

    from mura_ray.labels import BODY_PARTS

    rng = np.random.default_rng(seed)
    n_studies = max(1, round(n / IMAGES_PER_STUDY))
    study = np.sort(rng.integers(0, n_studies, n))
    study_label = rng.random(n_studies) < 0.4
    study_part = rng.integers(0, len(BODY_PARTS), n_studies)
    label = study_label[study].astype(np.int8)
    prob = 1.0 / (1.0 + np.exp(-(rng.normal(0.0, 1.2, n) + 1.5 * (label - 0.5) * 2)))
    parts = np.array(BODY_PARTS, dtype=object)
    part = parts[study_part[study]]
    wrong = rng.random(n) < 0.05
    part_pred = np.where(wrong, parts[rng.integers(0, len(BODY_PARTS), n)], part)
    failed = rng.random(n) < ERROR_RATE
    return pd.DataFrame({
        "image_id": [f"{i:020x}" for i in range(n)],
        "study_id": pd.Series([f"XR_{p}/patient{s:06d}/study1" for p, s in zip(part, study, strict=True)]),
        "body_part": part,
        "body_part_pred": np.where(failed, None, part_pred),
        "prob_abnormal": np.where(failed, np.nan, prob).astype(np.float32),
        "label": label,
        "model_id": "benchmark-model",
        "error": np.where(failed, "cannot decode image: benchmark", None),
    })


def time_report(n: int, bootstrap: int, workdir: str) -> dict[str, Any]:
    """Seconds to read the predictions Parquet, build the report, and write it (JSON, Markdown, HTML, figures)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mura_ray.predictions import load_predictions
    from mura_ray.report import build_report, write_report

    df = synthetic_predictions(n)
    path = os.path.join(workdir, f"predictions-{n}.parquet")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    t0 = time.perf_counter()
    df = load_predictions(path)
    t1, c1 = time.perf_counter(), time.process_time()
    report = build_report(df, threshold=0.5, threshold_source="benchmark", bootstrap=bootstrap)
    t2 = time.perf_counter()
    write_report(report, df, os.path.join(workdir, f"report-{n}"))
    t3, c3 = time.perf_counter(), time.process_time()
    # CPU seconds as well: on a shared machine the wall time also counts the time spent waiting for the core.
    return {"load_s": t1 - t0, "build_s": t2 - t1, "write_s": t3 - t2, "report_s": t3 - t1, "report_cpu_s": c3 - c1,
            "n_images": report["n_images"], "n_studies": report["n_studies"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="predictions")
    p.add_argument("--repeats", type=int, default=1, help="runs per size (median reported)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (the scoring job's default)")
    p.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.all_cores:
        # Before numpy and the BLAS libraries start their threads, so that every thread inherits the one core.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    setup_logging()
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    started, load_start = time.perf_counter(), load_1m()
    sizes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        for n in args.sizes:
            runs = [time_report(n, args.bootstrap, tmp) for _ in range(args.repeats)]
            sizes[str(n)] = {k: round(median([r[k] for r in runs]), 3) for k in ("load_s", "build_s", "write_s",
                                                                                 "report_s", "report_cpu_s")}
            sizes[str(n)].update(n_images=runs[0]["n_images"], n_studies=runs[0]["n_studies"])
            logger.info("%d predictions: report %.1f s (%.1f s CPU; build %.1f s, write %.1f s), load %.1f s", n,
                        sizes[str(n)]["report_s"], sizes[str(n)]["report_cpu_s"], sizes[str(n)]["build_s"],
                        sizes[str(n)]["write_s"], sizes[str(n)]["load_s"])
    emit({
        "name": "report",
        "report_s": {n: s["report_s"] for n, s in sizes.items()},
        "report_cpu_s": {n: s["report_cpu_s"] for n, s in sizes.items()},
        "target_s_at_1m": 60,
        "sizes": sizes,
        "statistic": f"median of {args.repeats} run(s) per size",
        "bootstrap": args.bootstrap,
        "cores": len(os.sched_getaffinity(0)),
        "load_1m_start": load_start, "load_1m_end": load_1m(),
        "seconds": round(time.perf_counter() - started, 1),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
