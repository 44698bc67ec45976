"""Synthetic radiographs: what an abnormal study shows on one bone (fractures, displaced fragments, metal).

`fracture`, `butterfly` and `avulsion` take the bone drawn alone on a layer (floats, one pixel per canvas pixel)
and return it broken; `hardware` draws a separate layer of metal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from mura_ray.data.anatomy import Bone, pixel_grid, polygon_pixels, rect, rotate, unit

LesionKind = Literal["fracture", "butterfly", "avulsion", "hardware"]
LESION_KINDS: tuple[LesionKind, ...] = ("fracture", "butterfly", "avulsion", "hardware")


@dataclass(frozen=True)
class Lesion:
    """An abnormal study's lesion; every view that shows it draws it at the same place."""

    kind: LesionKind
    target: float  # picks one of the anatomy's breakable bones, in [0, 1)
    position: float  # where along that bone, in [0, 1)


def _jagged_distance(size: int, point: np.ndarray, normal: np.ndarray, amplitude: float, rng: np.random.Generator):
    """Signed distance from a zig-zag line through `point`, positive on the `normal` side."""
    x, y = pixel_grid(size)
    along = (x - point[0]) * -normal[1] + (y - point[1]) * normal[0]
    across = (x - point[0]) * normal[0] + (y - point[1]) * normal[1]
    for wavelength in rng.uniform(0.015, 0.05, size=2):
        across = across + amplitude / 2 * np.sin(2 * np.pi * along / wavelength + rng.uniform(0, 2 * np.pi))
    return across


def _move(layer: np.ndarray, pivot: np.ndarray, angle: float, shift: np.ndarray) -> np.ndarray:
    """Rotate `layer` by `angle` about `pivot`, then translate by `shift` (canvas units)."""
    size = layer.shape[0]
    c, s = math.cos(angle), math.sin(angle)
    px, py = pivot * size
    tx, ty = (pivot + shift) * size
    # PIL wants the inverse map: output pixel -> input pixel.
    data = (c, s, px - c * tx - s * ty, -s, c, py + s * tx - c * ty)
    moved = Image.fromarray(layer).transform(
        (size, size), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR
    )
    return np.asarray(moved)


def _axes(bone: Bone) -> tuple[np.ndarray, np.ndarray]:
    u = unit(bone.p1 - bone.p0)
    return u, np.array([-u[1], u[0]])


def fracture(layer: np.ndarray, bone: Bone, t: float, rng: np.random.Generator, displaced: bool) -> np.ndarray:
    """Cut the bone with a jagged dark gap; a displaced fracture also shifts and angulates the distal fragment."""
    u, nrm = _axes(bone)
    point = bone.p0 + t * (bone.p1 - bone.p0)
    normal = rotate(u, rng.uniform(-0.6, 0.6))  # transverse to oblique
    gap = rng.uniform(0.05, 0.07)
    d = _jagged_distance(layer.shape[0], point, normal, rng.uniform(0.3, 0.7) * gap, rng)
    proximal = np.where(d < -gap / 2, layer, 0.0)
    distal = np.where(d > gap / 2, layer, 0.0).astype(np.float32)
    if displaced:
        shift = nrm * rng.choice((-1.0, 1.0)) * rng.uniform(0.6, 1.1) * bone.width + u * rng.uniform(0.0, 0.02)
        distal = _move(distal, point, rng.choice((-1.0, 1.0)) * rng.uniform(0.1, 0.3), shift)
    return np.maximum(proximal, distal)


def butterfly(layer: np.ndarray, bone: Bone, t: float, rng: np.random.Generator) -> np.ndarray:
    """Break a wedge out of the shaft, its base on one cortex, and push it away from the bone."""
    u, nrm = _axes(bone)
    side = rng.choice((-1.0, 1.0))
    centre = bone.p0 + t * (bone.p1 - bone.p0)
    x, y = pixel_grid(layer.shape[0])
    along = (x - centre[0]) * u[0] + (y - centre[1]) * u[1]
    across = ((x - centre[0]) * nrm[0] + (y - centre[1]) * nrm[1]) * side
    half = rng.uniform(0.05, 0.09)  # half the wedge's base, on the cortex
    gap = rng.uniform(0.025, 0.04)
    edge = half * (across + 0.6 * bone.width) / (1.1 * bone.width) - np.abs(along)  # > 0 inside the wedge
    wedge = np.where(edge > gap / 2, layer, 0.0).astype(np.float32)
    rest = np.where(edge > -gap / 2, 0.0, layer)
    wedge = _move(wedge, centre, rng.uniform(-0.4, 0.4), nrm * side * rng.uniform(0.04, 0.07))
    return np.maximum(rest, wedge)


def avulsion(layer: np.ndarray, bone: Bone, at_far_end: bool, rng: np.random.Generator) -> np.ndarray:
    """Chip a corner off one end of the bone and displace it."""
    u, nrm = _axes(bone)
    end, outward = (bone.p1, u) if at_far_end else (bone.p0, -u)
    side = rng.choice((-1.0, 1.0))
    reach = 0.6 * bone.end_width
    corner = end - outward * 0.3 * reach + nrm * side * 0.35 * reach
    normal = unit(rotate(outward + nrm * side, rng.uniform(-0.3, 0.3)))
    gap = rng.uniform(0.025, 0.04)
    d = _jagged_distance(layer.shape[0], corner, normal, 0.4 * gap, rng)
    x, y = pixel_grid(layer.shape[0])
    near = (x - end[0]) ** 2 + (y - end[1]) ** 2 < (1.6 * reach) ** 2
    chip = np.where(near & (d > gap / 2), layer, 0.0).astype(np.float32)
    rest = np.where(near & (d > -gap / 2), 0.0, layer)
    chip = _move(chip, corner, rng.uniform(-0.5, 0.5), normal * rng.uniform(0.06, 0.09))
    return np.maximum(rest, chip)


def hardware(bone: Bone, t: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Metal: a plate with screws, an intramedullary nail with locking screws, or crossed wires."""
    image = Image.new("L", (size, size))
    draw = ImageDraw.Draw(image)
    u, nrm = _axes(bone)
    length = float(np.hypot(*(bone.p1 - bone.p0)))
    centre = bone.p0 + t * (bone.p1 - bone.p0)
    w = bone.width
    parts: list[np.ndarray] = []
    kind = rng.choice(3, p=(0.5, 0.2, 0.3))
    if kind == 0:  # plate on the cortex, screws across the bone
        side = rng.choice((-1.0, 1.0))
        half = min(rng.uniform(0.1, 0.18), 0.4 * length)
        plate_w = rng.uniform(0.03, 0.045)
        parts.append(rect(centre + nrm * side * (w / 2 + plate_w / 3), u, 2 * half, plate_w))
        for s in np.linspace(-0.8 * half, 0.8 * half, rng.integers(3, 6)):
            parts.append(rect(centre + u * s, nrm, w * 1.25 + 0.03, rng.uniform(0.015, 0.022)))
    elif kind == 1:  # nail down the canal
        parts.append(rect(bone.p0 + 0.5 * (bone.p1 - bone.p0), u, 0.9 * length, max(0.4 * w, 0.025)))
        for s in (0.12, 0.88):
            parts.append(rect(bone.p0 + s * (bone.p1 - bone.p0), nrm, w * 1.3 + 0.02, 0.018))
    else:  # crossed Kirschner wires
        for _ in range(rng.integers(2, 4)):
            direction = rotate(u, rng.choice((-1.0, 1.0)) * rng.uniform(0.3, 0.9))
            parts.append(rect(centre + u * rng.normal(0, 0.02), direction, rng.uniform(0.25, 0.35), 0.016))
    for poly in parts:
        draw.polygon(polygon_pixels(poly, size), fill=255)
    return np.asarray(image, dtype=np.float32) / 255

