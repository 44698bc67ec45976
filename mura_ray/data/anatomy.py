"""Synthetic radiographs: the bones and soft tissue of each body part, as polygons on a unit canvas.

The canvas spans [0, 1] x [0, 1], y down; one builder per body part draws its anatomy upright, with seeded
variation, and says where on which bones a lesion may sit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mura_ray.labels import BODY_PARTS

Point = tuple[float, float]


@dataclass(frozen=True)
class Bone:
    """One bone: its outline and canal, its axis from p0 to p1, and how bright it films (`density`)."""

    outline: np.ndarray  # (k, 2) polygon, canvas units: the canvas spans [0, 1] x [0, 1], y down
    canal: np.ndarray | None  # darker medullary canal inside the outline
    p0: np.ndarray
    p1: np.ndarray
    width: float  # shaft width
    end_width: float  # width of the wider end, sizes avulsed fragments
    density: float = 1.0


@dataclass(frozen=True)
class Anatomy:
    """The bones and soft tissue of one body part, upright, in canvas units."""

    bones: list[Bone]
    tissue: list[np.ndarray]  # soft-tissue polygons
    targets: list[tuple[int, float, float]]  # (bone index, t_min, t_max): where a lesion may sit
    air: list[np.ndarray] = field(default_factory=list)  # lung: darker than soft tissue


# ---------------------------------------------------------------------------------------------------------------
# Canvas and geometry


def polygon_pixels(poly: np.ndarray, size: int) -> list[float]:
    """A polygon's vertices in pixels of a `size`-pixel canvas, flat, as Pillow's `ImageDraw.polygon` takes them."""
    return (poly * size).ravel().tolist()


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates of the pixel centres: x as a row, y as a column (they broadcast to (size, size))."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[None, :], coords[:, None]


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.hypot(v[0], v[1])


def rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _long_bone(
    p0: Point, p1: Point, shaft: float, end0: float, end1: float, density: float = 1.0, n: int = 20
) -> Bone:
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
    return Bone(outline, canal, a, b, shaft, max(end0, end1), density)


def _oval(centre: Point, rx: float, ry: float, angle: float = 0.0, density: float = 1.0) -> Bone:
    a = np.linspace(0.0, 2 * math.pi, 28, endpoint=False)[:, None]
    c = np.asarray(centre, float)
    major = rotate(np.array([1.0, 0.0]), angle)
    minor = np.array([-major[1], major[0]])
    outline = c + rx * np.cos(a) * major + ry * np.sin(a) * minor
    return Bone(outline, None, c - rx * major, c + rx * major, 2 * min(rx, ry), 2 * max(rx, ry), density)


def _arc_band(centre: Point, radius: float, width: float, a0: float, a1: float, density: float = 1.0) -> Bone:
    """A curved strip of bone (glenoid rim, rib)."""
    a = np.linspace(a0, a1, 24)[:, None]
    ring = np.concatenate([np.cos(a), np.sin(a)], axis=1)
    c = np.asarray(centre, float)
    outline = np.concatenate([c + (radius + width / 2) * ring, (c + (radius - width / 2) * ring)[::-1]])
    return Bone(outline, None, c + radius * ring[0], c + radius * ring[-1], width, width, density)


def rect(centre: np.ndarray, direction: np.ndarray, length: float, width: float) -> np.ndarray:
    """The corners of a rectangle centred on `centre`, `length` along `direction` and `width` across."""
    u = unit(direction)
    nrm = np.array([-u[1], u[0]])
    hl, hw = u * length / 2, nrm * width / 2
    return np.stack([centre - hl - hw, centre + hl - hw, centre + hl + hw, centre - hl + hw])


def _capsule(p0: Point, p1: Point, width: float) -> np.ndarray:
    return _long_bone(p0, p1, width, width, width).outline


# ---------------------------------------------------------------------------------------------------------------
# Anatomy: one builder per body part, in canvas units, upright; the pose is applied later to the whole canvas.


def _forearm(rng: np.random.Generator) -> Anatomy:
    x = 0.5 + rng.normal(0, 0.02)
    sep = rng.uniform(0.11, 0.19)  # lateral views overlap the two bones more
    radius = _long_bone((x - sep / 2, 0.05), (x - sep / 2 - 0.03, 0.94), 0.05, 0.075, 0.13)
    ulna = _long_bone((x + sep / 2, 0.03), (x + sep / 2 + 0.01, 0.94), 0.045, 0.11, 0.06)
    tissue = [_capsule((x, -0.2), (x, 1.2), rng.uniform(0.38, 0.46))]
    return Anatomy([radius, ulna], tissue, [(0, 0.25, 0.75), (1, 0.25, 0.75)])


def _humerus(rng: np.random.Generator) -> Anatomy:
    x = 0.5 + rng.normal(0, 0.02)
    w = rng.uniform(0.075, 0.095)
    shaft = _long_bone((x, 0.15), (x + rng.normal(0, 0.015), 0.87), w, 1.5 * w, 2.6 * w)
    head = _oval((x - 0.025, 0.12), 0.105, 0.095, rng.normal(0, 0.2))
    tissue = [_capsule((x, -0.2), (x, 1.2), rng.uniform(0.46, 0.56))]
    return Anatomy([shaft, head], tissue, [(0, 0.25, 0.75)])


def _finger(rng: np.random.Generator) -> Anatomy:
    lengths = (0.26, 0.29, 0.19, 0.13)  # metacarpal head, proximal, middle, distal phalanx
    widths = (0.075, 0.062, 0.052, 0.042)
    gap = rng.uniform(0.025, 0.035)
    scale = rng.uniform(0.92, 1.05)
    direction, cursor = np.array([0.0, -1.0]), np.array([0.5 + rng.normal(0, 0.02), 1.06])
    bones, tips = [], [cursor]
    for length, width in zip(lengths, widths, strict=True):
        direction = rotate(direction, rng.normal(0, 0.06))
        end = cursor + direction * length * scale
        bones.append(_long_bone(tuple(cursor), tuple(end), width, 1.35 * width, 1.25 * width))
        cursor = end + direction * gap
        tips.append(end)
    tissue = [_capsule(tuple(tips[i]), tuple(tips[i + 1]), rng.uniform(0.17, 0.21)) for i in range(len(tips) - 1)]
    return Anatomy(bones, tissue, [(0, 0.35, 0.65), (1, 0.25, 0.75), (2, 0.3, 0.7)])


def _ray(base: np.ndarray, angle: float, lengths: tuple[float, ...], widths: tuple[float, ...], gap: float):
    """A metacarpal and its phalanges fanned out from `base` at `angle` from vertical."""
    direction = rotate(np.array([0.0, -1.0]), angle)
    bones, cursor = [], base
    for length, width in zip(lengths, widths, strict=True):
        end = cursor + direction * length
        bones.append(_long_bone(tuple(cursor), tuple(end), width, 1.4 * width, 1.3 * width))
        cursor = end + direction * gap
    return bones, cursor - direction * gap


def _hand(rng: np.random.Generator) -> Anatomy:
    cx = 0.5 + rng.normal(0, 0.02)
    spread = rng.uniform(0.8, 1.2)
    bones: list[Bone] = []
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
    return Anatomy(bones, tissue, targets)


def _wrist(rng: np.random.Generator) -> Anatomy:
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
        tip = base + rotate(np.array([0.0, -0.55]), (i - 1.5) * 0.08)
        bones.append(_long_bone(tuple(base), tuple(tip), 0.055, 0.08, 0.06))
    bones.append(_long_bone((cx - 0.25, 0.46), (cx - 0.5, 0.1), 0.06, 0.08, 0.06))  # thumb metacarpal
    tissue = [_capsule((cx + 0.03, 1.3), (cx + 0.03, -0.3), rng.uniform(0.62, 0.72))]
    targets = [(0, 0.45, 0.85), (0, 0.45, 0.85), (1, 0.45, 0.85)]
    targets += [(first_metacarpal + i, 0.25, 0.6) for i in range(4)]
    return Anatomy(bones, tissue, targets)


def _elbow(rng: np.random.Generator) -> Anatomy:
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
    return Anatomy([humerus, ulna, radius], tissue, [(0, 0.45, 0.8), (1, 0.3, 0.7), (2, 0.3, 0.7)])


def _shoulder(rng: np.random.Generator) -> Anatomy:
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
    bones.insert(0, Bone(scapula, None, scapula[0], scapula[2], 0.2, 0.2, 0.45))
    for k in range(3):
        bones.insert(0, _arc_band((0.8, 0.25), 0.62 + 0.13 * k, 0.035, math.radians(125), math.radians(195), 0.4))
    tissue = [np.array([[-0.2, -0.2], [1.2, -0.2], [1.2, 1.2], [-0.2, 1.2]])]
    lung = np.array([[-0.2, 0.3], [c[0] - 0.35, 0.33], [c[0] - 0.28, 0.7], [c[0] - 0.25, 1.2], [-0.2, 1.2]])
    shaft, clavicle = 4, 5
    return Anatomy(bones, tissue, [(shaft, 0.15, 0.5), (shaft, 0.15, 0.5), (clavicle, 0.3, 0.7)], [lung])


ANATOMY: dict[str, Callable[[np.random.Generator], Anatomy]] = {
    "ELBOW": _elbow,
    "FINGER": _finger,
    "FOREARM": _forearm,
    "HAND": _hand,
    "HUMERUS": _humerus,
    "SHOULDER": _shoulder,
    "WRIST": _wrist,
}
assert set(ANATOMY) == set(BODY_PARTS)
