"""Training-input benchmark on MURA-sized sources (grayscale PNGs of 512 px on the longer side, at 224 px): images/s
that training's default input delivers to the loop, augmentation included, against what a user picks instead.

- ours: the training job's default path. The train split's training-ready cache is built first (a Ray Data job,
  timed and reported on its own, against a plain `multiprocessing` decode-resize-write on the same cores); then a
  real `TorchTrainer` worker reads it through `build_input(cache=...)` and `iter_batches`, its epochs cut from one
  Ray Data execution by training's `EpochStream`, and augments each batch on its device (`prepare_batch`, seeded by
  epoch), as `mura_ray.train` does.
- baseline: a `DataLoader` with one worker process per core that decodes, resizes (`load_pixels`) and augments
  (`model_input`, the same augmentation, a batch at a time in the worker) the ingested PNG bytes every epoch.
- same_input: a `DataLoader` (one worker per core) reading the same cache, augmenting in the loop as ours does:
  Ray's own overhead on the same input.

Each side runs two phases of epochs: `input` pulls batches as fast as it can (its first epoch a warm-up left out),
`train` feeds a consumer paced like one modern GPU training EfficientNet-B0 at 224 px (`--consumer-ms-per-image`,
1 ms: 1,000 img/s) and measures the share of wall time it waits for data (`stall_share`). Images/s and stall share
are over the measured epochs together (medians alongside). Prints one JSON line.

    .venv/bin/python benchmarks/input_pipeline.py
    .venv/bin/python benchmarks/input_pipeline.py --workers 2 --skip-baseline --train-epochs 0     # 2 Train workers
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
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

logger = logging.getLogger("benchmarks.input_pipeline")

Step = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------------- shared
PHASE_WARM_UP_EPOCHS = {"input": 1, "train": 0}
"""Epochs run before the measured ones, per phase: the input phase's first epoch starts the pipeline (Ray's first
execution, the DataLoader's worker processes); the paced phase runs on that warm pipeline."""

NORMALIZATION = (0.5, 0.25)
"""Mean and std of the model input (what they are does not change the work)."""


def paced_step(ms_per_image: float) -> Step:
    """A consumer standing in for a GPU's training step: busy `ms_per_image` per image of each batch."""
    def step(batch: dict[str, Any]) -> None:
        time.sleep(ms_per_image / 1000 * len(batch["image"]))

    return step


def run_epoch(batches: Iterable[dict[str, Any]], step: Step | None,
              prepare: Callable[[dict[str, Any]], dict[str, Any]] = lambda b: b) -> dict[str, float]:
    """Pull every batch, `prepare` it (augmentation on the consumer's device) and `step` on it: images, seconds,
    seconds blocked on the iterator, first-batch latency."""
    started = time.perf_counter()
    it = iter(batches)
    images, wait, first = 0, 0.0, None
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t0
        if first is None:
            first = time.perf_counter() - started
        if batch is None:
            break
        batch = prepare(batch)
        images += len(batch["image"])
        if step is not None:
            step(batch)
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": seconds, "wait_s": wait, "first_batch_s": first or 0.0}


def summarize(epochs: list[dict[str, float]], warmup: int) -> dict[str, Any]:
    """The measured epochs (the first `warmup` left out), taken together: images/s and stall share over their
    summed time. One stream runs through the epochs, so an epoch can start on input read during the one before
    and a single epoch's images/s (hence a median of two) would flatter it; medians are kept alongside."""
    measured = epochs[warmup:] or epochs
    seconds = sum(e["seconds"] for e in measured)
    return {
        "images_per_s": sum(e["images"] for e in measured) / seconds,
        "stall_share": sum(e["wait_s"] for e in measured) / seconds,
        "images_per_s_median": median([e["images"] / e["seconds"] for e in measured]),
        "stall_share_median": median([e["wait_s"] / e["seconds"] for e in measured]),
        "first_batch_s": median([e["first_batch_s"] for e in measured]),
        "epoch_s": median([e["seconds"] for e in measured]),
        "images_per_epoch": int(median([e["images"] for e in measured])),
        "epochs": [{k: round(v, 4) for k, v in e.items()} for e in epochs],
    }


def _merge_workers(per_worker: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per-epoch totals over workers: all images, the slowest worker's time, the mean blocked share."""
    merged = []
    for epoch in zip(*per_worker, strict=True):
        seconds = max(e["seconds"] for e in epoch)
        merged.append({
            "images": sum(e["images"] for e in epoch),
            "seconds": seconds,
            "wait_s": seconds * sum(e["wait_s"] / e["seconds"] for e in epoch) / len(epoch),
            "first_batch_s": max(e["first_batch_s"] for e in epoch),
        })
    return merged


def run_loader(dataset: Any, args: argparse.Namespace, collate: Callable | None = None,
               prepare: Callable[[dict[str, Any]], dict[str, Any]] = lambda b: b) -> dict[str, Any]:
    """A `DataLoader` side (no Ray running): `--loader-workers` processes, persistent, shuffled; both phases."""
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    torch.set_num_threads(1)  # as a Train worker with cpus_per_worker=1 runs
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.loader_workers,
                        persistent_workers=True, collate_fn=collate)
    out: dict[str, Any] = {}
    for phase, epochs in (("input", args.input_epochs), ("train", args.train_epochs)):
        if epochs <= 0:
            continue
        step = paced_step(args.consumer_ms_per_image) if phase == "train" else None
        runs = [run_epoch(loader, step, prepare) for _ in range(epochs + PHASE_WARM_UP_EPOCHS[phase])]
        for epoch, e in enumerate(runs):
            logger.info("%s %s epoch %d: %.1f img/s, stall %.1f%%", type(dataset).__name__, phase, epoch,
                        e["images"] / e["seconds"], 100 * e["wait_s"] / e["seconds"])
        out[phase] = summarize(runs, warmup=PHASE_WARM_UP_EPOCHS[phase])
    return out


# ---------------------------------------------------------------------------------------------------- baseline
class ParquetImages:
    """Map-style torch dataset over the ingested Parquet rows: per item, decode and resize (`load_pixels`).

    Image bytes stay in one Arrow array (no per-row Python objects), so forked workers share them cheaply.
    """

    def __init__(self, split_dir: str, image_size: int):
        import pyarrow.parquet as pq

        from mura_ray.data.pipeline import TRAIN_COLUMNS, body_part_indices, label_values

        table = pq.read_table(split_dir, columns=list(TRAIN_COLUMNS)).combine_chunks()
        self.images = table.column("image").chunk(0)
        self.labels = label_values(table.column("label").to_pylist())
        self.body_parts = body_part_indices(table.column("body_part").to_pylist())
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from mura_ray.data.images import DecodeError, load_pixels

        try:
            pixels, ok = load_pixels(self.images[i].as_py(), self.image_size), 1.0
        except DecodeError:
            pixels, ok = torch.zeros(self.image_size, self.image_size, dtype=torch.uint8).numpy(), 0.0
        return {"image": torch.tensor(pixels)[None], "label": float(self.labels[i]),
                "body_part": int(self.body_parts[i]), "ok": ok}


def augment_in_worker(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The baseline's `collate_fn`, run in its worker processes: stack a batch and augment it there, on CPU, with
    the same augmentation as training (`model_input`), a generator per worker process."""
    import torch
    from torch.utils.data import default_collate, get_worker_info

    from mura_ray.data.augment import model_input

    batch = default_collate(items)
    global _WORKER_GENERATOR
    if _WORKER_GENERATOR is None:
        info = get_worker_info()
        _WORKER_GENERATOR = torch.Generator().manual_seed((info.seed if info else 0) % 2**32)
    return {**batch, "image": model_input(batch["image"], *NORMALIZATION, _WORKER_GENERATOR)}


_WORKER_GENERATOR = None


# ---------------------------------------------------------------------------------------------------- same input
class CachedImages:
    """Map-style torch dataset over the training-ready cache's rows (the files its marker lists): per item, the
    stored pixels. The pixels stay in one Arrow array, shared by forked workers."""

    def __init__(self, folder: str, image_size: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from mura_ray.data.cache import cache_files, read_marker
        from mura_ray.data.pipeline import body_part_indices, label_values

        marker = read_marker(folder)
        assert marker is not None, folder
        table = pa.concat_tables([pq.read_table(f, columns=["pixels", "ok", "label", "body_part"])
                                  for f in cache_files(folder, marker)]).combine_chunks()
        self.table = table
        self.labels = label_values(table.column("label").to_pylist())
        self.body_parts = body_part_indices(table.column("body_part").to_pylist())
        self.ok = table.column("ok").to_numpy(zero_copy_only=False).astype("float32")
        self.image_size = image_size

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from mura_ray.data.cache import cached_pixels

        pixels = cached_pixels(self.table.slice(i, 1), self.image_size)[0]
        return {"image": torch.from_numpy(pixels.copy()), "label": float(self.labels[i]),
                "body_part": int(self.body_parts[i]), "ok": float(self.ok[i])}


def augment_in_loop() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """What the training loop does to each batch it receives (ours and same_input): augment on its device."""
    from mura_ray.data.augment import augment_generator, prepare_batch

    generator = augment_generator(0, 0, 0)
    return lambda batch: prepare_batch(batch, *NORMALIZATION, generator)


# ---------------------------------------------------------------------------------------------------- cache build
def _plain_decode_resize_write(source: str, dest: str, image_size: int) -> int:
    import numpy as np
    import pyarrow.parquet as pq

    from mura_ray.data.images import DecodeError, load_pixels

    images = pq.read_table(source, columns=["image"]).column("image").to_pylist()
    out = np.zeros((len(images), image_size, image_size), dtype=np.uint8)
    for i, data in enumerate(images):
        try:
            out[i] = load_pixels(data, image_size)
        except DecodeError:
            pass
    np.save(dest, out)
    return len(images)


def run_plain_build(data: str, image_size: int, processes: int) -> dict[str, Any]:
    """The reference for the cache build: a `multiprocessing` pool (one process per core) decoding, resizing and
    writing each Parquet file of the train split to a .npy file."""
    import multiprocessing

    from mura_ray.data.pipeline import split_files

    files = split_files(data, "train")
    with tempfile.TemporaryDirectory(prefix="bench-plain-") as out:
        started = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            rows = sum(pool.starmap(_plain_decode_resize_write,
                                    [(f, os.path.join(out, f"{i}.npy"), image_size) for i, f in enumerate(files)]))
        seconds = time.perf_counter() - started
    return {"images": rows, "seconds": round(seconds, 3), "images_per_s": rows / seconds}


def build_cache(data: str, image_size: int, where: str) -> dict[str, Any]:
    """The train split's cache, built as training builds it on first use (`ensure_cache`), timed."""
    import pyarrow.fs as pafs

    from mura_ray import storage
    from mura_ray.data.cache import ensure_cache
    from mura_ray.data.ingest import read_summary

    started = time.perf_counter()
    built = ensure_cache(data, read_summary(data), image_size, where, splits=("train",))["train"]
    seconds = time.perf_counter() - started
    fs, path = storage.resolve(built["folder"])
    size = sum(i.size for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name.endswith(".parquet"))
    rows = built["marker"]["rows"]
    return {"folder": built["folder"], "images": rows, "seconds": round(seconds, 3), "images_per_s": rows / seconds,
            "bytes_per_image": size / max(rows, 1), "n_errors": built["marker"]["n_errors"]}


def measure_per_core(data: str, cache_folder: str, image_size: int, n: int = 256) -> dict[str, float]:
    """Images/s of one core (one torch thread, no Ray): decode + resize + augment of the ingested PNGs (a decoding
    input's per-image work), the augmentation alone (batches of 32), and reading the cache's files into tensors
    (the cached input's CPU work): what docs/scaling.md works out decode cores per GPU from."""
    import pyarrow.parquet as pq
    import torch

    from mura_ray.data.augment import augment_generator, model_input
    from mura_ray.data.cache import cache_files, cached_pixels, read_marker
    from mura_ray.data.images import load_pixels
    from mura_ray.data.pipeline import split_files

    torch.set_num_threads(1)
    images = []
    for f in split_files(data, "train"):
        images += pq.read_table(f, columns=["image"]).column("image").to_pylist()
        if len(images) >= n:
            break
    images = images[:n]
    generator = augment_generator(0, 0, 0)
    started = time.perf_counter()
    pixels = [torch.from_numpy(load_pixels(b, image_size))[None, None] for b in images]
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, len(pixels), 32):
        model_input(torch.cat(pixels[i : i + 32]), *NORMALIZATION, generator)
    augment_s = time.perf_counter() - started
    marker = read_marker(cache_folder)
    assert marker is not None
    started, rows = time.perf_counter(), 0
    for f in cache_files(cache_folder, marker):
        table = pq.read_table(f, columns=["pixels", "ok", "label", "body_part", "study_id"])
        rows += len(torch.from_numpy(cached_pixels(table, image_size).copy()))
    read_s = time.perf_counter() - started
    return {"decode_resize_images_per_s": round(len(images) / decode_s, 1),
            "augment_images_per_s": round(len(images) / augment_s, 1),
            "decode_resize_augment_images_per_s": round(len(images) / (decode_s + augment_s), 1),
            "cache_read_images_per_s": round(rows / read_s, 1)}


# ---------------------------------------------------------------------------------------------------- ours
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the phases on this worker's shard, as `mura_ray.train` reads it; rank 0 reports all."""
    import ray.train
    import ray.train.torch
    import torch

    from mura_ray.config import TrainConfig
    from mura_ray.data.augment import augment_generator, prepare_batch
    from mura_ray.data.pipeline import EpochStream, derived_seed, training_batches
    from mura_ray.models import build_model
    from mura_ray.train import setup_training

    torch.manual_seed(0)
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    batch_size = config["batch_size"]
    results: dict[str, list[dict[str, float]]] = {}
    setup_s = None
    rows = config["rows_per_worker"]

    def batches():  # as mura_ray.train reads its shard
        return training_batches(shard, batch_size=batch_size, rows_per_epoch=rows, seed=derived_seed(0, rank),
                                device=device)

    for phase, epochs in (("input", config["input_epochs"]), ("train", config["train_epochs"])):
        if epochs <= 0:
            continue
        # As training runs it: one execution for the phase's epochs, cut from it at exact rows and shuffled per
        # epoch (shuffle_epochs), handed over by EpochStream; each phase starts the dataset's execution anew, so the
        # paced phase's first epoch includes the start-up.
        n_epochs = epochs + PHASE_WARM_UP_EPOCHS[phase]
        stream = EpochStream(batches, n_epochs, rows, depth=config["epoch_prefetch"])
        step = None
        if phase == "train":
            # The paced phase starts as a training run does: the stream is made, then the model is set up (the
            # default backbone, as mura_ray.train builds and prepares it) while the input starts.
            setup_started = time.perf_counter()
            cfg = TrainConfig(image_size=config["image_size"])
            setup_training(build_model(cfg.backbone, image_size=cfg.image_size), cfg, None,
                           ray.train.torch.prepare_model, device)
            setup_s = time.perf_counter() - setup_started
            step = paced_step(config["consumer_ms_per_image"])
        runs = []
        for epoch in range(n_epochs):
            generator = augment_generator(0, epoch, rank)
            runs.append(run_epoch(stream.epoch(), step, lambda b, g=generator: prepare_batch(b, *NORMALIZATION, g)))
        results[phase] = runs
        stream.close()
    everyone = [results]
    if ctx.get_world_size() > 1:
        import torch.distributed as dist

        everyone = [None] * ctx.get_world_size()
        dist.all_gather_object(everyone, results)
    metrics = {"results": json.dumps(everyone), "setup_s": setup_s}
    # Ray Train V2 keeps only metrics that come with a checkpoint, so rank 0 attaches an (empty) one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if ctx.get_world_rank() == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


def phase_epochs(args: argparse.Namespace) -> int:
    """Epochs of the longer phase, warm-up included: the passes the dataset holds."""
    return max(args.input_epochs + PHASE_WARM_UP_EPOCHS["input"], args.train_epochs + PHASE_WARM_UP_EPOCHS["train"])


def run_ours(data: str, args: argparse.Namespace, cache_folder: str) -> dict[str, Any]:
    """The Ray side: one TorchTrainer run (`--workers` workers, 1 CPU each) over `build_input(cache=...)`, with
    the dataset configuration training uses (`training_data_config`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mura_ray.data import pipeline

    rows_per_worker = pipeline.split_rows(data, "train") // args.workers  # as mura_ray.train cuts its epochs
    # One pass more than the longer phase's epochs: its last epoch is then not the end of the stream, which would
    # only drain what was read ahead of it (in training, the run's last epoch of many).
    dataset = pipeline.build_input(data, "train", image_size=args.image_size, train=True, cache=cache_folder,
                                   batch_size=args.batch_size, passes=phase_epochs(args) + 1)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as storage:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"batch_size": args.batch_size, "input_epochs": args.input_epochs,
                               "train_epochs": args.train_epochs, "epoch_prefetch": args.epoch_prefetch,
                               "consumer_ms_per_image": args.consumer_ms_per_image,
                               "rows_per_worker": rows_per_worker, "image_size": args.image_size},
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=False,
                                                   resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="input_pipeline", storage_path=storage,
                                           logging_config=ray.train.LoggingConfig(log_level="WARNING")),
            datasets={"train": dataset},
            dataset_config=pipeline.training_data_config(args.workers),
        )
        result = trainer.fit()
    per_worker = json.loads(result.metrics["results"])
    out: dict[str, Any] = {"rows_per_worker": rows_per_worker, "setup_s": result.metrics["setup_s"]}
    for phase in per_worker[0]:
        merged = _merge_workers([w[phase] for w in per_worker])
        for epoch, e in enumerate(merged):
            logger.info("ours %s epoch %d: %.1f img/s, stall %.1f%%", phase, epoch, e["images"] / e["seconds"],
                        100 * e["wait_s"] / e["seconds"])
        out[phase] = summarize(merged, warmup=PHASE_WARM_UP_EPOCHS[phase])
        out[phase]["per_worker_images_per_s"] = [
            median([e["images"] / e["seconds"] for e in w[phase][PHASE_WARM_UP_EPOCHS[phase]:] or w[phase]])
            for w in per_worker
        ]
    return out


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    n_cores = cores()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p, default_source_size=512)
    p.add_argument("--image-size", type=int, default=224, help="training input side in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="images per training batch")
    p.add_argument("--input-epochs", type=int, default=4,
                   help="measured delivery-only epochs (after a warm-up epoch); a few, as one stream's epochs vary")
    p.add_argument("--train-epochs", type=int, default=2, help="measured epochs feeding the paced consumer")
    p.add_argument("--consumer-ms-per-image", type=float, default=1.0,
                   help="the paced consumer's time per image (1 ms: one GPU training EfficientNet-B0 at 224 px)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (1 CPU each)")
    p.add_argument("--loader-workers", type=int, default=n_cores, help="DataLoader worker processes (cores)")
    p.add_argument("--ray-cpus", type=int, default=max(4, n_cores + 2), help="logical CPUs of the local Ray")
    p.add_argument("--epoch-prefetch", type=int, default=8,
                   help="batches training's EpochStream pulls ahead (its default)")
    p.add_argument("--skip-baseline", action="store_true", help="measure only the Ray side (and the cache build)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.epoch_prefetch < 1:
        raise SystemExit(f"error: --epoch-prefetch must be at least 1, got {args.epoch_prefetch}")
    setup_logging()
    started, load_start = time.perf_counter(), load_1m()
    data = synthetic_dataset(cache_dir(args.cache), args.images, args.source_size)
    baseline = ({} if args.skip_baseline else
                run_loader(ParquetImages(os.path.join(data, "train"), args.image_size), args, augment_in_worker))
    plain = run_plain_build(data, args.image_size, cores())
    logger.info("plain decode-resize-write: %.1f img/s", plain["images_per_s"])
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as where:
        with local_ray(args.ray_cpus):
            build = build_cache(data, args.image_size, where)
            logger.info("cache build: %.1f img/s, %.0f bytes/image", build["images_per_s"], build["bytes_per_image"])
            ours = run_ours(data, args, build["folder"])
        same = ({} if args.skip_baseline else
                run_loader(CachedImages(build["folder"], args.image_size), args,
                           prepare=augment_in_loop()))
        per_core = measure_per_core(data, build["folder"], args.image_size)
        logger.info("one core: %s", per_core)

    def pick(side: dict[str, Any], phase: str, key: str) -> float | None:
        return round(side[phase][key], 4) if phase in side else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    ours_ips, base_ips = pick(ours, "input", "images_per_s"), pick(baseline, "input", "images_per_s")
    same_ips = pick(same, "input", "images_per_s")
    emit({
        "name": "input_pipeline",
        "ours_images_per_s": ours_ips,
        "baseline_images_per_s": base_ips,
        "ratio": ratio(ours_ips, base_ips),
        "same_input_images_per_s": same_ips,
        "ratio_same_input": ratio(ours_ips, same_ips),
        "stall_share": pick(ours, "train", "stall_share"),
        "consumer_images_per_s": round(1000 / args.consumer_ms_per_image, 1),
        "source_px": args.source_size,
        "image_size": args.image_size,
        "ratio_median": ratio(pick(ours, "input", "images_per_s_median"),
                              pick(baseline, "input", "images_per_s_median")),
        "baseline_stall_share": pick(baseline, "train", "stall_share"),
        "same_input_stall_share": pick(same, "train", "stall_share"),
        "ours_first_batch_s": pick(ours, "input", "first_batch_s"),
        "ours_setup_s": round(ours["setup_s"], 3) if ours.get("setup_s") is not None else None,
        "baseline_first_batch_s": pick(baseline, "input", "first_batch_s"),
        "cache_build_images_per_s": round(build["images_per_s"], 1),
        "plain_build_images_per_s": round(plain["images_per_s"], 1),
        "cache_build_ratio": ratio(build["images_per_s"], plain["images_per_s"]),
        "cache_build_s": build["seconds"],
        "cache_bytes_per_image": round(build["bytes_per_image"]),
        "cache_errors": build["n_errors"],
        "per_core": per_core,
        "statistic": "over the measured epochs together (input: warm-up epoch excluded)",
        "repeats": {"input": args.input_epochs, "train": args.train_epochs},
        "images_per_epoch": ours["input"]["images_per_epoch"] if "input" in ours else None,
        "batch_size": args.batch_size, "workers": args.workers, "loader_workers": args.loader_workers,
        "epoch_prefetch": args.epoch_prefetch,
        "cores": cores(), "ray_cpus": args.ray_cpus, "load_1m_start": load_start, "load_1m_end": load_1m(),
        "seconds": round(time.perf_counter() - started, 1),
        "ours": ours, "baseline": baseline, "same_input": same,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
