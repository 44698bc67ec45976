"""Training augmentation as batched tensor ops on the Train worker's device, and the uint8 → model input step.

The input pipeline delivers `load_pixels`' uint8 pixels (from the cache, or decoded); here, on the worker's device
(the GPU when there is one), each image gets a random horizontal flip, rotation (±30°, as in the MURA paper),
small scale and translation (one `affine_grid` + `grid_sample` for the batch) and brightness/contrast jitter, then
the model's normalisation. Every random draw comes from an explicit `torch.Generator` seeded by (seed, epoch,
rank) (`augment_generator`): two runs with the same seed see the same augmented batches, and a resumed run's
epochs get the draws they would have had.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mura_ray.data.pipeline import derived_seed

ROTATION_DEG = 30.0
"""Largest rotation either way (the MURA paper's ±30°)."""
SCALE = (0.9, 1.1)
"""Range of the zoom factor."""
TRANSLATE = 0.05
"""Largest shift either way, as a share of the image side."""
CONTRAST = (0.8, 1.2)
"""Range of the contrast factor, about each image's mean."""
BRIGHTNESS = 0.08
"""Largest brightness shift either way, on the [0, 1] scale."""


def augment_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The CPU generator of one worker's augmentation draws in one epoch (parameters are drawn on the CPU and
    moved to the device, so a GPU and a CPU run draw the same)."""
    return torch.Generator().manual_seed(derived_seed(seed, epoch, rank))


def augment_batch(images: Tensor, generator: torch.Generator) -> Tensor:
    """Augment a batch of float images in [0, 1] (N x 1 x S x S) on their device, each with its own draw.

    torchvision's v2 transforms draw one set of parameters per call (the whole batch would turn alike), so the
    per-image affine is one `affine_grid`/`grid_sample` and the jitter plain tensor arithmetic.
    """
    n, device = images.shape[0], images.device
    u = torch.rand(n, 7, generator=generator).to(device)
    angle = (u[:, 0] * 2 - 1) * math.radians(ROTATION_DEG)
    scale = SCALE[0] + u[:, 1] * (SCALE[1] - SCALE[0])
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0).to(device)
    shift = (u[:, 3:5] * 2 - 1) * (2 * TRANSLATE)  # affine_grid's coordinates span 2 per side
    contrast = CONTRAST[0] + u[:, 5] * (CONTRAST[1] - CONTRAST[0])
    brightness = (u[:, 6] * 2 - 1) * BRIGHTNESS
    # Output → input sampling coordinates: rotate, zoom by `scale`, mirror x where flipped, shift.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1).to(images.dtype)
    grid = sampling_grid(theta, images.shape[-2], images.shape[-1])
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mid = out.mean(dim=(1, 2, 3), keepdim=True)
    view = (-1, 1, 1, 1)
    return out.sub_(mid).mul_(contrast.view(view).to(out.dtype)).add_(mid + brightness.view(view).to(out.dtype)) \
        .clamp_(0, 1)


def sampling_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """`F.affine_grid(theta, (N, 1, height, width), align_corners=False)`, built as a per-column plus a per-row term
    (each sampling coordinate is affine in x plus affine in y): affine_grid's batched matmul of width 3 took 0.66 ms
    an image at 224 px on one CPU thread, this 0.014 ms (tests/test_cache.py checks they agree)."""
    xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1  # pixel centres
    ys = (torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1
    cols = (theta[:, :, 0, None] * xs).transpose(1, 2)  # N x W x 2
    rows = (theta[:, :, 1, None] * ys + theta[:, :, 2, None]).transpose(1, 2)  # N x H x 2
    return cols[:, None] + rows[:, :, None]  # N x H x W x 2


def model_input(pixels: Tensor, mean: float, std: float, generator: torch.Generator | None = None) -> Tensor:
    """uint8 pixels (N x 1 x S x S, `load_pixels`) to the model's float32 input on their device, augmented when a
    `generator` is given: `(pixels / 255 - mean) / std`, as `images.normalize` and scoring compute it."""
    images = pixels.float() / 255.0
    if generator is not None:
        images = augment_batch(images, generator)
    return images.sub_(mean).div_(std)


def prepare_batch(batch: dict[str, Tensor], mean: float, std: float,
                  generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """An input batch with its `image` column turned into the model's input (`model_input`)."""
    return {**batch, "image": model_input(batch["image"], mean, std, generator)}
