"""Training-input benchmark: images/s that Ray Data delivers to a Train worker against a plain PyTorch DataLoader,
and the share of a training epoch the loop spends waiting for data with a small backbone.

Both sides read the same ingested Parquet split and do the same per-image work (`preprocess_images`: decode,
resize, augment) on the same cores. Ours is a real `TorchTrainer` fed by `build_input` and consumed with
`iter_torch_batches`, as `mura_ray.train` does: each phase's epochs cut from one Ray Data execution by its
`EpochStream`. The baseline is a `DataLoader` with one worker process per core, run before Ray starts. Each side runs
two phases of epochs: `input` only pulls batches (delivery capacity; its first epoch is a warm-up left out), `train`
takes an AdamW step of the backbone on every batch (stall share = time blocked on the iterator / epoch time; the
model's first steps are taken on a random batch before the measured epochs). Images/s and stall share are over the
measured epochs together (medians alongside). Prints one JSON line.

    .venv/bin/python benchmarks/input_pipeline.py
    .venv/bin/python benchmarks/input_pipeline.py --workers 2 --train-epochs 0     # delivery on 2 Train workers
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
def make_step(backbone: str, wrap: Callable[[Any], Any] = lambda m: m) -> Step:
    """One training step of `backbone` per batch, as `mura_ray.train` takes it (multi-task loss, AdamW)."""
    import torch

    from mura_ray.losses import multitask_loss
    from mura_ray.models import build_model

    model = wrap(build_model(backbone))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch: dict[str, Any]) -> None:
        out = model(batch["image"], batch["body_part"])
        keep = (batch["ok"] > 0) & (batch["label"] >= 0)
        loss, _ = multitask_loss({k: v[keep] for k, v in out.items()}, batch["label"][keep],
                                 batch["body_part"][keep], kind="bce", pos_weight=None, gamma=2.0,
                                 body_part_weight=0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


WARM_UP_STEPS = 5
"""Steps on a random batch before a train phase's measured epochs: the first steps' one-time costs (allocations,
kernel selection) stay out of the epochs, which only the input's warm-up epoch would otherwise have absorbed."""

PHASE_WARM_UP_EPOCHS = {"input": 1, "train": 0}
"""Epochs run before the measured ones, per phase: the input phase's first epoch starts the pipeline (Ray's first
execution, the DataLoader's worker processes); the train phase runs on that warm pipeline."""


def warm_up(step: Step, batch_size: int, image_size: int, device: Any = "cpu") -> None:
    """WARM_UP_STEPS steps of `step` on a random batch of the input's shape, on `device`."""
    import torch

    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(batch_size, 1, image_size, image_size, generator=generator),
        "label": torch.randint(0, 2, (batch_size,), generator=generator).float(),
        "body_part": torch.randint(0, 7, (batch_size,), generator=generator),
        "ok": torch.ones(batch_size),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    for _ in range(WARM_UP_STEPS):
        step(batch)


def run_epoch(batches: Iterable[dict[str, Any]], step: Step | None) -> dict[str, float]:
    """Pull every batch (and step on it): images, seconds, seconds blocked on the iterator, first-batch latency."""
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
        images += len(batch["image"])
        if step is not None:
            step(batch)
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": seconds, "wait_s": wait, "first_batch_s": first or 0.0}


def summarize(epochs: list[dict[str, float]], warmup: int) -> dict[str, Any]:
    """The measured epochs (the first `warmup` left out), taken together: images/s and stall share over their
    summed time. One stream runs through the epochs, so an epoch can start on input decoded during the one before
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


# ---------------------------------------------------------------------------------------------------- baseline
class ParquetImages:
    """Map-style torch dataset over the same Parquet rows; per item the same `preprocess_images` work as ours.

    Image bytes stay in one Arrow array (no per-row Python objects), so forked workers share them cheaply.
    """

    def __init__(self, split_dir: str, *, image_size: int, mean: float, std: float):
        import pyarrow.parquet as pq

        from mura_ray.data.pipeline import TRAIN_COLUMNS, body_part_indices, label_values

        table = pq.read_table(split_dir, columns=list(TRAIN_COLUMNS)).combine_chunks()
        self.images = table.column("image").chunk(0)
        self.labels = label_values(table.column("label").to_pylist())
        self.body_parts = body_part_indices(table.column("body_part").to_pylist())
        self.kwargs = {"image_size": image_size, "mean": mean, "std": std, "train": True}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from mura_ray.data.pipeline import preprocess_images

        image, ok = preprocess_images([self.images[i].as_py()], **self.kwargs)
        return {"image": torch.from_numpy(image[0]), "label": float(self.labels[i]),
                "body_part": int(self.body_parts[i]), "ok": float(ok[0])}


def run_baseline(data: str, args: argparse.Namespace, mean: float, std: float) -> dict[str, Any]:
    """The DataLoader side (no Ray running): `num_workers` = cores, persistent workers, shuffled."""
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    torch.set_num_threads(1)  # as a Train worker with cpus_per_worker=1 runs
    dataset = ParquetImages(os.path.join(data, "train"), image_size=args.image_size, mean=mean, std=std)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.loader_workers,
                        persistent_workers=True)
    out: dict[str, Any] = {}
    for phase, epochs in (("input", args.input_epochs), ("train", args.train_epochs)):
        if epochs <= 0:
            continue
        step = make_step(args.backbone) if phase == "train" else None
        if step is not None:
            warm_up(step, args.batch_size, args.image_size)
        runs = []
        for epoch in range(epochs + PHASE_WARM_UP_EPOCHS[phase]):
            runs.append(run_epoch(loader, step))
            logger.info("baseline %s epoch %d: %.1f img/s, stall %.1f%%", phase, epoch,
                        runs[-1]["images"] / runs[-1]["seconds"], 100 * runs[-1]["wait_s"] / runs[-1]["seconds"])
        out[phase] = summarize(runs, warmup=PHASE_WARM_UP_EPOCHS[phase])
    return out


# ---------------------------------------------------------------------------------------------------- ours
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the same phases as the baseline on this worker's shard; rank 0 reports every worker's."""
    import ray.train
    import ray.train.torch
    import torch

    from mura_ray.data.pipeline import EpochStream

    torch.manual_seed(0)
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    batch_size = config["batch_size"]
    results: dict[str, list[dict[str, float]]] = {}
    for phase, epochs in (("input", config["input_epochs"]), ("train", config["train_epochs"])):
        if epochs <= 0:
            continue

        def batches():
            # The arguments of mura_ray.data.pipeline.iter_batches (training's iterator), with prefetch as a knob.
            return shard.iter_torch_batches(
                batch_size=batch_size,
                dtypes={"image": torch.float32, "label": torch.float32, "body_part": torch.int64,
                        "ok": torch.float32, "study": torch.int64},
                device=device,
                prefetch_batches=config["prefetch_batches"],
                local_shuffle_buffer_size=batch_size * 8,
            )

        # As training runs it: one execution for the phase's epochs, cut from it by rows (EpochStream), started
        # before the model is built (each phase starts the dataset's execution anew, so the train phase's first
        # epoch includes the start-up, overlapped with the model's set-up as in mura_ray.train).
        n_epochs = epochs + PHASE_WARM_UP_EPOCHS[phase]
        stream = EpochStream(batches, n_epochs, config["rows_per_worker"], depth=config["epoch_prefetch"])
        step = make_step(config["backbone"], ray.train.torch.prepare_model) if phase == "train" else None
        if step is not None:
            warm_up(step, batch_size, config["image_size"], device)
        results[phase] = [run_epoch(stream.epoch(), step) for _ in range(n_epochs)]
        stream.close()
    everyone = [results]
    if ctx.get_world_size() > 1:
        import torch.distributed as dist

        everyone = [None] * ctx.get_world_size()
        dist.all_gather_object(everyone, results)
    metrics = {"results": json.dumps(everyone)}
    # Ray Train V2 keeps only metrics that come with a checkpoint, so rank 0 attaches an (empty) one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if ctx.get_world_rank() == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


def build_dataset(data: str, args: argparse.Namespace, mean: float, std: float):
    """The training input: `build_input` as training builds it (a pass over the split for each epoch), or a what-if
    (smaller read blocks)."""
    from mura_ray.data import pipeline

    # One pass more than the longer phase's epochs: its last epoch is then not the end of the stream, which would
    # only drain what was decoded ahead of it (in training, the run's last epoch of many).
    passes = phase_epochs(args) + 1
    if not args.rows_per_block:
        return pipeline.build_input(data, "train", image_size=args.image_size, mean=mean, std=std, train=True,
                                    num_cpus=args.decode_cpus, batch_size=args.map_batch_size, passes=passes)
    # What-if: cut the read blocks before the decode,
    # so a one-file split is decoded by many tasks and its first batch does not wait for the whole file.
    files = pipeline.pass_order(pipeline.split_files(data, "train"), passes, seed=0)
    ds = pipeline.read_split(data, "train", pipeline.TRAIN_COLUMNS, files=files)
    ds = ds.repartition(target_num_rows_per_block=args.rows_per_block)
    return ds.map_batches(
        pipeline.preprocess_batch, batch_format="numpy", batch_size=args.map_batch_size, num_cpus=args.decode_cpus,
        fn_kwargs={"image_size": args.image_size, "mean": mean, "std": std, "train": True},
    )


def phase_epochs(args: argparse.Namespace) -> int:
    """Epochs of the longer phase, warm-up included: the passes the dataset holds."""
    return max(args.input_epochs + PHASE_WARM_UP_EPOCHS["input"], args.train_epochs + PHASE_WARM_UP_EPOCHS["train"])


def run_ours(data: str, args: argparse.Namespace, mean: float, std: float) -> dict[str, Any]:
    """The Ray side: one TorchTrainer run (`--workers` workers, 1 CPU each) over `build_input`'s dataset."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mura_ray.data.pipeline import split_rows

    rows_per_worker = split_rows(data, "train") // args.workers  # as mura_ray.train cuts its epochs
    with local_ray(args.ray_cpus), tempfile.TemporaryDirectory(prefix="bench-train-") as storage:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"batch_size": args.batch_size, "input_epochs": args.input_epochs,
                               "train_epochs": args.train_epochs, "backbone": args.backbone,
                               "prefetch_batches": args.prefetch_batches, "image_size": args.image_size,
                               "epoch_prefetch": args.epoch_prefetch, "rows_per_worker": rows_per_worker},
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=False,
                                                   resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="input_pipeline", storage_path=storage,
                                           logging_config=ray.train.LoggingConfig(log_level="WARNING")),
            datasets={"train": build_dataset(data, args, mean, std)},
        )
        result = trainer.fit()
    per_worker = json.loads(result.metrics["results"])
    out: dict[str, Any] = {"rows_per_worker": rows_per_worker}
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
    add_dataset_args(p)
    p.add_argument("--image-size", type=int, default=128, help="training input side in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="images per training batch")
    p.add_argument("--input-epochs", type=int, default=6,
                   help="measured delivery-only epochs (after a warm-up epoch); a few, as one stream's epochs vary")
    p.add_argument("--train-epochs", type=int, default=2,
                   help="measured epochs with a training step (after warm-up steps on a random batch)")
    p.add_argument("--backbone", default="mobilenetv2_035",
                   help="model stepped in the train phase (custom_cnn at 128 px costs ~120 ms/image on one core)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (1 CPU each)")
    p.add_argument("--loader-workers", type=int, default=n_cores, help="DataLoader worker processes (cores)")
    p.add_argument("--ray-cpus", type=int, default=max(4, n_cores + 2), help="logical CPUs of the local Ray")
    p.add_argument("--decode-cpus", type=float, default=1.0,
                   help="num_cpus per decode task (default 1, build_input's as training runs it)")
    p.add_argument("--map-batch-size", type=int, default=32, help="rows per decode batch (build_input's)")
    p.add_argument("--prefetch-batches", type=int, default=4, help="iter_torch_batches prefetch (training's)")
    p.add_argument("--epoch-prefetch", type=int, default=8,
                   help="batches training's EpochStream pulls ahead (its default)")
    p.add_argument("--rows-per-block", type=int, default=0,
                   help="what-if: split read blocks to this many rows before decoding; 0 = build_input as is")
    p.add_argument("--skip-baseline", action="store_true", help="measure only the Ray side")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.epoch_prefetch < 1:
        raise SystemExit(f"error: --epoch-prefetch must be at least 1, got {args.epoch_prefetch}")
    setup_logging()
    from mura_ray.models import build_model, trunk_normalization

    started, load_start = time.perf_counter(), load_1m()
    mean, std = trunk_normalization(build_model(args.backbone).trunk)
    data = synthetic_dataset(cache_dir(args.cache), args.images, args.source_size)
    baseline = {} if args.skip_baseline else run_baseline(data, args, mean, std)
    ours = run_ours(data, args, mean, std)

    def pick(side: dict[str, Any], phase: str, key: str) -> float | None:
        return round(side[phase][key], 4) if phase in side else None

    ours_ips, base_ips = pick(ours, "input", "images_per_s"), pick(baseline, "input", "images_per_s")
    emit({
        "name": "input_pipeline",
        "ours_images_per_s": ours_ips,
        "baseline_images_per_s": base_ips,
        "ratio": round(ours_ips / base_ips, 3) if ours_ips and base_ips else None,
        "ratio_median": (round(ours["input"]["images_per_s_median"] / baseline["input"]["images_per_s_median"], 3)
                         if ours_ips and base_ips else None),
        "stall_share": pick(ours, "train", "stall_share"),
        "baseline_stall_share": pick(baseline, "train", "stall_share"),
        "ours_train_images_per_s": pick(ours, "train", "images_per_s"),
        "baseline_train_images_per_s": pick(baseline, "train", "images_per_s"),
        "ours_first_batch_s": pick(ours, "input", "first_batch_s"),
        "baseline_first_batch_s": pick(baseline, "input", "first_batch_s"),
        "statistic": "over the measured epochs together (input: warm-up epoch excluded; train: after warm-up steps)",
        "repeats": {"input": args.input_epochs, "train": args.train_epochs},
        "images_per_epoch": ours["input"]["images_per_epoch"] if "input" in ours else None,
        "image_size": args.image_size, "source_size": args.source_size, "batch_size": args.batch_size,
        "backbone": args.backbone, "workers": args.workers, "loader_workers": args.loader_workers,
        "decode_cpus": args.decode_cpus, "map_batch_size": args.map_batch_size,
        "prefetch_batches": args.prefetch_batches, "epoch_prefetch": args.epoch_prefetch,
        "rows_per_block": args.rows_per_block,
        "cores": cores(), "ray_cpus": args.ray_cpus, "load_1m_start": load_start, "load_1m_end": load_1m(),
        "seconds": round(time.perf_counter() - started, 1),
        "ours": ours, "baseline": baseline,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
