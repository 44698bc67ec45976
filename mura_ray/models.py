"""Multi-task radiograph classifiers: a timm trunk (or the report's custom CNN) with abnormality and body-part heads.

timm is the registry: any timm model name is a backbone, built with one input channel and no classifier. The
abnormality head sees the pooled features together with a 32-d body-part embedding (the reference report's design);
the auxiliary head predicts the body part, and stands in for it at inference when a row carries none.
"""

from __future__ import annotations

import difflib
import io
import logging
import math
import sys
from dataclasses import asdict
from typing import Any

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.models import adapt_input_conv, get_pretrained_cfg_value
from torch import Tensor, nn

from mura_ray import storage
from mura_ray.config import FreezePolicy, UserError
from mura_ray.exported import ModelSpec, read_exported, weights_id
from mura_ray.labels import BODY_PARTS

logger = logging.getLogger(__name__)

CUSTOM_CNN = "custom_cnn"
UNKNOWN_BODY_PART = -1
"""Body-part index of rows whose body part is not known (external sets, raw archives)."""


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
    """Read weights (local or s3://) from safetensors or a PyTorch file without unpickling arbitrary objects."""
    try:
        if path.startswith("s3://"):
            data = storage.read_bytes(path)
            state = (safetensors.torch.load(data) if path.endswith(".safetensors")
                     else torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        elif path.endswith(".safetensors"):
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, corrupt or truncated, or a pickle of objects other than tensors
        raise UserError(f"cannot load weights from {path}: {str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict")
    return state


def _create_model(backbone: str, image_size: int | None, **kwargs: Any) -> nn.Module:
    """`timm.create_model`, at `image_size` for the models whose pretrained config declares a fixed input size
    (ViT, DeiT, Swin, ...); the others take any input size."""
    if image_size is not None and get_pretrained_cfg_value(backbone, "fixed_input_size"):
        kwargs["img_size"] = image_size
    return timm.create_model(backbone, **kwargs)


def _names(cfg: dict[str, Any], key: str) -> tuple[str, ...]:
    value = cfg.get(key) or ()
    return (value,) if isinstance(value, str) else tuple(value)


def _load_weights(trunk: nn.Module, state_dict: dict[str, Tensor], refusal: str) -> None:
    """Load weights into the trunk as timm loads its own pretrained ones; raise UserError(`refusal: why`) when
    they do not fit.

    The checkpoint filter of the model's timm module (`checkpoint_filter_fn`) converts them for the trunk (it
    resamples position embeddings to the trunk's input size), RGB input convolutions are adapted to one channel,
    and the classifier, which the trunk has none of, is left out. Any other key missing or foreign, or a tensor
    of another shape, does not fit.
    """
    filter_fn = getattr(sys.modules[type(trunk).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, trunk)
    own = trunk.state_dict()
    for conv in _names(trunk.pretrained_cfg, "first_conv"):
        key = f"{conv}.weight"
        weight = state_dict.get(key)
        if weight is not None and key in own and weight.ndim == 4 and weight.shape[1] == 3 * own[key].shape[1]:
            state_dict[key] = adapt_input_conv(1, weight)
    try:
        result = trunk.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # tensors of another shape, listed on the lines after the first
        lines = str(e).splitlines()
        raise UserError(f"{refusal}: {(lines[1:] or lines)[0].strip()}") from None
    classifier = _names(trunk.pretrained_cfg, "classifier")
    unexpected = [k for k in result.unexpected_keys if k.rpartition(".")[0] not in classifier]
    problems = [f"{len(keys)} {kind} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for kind, keys in (("missing", result.missing_keys), ("unexpected", unexpected)) if keys]
    if problems:
        raise UserError(f"{refusal}: {'; '.join(problems)}")


def build_trunk(
    backbone: str, *, pretrained: bool = False, pretrained_file: str | None = None, image_size: int | None = None
) -> nn.Module:
    """A one-channel feature extractor returning pooled features; pretrained RGB stems are adapted to one channel.

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
        trunk = _create_model(backbone, image_size, pretrained=False, **kwargs)
        _load_weights(trunk, state_dict, f"--pretrained-file {pretrained_file} does not fit {backbone}")
        return trunk
    if pretrained:
        logger.info("Loading timm's pretrained weights for %s from the hub", backbone)
        try:
            return _create_model(backbone, image_size, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as e:
            raise UserError(
                f"cannot download pretrained weights for {backbone} ({str(e).splitlines()[0]}); "
                "on an air-gapped cluster pass --pretrained-file PATH instead"
            ) from None
    # random initialisation (training says so once per run; loading an exported model lands here too)
    return _create_model(backbone, image_size, pretrained=False, **kwargs)


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

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay spares beside biases and norms (timm's optimizer factory asks): the body-part
        embedding and what the trunk names (a ViT's position embedding and class token)."""
        trunk = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return {f"trunk.{name}" for name in trunk} | ({"body_part_embed.weight"} if self.body_part_embed else set())

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


def predict(model: nn.Module, image: Tensor, body_part: Tensor | None = None, *, tta: bool = False
            ) -> dict[str, Tensor]:
    """The model's named logits; with `tta`, averaged in probability over the image and its horizontal flip.

    The one test-time augmentation: validation, the test split and `jobs/score.py --tta` all call this. Averaged
    logits are the logits of the mean probabilities (the sigmoid of `abnormal` and the softmax of `body_part` are
    the views' means), computed in log space so that no probability of 0 or 1 overflows, and the losses of
    validation stay the losses of what scoring outputs.
    """
    if not tta:
        return model(image, body_part)
    outs = [model(view, body_part) for view in (image, torch.flip(image, dims=[3]))]
    ab = torch.stack([o["abnormal"].float() for o in outs])
    merged = {"abnormal": torch.logsumexp(F.logsigmoid(ab), 0) - torch.logsumexp(F.logsigmoid(-ab), 0)}
    if "body_part" in outs[0]:
        parts = torch.stack([F.log_softmax(o["body_part"].float(), dim=1) for o in outs])
        merged["body_part"] = torch.logsumexp(parts, 0) - math.log(len(outs))
    return merged


def export_model(model: nn.Module, spec: ModelSpec, out_uri: str, card: dict[str, Any]) -> str:
    """Write `model.safetensors`, `config.json` and `model_card.json` to `out_uri`; returns the model id.

    The model id is a hash of the weights file, so predictions name exactly the weights that made them.
    """
    weights = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    model_id = weights_id(weights)
    storage.write_bytes(storage.join(out_uri, "model.safetensors"), weights)
    storage.write_json(storage.join(out_uri, "config.json"), asdict(spec))
    storage.write_json(storage.join(out_uri, "model_card.json"), {"model_id": model_id, **card})
    return model_id


def load_model(model_uri: str) -> tuple[MultiTaskNet, ModelSpec, str]:
    """Load an exported model directory: (model in eval mode, its spec, model id)."""
    spec, weights, model_id = read_exported(model_uri)
    model = model_from_spec(spec)
    model.load_state_dict(safetensors.torch.load(weights))
    model.eval()
    return model, spec, model_id


# ---------------------------------------------------------------------------------------------------- precision
def amp_dtype() -> torch.dtype:
    """Mixed precision on this GPU (training and scoring): bfloat16 where the hardware has it (Ampere and later),
    else float16 (training adds a GradScaler). torch's `is_bf16_supported()` also says yes where bfloat16 is only
    emulated (T4, V100): slow there, and cuDNN is reported to lack bfloat16 convolutions below compute capability
    8.0."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` (from `amp_dtype`, chosen once per process), or none when it is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
