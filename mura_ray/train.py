"""Data-parallel multi-task training on Ray Train: the per-worker loop and the `fit(cfg)` driver around TorchTrainer.

The loop resumes from `ray.train.get_checkpoint()` (model, optimizer, scheduler, epoch, early-stopping state), so
a worker failure costs at most one epoch and re-running with the same run directory continues the run. Validation
runs on rank 0 over every validation row (the val set is never split across workers, so no row is dropped).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from mura_ray import __version__, runtime, storage
from mura_ray.checkpoints import best_state, check_resumable, load_checkpoint_state, resume_epoch, save_state
from mura_ray.config import METRIC_MODES, TrainConfig, UserError
from mura_ray.data.augment import augment_generator, prepare_batch
from mura_ray.data.cache import ensure_cache
from mura_ray.data.pipeline import (
    EpochStream,
    build_input,
    derived_seed,
    iter_batches,
    split_rows,
    training_batches,
    training_data_config,
)
from mura_ray.exported import ModelSpec
from mura_ray.labels import BODY_PARTS
from mura_ray.losses import multitask_loss
from mura_ray.metrics import validation_metrics
from mura_ray.models import (
    amp_dtype,
    autocast,
    build_model,
    export_model,
    predict,
    trunk_normalization,
)
from mura_ray.optim import build_optimizer, lr_schedule
from mura_ray.runtime import check_fits, first_line, started_local_ray, use_gpu

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- worker loop
def evaluate(model: nn.Module, batches, device: torch.device, amp: torch.dtype | None, loss_kwargs: dict[str, Any],
             threshold: float, tta: bool = False) -> dict[str, float]:
    """Loss and metrics over every row of a validation iterator (rows that failed to decode are skipped), at image
    level and at MURA's study level (a study's probability is the mean of its images', its label the max). With
    `tta`, of the probabilities averaged over the flips scoring averages (`models.predict`)."""
    model.eval()
    labels, probs, parts, part_pred, studies, losses, ab_losses, weights = [], [], [], [], [], [], [], []
    skipped = 0
    with torch.inference_mode():
        for batch in batches:
            decoded = batch["ok"] > 0
            skipped += int((~decoded).sum())
            ok = decoded & (batch["label"] >= 0)  # as in training: a row without a label has nothing to score
            if not ok.any():
                continue
            image, label, body_part = batch["image"][ok], batch["label"][ok], batch["body_part"][ok]
            with autocast(device, amp):
                out = predict(model, image, body_part, tta=tta)
            loss, ab = multitask_loss(out, label, body_part, **loss_kwargs)
            losses.append(float(loss) * len(label))
            ab_losses.append(float(ab) * len(label))
            weights.append(len(label))
            labels.append(label.cpu().numpy())
            probs.append(torch.sigmoid(out["abnormal"].float()).cpu().numpy())
            parts.append(body_part.cpu().numpy())
            studies.append(batch["study"][ok].cpu().numpy())
            if "body_part" in out:
                part_pred.append(out["body_part"].argmax(1).cpu().numpy())
    if not weights:
        raise RuntimeError(f"the validation split has no labelled image that decodes ({skipped} failed to decode): "
                           "nothing to compute the validation loss on")
    y, p, study = np.concatenate(labels), np.concatenate(probs), np.concatenate(studies)
    study = np.where(study >= 0, study, -1 - np.arange(study.size))  # an image without a study is its own
    levels = {k: _or_nan(v) for k, v in validation_metrics(y, p, study, threshold).items()}
    parts_known, parts_pred = np.concatenate(parts), np.concatenate(part_pred) if part_pred else None
    known = parts_known >= 0
    body_part_acc = (float((parts_pred[known] == parts_known[known]).mean()) if parts_pred is not None and known.any()
                     else math.nan)
    return {"val_loss": sum(losses) / sum(weights), "val_abnormal_loss": sum(ab_losses) / sum(weights), **levels,
            "val_body_part_acc": body_part_acc, "val_skipped_images": skipped}


def _or_nan(value: float | None) -> float:
    """A metric for Ray Train's report: NaN where `metrics` says undefined (None), as Tune and ASHA expect."""
    return math.nan if value is None else float(value)


def train_step(model: nn.Module, batch: dict[str, Tensor], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, device: torch.device, amp: torch.dtype | None,
               loss_kwargs: dict[str, Any], clip_grad: float = 0.0) -> tuple[int, int, float]:
    """One optimisation step on a batch of the input pipeline (`image`, `label`, `body_part`, `ok`), under autocast
    to `amp` (None: float32) with `scaler` (enabled for float16), the gradients' norm clipped to `clip_grad` (0: not
    clipped): (images trained on, images that failed to decode, loss). Rows that failed to decode or have no label
    are left out of the loss.

    Every worker steps on every batch (even an all-failed one) so DDP's collectives stay in lockstep.
    """
    ok = batch["ok"] > 0
    image, label, body_part = batch["image"], batch["label"], batch["body_part"]
    with autocast(device, amp):
        out = model(image, body_part)
    keep = ok & (label >= 0)
    if bool(keep.any()):
        loss, _ = multitask_loss({k: v[keep] for k, v in out.items()}, label[keep], body_part[keep], **loss_kwargs)
    else:
        loss = sum(v.sum() for v in out.values()) * 0.0
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the float16 loss-scaled ones
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return int(keep.sum()), int((~ok).sum()), float(loss.detach())


@dataclass
class TrainingSetup:
    model: nn.Module
    """As prepared (on its device; wrapped in DistributedDataParallel when there are several workers)."""
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    start_epoch: int = 0
    best: dict[str, float] = field(default_factory=dict)
    """The best value so far of each metric early stopping has watched (`watch`)."""
    bad_epochs: int = 0


def setup_training(model: nn.Module, cfg: TrainConfig, state: dict[str, Any] | None,
                   prepare: Callable[[nn.Module], nn.Module], device: torch.device,
                   steps_per_epoch: int = 1) -> TrainingSetup:
    """The model on its device (`prepare`: Ray Train's `prepare_model`), then its optimizer, learning-rate schedule
    and loss scaler, restored from a checkpoint's `state` when resuming.

    The optimizer is built, and its state loaded, only once the model is on its device: torch puts loaded optimizer
    state on the device its parameters are on at that moment, and moving the model afterwards leaves the state
    behind (on a GPU, every resumed run would fail its first step).
    """
    if state is not None:
        model.load_state_dict(state["model"])
    model = prepare(model)
    raw_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = build_optimizer(raw_model, cfg)
    amp = amp_dtype() if cfg.amp and device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    if state is None:
        return TrainingSetup(model, raw_model, optimizer, lr_schedule(optimizer, cfg, steps_per_epoch), scaler, amp)
    recipe = [group["weight_decay"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, weight_decay in zip(optimizer.param_groups, recipe, strict=True):  # this run's recipe, not the saved
        group["weight_decay"] = weight_decay
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    start = state["epoch"] + 1
    # A checkpoint written before `best` was recorded holds the best validation loss only.
    best = state.get("best", {"val_loss": state.get("best_val_loss", math.inf)})
    return TrainingSetup(model, raw_model, optimizer, lr_schedule(optimizer, cfg, steps_per_epoch, start), scaler,
                         amp, start, dict(best), state["bad_epochs"])


def watch(val: dict[str, float], best: dict[str, float], metric: str) -> tuple[str, bool]:
    """The metric early stopping watches at this epoch (`metric`, or val_abnormal_loss where `metric` is undefined)
    and whether it beat its best so far, which is then updated in `best`."""
    watched = metric if math.isfinite(val[metric]) else "val_abnormal_loss"
    value, sign = val[watched], 1.0 if METRIC_MODES[watched] == "min" else -1.0
    improved = watched not in best or sign * value < sign * best[watched] - 1e-6
    if improved:
        best[watched] = value
    return watched, improved


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: build, (resume,) train, validate on rank 0, report and checkpoint every epoch."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)  # the initial weights (DDP then gives every rank rank 0's)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    state = load_checkpoint_state(checkpoint) if checkpoint else None
    if state is not None:
        start_epoch, bad_epochs = state["epoch"] + 1, state["bad_epochs"]
        if rank == 0:
            print(f"Resuming from the checkpoint of epoch {state['epoch'] + 1}", flush=True)
        if start_epoch >= cfg.epochs or bad_epochs >= cfg.patience:
            # The run had already ended (e.g. a search was interrupted while this run wrote its last checkpoint):
            # report its last epoch again, so that the caller (Tune) learns how it ended instead of getting nothing.
            if rank == 0:
                why = (f"it stopped early (no better {cfg.select_metric} for {bad_epochs} epochs; raise --patience "
                       "to go on)"
                       if bad_epochs >= cfg.patience else f"it had trained its {start_epoch} epochs")
                print(f"Nothing to train: {why}", flush=True)
            last = dict(state["metrics"])  # saved as floats
            last.update({k: int(last[k]) for k in ("epoch", "train_images", "skipped_images", "left_out_images")
                         if k in last})
            last["stopped_early"] = bool(last.get("stopped_early"))
            ray.train.report(last, checkpoint=None)
            return

    # The input starts now, while rank 0 plans validation's input and the model is built, and runs on through
    # every epoch left. A resumed run reads the passes from its first unfinished epoch on (the driver found it:
    # `resume_epoch`), in the orders they have in a run from the start; so are its batches shuffled
    # (`shuffle_epochs`): it goes on as if never stopped.
    train_shard = ray.train.get_dataset_shard("train")
    start = state["epoch"] + 1 if state is not None else 0  # as setup_training resumes
    rows = loop_config["epoch_rows"]
    if start != loop_config["first_pass"] and rank == 0:
        logger.warning("Resuming at epoch %d from an input that starts at pass %d (the worker group restarted "
                       "within the run): these epochs see other batches than a run that never stopped",
                       start + 1, loop_config["first_pass"] + 1)

    def batches():
        return training_batches(train_shard, batch_size=cfg.batch_size, rows_per_epoch=rows,
                                seed=derived_seed(cfg.seed, rank), device=device, first_epoch=start)

    stream = EpochStream(batches, epochs=cfg.epochs - start, rows_per_epoch=rows)
    try:
        val_shard = _validation(loop_config["val_input"]) if rank == 0 else None
        _train(cfg, loop_config, state, stream, val_shard, device, rank, world, start)
    finally:
        stream.close()


def _validation(val_input: dict[str, Any]):
    """Rank 0's validation dataset (every row, in order), its read-and-decode tasks kept on rank 0's node.

    They reserve no CPU (see `build_trainer`), and a task that reserves none can be placed on any node: with Ray
    Data's default SPREAD, the read and decode of validation images landed on every node in turn, the head of a
    cluster too (0 CPUs in cluster/, so that nothing runs beside the GCS there). A soft affinity keeps them beside
    the worker that consumes them (their images cross no network), and lets them run elsewhere if that node goes.
    At most as many at once as the cluster has spare CPUs (`max_tasks`) and the node has CPUs, and at least 2.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("NodeID") == node), 0)
    max_tasks = max(2, min(val_input["max_tasks"], int(cpus)))
    here = NodeAffinitySchedulingStrategy(node, soft=True)
    return build_input(**{**val_input, "max_tasks": max_tasks}, train=False, scheduling_strategy=here)


def _train(cfg: TrainConfig, loop_config: dict[str, Any], state: dict[str, Any] | None, stream: EpochStream,
           val_shard, device: torch.device, rank: int, world: int, start: int) -> None:
    import ray
    import ray.train
    import ray.train.torch

    # Pretrained weights come from the driver, which loaded them once (PreparedRun.weights).
    model = build_model(cfg.backbone, freeze=cfg.freeze, multitask=cfg.multitask,
                        body_part_embedding=cfg.body_part_embedding, dropout=cfg.dropout, image_size=cfg.image_size)
    if loop_config.get("weights") is not None:
        model.load_state_dict(ray.get(loop_config["weights"]))
    pos_weight, mean, std = loop_config.get("pos_weight"), loop_config["mean"], loop_config["std"]
    steps_per_epoch = max(1, math.ceil(loop_config["epoch_rows"] / cfg.batch_size))
    run = setup_training(model, cfg, state, ray.train.torch.prepare_model, device, steps_per_epoch)
    model, raw_model, optimizer, scheduler, scaler, amp = (
        run.model, run.raw_model, run.optimizer, run.scheduler, run.scaler, run.amp)
    start_epoch, best, bad_epochs = run.start_epoch, run.best, run.bad_epochs
    updates = start_epoch * steps_per_epoch
    # The weights' exponential moving average (--ema): what validation scores, and what is exported.
    ema = ModelEmaV3(raw_model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    if ema is not None and state is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"])
    said_undefined = False
    assert start_epoch == start, "the input stream was made for other epochs than the loop runs"
    loss_kwargs = {"kind": cfg.loss, "pos_weight": pos_weight, "gamma": cfg.focal_gamma,
                   "body_part_weight": cfg.body_part_weight if cfg.multitask else 0.0}
    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.patience:
            break
        torch.manual_seed(derived_seed(cfg.seed, epoch, rank, 1))  # dropout (1: apart from augmentation draws)
        model.train()
        lr = optimizer.param_groups[0]["lr"]  # at the epoch's first step
        t_start = time.perf_counter()
        wait = 0.0
        seen, skipped, left_out, loss_sum = 0, 0, 0, 0.0
        it = iter(stream.epoch())
        generator = augment_generator(cfg.seed, epoch, rank)  # this epoch's augmentation, on this worker
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            wait += time.perf_counter() - t0
            if batch is None:
                break
            if len(batch["ok"]) < 2:
                # BatchNorm cannot train on one row: a last batch of one (at the end of the run's input) is left
                # out. The shards are equal, so every worker leaves it out together.
                left_out += 1
                continue
            batch = prepare_batch(batch, mean, std, generator)
            n, failed, loss = train_step(model, batch, optimizer, scaler, device, amp, loss_kwargs, cfg.clip_grad)
            updates += 1
            scheduler.step_update(updates)
            if ema is not None:
                ema.update(raw_model, step=updates)
            seen += n
            skipped += failed
            loss_sum += loss * n
        elapsed = time.perf_counter() - t_start
        if world > 1:  # the epoch's counts and loss over every worker's shard, not rank 0's alone
            import torch.distributed as dist

            totals = torch.tensor([seen, skipped, left_out, loss_sum], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            seen, skipped, left_out = (int(v) for v in totals[:3].tolist())
            loss_sum = float(totals[3])
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_images": seen,
            "skipped_images": skipped,
            "left_out_images": left_out,
            "images_per_s": seen / max(elapsed, 1e-9),
            "data_stall_share": wait / max(elapsed, 1e-9),
            "lr": lr,
        }
        if rank == 0:
            batches = iter_batches(val_shard, cfg.batch_size * 2, device)
            val = evaluate(raw_model if ema is None else ema.module, (prepare_batch(b, mean, std) for b in batches),
                           device, amp, loss_kwargs, cfg.threshold, cfg.tta)
        else:
            val = None
        if world > 1:
            import torch.distributed as dist

            box = [val]
            dist.broadcast_object_list(box, src=0)
            val = box[0]
        metrics.update(val)
        watched, improved = watch(val, best, cfg.select_metric)
        if watched != cfg.select_metric and rank == 0 and not said_undefined:
            logger.warning("%s is undefined at epoch %d (a validation split of one class?): early stopping watches "
                           "%s where it is", cfg.select_metric, epoch + 1, watched)
            said_undefined = True
        bad_epochs = 0 if improved else bad_epochs + 1
        metrics["stopped_early"] = bad_epochs >= cfg.patience and epoch + 1 < cfg.epochs
        with tempfile.TemporaryDirectory() as tmp:
            reported = None
            if rank == 0:
                save_state(tmp, {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch, "best": best, "bad_epochs": bad_epochs,
                    "metrics": {k: float(v) for k, v in metrics.items()},
                    **({"ema": ema.module.state_dict()} if ema is not None else {}),
                })
                reported = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=reported)
        if metrics["stopped_early"]:  # every worker decides alike (rank 0's val loss): drop the next epoch's input
            stream.close()


# ---------------------------------------------------------------------------------------------------- driver
def _git_version() -> str:
    """The code's version for the model card: `0.1.0+<commit>` (`.dirty` with uncommitted changes to the package)
    from a git checkout; elsewhere (`ray job submit` uploads the working directory without .git, an installed
    wheel) `0.1.0+src.<hash of the package's source files>`, so that a card still names the code that made it."""
    package = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=package).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = sha and git("status", "--porcelain", "--", package)
    except (OSError, subprocess.SubprocessError):
        sha = dirty = ""
    if sha:
        return f"{__version__}+{sha}" + (".dirty" if dirty else "")
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(package)):
        for name in sorted(f for f in files if f.endswith((".py", ".yaml"))):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, package).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    return f"{__version__}+src.{digest.hexdigest()[:12]}"


def default_run_dir(backbone: str) -> str:
    return os.path.join("runs", f"{backbone}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_data(cfg: TrainConfig) -> str:
    """The dataset to train on: `--data`, or the synthetic demo set (built and ingested once, cached)."""
    if cfg.data:
        return cfg.data
    from mura_ray.data.demo import demo_dataset

    return demo_dataset(cfg.demo_images)


def check_cluster_fits(cfg: TrainConfig) -> None:
    """A run the cluster cannot place never starts (`runtime.check_fits`): the Train workers' CPUs and GPUs, and
    one CPU more to read and decode images."""
    gpu = use_gpu(cfg.gpu)
    check_fits({"CPU": cfg.workers * cfg.cpus_per_worker + 1, "GPU": cfg.workers if gpu else 0},
               what=f"--workers {cfg.workers} (x --cpus-per-worker {cfg.cpus_per_worker:g}, one CPU to decode images"
               f"{', one GPU each' if gpu else ''})",
               hint="use --gpu no to train on CPUs" if gpu else "lower --workers or --cpus-per-worker")


class _EpochLogger:
    """Driver-side Ray Train callback: one line per epoch with the key metrics (rank 0's)."""

    def __new__(cls, epochs: int):
        import ray.train

        class EpochLogger(ray.train.UserCallback):
            def after_report(self, run_context, metrics, checkpoint):  # noqa: ARG002
                m = metrics[0]
                skipped = int(m.get("skipped_images", 0) + m.get("val_skipped_images", 0))
                logger.info(
                    "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_auc %.4f  val_kappa %.4f  study_auc %.4f  "
                    "study_kappa %.4f  body_part_acc %.4f  %.1f img/s  stall %.0f%%%s%s",
                    m["epoch"], epochs, m["train_loss"], m["val_loss"], m["val_auc"], m["val_kappa"],
                    m["val_study_auc"], m["val_study_kappa"],
                    m["val_body_part_acc"], m["images_per_s"], 100 * m["data_stall_share"],
                    f"  skipped {skipped} undecodable image(s)" if skipped else "",
                    "  (stopping early)" if m.get("stopped_early") else "",
                )

        return EpochLogger()


def _pos_weight(summary: dict[str, Any]) -> float | None:
    rate = summary["splits"].get("train", {}).get("positive_rate")
    if not rate or rate >= 1:
        return None
    return (1 - rate) / rate


@dataclass(frozen=True)
class PreparedRun:
    """A validated config with its run directory, dataset and normalisation resolved."""

    cfg: TrainConfig
    data: str
    summary: dict[str, Any]
    mean: float
    std: float
    weights: Any = None
    """ObjectRef of the pretrained weights the driver loaded (None without --pretrained/--pretrained-file): the
    workers take them from the object store instead of each reading the driver's file or the hub again (a local
    file is not on the other nodes, and worker nodes may have no internet)."""


def prepare_run(cfg: TrainConfig) -> PreparedRun:
    """Validate, fail fast on a bad backbone, start or attach Ray, and resolve (or build) the dataset."""
    import ray

    cfg = cfg.validate()
    out = (cfg.out or default_run_dir(cfg.backbone)).removeprefix("file://")
    storage.check_in_bucket(out, "--out", "runs/NAME")
    # Absolute, so that the path logged is where the run is (under `ray job submit --working-dir` a relative path
    # is inside Ray's copy of the working directory).
    cfg = replace(cfg, out=storage.absolute(out), cache_dir=cfg.cache_dir and storage.absolute(cfg.cache_dir))
    # Fail fast, before any cluster work, on a misspelt backbone and on weights that cannot be had or do not fit
    # (in the workers, each retried `max_failures` times, such an error would end as a Ray traceback).
    torch.manual_seed(cfg.seed)  # the probe's head is what the workers start from when it carries pretrained weights
    probe = build_model(cfg.backbone, pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file,
                        freeze=cfg.freeze, multitask=cfg.multitask, body_part_embedding=cfg.body_part_embedding,
                        dropout=cfg.dropout, image_size=cfg.image_size)
    mean, std = trunk_normalization(probe.trunk)
    if cfg.backbone != "custom_cnn" and not (cfg.pretrained or cfg.pretrained_file):
        logger.info("No pretrained weights given: %s starts from random initialisation", cfg.backbone)
    # A given --data is checked before Ray starts (a wrong path, refused credentials or an unreachable endpoint fail
    # in a second, not after Ray's start-up); the demo set is built with Ray.
    if cfg.data and storage.overlap(cfg.data, cfg.out):
        # The test split is scored into RUN_DIR/test at the end, which clears that folder first
        raise UserError(f"--out {cfg.out} and --data {cfg.data} overlap (the same folder, or one inside the other): "
                        "give a run directory outside the dataset")
    summary = check_dataset(cfg.data) if cfg.data else None
    try:  # and so is --out (before the demo set is built, too)
        storage.probe_writable(cfg.out)
    except OSError as e:
        raise UserError(f"--out {cfg.out}: cannot write there ({first_line(e)})") from None
    runtime.init_ray(train_cpus=cfg.workers * cfg.cpus_per_worker)
    check_cluster_fits(cfg)
    weights = ray.put(probe.state_dict()) if cfg.pretrained or cfg.pretrained_file else None
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    # (Not from a Tune trial, an actor, which cannot tell whether the search started its Ray: tune checks its --out.)
    in_driver = ray.get_runtime_context().get_actor_id() is None
    if not storage.is_remote(cfg.out) and (nodes > 1 or (in_driver and not started_local_ray())):
        # On an attached cluster too: an autoscaler adds the GPU nodes after this check (a head of 0 CPUs is alone
        # at first), and without --out the default run directory is inside the job's copy of its working directory.
        logger.warning("--out %s is a local path on a cluster (%d node(s) now): every node that runs a Train worker "
                       "must see it (a shared filesystem), else Ray Train cannot store its checkpoints; give "
                       "--out s3://... otherwise", cfg.out, nodes)
    if not cfg.data:
        logger.info("No --data given: training on the built-in SYNTHETIC demo radiographs (not MURA). "
                    "To train on MURA: jobs/ingest.py --source mura --root MURA-v1.1 --out DEST, then --data DEST.")
    data = resolve_data(cfg)
    if nodes > 1 and not storage.is_remote(data):
        logger.warning("--data %s is a local path on a cluster of %d nodes: Ray Data reads it on every node, so "
                       "every node must see it (a shared filesystem); give s3://... otherwise", data, nodes)
    if summary is None:
        summary = check_dataset(data)
    return PreparedRun(cfg, data, summary, mean, std, weights)


def check_dataset(data: str) -> dict[str, Any]:
    """The ingest summary of a dataset training can use, or a UserError saying what is wrong with it."""
    from mura_ray.data.ingest import LAYOUT_VERSION, read_summary

    summary = read_summary(data)
    for split in ("train", "val"):
        if split not in summary["splits"]:
            raise UserError(f"--data {data}: has no {split} split; training needs train and val")
        counts = summary["splits"][split]
        if counts.get("images", 1) == 0 or ("positive_rate" in counts and counts["positive_rate"] is None):
            # Found now, not in the workers after the first epoch (where Ray Train would retry it max_failures times)
            raise UserError(f"--data {data}: its {split} split has no labelled images; training needs labelled "
                            "train and val images (score unlabelled sets with jobs/score.py)")
    if summary.get("layout_version", 1) < LAYOUT_VERSION:
        logger.warning("--data %s was ingested by an older mura_ray, in path order: epochs are shuffled only within "
                       "a local buffer. Re-run jobs/ingest.py with --overwrite for a fully shuffled train split.", data)
    return summary


def build_trainer(run: PreparedRun, *, callbacks: list[Any] | None = None):
    """The TorchTrainer of a run: streaming train/val datasets, checkpoints in RUN_DIR, fault tolerance.

    `callbacks` replace the default per-epoch logger (Tune passes its report callback).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = run.cfg
    assert cfg.out is not None
    train_rows = split_rows(run.data, "train")
    if train_rows // cfg.workers < cfg.batch_size:
        # Epochs are cut from one stream in whole batches: with fewer rows a worker than a batch, some would be empty
        raise UserError(f"--data {run.data}: its train split has {train_rows} images, {train_rows // cfg.workers} "
                        f"for each of {cfg.workers} worker(s), fewer than --batch-size {cfg.batch_size}: lower "
                        "--batch-size or --workers")
    # The train split's every epoch in one dataset (one Ray Data execution; EpochStream cuts the epochs by rows).
    # Validation's read-and-decode tasks reserve no CPU, at most as many at once as the cluster has CPUs beside the
    # Train workers: while rank 0 validates, the training stream is paused by backpressure, and its paused tasks
    # keep their CPUs; with every spare CPU held so, validation tasks that reserve one would never be scheduled and
    # the run would hang (seen with a small object store: the decoded-ahead budget fills during validation).
    spare = int(ray.cluster_resources().get("CPU", 0) - cfg.workers * cfg.cpus_per_worker)
    first_pass = min(resume_epoch(cfg.out), cfg.epochs - 1)  # a finished run reads nothing (one pass, unread)
    # The train and val splits' training-ready caches at --image-size, built on first use or when stale.
    caches = ({split: c["folder"] for split, c in
               ensure_cache(run.data, run.summary, cfg.image_size, cfg.cache_dir).items()} if cfg.cache else {})
    datasets = {
        "train": build_input(run.data, "train", image_size=cfg.image_size, train=True, cache=caches.get("train"),
                             batch_size=cfg.batch_size, seed=cfg.seed, passes=cfg.epochs, first_pass=first_pass),
    }
    # Validation is built by rank 0 (`_validation`), to keep its tasks on rank 0's node; not split, every row.
    val_input = {"data": run.data, "split": "val", "image_size": cfg.image_size, "cache": caches.get("val"),
                 "batch_size": cfg.batch_size, "num_cpus": 0, "max_tasks": spare}
    storage_fs, storage_path = storage.resolve(cfg.out)
    run_config = ray.train.RunConfig(
        name=os.path.basename(storage_path.rstrip("/")),
        storage_path=os.path.dirname(storage_path.rstrip("/")),
        storage_filesystem=storage_fs,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.num_to_keep, checkpoint_score_attribute=cfg.select_metric,
            checkpoint_score_order=METRIC_MODES[cfg.select_metric],
        ),
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        callbacks=callbacks if callbacks is not None else [_EpochLogger(cfg.epochs)],
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": asdict(cfg), "pos_weight": _pos_weight(run.summary), "weights": run.weights,
                           "mean": run.mean, "std": run.std,
                           "epoch_rows": train_rows // cfg.workers,  # Ray Train's shards are equal
                           "val_input": val_input, "first_pass": first_pass},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu(cfg.gpu), resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=run_config,
        datasets=datasets,
        dataset_config=training_data_config(cfg.workers),
    )


def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train and export the best checkpoint to RUN_DIR/model/; returns the run directory, the model directory, the
    dataset trained on and the best checkpoint's validation metrics (`jobs/train.py` then scores the test split)."""
    run = prepare_run(cfg)
    check_resumable(run.cfg)
    logger.info("Run directory: %s", run.cfg.out)
    result = build_trainer(run).fit()
    return export_best(run, best_state(result, run.cfg.select_metric))


def export_best(run: PreparedRun, state: dict[str, Any]) -> dict[str, Any]:
    """Export a checkpoint's training state as a self-describing model (RUN_DIR/model/)."""
    cfg, data, summary, mean, std = run.cfg, run.data, run.summary, run.mean, run.std

    model = build_model(cfg.backbone, multitask=cfg.multitask, body_part_embedding=cfg.body_part_embedding,
                        dropout=cfg.dropout, image_size=cfg.image_size)
    model.load_state_dict(state.get("ema") or state["model"])  # the EMA weights, which validation scored
    spec = ModelSpec(
        backbone=cfg.backbone, image_size=cfg.image_size, mean=mean, std=std, multitask=cfg.multitask,
        body_part_embedding=cfg.body_part_embedding, dropout=cfg.dropout, freeze=cfg.freeze,
        threshold=cfg.threshold, tta=cfg.tta,
    )
    out = cfg.out
    assert out is not None
    card = {
        "backbone": cfg.backbone,
        "tasks": {"abnormal": list(spec.abnormal_names), "body_part": list(BODY_PARTS) if cfg.multitask else None},
        "input": {"channels": 1, "image_size": cfg.image_size, "mean": mean, "std": std,
                  "resize": "longer side to image_size, aspect preserved, zero padded"},
        "threshold": cfg.threshold,
        "training": {
            "data": data, "synthetic_demo": not cfg.data, "fingerprint": summary.get("fingerprint"),
            "counts": {s: v["images"] for s, v in summary["splits"].items()},
            "best_epoch": state["epoch"] + 1, "config": asdict(cfg),
        },
        "metrics": {"validation": state.get("metrics", {})},
        "selected_by": cfg.select_metric,
        "selected_with_tta": cfg.tta,
        "code_version": _git_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    model_dir = storage.join(out, "model")
    export_model(model, spec, model_dir, card)
    storage.write_json(storage.join(out, "train_config.json"), asdict(cfg))
    logger.info("Run directory: %s", out)
    return {"run_dir": out, "model_dir": model_dir, "data": data, "has_test": "test" in summary["splits"],
            "validation": state.get("metrics", {})}
