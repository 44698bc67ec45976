"""Grad-CAM heatmaps for the scoring report: the most confident true positives, false negatives and false positives.

pytorch-grad-cam (the optional extra `mura_ray[explain]`) does the attribution. The target layer is the trunk's last
`feature_info` stage, so every timm backbone (and the custom CNN) works without a per-architecture table.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import torch
from PIL import Image
from torch import Tensor, nn

from mura_ray import storage
from mura_ray.config import UserError
from mura_ray.data.images import DecodeError, load_pixels, normalize
from mura_ray.data.pipeline import body_part_indices
from mura_ray.data.score_input import is_parquet_input
from mura_ray.exported import ModelSpec
from mura_ray.models import MultiTaskNet, load_model

logger = logging.getLogger(__name__)

EXAMPLE_KINDS: tuple[str, ...] = ("true positive", "false negative", "false positive")
"""Report sections, in display order."""

_BATCH_SIZE = 8
"""Images per Grad-CAM forward/backward pass (bounds memory for large backbones on CPU)."""

_MISSING_EXTRA = "--explain needs the optional extra: pip install 'mura_ray[explain]'"


def _gradcam_api() -> tuple[Any, Any, Callable[..., np.ndarray]]:
    """(GradCAM, ClassifierOutputTarget, show_cam_on_image), imported lazily because the extra is optional."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.image import show_cam_on_image
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise UserError(_MISSING_EXTRA) from None
    return GradCAM, ClassifierOutputTarget, show_cam_on_image


def select_examples(predictions: pd.DataFrame, n: int, threshold: float) -> dict[str, pd.DataFrame]:
    """Up to `n` labelled, error-free rows per kind in EXAMPLE_KINDS, most confident (or most wrong) first.

    True and false positives are ordered by decreasing probability, false negatives by increasing probability;
    ties go by image id so the choice does not depend on the order of the prediction parts.
    """
    usable = predictions["label"].notna() & predictions["prob_abnormal"].notna()
    if "error" in predictions:
        usable &= predictions["error"].isna()
    rows = predictions[usable]
    positive = rows["label"].astype(int) == 1
    flagged = rows["prob_abnormal"].astype(np.float64) >= threshold  # as scoring decided (NumPy 2 would compare
    # a float32 column in float32)
    n = max(n, 0)

    def _top(mask: pd.Series, highest_first: bool) -> pd.DataFrame:
        ordered = rows[mask].sort_values(["prob_abnormal", "image_id"], ascending=[not highest_first, True])
        return ordered.head(n)

    return {
        "true positive": _top(positive & flagged, highest_first=True),
        "false negative": _top(positive & ~flagged, highest_first=False),
        "false positive": _top(~positive & flagged, highest_first=True),
    }


def target_layer(model: MultiTaskNet) -> nn.Module:
    """The trunk's last feature stage (layer4 of a ResNet, norm5 of a DenseNet, blocks.6 of an EfficientNet).

    A vision transformer with a class token (ViT, DeiT) is the exception: its head reads only the class token of
    the last block's output, so that output's patch tokens get no gradient (a blank map). The last block's first
    norm is taken instead, whose patch tokens feed the class token through the block's attention (pytorch-grad-cam's
    choice for ViT).
    """
    trunk = model.trunk
    info = getattr(trunk, "feature_info", None)
    if not info:
        raise UserError(f"Grad-CAM needs a backbone with feature stages (timm feature_info); "
                        f"{type(trunk).__name__} has none")
    blocks = getattr(trunk, "blocks", None)
    if getattr(trunk, "num_prefix_tokens", 0) and isinstance(blocks, nn.Sequential) and hasattr(blocks[-1], "norm1"):
        return blocks[-1].norm1
    return trunk.get_submodule(info[-1]["module"])


def _reshape_transform(model: MultiTaskNet, layer: nn.Module, image_size: int) -> Callable[[Tensor], Tensor] | None:
    """None for NCHW activations, a permute for channels-last ones (Swin), and for transformer tokens (ViT, DeiT:
    batch x tokens x channels) the patch tokens laid out on the patch grid, class and register tokens dropped.

    One probe forward pass reads the activation's shape; the channel count from feature_info tells the layout.
    """
    seen: list[tuple[int, ...]] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, 1, image_size, image_size, device=device))
    finally:
        handle.remove()
    channels = model.trunk.feature_info[-1].get("num_chs")
    shape = seen[0]
    if len(shape) == 4 and shape[1] == channels:
        return None
    if len(shape) == 4 and shape[-1] == channels:
        return lambda t: t.permute(0, 3, 1, 2)
    if len(shape) == 3 and shape[-1] == channels:
        prefix = int(getattr(model.trunk, "num_prefix_tokens", 0))
        patches = shape[1] - prefix
        grid = getattr(getattr(model.trunk, "patch_embed", None), "grid_size", None)
        if grid is None or grid[0] * grid[1] != patches:
            side = math.isqrt(patches)
            grid = (side, side) if side * side == patches else None
        if grid is not None:
            rows, cols = int(grid[0]), int(grid[1])
            return lambda t: t[:, prefix:, :].reshape(t.shape[0], rows, cols, t.shape[2]).permute(0, 3, 1, 2)
    module = model.trunk.feature_info[-1]["module"]
    raise UserError(f"Grad-CAM needs spatial feature maps; the backbone's last stage {module!r} gives activations "
                    f"of shape {shape} (transformer tokens?). Use --explain 0 for this model.")


class _AbnormalLogit(nn.Module):
    """The abnormality logit as a (B, 1) output, with the batch's body parts fixed (pytorch-grad-cam's interface)."""

    def __init__(self, net: MultiTaskNet):
        super().__init__()
        self.net = net
        self.body_part: Tensor | None = None

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image, self.body_part)["abnormal"].unsqueeze(1)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def gradcam_images(
    model: MultiTaskNet, spec: ModelSpec, images: list[bytes], body_parts: list[str | None], captions: list[str]
) -> list[tuple[str, bytes]]:
    """(caption, PNG) pairs: each image as the model saw it, with its abnormality Grad-CAM overlaid.

    A missing body part is filled in by the model's own body-part head, as in scoring. Images that cannot be
    decoded are skipped with a warning. PNGs are `spec.image_size` pixels square.
    """
    GradCAM, ClassifierOutputTarget, show_cam_on_image = _gradcam_api()
    if not len(images) == len(body_parts) == len(captions):
        raise ValueError(f"{len(images)} images, {len(body_parts)} body parts and {len(captions)} captions")
    views: list[np.ndarray] = []
    kept: list[int] = []
    for i, data in enumerate(images):
        try:
            views.append(load_pixels(data, spec.image_size))
            kept.append(i)
        except DecodeError as e:
            logger.warning("Grad-CAM skips %r: %s", captions[i], e)
    if not views:
        return []
    was_training = model.training
    model.eval()
    layer = target_layer(model)
    device = next(model.parameters()).device
    wrapper = _AbnormalLogit(model)
    parts = body_part_indices([body_parts[i] for i in kept])
    out: list[tuple[str, bytes]] = []
    # Callers may score under inference mode; Grad-CAM needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        reshape = _reshape_transform(model, layer, spec.image_size)
        with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=reshape) as cam:
            for start in range(0, len(views), _BATCH_SIZE):
                batch = np.stack(views[start : start + _BATCH_SIZE])
                x = torch.from_numpy(normalize(batch[:, None], spec.mean, spec.std)).to(device)
                # A gradient path through the input keeps Grad-CAM working when trunk weights are frozen.
                x.requires_grad_(True)
                wrapper.body_part = torch.from_numpy(parts[start : start + len(batch)]).to(device)
                maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * len(batch))
                for view, heat, i in zip(batch, maps, kept[start : start + len(batch)], strict=True):
                    rgb = np.repeat(view[:, :, None].astype(np.float32) / 255.0, 3, axis=2)
                    out.append((captions[i], _png(show_cam_on_image(rgb, heat, use_rgb=True))))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return out


def _read_parquet_images(input_uri: str, image_ids: Sequence[str]) -> dict[str, bytes]:
    """Image bytes of `image_ids` from an ingested split, reading only the matching rows."""
    files = storage.list_parquet(input_uri) if storage.is_dir(input_uri) else [input_uri]
    fs, _ = storage.resolve(files[0])
    dataset = ds.dataset([storage.resolve(f)[1] for f in files], filesystem=fs, format="parquet")
    table = dataset.to_table(columns=["image_id", "image"], filter=ds.field("image_id").isin(list(image_ids)))
    return dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True))


def _read_folder_images(input_uri: str, rows: pd.DataFrame) -> dict[str, bytes]:
    """Image bytes from a raw image folder, where predictions' `path` is relative to the folder."""
    found: dict[str, bytes] = {}
    for image_id, rel in zip(rows["image_id"], rows["path"], strict=True):
        try:
            found[image_id] = storage.read_bytes(storage.join(input_uri, rel))
        except OSError as e:
            logger.warning("Grad-CAM cannot read %s: %s", rel, e)
    return found


def _caption(kind: str, row: pd.Series, model_note: str) -> str:
    known = row.get("body_part")
    predicted = row.get("body_part_pred")
    if isinstance(known, str):
        part = known
    elif isinstance(predicted, str):
        part = f"{predicted} (predicted)"
    else:
        part = "body part unknown"
    return f"{kind} · p={row['prob_abnormal']:.2f} · {part} · {row['path']}{model_note}"


def explain_report_examples(
    predictions: pd.DataFrame, input_uri: str, model_uris: list[str], n: int, threshold: float
) -> list[tuple[str, bytes]]:
    """Grad-CAM (caption, PNG) pairs for `select_examples`, ready for `report.write_report(explanations=...)`.

    Images are read back from the scoring input (an ingested Parquet split or a raw image folder). Heatmaps come
    from the first model of an ensemble; captions say so, and carry the ensemble's probability.
    """
    _gradcam_api()
    if not model_uris:
        raise UserError("--explain needs at least one --model")
    chosen = select_examples(predictions, n, threshold)
    frames = [frame.assign(_kind=kind) for kind, frame in chosen.items() if len(frame)]
    if not frames:
        logger.info("Grad-CAM: no labelled, scored rows to explain")
        return []
    rows = pd.concat(frames)
    if not storage.exists(input_uri):
        raise UserError(f"--input {input_uri}: no such file or folder (needed to read the images to explain)")
    if is_parquet_input(input_uri):
        images = _read_parquet_images(input_uri, sorted(set(rows["image_id"])))
    else:
        images = _read_folder_images(input_uri, rows)
    missing = [i for i in rows["image_id"] if i not in images]
    if missing:
        logger.warning("Grad-CAM: %d of %d selected images not found in %s", len(missing), len(rows), input_uri)
    rows = rows[rows["image_id"].isin(images.keys())]
    model, spec, model_id = load_model(model_uris[0])
    note = f" · Grad-CAM of model 1 of {len(model_uris)} ({model_id})" if len(model_uris) > 1 else ""
    logger.info("Grad-CAM for %d images with %s (%s)", len(rows), model_uris[0], spec.backbone)
    return gradcam_images(
        model,
        spec,
        [images[i] for i in rows["image_id"]],
        [p if isinstance(p, str) else None for p in rows.get("body_part", [None] * len(rows))],
        [_caption(row["_kind"], row, note) for _, row in rows.iterrows()],
    )
