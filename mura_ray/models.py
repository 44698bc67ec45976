"""Multi-task radiograph classifiers: a timm trunk (or the report's custom CNN) with abnormality and body-part heads.

timm is the registry: any timm model name is a backbone, built with one input channel and no classifier. The
abnormality head sees the pooled features together with a 32-d body-part embedding (the reference report's design);
the auxiliary head predicts the body part, and stands in for it at inference when a row carries none.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mura_ray import storage
from mura_ray.config import UserError
from mura_ray.labels import ABNORMAL_NAMES, BODY_PARTS

logger = logging.getLogger(__name__)

CUSTOM_CNN = "custom_cnn"
UNKNOWN_BODY_PART = -1
"""Body-part index of rows whose body part is not known (external sets, raw archives)."""

FreezePolicy = Literal["none", "all", "all-but-last"]


class CustomCNN(nn.Module):
    """The reference report's from-scratch baseline: three conv blocks (conv, batch norm, ReLU, max-pool).

    The last feature map is pooled twice, by its average and by its maximum, and the two are concatenated: a
    fracture line or a screw covers a few cells of the map, and averaging alone washes such a local finding out
    (on the synthetic demo set, average pooling alone left abnormality AUC near 0.6 after 12 epochs; with the
    maximum added it passed 0.8). Exposes timm's trunk interface (`num_features`, `feature_info`, pooled output) so
    heads, freezing and Grad-CAM treat it like any timm model.
    """

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        blocks = []
        prev = in_chans
        for width in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(prev, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            prev = width
        self.blocks = nn.Sequential(*blocks)
        self.num_features = 2 * prev
        self.feature_info = [{"module": f"blocks.{i}", "num_chs": w} for i, w in enumerate(widths)]
        self.pretrained_cfg = {"mean": (0.5,), "std": (0.25,)}

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(x)
        return torch.cat([F.adaptive_avg_pool2d(features, 1), F.adaptive_max_pool2d(features, 1)], dim=1).flatten(1)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, [*timm.list_models(), CUSTOM_CNN], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """Read weights from safetensors or a PyTorch file without unpickling arbitrary objects."""
    if path.startswith("s3://"):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            try:
                data = storage.read_bytes(path)
            except OSError as e:  # missing, no access, unreachable endpoint
                raise UserError(f"cannot load weights from {path}: {str(e).splitlines()[0]}") from None
            with open(local, "wb") as f:
                f.write(data)
            return load_state_dict_file(local)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # SafetensorError for a corrupt or truncated file, OSError for an unreadable one
            raise UserError(f"cannot load weights from {path}: {str(e).splitlines()[0]}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or others for unsafe or corrupt files
        raise UserError(f"cannot load weights from {path}: {str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict")
    return state


class _KeyMismatches(list):
    """Missing or unexpected keys of timm's pretrained load, collected while in the `with` block.

    timm loads non-strictly once it drops the classifier (`num_classes=0`) and only logs the keys it could not
    match, so a weight file for another architecture would leave part of the trunk at random init without an
    error. Its log records are the only report of that; they are collected here (and not shown) instead.
    """

    _logger = logging.getLogger("timm.models._builder")

    def __enter__(self) -> _KeyMismatches:
        self._handler = logging.Handler(logging.INFO)
        self._handler.emit = self._collect  # type: ignore[method-assign]
        self._saved = self._logger.level, self._logger.propagate
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        self._logger.addHandler(self._handler)
        return self

    def _collect(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("Missing keys", "Unexpected keys")):
            self.append(message)

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]


def _create_model(backbone: str, image_size: int | None, **kwargs: Any) -> nn.Module:
    """`timm.create_model`, at `image_size` for models built for one input size (ViT, Swin, ...: timm resamples
    their position embeddings when loading weights); convolutional models take any size and no `img_size`."""
    if image_size is not None:
        try:
            return timm.create_model(backbone, img_size=image_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(backbone, **kwargs)


def build_trunk(
    backbone: str, *, pretrained: bool = False, pretrained_file: str | None = None, image_size: int | None = None
) -> nn.Module:
    """A one-channel feature extractor returning pooled features; timm adapts pretrained RGB stems to one channel.

    `image_size` builds fixed-size models (vision transformers) for that input; convolutional ones ignore it.
    """
    if backbone == CUSTOM_CNN:
        if pretrained or pretrained_file:
            raise UserError("custom_cnn is trained from scratch: --pretrained and --pretrained-file do not apply")
        return CustomCNN(in_chans=1)
    if not timm.is_model(backbone):
        raise UserError(f"Unknown backbone {backbone!r}; timm has no such model.{_suggest(backbone)}")
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": 1}
    if pretrained_file:
        state_dict = load_state_dict_file(pretrained_file)
        logger.info("Loading weights for %s from %s", backbone, pretrained_file)
        try:
            with _KeyMismatches() as mismatches:
                trunk = _create_model(backbone, image_size, pretrained=True,
                                      pretrained_cfg_overlay={"state_dict": state_dict}, **kwargs)
        except RuntimeError as e:  # load_state_dict: tensors of the wrong shape
            raise UserError(
                f"--pretrained-file {pretrained_file} does not fit {backbone} ({str(e).splitlines()[0].strip()})"
            ) from None
        if mismatches:
            raise UserError(f"--pretrained-file {pretrained_file} does not fit {backbone}: {mismatches[0][:300]}")
    elif pretrained:
        logger.info("Loading timm's pretrained weights for %s from the hub", backbone)
        try:
            trunk = _create_model(backbone, image_size, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as e:
            raise UserError(
                f"cannot download pretrained weights for {backbone} ({str(e).splitlines()[0]}); "
                "on an air-gapped cluster pass --pretrained-file PATH instead"
            ) from None
    else:  # random initialisation (training says so once per run; loading an exported model lands here too)
        trunk = _create_model(backbone, image_size, pretrained=False, **kwargs)
    return trunk


def trunk_normalization(trunk: nn.Module) -> tuple[float, float]:
    """One-channel mean and std from the trunk's data config (the mean of its RGB values for timm models)."""
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", (0.5,))
    std = cfg.get("std", (0.25,))
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))


def apply_freeze(trunk: nn.Module, policy: FreezePolicy) -> list[str]:
    """Freeze trunk parameters by policy; returns the names of trunk parameters left trainable.

    `all-but-last` keeps the last resolution stage trainable: everything after the module of the trunk's
    second-to-last `feature_info` entry (layer4 of a ResNet, denseblock4 of a DenseNet), for any timm model.
    """
    names = [name for name, _ in trunk.named_parameters()]
    if policy == "none":
        trainable = set(names)
    elif policy == "all":
        trainable = set()
    elif policy == "all-but-last":
        info = getattr(trunk, "feature_info", None)
        stages = [f["module"] for f in info] if info is not None else []
        if len(stages) < 2:
            raise UserError("--freeze all-but-last needs a backbone with feature stages (timm feature_info)")
        boundary = stages[-2]
        last_index = max(
            (i for i, n in enumerate(names) if n == boundary or n.startswith(boundary + ".")), default=-1
        )
        if last_index < 0:
            raise UserError(f"--freeze all-but-last: no parameters under stage {boundary!r}")
        trainable = set(names[last_index + 1 :])
    else:
        raise UserError(f"--freeze {policy!r} is not one of none, all, all-but-last")
    for name, param in trunk.named_parameters():
        param.requires_grad = name in trainable
    return [n for n in names if n in trainable]


class MultiTaskNet(nn.Module):
    """Trunk plus an `nn.ModuleDict` of heads; `forward` returns named logits."""

    def __init__(
        self,
        trunk: nn.Module,
        *,
        num_body_parts: int = len(BODY_PARTS),
        embed_dim: int = 32,
        dropout: float = 0.3,
        multitask: bool = True,
        body_part_embedding: bool = True,
        freeze: FreezePolicy = "none",
    ):
        super().__init__()
        self.trunk = trunk
        self.multitask = multitask
        self.freeze = freeze
        features = trunk.num_features
        # One extra embedding row stands for "unknown" when no body-part head can fill it in: zero ("no information")
        # and never trained (`padding_idx`), since training rows normally all have a body part and a trained row
        # would otherwise stay at its random initialisation.
        self.body_part_embed = (nn.Embedding(num_body_parts + 1, embed_dim, padding_idx=num_body_parts)
                                if body_part_embedding else None)
        in_abnormal = features + (embed_dim if body_part_embedding else 0)
        heads = {
            "abnormal": nn.Sequential(
                nn.Linear(in_abnormal, 256),
                nn.BatchNorm1d(256),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(256, 64),
                nn.BatchNorm1d(64),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(64, 1),
            )
        }
        if multitask:
            heads["body_part"] = nn.Sequential(
                nn.Linear(features, 128), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(128, num_body_parts)
            )
        self.heads = nn.ModuleDict(heads)
        self.num_body_parts = num_body_parts

    def train(self, mode: bool = True) -> MultiTaskNet:
        super().train(mode)
        if mode and self.freeze != "none":
            # What is frozen keeps its batch-norm statistics too (as Keras's `trainable = False`, which the
            # reference report trained with): every trunk module whose parameters are all frozen runs in eval mode.
            for module in self.trunk.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self

    def forward(self, image: Tensor, body_part: Tensor | None = None) -> dict[str, Tensor]:
        """`body_part` holds known indices, or UNKNOWN_BODY_PART where the row has none (then predicted)."""
        features = self.trunk(image)
        out: dict[str, Tensor] = {}
        if "body_part" in self.heads:
            out["body_part"] = self.heads["body_part"](features)
        abnormal_in = features
        if self.body_part_embed is not None:
            if body_part is None:
                body_part = torch.full((image.shape[0],), UNKNOWN_BODY_PART, device=image.device, dtype=torch.long)
            index = body_part.long()
            unknown = index < 0
            if "body_part" in out:
                fallback = out["body_part"].detach().argmax(dim=1)
            else:
                fallback = torch.full_like(index, self.num_body_parts)
            index = torch.where(unknown, fallback, index)
            abnormal_in = torch.cat([features, self.body_part_embed(index)], dim=1)
        out["abnormal"] = self.heads["abnormal"](abnormal_in).squeeze(1)
        return out


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and preprocess its input; written as config.json."""

    backbone: str
    image_size: int
    mean: float
    std: float
    multitask: bool = True
    body_part_embedding: bool = True
    dropout: float = 0.3
    freeze: str = "none"
    threshold: float = 0.5
    body_parts: tuple[str, ...] = BODY_PARTS
    abnormal_names: tuple[str, ...] = ABNORMAL_NAMES
    extra: dict[str, Any] = field(default_factory=dict)


def build_model(
    backbone: str,
    *,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    freeze: FreezePolicy = "none",
    multitask: bool = True,
    body_part_embedding: bool = True,
    dropout: float = 0.3,
    image_size: int | None = None,
) -> MultiTaskNet:
    trunk = build_trunk(backbone, pretrained=pretrained, pretrained_file=pretrained_file, image_size=image_size)
    apply_freeze(trunk, freeze)
    return MultiTaskNet(
        trunk, dropout=dropout, multitask=multitask, body_part_embedding=body_part_embedding, freeze=freeze
    )


def model_from_spec(spec: ModelSpec) -> MultiTaskNet:
    """An uninitialised-weights model with the architecture described by `spec` (weights are loaded after)."""
    return build_model(
        spec.backbone,
        multitask=spec.multitask,
        body_part_embedding=spec.body_part_embedding,
        dropout=spec.dropout,
        image_size=spec.image_size,
    )


def _weights_id(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def export_model(model: nn.Module, spec: ModelSpec, out_uri: str, card: dict[str, Any]) -> str:
    """Write `model.safetensors`, `config.json` and `model_card.json` to `out_uri`; returns the model id.

    The model id is a hash of the weights file, so predictions name exactly the weights that made them.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "model.safetensors")
        save_file(state, weights)
        model_id = _weights_id(weights)
        with open(weights, "rb") as f:
            storage.write_bytes(storage.join(out_uri, "model.safetensors"), f.read())
    config = asdict(spec)
    storage.write_json(storage.join(out_uri, "config.json"), config)
    storage.write_json(storage.join(out_uri, "model_card.json"), {"model_id": model_id, **card})
    return model_id


def load_model(model_uri: str) -> tuple[MultiTaskNet, ModelSpec, str]:
    """Load an exported model directory: (model in eval mode, its spec, model id)."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "config.json"):
        if not storage.exists(storage.join(model_uri, name)):
            raise UserError(f"--model {model_uri}: not an exported model directory (no {name})")
    raw = storage.read_json(storage.join(model_uri, "config.json"))
    raw["body_parts"] = tuple(raw.get("body_parts", BODY_PARTS))
    raw["abnormal_names"] = tuple(raw.get("abnormal_names", ABNORMAL_NAMES))
    spec = ModelSpec(**raw)
    model = model_from_spec(spec)
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "model.safetensors")
        with open(weights, "wb") as f:
            f.write(storage.read_bytes(storage.join(model_uri, "model.safetensors")))
        model.load_state_dict(load_file(weights))
        model_id = _weights_id(weights)
    model.eval()
    return model, spec, model_id


def read_model_card(model_uri: str) -> dict[str, Any]:
    uri = storage.join(model_uri, "model_card.json")
    return storage.read_json(uri) if storage.exists(uri) else {}


# ---------------------------------------------------------------------------------------------------- precision
def amp_dtype() -> torch.dtype:
    """Mixed precision on this GPU (training and scoring): bfloat16 where the hardware has it (Ampere and later),
    else float16 (training adds a GradScaler). torch's `is_bf16_supported()` also says yes where bfloat16 is only
    emulated (T4, V100): slow there, and cuDNN is reported to lack bfloat16 convolutions below compute capability
    8.0."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` (from `amp_dtype`, chosen once per process), or none when it is None."""
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def describe(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return json.dumps({"parameters": total, "trainable": trainable})
