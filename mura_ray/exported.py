"""An exported model directory, read and written without torch: `config.json` (`ModelSpec`), `model.safetensors`
(whose hash is the model id) and `model_card.json`, or an ensemble's `ensemble.json` and member directories.

Building the network from them is `models.load_model`'s; the scoring driver reads what it needs to check its input
and output from here, and loads the networks while its Ray starts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from mura_ray import storage
from mura_ray.config import UserError
from mura_ray.labels import ABNORMAL_NAMES, BODY_PARTS


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
    tta: bool = False
    """Whether validation averaged over the test-time flips (`models.predict`): scoring does by default."""
    body_parts: tuple[str, ...] = BODY_PARTS
    abnormal_names: tuple[str, ...] = ABNORMAL_NAMES
    extra: dict[str, Any] = field(default_factory=dict)


def weights_id(data: bytes) -> str:
    """The model id: a hash of the weights file, so predictions name exactly the weights that made them."""
    return hashlib.sha256(data).hexdigest()[:16]


def read_exported(model_uri: str) -> tuple[ModelSpec, bytes, str]:
    """An exported model directory's spec, weights file and model id."""
    for name in ("model.safetensors", "config.json"):
        if not storage.exists(storage.join(model_uri, name)):
            raise UserError(f"--model {model_uri}: not an exported model directory (no {name})")
    raw = storage.read_json(storage.join(model_uri, "config.json"))
    raw["body_parts"] = tuple(raw.get("body_parts", BODY_PARTS))
    raw["abnormal_names"] = tuple(raw.get("abnormal_names", ABNORMAL_NAMES))
    weights = storage.read_bytes(storage.join(model_uri, "model.safetensors"))
    return ModelSpec(**raw), weights, weights_id(weights)


ENSEMBLE_FILE = "ensemble.json"
"""In an ensemble's directory: its members (directories relative to it), operating threshold and TTA setting."""


def ensemble_members(model_uri: str) -> tuple[list[str], dict[str, Any] | None]:
    """The exported models behind a --model directory: itself, or an ensemble's members (with its ensemble.json).

    An ensemble directory (`jobs/tune.py --ensemble-size`) holds copies of its members' model directories and the
    operating threshold chosen on validation for their mean probability.
    """
    uri = storage.join(model_uri, ENSEMBLE_FILE)
    if not storage.exists(uri):
        return [model_uri], None
    ensemble = storage.read_json(uri)
    members = ensemble.get("members") if isinstance(ensemble, dict) else None
    if not members or not all(isinstance(m, str) for m in members):
        raise UserError(f"--model {model_uri}: {ENSEMBLE_FILE} names no members; export the ensemble again")
    return [storage.join(model_uri, m) for m in members], ensemble


def write_ensemble(members: list[str], out_uri: str, card: dict[str, Any], *, tta: bool) -> None:
    """Copy exported model directories into `out_uri`/members/ and describe them as one ensemble model (its
    threshold 0.5 until one is chosen on validation, as for a single model)."""
    names = []
    for i, member in enumerate(members):
        name = f"members/{i}"
        for file in ("model.safetensors", "config.json", "model_card.json"):
            storage.write_bytes(storage.join(out_uri, name, file), storage.read_bytes(storage.join(member, file)))
        names.append(name)
    storage.write_json(storage.join(out_uri, ENSEMBLE_FILE), {"members": names, "threshold": 0.5, "tta": tta})
    storage.write_json(storage.join(out_uri, "model_card.json"), {**card, "members": names, "threshold": 0.5})
