"""Scoring benchmark: images/s of the scoring job (`mura_ray.score.score` on an ingested split) against a plain
PyTorch loop over the same Parquet rows with the same exported model and the same `Predictor` (decode, resize,
`torch.inference_mode`), the same batch size and the same cores.

Ours runs the whole job (chunked read, already-scored filter, decode fused into `map_batches(Predictor)` on
`--concurrency` actors of 1 CPU each, Parquet write, manifest commit), report off; `--with-map-batches` also times
the bare `scoring_dataset` path (decode and Predictor actors, nothing written).
The baseline reads the split with pyarrow, calls one `Predictor` per batch with torch on all cores, and writes the
predictions Parquet; it runs before Ray starts. The first run of each is a warm-up left out of the medians.
Prints one JSON line.

    .venv/bin/python benchmarks/score.py
    .venv/bin/python benchmarks/score.py --concurrency 1 --baseline-threads 1     # one core each
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Any

from _common import (
    add_dataset_args,
    cache_dir,
    cores,
    emit,
    load_1m,
    local_ray,
    median,
    setup_logging,
    synthetic_dataset,
)

logger = logging.getLogger("benchmarks.score")


def export_random_model(out: str, backbone: str, image_size: int) -> str:
    """A randomly initialised model exported like training exports one (throughput does not depend on weights)."""
    import torch

    from mura_ray.models import ModelSpec, build_model, export_model, trunk_normalization

    torch.manual_seed(0)
    model = build_model(backbone).eval()
    mean, std = trunk_normalization(model.trunk)
    export_model(model, ModelSpec(backbone=backbone, image_size=image_size, mean=mean, std=std), out,
                 card={"note": "random weights, for benchmarks only"})
    return out


def rewrite_as_files(split_dir: str, out: str, n_files: int) -> str:
    """The split's rows as `n_files` Parquet files of equal row counts, in order."""
    import pyarrow.parquet as pq

    table = pq.read_table(split_dir)
    os.makedirs(out)
    step = -(-table.num_rows // n_files)
    for i in range(n_files):
        pq.write_table(table.slice(i * step, step), os.path.join(out, f"part-{i:04d}.parquet"))
    return out


def run_baseline(split_dir: str, model_dir: str, out_dir: str, batch_size: int, threads: int) -> dict[str, float]:
    """Read → Predictor per batch → write, in this process, torch using `threads` threads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from mura_ray.data.score_input import INPUT_COLUMNS
    from mura_ray.score import Predictor

    torch.set_num_threads(threads)
    started = time.perf_counter()
    predictor = Predictor([model_dir], use_gpu=False, tta=False, threshold=None)
    rows = pq.read_table(split_dir, columns=list(INPUT_COLUMNS)).to_pandas()
    parts = [predictor(rows.iloc[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    pq.write_table(pa.concat_tables(parts), os.path.join(out_dir, "predictions.parquet"))
    return {"images": len(rows), "seconds": time.perf_counter() - started}


def run_job(split_dir: str, model_dir: str, out_dir: str, batch_size: int, concurrency: int,
            chunk_images: int | None = None) -> dict[str, float]:
    """The scoring job as `jobs/score.py` runs it (report off), into a fresh output directory."""
    from mura_ray.config import ScoreConfig
    from mura_ray.score import score

    chunking = {"chunk_images": chunk_images} if chunk_images else {}
    started = time.perf_counter()
    summary = score(ScoreConfig(models=(model_dir,), input=split_dir, out=out_dir, batch_size=batch_size,
                                concurrency=concurrency, gpu="no", report=False, **chunking))
    return {"images": summary["scored"] + summary["failed"], "seconds": time.perf_counter() - started,
            "job_seconds": summary["seconds"]}


def run_map_batches(split_dir: str, model_dir: str, batch_size: int, concurrency: int) -> dict[str, float]:
    """Only the job's core: read_parquet → `scoring_dataset` (decode, Predictor actors), results counted, not
    written."""
    from mura_ray.data.pipeline import read_parquet
    from mura_ray.data.score_input import INPUT_COLUMNS
    from mura_ray.score import _check_models, scoring_dataset

    sizes = _check_models((model_dir,))[2]
    started = time.perf_counter()
    ds = scoring_dataset(read_parquet(split_dir, None).select_columns(list(INPUT_COLUMNS)), [model_dir], sizes,
                         {"use_gpu": False, "tta": False, "threshold": None}, batch_size=batch_size,
                         concurrency=concurrency, cpus_per_actor=1.0)
    images = sum(len(b["image_id"]) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    return {"images": images, "seconds": time.perf_counter() - started}


def _rate(runs: list[dict[str, float]]) -> float:
    measured = runs[1:] or runs
    return median([r["images"] / r["seconds"] for r in measured])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    n_cores = cores()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--split", default="train", help="ingested split scored")
    p.add_argument("--backbone", default="custom_cnn", help="exported model (random weights)")
    p.add_argument("--image-size", type=int, default=128, help="model input side in pixels")
    p.add_argument("--batch-size", type=int, default=64, help="images per Predictor call (ScoreConfig default)")
    p.add_argument("--concurrency", type=int, default=n_cores, help="scoring actors, 1 CPU each (ours)")
    p.add_argument("--baseline-threads", type=int, default=n_cores, help="torch threads of the plain loop")
    p.add_argument("--chunk-images", type=int, default=None,
                   help="images per committed chunk of the job (default: ScoreConfig's, one chunk here)")
    p.add_argument("--files", type=int, default=0,
                   help="rewrite the split as this many Parquet files first (a many-file input); 0 = as ingested")
    p.add_argument("--repeats", type=int, default=2, help="measured runs of each side (plus a warm-up)")
    p.add_argument("--ray-cpus", type=int, default=max(4, n_cores + 2), help="logical CPUs of the local Ray")
    p.add_argument("--with-map-batches", action="store_true",
                   help="also time the bare read_parquet → map_batches(Predictor) path, without the job's commits")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    started, load_start = time.perf_counter(), load_1m()
    data = synthetic_dataset(cache_dir(args.cache), args.images, args.source_size)
    split_dir = os.path.join(data, args.split)
    baseline: list[dict[str, float]] = []
    job: list[dict[str, float]] = []
    bare: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        if args.files:
            split_dir = rewrite_as_files(split_dir, os.path.join(tmp, "input"), args.files)
        model_dir = export_random_model(os.path.join(tmp, "model"), args.backbone, args.image_size)
        for i in range(args.repeats + 1):
            out = tempfile.mkdtemp(dir=tmp)
            baseline.append(run_baseline(split_dir, model_dir, out, args.batch_size, args.baseline_threads))
            logger.info("baseline run %d: %.1f img/s", i, baseline[-1]["images"] / baseline[-1]["seconds"])
        with local_ray(args.ray_cpus):
            for i in range(args.repeats + 1):
                job.append(run_job(split_dir, model_dir, os.path.join(tmp, f"job-{i}"), args.batch_size,
                                   args.concurrency, args.chunk_images))
                logger.info("job run %d: %.1f img/s", i, job[-1]["images"] / job[-1]["seconds"])
            for i in range(args.repeats + 1 if args.with_map_batches else 0):
                bare.append(run_map_batches(split_dir, model_dir, args.batch_size, args.concurrency))
                logger.info("map_batches run %d: %.1f img/s", i, bare[-1]["images"] / bare[-1]["seconds"])
    ours, base = _rate(job), _rate(baseline)
    result: dict[str, Any] = {
        "name": "score",
        "ours_images_per_s": round(ours, 2),
        "baseline_images_per_s": round(base, 2),
        "ratio": round(ours / base, 3),
        "ours_map_batches_images_per_s": round(_rate(bare), 2) if bare else None,
        "map_batches_ratio": round(_rate(bare) / base, 3) if bare else None,
        "statistic": "median over measured runs, warm-up run excluded",
        "repeats": args.repeats,
        "images": baseline[0]["images"], "split": args.split, "backbone": args.backbone,
        "image_size": args.image_size, "source_size": args.source_size, "batch_size": args.batch_size,
        "concurrency": args.concurrency, "chunk_images": args.chunk_images, "files": args.files,
        "baseline_threads": args.baseline_threads, "cores": cores(),
        "ray_cpus": args.ray_cpus, "load_1m_start": load_start, "load_1m_end": load_1m(),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": {"job": job, "map_batches": bare, "baseline": baseline},
    }
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
