"""Synthetic radiographs: one film from an anatomy and an optional lesion, posed and exposed like a real one."""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mura_ray.data.anatomy import ANATOMY, Bone, pixel_grid, polygon_pixels
from mura_ray.data.lesions import Lesion, avulsion, butterfly, fracture, hardware


def _draw_bones(size: int, bones: list[Bone]) -> np.ndarray:
    """The bones on a `size`-pixel canvas, each as bright as its density with a darker canal, in [0, 1]."""
    image = Image.new("L", (size, size))
    draw = ImageDraw.Draw(image)
    for bone in bones:
        draw.polygon(polygon_pixels(bone.outline, size), fill=round(230 * bone.density))
        if bone.canal is not None:
            draw.polygon(polygon_pixels(bone.canal, size), fill=round(165 * bone.density))
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


def render(body_part: str, lesion: Lesion | None, size: int, rng: np.random.Generator) -> np.ndarray:
    """One radiograph of `body_part` (showing `lesion`, if any) as floats in [0, 1], shape (height, width).

    Every random choice draws from `rng`, in a fixed order: the same generator state gives the same pixels.
    """
    anatomy = ANATOMY[body_part](rng)
    tissue_image = Image.new("L", (size, size))
    draw = ImageDraw.Draw(tissue_image)
    for poly in anatomy.tissue:
        draw.polygon(polygon_pixels(poly, size), fill=255)
    for poly in anatomy.air:
        draw.polygon(polygon_pixels(poly, size), fill=70)
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
            layer = fracture(layer, bone, t, rng, displaced=rng.random() < 0.85)
        elif lesion.kind == "butterfly":
            layer = butterfly(layer, bone, t, rng)
        elif lesion.kind == "avulsion":
            site = bone.p1 if lesion.position < 0.5 else bone.p0
            layer = avulsion(layer, bone, lesion.position < 0.5, rng)
        else:
            if rng.random() < 0.4:  # fixation of a still-visible fracture
                layer = fracture(layer, bone, t, rng, displaced=False)
            metal = hardware(bone, t, size, rng)
        bones = np.maximum(bones, layer)
        if lesion.kind != "hardware":  # soft-tissue swelling around an injury
            x, y = pixel_grid(size)
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

