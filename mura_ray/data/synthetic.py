"""Synthetic radiographs laid out exactly like MURA-v1.1, so demos and tests run the real ingest path offline.

Each body part has its own bone-like anatomy; abnormal studies show fractures, displaced fragments or hardware.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mura_ray.labels import BODY_PARTS

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bumped whenever the images change, so cached demo sets are rebuilt rather than silently reused."""

DATASET_DIR = "MURA-v1.1"

# Share of studies per body part, close to MURA-v1.1's train split (wrist and shoulder most common).
_BODY_PART_WEIGHTS: dict[str, float] = {
    "ELBOW": 0.13,
    "FINGER": 0.14,
    "FOREARM": 0.06,
    "HAND": 0.15,
    "HUMERUS": 0.05,
    "SHOULDER": 0.22,
    "WRIST": 0.25,
}
_ABNORMAL_RATE = 0.4
_VISIBLE_RATE = 0.8  # share of an abnormal study's images that show the abnormality
_PARTS_PER_PATIENT = (0.78, 0.18, 0.04)  # P(1, 2, 3 body parts)
_STUDIES_PER_PART = (0.85, 0.12, 0.03)  # P(1, 2, 3 studies of one body part)
_VIEWS_PER_STUDY = (0.08, 0.37, 0.40, 0.15)  # P(1, 2, 3, 4 images)
_RGB_RATE = 0.1
_UINT16_RATE = 0.1

LesionKind = Literal["fracture", "butterfly", "avulsion", "hardware"]
_LESION_KINDS: tuple[LesionKind, ...] = ("fracture", "butterfly", "avulsion", "hardware")
_LESION_WEIGHTS = (0.45, 0.14, 0.06, 0.35)

Point = tuple[float, float]


@dataclass(frozen=True)
class _Study:
    split: Literal["train", "valid"]
    patient: int
    body_part: str
    number: int
    abnormal: bool
    n_views: int
    seed: int

    @property
    def path(self) -> str:
        """Relative to the folder containing MURA-v1.1, with MURA's trailing slash."""
        outcome = "positive" if self.abnormal else "negative"
        return f"{DATASET_DIR}/{self.split}/XR_{self.body_part}/patient{self.patient:05d}/study{self.number}_{outcome}/"


@dataclass(frozen=True)
class _Lesion:
    kind: LesionKind
    target: float  # picks one of the anatomy's breakable bones, in [0, 1)
    position: float  # where along that bone, in [0, 1)


@dataclass(frozen=True)
class _Bone:
    outline: np.ndarray  # (k, 2) polygon, canvas units: the canvas spans [0, 1] x [0, 1], y down
    canal: np.ndarray | None  # darker medullary canal inside the outline
    p0: np.ndarray
    p1: np.ndarray
    width: float  # shaft width
    end_width: float  # width of the wider end, sizes avulsed fragments
    density: float = 1.0


@dataclass(frozen=True)
class _Anatomy:
    bones: list[_Bone]
    tissue: list[np.ndarray]  # soft-tissue polygons
    targets: list[tuple[int, float, float]]  # (bone index, t_min, t_max): where a lesion may sit
    air: list[np.ndarray] = field(default_factory=list)  # lung: darker than soft tissue


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.hypot(v[0], v[1])


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _long_bone(
    p0: Point, p1: Point, shaft: float, end0: float, end1: float, density: float = 1.0, n: int = 20
) -> _Bone:
    """A tubular bone whose ends flare into rounded epiphyses, with a darker canal down the shaft."""
    a, b = np.asarray(p0, float), np.asarray(p1, float)
    axis = b - a
    length = float(np.hypot(*axis))
    u = axis / length
    nrm = np.array([-u[1], u[0]])
    t = np.linspace(0.0, 1.0, n)[:, None]
    flare = 0.2 * length
    s = t * length
    width = (
        shaft + (end0 - shaft) * np.exp(-((s / flare) ** 2)) + (end1 - shaft) * np.exp(-(((length - s) / flare) ** 2))
    )
    centre = a + t * axis
    left, right = centre + nrm * width / 2, centre - nrm * width / 2
    arc = np.linspace(0.0, math.pi, 9)[:, None]
    cap1 = b + (end1 / 2) * (np.cos(arc) * nrm + 0.5 * np.sin(arc) * u)
    cap0 = a + (end0 / 2) * (-np.cos(arc) * nrm - 0.5 * np.sin(arc) * u)
    outline = np.concatenate([left, cap1, right[::-1], cap0])
    tc = np.linspace(0.12, 0.88, n)[:, None]
    canal_w = 0.45 * shaft * np.sin(np.pi * (tc - 0.12) / 0.76) ** 0.3
    canal_c = a + tc * axis
    canal = np.concatenate([canal_c + nrm * canal_w / 2, (canal_c - nrm * canal_w / 2)[::-1]])
    return _Bone(outline, canal, a, b, shaft, max(end0, end1), density)


def _oval(centre: Point, rx: float, ry: float, angle: float = 0.0, density: float = 1.0) -> _Bone:
    a = np.linspace(0.0, 2 * math.pi, 28, endpoint=False)[:, None]
    c = np.asarray(centre, float)
    major = _rotate(np.array([1.0, 0.0]), angle)
    minor = np.array([-major[1], major[0]])
    outline = c + rx * np.cos(a) * major + ry * np.sin(a) * minor
    return _Bone(outline, None, c - rx * major, c + rx * major, 2 * min(rx, ry), 2 * max(rx, ry), density)


def _arc_band(centre: Point, radius: float, width: float, a0: float, a1: float, density: float = 1.0) -> _Bone:
    """A curved strip of bone (glenoid rim, rib)."""
    a = np.linspace(a0, a1, 24)[:, None]
    ring = np.concatenate([np.cos(a), np.sin(a)], axis=1)
    c = np.asarray(centre, float)
    outline = np.concatenate([c + (radius + width / 2) * ring, (c + (radius - width / 2) * ring)[::-1]])
    return _Bone(outline, None, c + radius * ring[0], c + radius * ring[-1], width, width, density)


def _rect(centre: np.ndarray, direction: np.ndarray, length: float, width: float) -> np.ndarray:
    u = _unit(direction)
    nrm = np.array([-u[1], u[0]])
    hl, hw = u * length / 2, nrm * width / 2
    return np.stack([centre - hl - hw, centre + hl - hw, centre + hl + hw, centre - hl + hw])


def _capsule(p0: Point, p1: Point, width: float) -> np.ndarray:
    return _long_bone(p0, p1, width, width, width).outline


# ---------------------------------------------------------------------------------------------------------------
# Anatomy: one builder per body part, in canvas units, upright; the pose is applied later to the whole canvas.


def _forearm(rng: np.random.Generator) -> _Anatomy:
    x = 0.5 + rng.normal(0, 0.02)
    sep = rng.uniform(0.11, 0.19)  # lateral views overlap the two bones more
    radius = _long_bone((x - sep / 2, 0.05), (x - sep / 2 - 0.03, 0.94), 0.05, 0.075, 0.13)
    ulna = _long_bone((x + sep / 2, 0.03), (x + sep / 2 + 0.01, 0.94), 0.045, 0.11, 0.06)
    tissue = [_capsule((x, -0.2), (x, 1.2), rng.uniform(0.38, 0.46))]
    return _Anatomy([radius, ulna], tissue, [(0, 0.25, 0.75), (1, 0.25, 0.75)])


def _humerus(rng: np.random.Generator) -> _Anatomy:
    x = 0.5 + rng.normal(0, 0.02)
    w = rng.uniform(0.075, 0.095)
    shaft = _long_bone((x, 0.15), (x + rng.normal(0, 0.015), 0.87), w, 1.5 * w, 2.6 * w)
    head = _oval((x - 0.025, 0.12), 0.105, 0.095, rng.normal(0, 0.2))
    tissue = [_capsule((x, -0.2), (x, 1.2), rng.uniform(0.46, 0.56))]
    return _Anatomy([shaft, head], tissue, [(0, 0.25, 0.75)])


def _finger(rng: np.random.Generator) -> _Anatomy:
    lengths = (0.26, 0.29, 0.19, 0.13)  # metacarpal head, proximal, middle, distal phalanx
    widths = (0.075, 0.062, 0.052, 0.042)
    gap = rng.uniform(0.025, 0.035)
    scale = rng.uniform(0.92, 1.05)
    direction, cursor = np.array([0.0, -1.0]), np.array([0.5 + rng.normal(0, 0.02), 1.06])
    bones, tips = [], [cursor]
    for length, width in zip(lengths, widths, strict=True):
        direction = _rotate(direction, rng.normal(0, 0.06))
        end = cursor + direction * length * scale
        bones.append(_long_bone(tuple(cursor), tuple(end), width, 1.35 * width, 1.25 * width))
        cursor = end + direction * gap
        tips.append(end)
    tissue = [_capsule(tuple(tips[i]), tuple(tips[i + 1]), rng.uniform(0.17, 0.21)) for i in range(len(tips) - 1)]
    return _Anatomy(bones, tissue, [(0, 0.35, 0.65), (1, 0.25, 0.75), (2, 0.3, 0.7)])


def _ray(base: np.ndarray, angle: float, lengths: tuple[float, ...], widths: tuple[float, ...], gap: float):
    """A metacarpal and its phalanges fanned out from `base` at `angle` from vertical."""
    direction = _rotate(np.array([0.0, -1.0]), angle)
    bones, cursor = [], base
    for length, width in zip(lengths, widths, strict=True):
        end = cursor + direction * length
        bones.append(_long_bone(tuple(cursor), tuple(end), width, 1.4 * width, 1.3 * width))
        cursor = end + direction * gap
    return bones, cursor - direction * gap


def _hand(rng: np.random.Generator) -> _Anatomy:
    cx = 0.5 + rng.normal(0, 0.02)
    spread = rng.uniform(0.8, 1.2)
    bones: list[_Bone] = []
    tissue = [_capsule((cx, 1.0), (cx, 0.5), 0.36)]
    targets = []
    gap = 0.016
    for i, (dx, angle, mc) in enumerate(
        ((-0.1, -0.12, 0.25), (-0.035, -0.03, 0.26), (0.03, 0.05, 0.24), (0.09, 0.14, 0.21))
    ):
        start = len(bones)
        ray, tip = _ray(
            np.array([cx + dx, 0.74]),
            angle * spread,
            (mc, 0.14, 0.085, 0.06 - 0.004 * i),
            (0.04, 0.034, 0.03, 0.026),
            gap,
        )
        bones += ray
        tissue.append(_capsule(tuple(ray[0].p1), tuple(tip), 0.075))
        targets += [(start, 0.3, 0.7), (start + 1, 0.3, 0.7)]
    thumb, tip = _ray(np.array([cx - 0.13, 0.78]), -0.75 * spread, (0.15, 0.1, 0.07), (0.042, 0.036, 0.03), gap)
    bones += thumb
    tissue.append(_capsule(tuple(thumb[0].p0), tuple(tip), 0.09))
    for j in range(7):  # carpals
        centre = (cx - 0.09 + 0.03 * j + rng.normal(0, 0.005), 0.8 + 0.035 * (j % 2) + rng.normal(0, 0.005))
        bones.append(_oval(centre, 0.028, 0.024, rng.uniform(0, math.pi)))
    bones.append(_long_bone((cx - 0.06, 1.12), (cx - 0.06, 0.88), 0.08, 0.08, 0.12))
    bones.append(_long_bone((cx + 0.085, 1.12), (cx + 0.085, 0.89), 0.045, 0.045, 0.055))
    return _Anatomy(bones, tissue, targets)


def _wrist(rng: np.random.Generator) -> _Anatomy:
    cx = 0.47 + rng.normal(0, 0.02)
    bones = [
        _long_bone((cx - 0.07, 1.15), (cx - 0.07, 0.68), 0.13, 0.13, 0.22),  # radius
        _long_bone((cx + 0.17, 1.15), (cx + 0.17, 0.71), 0.07, 0.07, 0.085),  # ulna
    ]
    for row_y, xs, r in ((0.6, (-0.16, -0.05, 0.06, 0.16), 0.052), (0.48, (-0.17, -0.06, 0.04, 0.14), 0.048)):
        for dx in xs:
            rx, ry = r * rng.uniform(0.85, 1.15), r * rng.uniform(0.8, 1.0)
            bones.append(
                _oval((cx + dx + rng.normal(0, 0.006), row_y + rng.normal(0, 0.008)), rx, ry, rng.uniform(0, 3))
            )
    first_metacarpal = len(bones)
    for i, dx in enumerate((-0.12, -0.01, 0.09, 0.19)):
        base = np.array([cx + dx, 0.4])
        tip = base + _rotate(np.array([0.0, -0.55]), (i - 1.5) * 0.08)
        bones.append(_long_bone(tuple(base), tuple(tip), 0.055, 0.08, 0.06))
    bones.append(_long_bone((cx - 0.25, 0.46), (cx - 0.5, 0.1), 0.06, 0.08, 0.06))  # thumb metacarpal
    tissue = [_capsule((cx + 0.03, 1.3), (cx + 0.03, -0.3), rng.uniform(0.62, 0.72))]
    targets = [(0, 0.45, 0.85), (0, 0.45, 0.85), (1, 0.45, 0.85)]
    targets += [(first_metacarpal + i, 0.25, 0.6) for i in range(4)]
    return _Anatomy(bones, tissue, targets)


def _elbow(rng: np.random.Generator) -> _Anatomy:
    joint = np.array([0.5 + rng.normal(0, 0.03), 0.48 + rng.normal(0, 0.03)])
    humerus = _long_bone((joint[0] + rng.normal(0, 0.03), -0.15), tuple(joint), 0.1, 0.1, 0.24)
    flexion = rng.uniform(0.25, 1.6)  # radians away from a straight arm
    d = np.array([math.sin(flexion), math.cos(flexion)])
    nrm = np.array([-d[1], d[0]])
    ulna_start = joint + d * 0.0 + nrm * 0.045
    radius_start = joint + d * 0.05 - nrm * 0.045
    ulna = _long_bone(tuple(ulna_start), tuple(ulna_start + d * 0.65), 0.055, 0.13, 0.05)
    radius = _long_bone(tuple(radius_start), tuple(radius_start + d * 0.62), 0.05, 0.085, 0.06)
    tissue = [
        _capsule((humerus.p0[0], -0.3), tuple(joint), 0.42),
        _capsule(tuple(joint), tuple(joint + d * 0.9), 0.38),
    ]
    return _Anatomy([humerus, ulna, radius], tissue, [(0, 0.45, 0.8), (1, 0.3, 0.7), (2, 0.3, 0.7)])


def _shoulder(rng: np.random.Generator) -> _Anatomy:
    c = np.array([0.57 + rng.normal(0, 0.03), 0.42 + rng.normal(0, 0.03)])
    head_r = rng.uniform(0.14, 0.17)
    bones = [
        _oval(tuple(c), head_r, head_r * 1.05, rng.normal(0, 0.3)),
        _long_bone((c[0] + 0.02, c[1] + 0.08), (c[0] + 0.06, 1.1), 0.12, 0.22, 0.12),  # humeral shaft
        _long_bone((-0.05, 0.14), (c[0] + 0.06, 0.2), 0.055, 0.06, 0.075),  # clavicle
        _arc_band(tuple(c), head_r + 0.035, 0.045, math.radians(145), math.radians(220), 0.9),  # glenoid
        _long_bone((c[0] - 0.3, 0.28), (c[0] + 0.1, c[1] - head_r - 0.03), 0.05, 0.05, 0.07, 0.9),  # acromion
    ]
    scapula = np.array([[c[0] - 0.22, c[1] - 0.14], [c[0] - 0.2, c[1] + 0.18], [0.1, 1.05], [-0.1, 1.0], [-0.1, 0.3]])
    bones.insert(0, _Bone(scapula, None, scapula[0], scapula[2], 0.2, 0.2, 0.45))
    for k in range(3):
        bones.insert(0, _arc_band((0.8, 0.25), 0.62 + 0.13 * k, 0.035, math.radians(125), math.radians(195), 0.4))
    tissue = [np.array([[-0.2, -0.2], [1.2, -0.2], [1.2, 1.2], [-0.2, 1.2]])]
    lung = np.array([[-0.2, 0.3], [c[0] - 0.35, 0.33], [c[0] - 0.28, 0.7], [c[0] - 0.25, 1.2], [-0.2, 1.2]])
    shaft, clavicle = 4, 5
    return _Anatomy(bones, tissue, [(shaft, 0.15, 0.5), (shaft, 0.15, 0.5), (clavicle, 0.3, 0.7)], [lung])


_ANATOMY: dict[str, Callable[[np.random.Generator], _Anatomy]] = {
    "ELBOW": _elbow,
    "FINGER": _finger,
    "FOREARM": _forearm,
    "HAND": _hand,
    "HUMERUS": _humerus,
    "SHOULDER": _shoulder,
    "WRIST": _wrist,
}
assert set(_ANATOMY) == set(BODY_PARTS) == set(_BODY_PART_WEIGHTS)


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _pixels(poly: np.ndarray, size: int) -> list[float]:
    return (poly * size).ravel().tolist()


def _draw_bones(size: int, bones: list[_Bone]) -> np.ndarray:
    image = Image.new("L", (size, size))
    draw = ImageDraw.Draw(image)
    for bone in bones:
        draw.polygon(_pixels(bone.outline, size), fill=round(230 * bone.density))
        if bone.canal is not None:
            draw.polygon(_pixels(bone.canal, size), fill=round(165 * bone.density))
    return np.asarray(image, dtype=np.float32) / 255


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[None, :], coords[:, None]


def _jagged_distance(size: int, point: np.ndarray, normal: np.ndarray, amplitude: float, rng: np.random.Generator):
    """Signed distance from a zig-zag line through `point`, positive on the `normal` side."""
    x, y = _grid(size)
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


def _axes(bone: _Bone) -> tuple[np.ndarray, np.ndarray]:
    u = _unit(bone.p1 - bone.p0)
    return u, np.array([-u[1], u[0]])


def _fracture(layer: np.ndarray, bone: _Bone, t: float, rng: np.random.Generator, displaced: bool) -> np.ndarray:
    """Cut the bone with a jagged dark gap; a displaced fracture also shifts and angulates the distal fragment."""
    u, nrm = _axes(bone)
    point = bone.p0 + t * (bone.p1 - bone.p0)
    normal = _rotate(u, rng.uniform(-0.6, 0.6))  # transverse to oblique
    gap = rng.uniform(0.05, 0.07)
    d = _jagged_distance(layer.shape[0], point, normal, rng.uniform(0.3, 0.7) * gap, rng)
    proximal = np.where(d < -gap / 2, layer, 0.0)
    distal = np.where(d > gap / 2, layer, 0.0).astype(np.float32)
    if displaced:
        shift = nrm * rng.choice((-1.0, 1.0)) * rng.uniform(0.6, 1.1) * bone.width + u * rng.uniform(0.0, 0.02)
        distal = _move(distal, point, rng.choice((-1.0, 1.0)) * rng.uniform(0.1, 0.3), shift)
    return np.maximum(proximal, distal)


def _butterfly(layer: np.ndarray, bone: _Bone, t: float, rng: np.random.Generator) -> np.ndarray:
    """Break a wedge out of the shaft, its base on one cortex, and push it away from the bone."""
    u, nrm = _axes(bone)
    side = rng.choice((-1.0, 1.0))
    centre = bone.p0 + t * (bone.p1 - bone.p0)
    x, y = _grid(layer.shape[0])
    along = (x - centre[0]) * u[0] + (y - centre[1]) * u[1]
    across = ((x - centre[0]) * nrm[0] + (y - centre[1]) * nrm[1]) * side
    half = rng.uniform(0.05, 0.09)  # half the wedge's base, on the cortex
    gap = rng.uniform(0.025, 0.04)
    edge = half * (across + 0.6 * bone.width) / (1.1 * bone.width) - np.abs(along)  # > 0 inside the wedge
    wedge = np.where(edge > gap / 2, layer, 0.0).astype(np.float32)
    rest = np.where(edge > -gap / 2, 0.0, layer)
    wedge = _move(wedge, centre, rng.uniform(-0.4, 0.4), nrm * side * rng.uniform(0.04, 0.07))
    return np.maximum(rest, wedge)


def _avulsion(layer: np.ndarray, bone: _Bone, at_far_end: bool, rng: np.random.Generator) -> np.ndarray:
    """Chip a corner off one end of the bone and displace it."""
    u, nrm = _axes(bone)
    end, outward = (bone.p1, u) if at_far_end else (bone.p0, -u)
    side = rng.choice((-1.0, 1.0))
    reach = 0.6 * bone.end_width
    corner = end - outward * 0.3 * reach + nrm * side * 0.35 * reach
    normal = _unit(_rotate(outward + nrm * side, rng.uniform(-0.3, 0.3)))
    gap = rng.uniform(0.025, 0.04)
    d = _jagged_distance(layer.shape[0], corner, normal, 0.4 * gap, rng)
    x, y = _grid(layer.shape[0])
    near = (x - end[0]) ** 2 + (y - end[1]) ** 2 < (1.6 * reach) ** 2
    chip = np.where(near & (d > gap / 2), layer, 0.0).astype(np.float32)
    rest = np.where(near & (d > -gap / 2), 0.0, layer)
    chip = _move(chip, corner, rng.uniform(-0.5, 0.5), normal * rng.uniform(0.06, 0.09))
    return np.maximum(rest, chip)


def _hardware(bone: _Bone, t: float, size: int, rng: np.random.Generator) -> np.ndarray:
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
        parts.append(_rect(centre + nrm * side * (w / 2 + plate_w / 3), u, 2 * half, plate_w))
        for s in np.linspace(-0.8 * half, 0.8 * half, rng.integers(3, 6)):
            parts.append(_rect(centre + u * s, nrm, w * 1.25 + 0.03, rng.uniform(0.015, 0.022)))
    elif kind == 1:  # nail down the canal
        parts.append(_rect(bone.p0 + 0.5 * (bone.p1 - bone.p0), u, 0.9 * length, max(0.4 * w, 0.025)))
        for s in (0.12, 0.88):
            parts.append(_rect(bone.p0 + s * (bone.p1 - bone.p0), nrm, w * 1.3 + 0.02, 0.018))
    else:  # crossed Kirschner wires
        for _ in range(rng.integers(2, 4)):
            direction = _rotate(u, rng.choice((-1.0, 1.0)) * rng.uniform(0.3, 0.9))
            parts.append(_rect(centre + u * rng.normal(0, 0.02), direction, rng.uniform(0.25, 0.35), 0.016))
    for poly in parts:
        draw.polygon(_pixels(poly, size), fill=255)
    return np.asarray(image, dtype=np.float32) / 255


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Zero-mean, unit-ish noise with features about `cell` pixels across."""
    h, w = shape
    coarse = rng.normal(size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur; Pillow's GaussianBlur has no float mode."""
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2)).astype(np.float32)
    k /= k.sum()
    h, w = image.shape
    padded = np.pad(image, r, mode="edge")
    rows = sum(k[i] * padded[i : i + h, :] for i in range(2 * r + 1))
    return sum(k[i] * rows[:, i : i + w] for i in range(2 * r + 1))


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _marker(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A laterality letter in a corner, like the lead markers on real films."""
    h, w = shape
    image = Image.new("L", (w, h))
    draw = ImageDraw.Draw(image)
    px = max(6, round(rng.uniform(0.07, 0.11) * min(w, h)))
    margin = round(rng.uniform(0.02, 0.06) * min(w, h))
    x = margin if rng.random() < 0.5 else w - margin - px
    y = margin if rng.random() < 0.5 else h - margin - px
    if rng.random() < 0.3:
        draw.rectangle((x - 2, y - 1, x + px, y + px + 1), outline=200)
    draw.text((x, y), "L" if rng.random() < 0.5 else "R", fill=255, font=_font(px))
    return np.asarray(image, dtype=np.float32) / 255


def _render(body_part: str, lesion: _Lesion | None, size: int, rng: np.random.Generator) -> np.ndarray:
    """One radiograph as floats in [0, 1], shape (height, width)."""
    anatomy = _ANATOMY[body_part](rng)
    tissue_image = Image.new("L", (size, size))
    draw = ImageDraw.Draw(tissue_image)
    for poly in anatomy.tissue:
        draw.polygon(_pixels(poly, size), fill=255)
    for poly in anatomy.air:
        draw.polygon(_pixels(poly, size), fill=70)
    tissue = np.asarray(tissue_image.filter(ImageFilter.GaussianBlur(0.02 * size)), dtype=np.float32) / 255

    target = None
    if lesion is not None:
        target, t_min, t_max = anatomy.targets[int(lesion.target * len(anatomy.targets))]
    bones = _draw_bones(size, [b for i, b in enumerate(anatomy.bones) if i != target])
    metal = None
    if lesion is not None and target is not None:
        bone = anatomy.bones[target]
        layer = _draw_bones(size, [bone])
        t = t_min + lesion.position * (t_max - t_min)
        site = bone.p0 + t * (bone.p1 - bone.p0)
        if lesion.kind == "fracture":
            layer = _fracture(layer, bone, t, rng, displaced=rng.random() < 0.85)
        elif lesion.kind == "butterfly":
            layer = _butterfly(layer, bone, t, rng)
        elif lesion.kind == "avulsion":
            site = bone.p1 if lesion.position < 0.5 else bone.p0
            layer = _avulsion(layer, bone, lesion.position < 0.5, rng)
        else:
            if rng.random() < 0.4:  # fixation of a still-visible fracture
                layer = _fracture(layer, bone, t, rng, displaced=False)
            metal = _hardware(bone, t, size, rng)
        bones = np.maximum(bones, layer)
        if lesion.kind != "hardware":  # soft-tissue swelling around an injury
            x, y = _grid(size)
            radius = rng.uniform(0.08, 0.13)
            tissue = tissue + rng.uniform(0.6, 1.2) * np.exp(-((x - site[0]) ** 2 + (y - site[1]) ** 2) / radius**2)

    texture = 1.0 + 0.08 * _smooth_noise(rng, (size, size), max(2, size // 24))
    canvas = rng.uniform(0.15, 0.23) * tissue + rng.uniform(0.38, 0.52) * bones * texture
    if metal is not None:
        canvas = np.maximum(canvas, rng.uniform(1.0, 1.1) * metal)

    # Pose: rotate, zoom, shift and mirror the whole canvas into a not-quite-square film.
    width, height = (round(size * rng.uniform(0.8, 1.0)) for _ in range(2))
    angle = math.radians(rng.uniform(-25, 25))
    zoom = rng.uniform(0.85, 1.15)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
    m = np.array([[c * flip, -s], [s * flip, c]])
    offset = size / 2 + rng.normal(0, 0.05 * size, 2) - m @ np.array([width / 2, height / 2])
    film = Image.fromarray(canvas.astype(np.float32)).transform(
        (width, height),
        Image.Transform.AFFINE,
        (m[0, 0], m[0, 1], offset[0], m[1, 0], m[1, 1], offset[1]),
        resample=Image.Resampling.BICUBIC,
        fillcolor=0.0,
    )
    image = np.asarray(film, dtype=np.float32)

    # Exposure: heel-effect gradient, fog, marker, optical blur, contrast and gamma, film grain.
    ramp = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None] * rng.uniform(-0.3, 0.3)
    ramp = ramp + np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :] * rng.uniform(-0.2, 0.2)
    image = image * (1.0 + ramp) + rng.uniform(0.02, 0.1)
    image = np.maximum(image, rng.uniform(0.85, 1.0) * _marker((height, width), rng))
    image = _blur(image, rng.uniform(0.4, 1.2) * size / 256)
    low, high = rng.uniform(-0.05, 0.06), rng.uniform(0.95, 1.15)
    image = np.clip((image - low) / (high - low), 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    grain = rng.normal(0.0, rng.uniform(0.008, 0.025), (height, width))
    mottle = rng.uniform(0.0, 0.025) * _smooth_noise(rng, (height, width), max(2, size // 32))
    return np.clip(image + grain + mottle, 0.0, 1.0)


def _encode(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """8-bit grey mostly, with a share of RGB and full-range 16-bit files, as MURA mixes them."""
    draw = rng.random()
    if draw < _UINT16_RATE:
        low, high = float(image.min()), float(image.max())
        scaled = (image - low) / max(high - low, 1e-6) * 65535.0
        return Image.fromarray(np.round(scaled).astype(np.uint16))
    grey = np.round(image * 255.0).astype(np.uint8)
    if draw < _UINT16_RATE + _RGB_RATE:
        tint = rng.uniform(0.94, 1.0, 3)
        rgb = np.round(grey[..., None] * tint).astype(np.uint8)
        return Image.fromarray(rgb)
    return Image.fromarray(grey)


# ---------------------------------------------------------------------------------------------------------------
# Dataset layout


def _plan(n_images: int, seed: int, valid_fraction: float) -> list[_Study]:
    """Patients, their studies and splits; the first patients cover every body part and one spans two."""
    rng = np.random.default_rng(seed)
    weights = np.array([_BODY_PART_WEIGHTS[p] for p in BODY_PARTS])
    weights /= weights.sum()
    patients: list[list[tuple[str, int, bool, int, int]]] = []
    total = 0
    while total < n_images or len(patients) < len(BODY_PARTS):
        index = len(patients)
        n_parts = 1 + int(rng.choice(3, p=_PARTS_PER_PATIENT))
        if index == 0:
            n_parts = max(n_parts, 2)
        parts = [str(p) for p in rng.choice(BODY_PARTS, size=n_parts, replace=False, p=weights)]
        if index < len(BODY_PARTS):
            forced = BODY_PARTS[index]
            parts = [forced, *(p for p in parts if p != forced)][:n_parts]
        studies = []
        for part in parts:
            for number in range(1, 2 + int(rng.choice(3, p=_STUDIES_PER_PART))):
                n_views = 1 + int(rng.choice(4, p=_VIEWS_PER_STUDY))
                abnormal = bool(rng.random() < _ABNORMAL_RATE)
                studies.append((part, number, abnormal, n_views, int(rng.integers(2**62))))
                total += n_views
        patients.append(studies)

    valid: set[int] = set()
    n_valid = 0
    for index in rng.permutation(np.arange(len(BODY_PARTS), len(patients))):
        if n_valid >= valid_fraction * total:
            break
        valid.add(int(index))
        n_valid += sum(s[3] for s in patients[index])
    order = [i for i in range(len(patients)) if i not in valid] + sorted(valid)
    if len(order) > 99_999:
        raise ValueError(f"{len(order)} patients do not fit MURA's 5-digit patient ids; ask for fewer images")
    plan = []
    for patient, index in enumerate(order, start=1):
        split: Literal["train", "valid"] = "valid" if index in valid else "train"
        plan += [_Study(split, patient, *study) for study in patients[index]]
    return plan


def _study_lesions(study: _Study) -> list[_Lesion | None]:
    """What each view of the study shows: most views of an abnormal study show its lesion, at least one does."""
    if not study.abnormal:
        return [None] * study.n_views
    rng = np.random.default_rng([study.seed, 0])
    lesion = _Lesion(_LESION_KINDS[rng.choice(len(_LESION_KINDS), p=_LESION_WEIGHTS)], rng.random(), rng.random())
    visible = rng.random(study.n_views) < _VISIBLE_RATE
    if not visible.any():
        visible[rng.integers(study.n_views)] = True
    return [lesion if v else None for v in visible]


def _write_studies(root: str, studies: list[_Study], image_size: int) -> None:
    """Render and save every view of some studies (a unit of work for the process pool)."""
    for study in studies:
        folder = pathlib.Path(root) / study.path
        folder.mkdir(parents=True)
        for view, lesion in enumerate(_study_lesions(study), start=1):
            rng = np.random.default_rng([study.seed, view])
            image = _render(study.body_part, lesion, image_size, rng)
            _encode(image, rng).save(folder / f"image{view}.png")


def generate_mura(
    root: str | os.PathLike,
    *,
    n_images: int = 2000,
    image_size: int = 256,
    seed: int = 0,
    valid_fraction: float = 0.15,
    workers: int = 1,
) -> pathlib.Path:
    """Write a synthetic MURA-v1.1 tree under root; returns root/'MURA-v1.1'.

    Deterministic by seed (same seed → byte-identical files, whatever `workers`: every image draws from its own
    generator, seeded by its study and view). `n_images` is met to within a few images, except that the first
    patients always cover all seven body parts. `workers` > 1 renders studies in that many processes.
    """
    problems = []
    if n_images < 1:
        problems.append(f"n_images must be at least 1, got {n_images}")
    if image_size < 16:
        problems.append(f"image_size must be at least 16 pixels, got {image_size}")
    if not 0.0 <= valid_fraction < 1.0:
        problems.append(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if problems:
        raise ValueError("; ".join(problems))
    dataset = pathlib.Path(root) / DATASET_DIR
    if dataset.exists():
        raise FileExistsError(f"{dataset} already exists; delete it or pass another root")

    started = time.perf_counter()
    plan = _plan(n_images, seed, valid_fraction)
    n_total = sum(s.n_views for s in plan)
    logger.info("Writing %d synthetic images in %d studies to %s", n_total, len(plan), dataset)
    image_lines: dict[str, list[str]] = {"train": [], "valid": []}
    study_lines: dict[str, list[str]] = {"train": [], "valid": []}
    for study in plan:
        study_lines[study.split].append(f"{study.path},{int(study.abnormal)}\n")
        image_lines[study.split] += [f"{study.path}image{view}.png\n" for view in range(1, study.n_views + 1)]
    batches = [plan[i : i + 16] for i in range(0, len(plan), 16)]
    if workers > 1 and len(batches) > 1:
        # Spawned, not forked: the caller may hold threads (a Ray driver does).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(batches)), mp_context=context) as pool:
            for _ in pool.map(_write_studies, [str(root)] * len(batches), batches, [image_size] * len(batches)):
                pass
    else:
        for batch in batches:
            _write_studies(str(root), batch, image_size)
    for split in ("train", "valid"):
        (dataset / f"{split}_image_paths.csv").write_text("".join(image_lines[split]))
        (dataset / f"{split}_labeled_studies.csv").write_text("".join(study_lines[split]))
    logger.info("Wrote %d images in %.1f s", n_total, time.perf_counter() - started)
    return dataset


def _cache_dir() -> pathlib.Path:
    if env := os.environ.get("MURA_RAY_CACHE"):
        return pathlib.Path(env)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(xdg) / "mura_ray"
    return pathlib.Path.home() / ".cache" / "mura_ray"


def demo_dataset_root(n_images: int = 2000, image_size: int = 256, seed: int = 0) -> pathlib.Path:
    """Build once and cache; return the folder that contains MURA-v1.1 (what a user passes as --root).

    The cache is $MURA_RAY_CACHE, else $XDG_CACHE_HOME/mura_ray, else ~/.cache/mura_ray. The set is built in a
    temporary sibling and renamed into place, so an interrupted build never looks complete and concurrent
    builders never mix their files.
    """
    cache = _cache_dir()
    final = cache / f"synthetic-mura-v{GENERATOR_VERSION}-n{n_images}-px{image_size}-seed{seed}"
    if final.is_dir():
        logger.info("Using cached synthetic MURA at %s", final)
        return final
    cache.mkdir(parents=True, exist_ok=True)
    building = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    try:
        generate_mura(building, n_images=n_images, image_size=image_size, seed=seed, workers=os.cpu_count() or 1)
        try:
            os.replace(building, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder: a real failure
                raise
            logger.info("Another process finished %s first; using its copy", final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final
