"""GPU checks of the training and scoring code, as one short script: torch only, no Ray.

The project's GPU machines have no Ray (its wheel is larger than what can be carried there), so the jobs' GPU paths
are checked piece by piece, with the code the jobs run on synthetic tensors, each comparison in the same run:

- training: `mura_ray.train.train_step` on the report's backbones at 224 px, float32 against mixed precision
  (`amp_dtype`: bfloat16 on Ampere and later, float16 with a GradScaler before), and with channels-last weights;
  images/s, peak memory, and the first step's loss under both precisions from the same weights;
- scoring: `mura_ray.score.Predictor` on pre-decoded images (what the job's GPU actors receive from its decode
  tasks), float32 against autocast: images/s and how far the probabilities move;
- decoding on one CPU core (`decode_for_scoring` for scoring, `preprocess_images` for training without a cache)
  on MURA-sized PNGs, hence how many CPU cores feed one GPU at the rates measured above;
- resume: checkpointed state loaded the way the Train worker loads it (`setup_training`), then a step on the GPU;
- NCCL: an all-reduce across the visible GPUs (one process each), its sum checked, its bus bandwidth (one GPU: the
  backend initialises, no traffic between GPUs).

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR       # on a GPU machine, a minute or two
    python benchmarks/gpu_check.py --device cpu --backbones custom_cnn --image-size 32 --batch-size 4 \\
        --warmup 1 --steps 2 --decode-images 4 --source-size 64 --out DIR      # the smoke test (gloo, no AMP)

Writes DIR/gpu_check.json and DIR/gpu_check.md (the tables for docs/benchmarks.md), prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import pathlib
import socket
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runs without installing the project

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("gpu_check")

REPORT_BACKBONES = ("custom_cnn", "resnet50", "densenet169", "efficientnet_b0")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def environment(device: torch.device) -> dict[str, Any]:
    from mura_ray.models import amp_dtype

    env: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "cpu_cores": len(os.sched_getaffinity(0))}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu": props.name, "gpus": torch.cuda.device_count(), "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "amp_dtype": str(amp_dtype()).removeprefix("torch."),
        })
    return env


def _amp(device: torch.device) -> torch.dtype:
    """The jobs' choice on a GPU; bfloat16 autocast on CPU (the smoke test's stand-in)."""
    from mura_ray.models import amp_dtype

    return amp_dtype() if device.type == "cuda" else torch.bfloat16


def _train_batch(batch_size: int, image_size: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(batch_size, 1, image_size, image_size, generator=g).to(device),
        "label": torch.randint(0, 2, (batch_size,), generator=g).float().to(device),  # as iter_torch_batches gives
        "body_part": torch.randint(0, 7, (batch_size,), generator=g).to(device),
        "ok": torch.ones(batch_size).to(device),
    }


def check_training(backbone: str, device: torch.device, image_size: int, batch_size: int, warmup: int,
                   steps: int) -> dict[str, Any]:
    """`train_step` images/s in float32, AMP and AMP with channels-last weights, from the same initial weights."""
    from mura_ray.models import build_model
    from mura_ray.train import train_step

    torch.manual_seed(0)
    base = build_model(backbone, image_size=image_size)
    batch = _train_batch(batch_size, image_size, device, seed=1)
    loss_kwargs = {"kind": "bce", "pos_weight": None, "gamma": 2.0, "body_part_weight": 0.5}
    modes: dict[str, tuple[torch.dtype | None, bool]] = {"float32": (None, False), "amp": (_amp(device), False)}
    if device.type == "cuda":
        modes["amp_channels_last"] = (_amp(device), True)
    out: dict[str, Any] = {}
    for name, (dtype, channels_last) in modes.items():
        model = copy.deepcopy(base).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        torch.manual_seed(1)  # the same dropout masks in every mode: the first losses differ by precision alone
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                started = time.perf_counter()
            losses.append(train_step(model, batch, optimizer, scaler, device, dtype, loss_kwargs)[2])
        _sync(device)
        elapsed = time.perf_counter() - started
        out[name] = {
            "images_per_s": round(steps * batch_size / elapsed, 1), "first_loss": round(losses[0], 5),
            "losses_finite": all(math.isfinite(v) for v in losses), "peak_memory_gib": _peak_gib(device),
        }
        logger.info("train %s %s: %.1f img/s", backbone, name, out[name]["images_per_s"])
    out["amp_speedup"] = round(out["amp"]["images_per_s"] / out["float32"]["images_per_s"], 2)
    out["first_loss_relative_difference"] = round(
        abs(out["amp"]["first_loss"] - out["float32"]["first_loss"]) / max(abs(out["float32"]["first_loss"]), 1e-9), 5)
    return out


def check_resume(device: torch.device) -> dict[str, Any]:
    """A resume as the Train worker does it: checkpointed state (saved from the CPU) loaded by `setup_training`
    after the model moved to the device, then a step, which fails when the optimizer's moments stayed behind."""
    from mura_ray.config import TrainConfig
    from mura_ray.models import build_model
    from mura_ray.train import setup_training, train_step

    cfg = TrainConfig(backbone="custom_cnn", image_size=64, epochs=3)
    loss_kwargs = {"kind": "bce", "pos_weight": None, "gamma": 2.0, "body_part_weight": 0.5}
    cpu = torch.device("cpu")
    first = setup_training(build_model("custom_cnn", image_size=64), cfg, None, lambda m: m, cpu)
    train_step(first.model, _train_batch(8, 64, cpu, seed=4), first.optimizer, first.scaler, cpu, None, loss_kwargs)
    state = {"model": first.raw_model.state_dict(), "optimizer": first.optimizer.state_dict(),
             "scaler": first.scaler.state_dict(), "epoch": 0, "best_val_loss": 1.0, "bad_epochs": 0}
    run = setup_training(build_model("custom_cnn", image_size=64), cfg, state, lambda m: m.to(device), device)
    devices = sorted({str(s["exp_avg"].device) for s in run.optimizer.state.values()})
    loss = train_step(run.model, _train_batch(8, 64, device, seed=5), run.optimizer, run.scaler, device, run.amp,
                      loss_kwargs)[2]
    return {"optimizer_state_devices": devices, "step_after_resume_loss": round(loss, 5),
            "ok": devices == [str(next(run.raw_model.parameters()).device)] and math.isfinite(loss)}


def _pixel_batch(batch_size: int, image_size: int, seed: int) -> pd.DataFrame:
    """Rows as the scoring job's decode tasks hand them to its actors."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "image_id": [f"img{i}" for i in range(batch_size)], "path": [f"img{i}.png" for i in range(batch_size)],
        "study_id": [None] * batch_size, "body_part": [None] * batch_size, "label": [None] * batch_size,
        "error": [None] * batch_size,
        f"pixels_{image_size}": list(rng.integers(0, 256, (batch_size, image_size, image_size), dtype=np.uint8)),
    })


def check_scoring(backbone: str, device: torch.device, image_size: int, batch_size: int, warmup: int, steps: int,
                  workdir: str) -> dict[str, Any]:
    """`Predictor` images/s on pre-decoded batches, float32 against autocast (the job's default on GPU)."""
    from mura_ray.exported import ModelSpec
    from mura_ray.models import build_model, export_model
    from mura_ray.score import Predictor

    torch.manual_seed(0)
    model_dir = os.path.join(workdir, f"model_{backbone}")
    export_model(build_model(backbone, image_size=image_size).eval(),
                 ModelSpec(backbone=backbone, image_size=image_size, mean=0.5, std=0.25), model_dir, {})
    batch = _pixel_batch(batch_size, image_size, seed=2)
    out: dict[str, Any] = {}
    probs = {}
    for name, amp in (("float32", False), ("amp", True)):
        predictor = Predictor([model_dir], use_gpu=device.type == "cuda", tta=False, threshold=None, amp=amp)
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                started = time.perf_counter()
            table = predictor(batch)
        elapsed = time.perf_counter() - started  # each call ends with the probabilities on the host
        probs[name] = np.array(table["prob_abnormal"].to_pylist(), dtype=np.float64)
        out[name] = {"images_per_s": round(steps * batch_size / elapsed, 1),
                     "autocast": str(predictor.amp).removeprefix("torch.") if predictor.amp else None}
        logger.info("score %s %s: %.1f img/s", backbone, name, out[name]["images_per_s"])
    out["amp_speedup"] = round(out["amp"]["images_per_s"] / out["float32"]["images_per_s"], 2)
    out["max_probability_difference"] = float(np.abs(probs["amp"] - probs["float32"]).max())
    out["decisions_changed_at_0.5"] = int(((probs["amp"] >= 0.5) != (probs["float32"] >= 0.5)).sum())
    return out


def check_decode(n_images: int, source_size: int, image_size: int, workdir: str) -> dict[str, Any]:
    """Images/s of one CPU core: scoring's decode + resize, and training's without a cache (decode + resize; the
    augmentation runs on the device)."""
    from mura_ray.data.images import IMAGE_SUFFIXES
    from mura_ray.data.pipeline import preprocess_images
    from mura_ray.data.synthetic import generate_mura
    from mura_ray.score import decode_for_scoring

    root = pathlib.Path(workdir) / "pngs"
    generate_mura(root, n_images=n_images, image_size=source_size, seed=3)
    images = [p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES][:n_images]
    torch.set_num_threads(1)
    batch = pd.DataFrame({"image": images, "error": [None] * len(images)})
    decode_for_scoring(batch.head(2), [image_size])  # warm-up: Pillow's codecs
    started = time.perf_counter()
    decoded = decode_for_scoring(batch, [image_size])
    score_rate = len(images) / (time.perf_counter() - started)
    started = time.perf_counter()
    _, ok = preprocess_images(images, image_size=image_size)
    train_rate = len(images) / (time.perf_counter() - started)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    failed = int(decoded["error"].notna().sum()) + int((ok == 0).sum())
    logger.info("decode on one core: scoring %.1f img/s, training %.1f img/s", score_rate, train_rate)
    return {"images": len(images), "source_size": source_size, "failed": failed,
            "score_images_per_s_per_core": round(score_rate, 1), "train_images_per_s_per_core": round(train_rate, 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_worker(rank: int, world: int, backend: str, port: int, megabytes: int, result: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    numel = megabytes * 2**20 // 4
    tensor = torch.full((numel,), float(rank + 1), device=device)
    for _ in range(2):  # warm-up: connections, buffers
        dist.all_reduce(tensor)
    tensor.fill_(float(rank + 1))
    _sync(device)
    dist.barrier()
    iterations = 5
    started = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(tensor)
    _sync(device)
    elapsed = (time.perf_counter() - started) / iterations
    # Five sums of ranks 1..world, each the input of the next: world**4 * world * (world + 1) / 2.
    expected = float(world * (world + 1) / 2 * world ** (iterations - 1))
    correct = bool(torch.allclose(tensor[:1024], torch.full_like(tensor[:1024], expected), rtol=1e-5))
    if rank == 0:
        bus = numel * 4 * 2 * (world - 1) / world / elapsed / 1e9 if world > 1 else None
        pathlib.Path(result).write_text(json.dumps({
            "backend": backend, "processes": world, "megabytes": megabytes, "seconds_per_all_reduce": elapsed,
            "bus_bandwidth_gb_per_s": round(bus, 1) if bus else None, "sum_correct": correct,
        }))
    dist.destroy_process_group()


def check_all_reduce(device: torch.device, megabytes: int, workdir: str) -> dict[str, Any]:
    """All-reduce across every visible GPU with NCCL (on CPU: two gloo processes, the harness's smoke test)."""
    import torch.multiprocessing as mp

    backend, world = ("nccl", torch.cuda.device_count()) if device.type == "cuda" else ("gloo", 2)
    result = os.path.join(workdir, "all_reduce.json")
    mp.spawn(_allreduce_worker, args=(world, backend, _free_port(), megabytes, result), nprocs=world)
    out = json.loads(pathlib.Path(result).read_text())
    if world == 1:
        out["note"] = "one GPU: NCCL initialised and reduced on it; traffic between GPUs was not exercised"
    logger.info("all-reduce: %s", out)
    return out


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"Device: {env.get('gpu', env['device'])} ({env.get('gpus', 0)} GPU), torch {env['torch']}, "
             f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, NCCL {env.get('nccl')}, AMP dtype "
             f"{env.get('amp_dtype')}, {env['cpu_cores']} CPU cores; image size {result['image_size']}, batch "
             f"{result['batch_size']} (training) / {result['score_batch_size']} (scoring).", "",
             "| Backbone | Train fp32 img/s | Train AMP img/s | AMP speed-up | AMP + channels-last img/s | "
             "First-loss diff | Peak GiB (AMP) | Score fp32 img/s | Score AMP img/s | Max prob diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["backbones"].items():
        t, s = r["train"], r["score"]
        lines.append(f"| {name} | {t['float32']['images_per_s']} | {t['amp']['images_per_s']} | {t['amp_speedup']} | "
                     f"{t.get('amp_channels_last', {}).get('images_per_s', '—')} | "
                     f"{t['first_loss_relative_difference']} | {t['amp']['peak_memory_gib']} | "
                     f"{s['float32']['images_per_s']} | {s['amp']['images_per_s']} | "
                     f"{s['max_probability_difference']:.2e} |")
    d = result["decode"]
    lines += ["", f"Decode on one core ({d['images']} synthetic {d['source_size']}-px PNGs): scoring "
              f"{d['score_images_per_s_per_core']} img/s, training (with augmentation) "
              f"{d['train_images_per_s_per_core']} img/s. Cores to feed one GPU at the AMP rates above:", "",
              "| Backbone | Training | Scoring |", "|---|---|---|"]
    for name, r in result["cores_per_gpu"].items():
        lines.append(f"| {name} | {r['train']} | {r['score']} |")
    r = result["resume"]
    lines += ["", f"Resume (checkpoint state from the CPU, model moved to {env['device']}): optimizer state on "
              f"{r['optimizer_state_devices']}, first step's loss {r['step_after_resume_loss']}, ok: {r['ok']}."]
    a = result["all_reduce"]
    lines += ["", f"All-reduce ({a['backend']}, {a['processes']} processes, {a['megabytes']} MB): "
              f"{a['seconds_per_all_reduce'] * 1e3:.2f} ms, bus bandwidth {a['bus_bandwidth_gb_per_s']} GB/s, sum "
              f"correct: {a['sum_correct']}. {a.get('note', '')}".rstrip()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (default) or cpu (smoke test)")
    p.add_argument("--backbones", default=",".join(REPORT_BACKBONES), help="comma-separated (default: the report's)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64, help="training batch per GPU (default 64)")
    p.add_argument("--score-batch-size", type=int, default=256, help="scoring batch (default 256)")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (cuDNN picks its kernels)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--decode-images", type=int, default=64)
    p.add_argument("--source-size", type=int, default=512, help="side of the synthetic PNGs (MURA's are ~512 px)")
    p.add_argument("--all-reduce-mb", type=int, default=256)
    p.add_argument("--out", default=None, help="folder for gpu_check.json and gpu_check.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible (use --device cpu for the smoke test)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    started = time.perf_counter()
    result: dict[str, Any] = {"name": "gpu_check", "environment": environment(device), "image_size": args.image_size,
                              "batch_size": args.batch_size, "score_batch_size": args.score_batch_size,
                              "backbones": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for backbone in args.backbones.split(","):
            result["backbones"][backbone] = {
                "train": check_training(backbone, device, args.image_size, args.batch_size, args.warmup, args.steps),
                "score": check_scoring(backbone, device, args.image_size, args.score_batch_size, args.warmup,
                                       args.steps, workdir),
            }
        result["decode"] = d = check_decode(args.decode_images, args.source_size, args.image_size, workdir)
        result["cores_per_gpu"] = {
            name: {"train": round(r["train"]["amp"]["images_per_s"] / d["train_images_per_s_per_core"], 1),
                   "score": round(r["score"]["amp"]["images_per_s"] / d["score_images_per_s_per_core"], 1)}
            for name, r in result["backbones"].items()}
        result["resume"] = check_resume(device)
        result["all_reduce"] = check_all_reduce(device, args.all_reduce_mb, workdir)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        pathlib.Path(args.out, "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
        pathlib.Path(args.out, "gpu_check.md").write_text(markdown(result))
    print(markdown(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
