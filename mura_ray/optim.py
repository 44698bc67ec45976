"""The recipe's optimisation, through timm: AdamW without weight decay on biases, norms and embeddings, and a
learning rate warmed up, then annealed on a cosine, stepped every optimisation step."""

from __future__ import annotations

import timm.optim
import torch
from timm.scheduler import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from mura_ray.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW at --lr, weight decay on the weights but not on biases, norms and embeddings (timm's parameter
    groups); frozen parameters are left out."""
    return timm.optim.create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                start_epoch: int = 0) -> Scheduler:
    """The recipe's learning rate, stepped per optimisation step (`step_update(updates)`): --warmup-epochs of linear
    warm-up from a tenth of --lr, then cosine annealing to 0 over the rest of --epochs (timm's CosineLRScheduler),
    advanced to `start_epoch`.

    Built from the recipe, not restored from a checkpoint: a resumed run with the same recipe continues exactly
    where it stopped, and one with more --epochs or another --lr follows the new recipe from there, as a fresh run
    of it would at that epoch (a restored schedule would keep the old length and rate).
    """
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = cfg.lr
    warmup = min(cfg.warmup_epochs, max(cfg.epochs - 1, 0)) * steps_per_epoch
    scheduler = CosineLRScheduler(optimizer, t_initial=max(cfg.epochs * steps_per_epoch - warmup, 1), lr_min=0.0,
                                  warmup_t=warmup, warmup_lr_init=cfg.lr / 10, warmup_prefix=True,
                                  t_in_epochs=False)
    scheduler.step_update(start_epoch * steps_per_epoch)
    return scheduler
