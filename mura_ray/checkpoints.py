"""A training run directory's checkpoints: the state saved every epoch, the one to export by a metric, the epoch a
re-run resumes at, and whether a re-run can resume at all."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from typing import Any

import torch

from mura_ray import storage
from mura_ray.config import METRIC_MODES, TrainConfig, UserError
from mura_ray.runtime import first_line

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
"""The training state's file in each checkpoint folder."""


def save_state(path: str, state: dict[str, Any]) -> None:
    """Write a training state (model, optimizer, scheduler, epoch, early-stopping state) into a checkpoint's folder."""
    torch.save(state, os.path.join(path, STATE_FILE))


def load_checkpoint_state(checkpoint) -> dict[str, Any]:
    """The training state a Ray Train checkpoint holds (`save_state`)."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


ARCHITECTURE_OPTIONS = ("backbone", "multitask", "body_part_embedding", "freeze", "image_size")
"""Options whose change makes a run directory's checkpoints unloadable (weights or optimizer state; the image size
shapes the position embeddings of fixed-size backbones such as ViT)."""


def resume_epoch(out: str) -> int:
    """The epoch a run in `out` resumes at (0 for a new run): the one after the checkpoint Ray Train restores, the
    latest it recorded in the run's checkpoint_manager_snapshot.json (what Train V2 itself reads on a re-run)."""
    uri = storage.join(out, "checkpoint_manager_snapshot.json")
    try:
        if not storage.exists(uri):
            return 0
        latest = storage.read_json(uri).get("latest_checkpoint_result") or {}
        return int(latest.get("metrics", {}).get("epoch", 0))  # reported 1-based: the next epoch's 0-based index
    except (OSError, ValueError, TypeError, AttributeError) as e:
        logger.warning("Cannot tell the epoch %s resumes at (%s): its input starts at the first pass", out,
                       first_line(e))
        return 0


def _has_checkpoints(out: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(out)
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return any(e.base_name.startswith("checkpoint_") for e in entries)


def check_resumable(cfg: TrainConfig) -> None:
    """Record the run's options in RUN_DIR/train_config.json, or check a re-run against those recorded.

    Re-running with the same --out resumes; with another architecture the checkpoints cannot load, which would
    fail in every worker restart: a UserError instead, before any cluster work.
    """
    assert cfg.out is not None
    path = storage.join(cfg.out, "train_config.json")
    try:
        if not storage.exists(path) or not _has_checkpoints(cfg.out):  # nothing to resume: this run's options
            storage.write_json(path, asdict(cfg))
            return
        earlier = storage.read_json(path)
    except OSError as e:
        raise UserError(f"--out {cfg.out}: cannot write there ({first_line(e)})") from None
    changed = [f"--{k.replace('_', '-')} {earlier[k]!r} -> {getattr(cfg, k)!r}" for k in ARCHITECTURE_OPTIONS
               if k in earlier and earlier[k] != getattr(cfg, k)]
    if changed:
        raise UserError(f"--out {cfg.out} holds a run of another model ({', '.join(changed)}); its checkpoints "
                        "cannot be resumed: give a new --out")


def best_state(result, metric: str = "val_loss") -> dict[str, Any]:
    """The training state saved with the best kept checkpoint of a finished run by `metric` (see METRIC_MODES).

    A metric undefined at every kept checkpoint (AUC and kappa on a validation split of one class) falls back to
    the abnormality loss, as early stopping does (the validation loss for checkpoints that lack it), with one log
    line.
    """
    def defined(metrics: dict[str, Any], key: str) -> bool:
        value = metrics.get(key)
        return isinstance(value, int | float) and math.isfinite(value)

    kept = result.best_checkpoints
    if not kept:
        raise RuntimeError("training finished without a checkpoint")
    if not any(defined(m, metric) for _, m in kept):
        fallback = "val_abnormal_loss" if any(defined(m, "val_abnormal_loss") for _, m in kept) else "val_loss"
        logger.warning("%s is undefined at every kept checkpoint (a validation split of one class?): choosing the "
                       "checkpoint by %s instead", metric, fallback)
        metric = fallback
    pick = max if METRIC_MODES[metric] == "max" else min
    best, _ = pick(((c, m) for c, m in kept if defined(m, metric)), key=lambda cm: float(cm[1][metric]))
    return load_checkpoint_state(best)
