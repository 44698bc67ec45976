"""Grad-CAM explanations: example selection, target layers of timm backbones, heatmaps, reading images back."""

from __future__ import annotations

import importlib.util
import io
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mura_ray.config import UserError
from mura_ray.data.images import load_pixels
from mura_ray.explain import explain_report_examples, gradcam_images, select_examples, target_layer
from mura_ray.exported import ModelSpec
from mura_ray.models import build_model, export_model, load_model

SIZE = 32
needs_gradcam = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_grad_cam") is None, reason="needs the explain extra (grad-cam)"
)


def _predictions(rows: list[tuple[str, float | None, float | None, str | None]]) -> pd.DataFrame:
    """(image_id, label, prob_abnormal, error) rows with the other prediction columns filled in."""
    return pd.DataFrame({
        "image_id": [r[0] for r in rows],
        "path": [f"XR_WRIST/patient1/study1/{r[0]}.png" for r in rows],
        "body_part": ["WRIST"] * len(rows),
        "body_part_pred": ["WRIST"] * len(rows),
        "label": [r[1] for r in rows],
        "prob_abnormal": [r[2] for r in rows],
        "error": [r[3] for r in rows],
    })


def test_select_examples_picks_the_most_confident_of_each_kind():
    df = _predictions([
        ("tp_high", 1, 0.95, None), ("tp_mid", 1, 0.80, None), ("tp_low", 1, 0.50, None),
        ("fn_worst", 1, 0.05, None), ("fn_mild", 1, 0.40, None),
        ("fp_worst", 0, 0.99, None), ("fp_mild", 0, 0.60, None),
        ("tn", 0, 0.10, None),
        ("unlabelled", None, 0.97, None), ("failed", 1, None, "cannot decode image"),
        ("errored_with_prob", 0, 0.98, "stale"),
    ])
    chosen = select_examples(df, n=2, threshold=0.5)
    assert list(chosen) == ["true positive", "false negative", "false positive"]
    assert chosen["true positive"]["image_id"].tolist() == ["tp_high", "tp_mid"]
    assert chosen["false negative"]["image_id"].tolist() == ["fn_worst", "fn_mild"]
    assert chosen["false positive"]["image_id"].tolist() == ["fp_worst", "fp_mild"]
    assert all(len(f) == 0 for f in select_examples(df, n=0, threshold=0.5).values())


@pytest.mark.parametrize("backbone", ["custom_cnn", "resnet18", "densenet121", "efficientnet_b0"])
def test_target_layer_is_the_last_spatial_stage(backbone):
    model = build_model(backbone).eval()
    layer = target_layer(model)
    seen = []
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.zeros(1, 1, 64, 64))
    assert len(seen) == 1 and len(seen[0]) == 4
    assert seen[0][1] == model.trunk.feature_info[-1]["num_chs"]


def _radiograph_png(seed: int, shape: tuple[int, int] = (48, 40)) -> bytes:
    """A bright ellipse ("bone") on a noisy dark background."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    bone = ((yy - h * 0.5) / (h * 0.35)) ** 2 + ((xx - w * (0.3 + 0.1 * (seed % 4))) / (w * 0.15)) ** 2 < 1
    arr = np.clip(30 + 170 * bone + rng.normal(0, 15, shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("explain") / "m")
    spec = ModelSpec(backbone="custom_cnn", image_size=SIZE, mean=0.5, std=0.25)
    export_model(build_model("custom_cnn"), spec, out, {"backbone": "custom_cnn"})
    return out


@needs_gradcam
def test_gradcam_images_are_pngs_with_a_heatmap(model_dir):
    from pytorch_grad_cam.utils.image import show_cam_on_image

    model, spec, _ = load_model(model_dir)
    images = [_radiograph_png(1), _radiograph_png(2), b"not an image"]
    with torch.inference_mode():  # as a scoring caller might be
        out = gradcam_images(model, spec, images, ["WRIST", None, None], ["a", "b", "broken"])
    assert [caption for caption, _ in out] == ["a", "b"]
    for _, png in out:
        img = Image.open(io.BytesIO(png), formats=["PNG"])
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
    # A constant class activation map is scaled to zeros; the overlay must differ from that one.
    overlay = np.asarray(Image.open(io.BytesIO(out[0][1])))
    view = load_pixels(images[0], SIZE).astype(np.float32) / 255.0
    flat = show_cam_on_image(np.repeat(view[:, :, None], 3, axis=2), np.zeros((SIZE, SIZE), np.float32), use_rgb=True)
    assert np.abs(overlay.astype(int) - flat.astype(int)).max() > 20
    assert not any(p.grad is not None for p in model.parameters())


@needs_gradcam
def test_gradcam_on_a_vision_transformer_at_the_model_input_size(tmp_path):
    """ViT activations are tokens, not maps: the patch tokens are laid out on the patch grid (class token dropped).
    The model is built at the exported input size (64 px, not timm's default 224)."""
    torch.manual_seed(0)
    spec = ModelSpec(backbone="vit_tiny_patch16_224", image_size=64, mean=0.5, std=0.25)
    export_model(build_model(spec.backbone, image_size=64), spec, str(tmp_path / "vit"), {})
    model, spec, _ = load_model(str(tmp_path / "vit"))
    out = gradcam_images(model, spec, [_radiograph_png(1, (64, 64)), _radiograph_png(2, (64, 64))],
                         ["WRIST", None], ["a", "b"])
    assert [caption for caption, _ in out] == ["a", "b"]
    from pytorch_grad_cam.utils.image import show_cam_on_image

    # The heatmap is not blank (the last block's output tokens, but for the class token, get no gradient).
    view = load_pixels(_radiograph_png(1, (64, 64)), 64).astype(np.float32) / 255.0
    flat = show_cam_on_image(np.repeat(view[:, :, None], 3, axis=2), np.zeros((64, 64), np.float32), use_rgb=True)
    overlay = np.asarray(Image.open(io.BytesIO(out[0][1])))
    assert overlay.shape == (64, 64, 3) and np.abs(overlay.astype(int) - flat.astype(int)).max() > 20


def _scored(ids: list[str]) -> pd.DataFrame:
    """Predictions for images named by their outcome; the false negative's body part is unknown (predicted)."""
    labels_probs = {"tp": (1, 0.9), "fn": (1, 0.2), "fp": (0, 0.7), "tn": (0, 0.1)}
    return pd.DataFrame({
        "image_id": ids,
        "path": [f"XR_HAND/patient1/study1_x/{i}.png" for i in ids],
        "body_part": [None if i == "fn" else "HAND" for i in ids],
        "body_part_pred": ["ELBOW" if i == "fn" else "HAND" for i in ids],
        "label": [labels_probs[i][0] for i in ids],
        "prob_abnormal": [labels_probs[i][1] for i in ids],
        "error": [None] * len(ids),
    })


@needs_gradcam
def test_explain_report_examples_reads_a_parquet_split(model_dir, tmp_path):
    ids = ["tp", "fn", "fp", "tn"]
    split = tmp_path / "test"
    split.mkdir()
    # The true negative's bytes are garbage: only the selected rows may be decoded.
    images = [_radiograph_png(1), _radiograph_png(2), _radiograph_png(3), b"garbage"]
    pq.write_table(pa.table({"image_id": pa.array(ids, pa.string()), "image": pa.array(images, pa.binary())}),
                   split / "part-0.parquet")
    out = explain_report_examples(_scored(ids), str(split), [model_dir], n=3, threshold=0.5)
    captions = [c for c, _ in out]
    assert captions == [
        "true positive · p=0.90 · HAND · XR_HAND/patient1/study1_x/tp.png",
        "false negative · p=0.20 · ELBOW (predicted) · XR_HAND/patient1/study1_x/fn.png",
        "false positive · p=0.70 · HAND · XR_HAND/patient1/study1_x/fp.png",
    ]
    assert all(png.startswith(b"\x89PNG") for _, png in out)


@needs_gradcam
def test_explain_report_examples_reads_a_raw_folder_and_names_the_ensemble_member(model_dir, tmp_path):
    ids = ["tp", "fn", "fp", "tn"]
    df = _scored(ids)
    for seed, rel in enumerate(df["path"][:3]):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(_radiograph_png(seed))
    out = explain_report_examples(df, str(tmp_path), [model_dir, model_dir], n=1, threshold=0.5)
    assert len(out) == 3
    assert all("Grad-CAM of model 1 of 2 (" in caption for caption, _ in out)


def test_explain_without_the_extra_says_how_to_install_it(monkeypatch, model_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(UserError, match=r"pip install 'mura_ray\[explain\]'"):
        explain_report_examples(_scored(["tp"]), str(tmp_path), [model_dir], n=1, threshold=0.5)
