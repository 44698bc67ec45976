"""Search spaces for `jobs/tune.py`: a YAML mapping of training options to fixed values or domains
(`choice`, `grid`, `uniform`, `loguniform`; the shipped `tune_space.yaml` documents the grammar), checked against
`TrainConfig` before any trial starts, and turned into Ray Tune's `param_space`."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, get_type_hints

import ray.tune
import yaml

from mura_ray.config import TrainConfig, TuneConfig, UserError, coerce

DEFAULT_SPACE = str(Path(__file__).with_name("tune_space.yaml"))
DOMAINS = ("choice", "grid", "uniform", "loguniform")
SET_BY_FLAGS = {
    "data": "--data", "out": "--out", "epochs": "--epochs", "workers": "--workers-per-trial", "gpu": "--gpu",
    "cpus_per_worker": "--cpus-per-worker", "demo_images": "--demo-images", "seed": "--seed",
    "select_metric": "--metric",
}
"""Training options the search sets for every trial from its own flags, so a space may not set them (it would be
overwritten: `select_metric` is --metric, so that a trial keeps the checkpoint its leaderboard score comes from;
`seed` is derived from --seed per trial, see `trial_seed`)."""


def load_space(path: str | None = None) -> dict[str, Any]:
    """Read and check a search-space YAML (default: the shipped one): {option: fixed value or {domain: args}}."""
    path = path or DEFAULT_SPACE
    source = f"--space {path}"
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"{source}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{source}: expected a mapping of training options to values or domains, "
                        "e.g. `lr: {loguniform: [1.0e-4, 3.0e-3]}`")
    return check_space({str(k).replace("-", "_"): v for k, v in raw.items()}, source=source)


def check_space(spec: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Validate every key and every value a trial could get; returns the space with values typed like TrainConfig.

    Raises one UserError listing every problem, each naming its option.
    """
    types = get_type_hints(TrainConfig)
    searchable = sorted(set(types) - set(SET_BY_FLAGS))
    problems: list[str] = []
    checked: dict[str, Any] = {}
    for name, value in spec.items():
        if name in SET_BY_FLAGS:
            problems.append(f"{name} is set by {SET_BY_FLAGS[name]}, not by the search space")
        elif name not in types:
            close = difflib.get_close_matches(name, searchable, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; options: {', '.join(searchable)}"
            problems.append(f"unknown option {name!r}{hint}")
        else:
            try:
                checked[name] = _check_entry(name, value, types[name])
            except ValueError as e:
                problems.append(f"{name}: {e}")
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))
    return checked


def _check_entry(name: str, value: Any, ftype: Any) -> Any:
    if not isinstance(value, dict):
        fixed = coerce(value, ftype)
        _check_value(name, fixed)
        return fixed
    if len(value) != 1 or next(iter(value)) not in DOMAINS:
        raise ValueError(f"a searched option is a mapping with one key of {', '.join(DOMAINS)}, got {value!r}")
    ((kind, args),) = value.items()
    if not isinstance(args, list) or not args:
        raise ValueError(f"{kind} needs a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform"):
        if ftype is not float:
            raise ValueError(f"{kind} draws floats but {name} is not a number; use choice or grid")
        if len(args) != 2:
            raise ValueError(f"{kind} needs [low, high], got {args!r}")
        low, high = (coerce(a, float) for a in args)
        if not low < high:
            raise ValueError(f"{kind} needs low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform needs 0 < low, got {args!r}")
        values = [low, high]
    else:
        values = [coerce(a, ftype) for a in args]
    for v in values:
        _check_value(name, v)
    return {kind: values}


def _check_value(name: str, value: Any) -> None:
    """The training job's own validation of one value (and, for a backbone, that timm knows it)."""
    import timm

    from mura_ray.models import CUSTOM_CNN, build_trunk

    try:
        TrainConfig(**{name: value}).validate()
        if name == "backbone" and value != CUSTOM_CNN and not timm.is_model(value):
            build_trunk(value)  # raises the UserError that names the closest timm model
    except UserError as e:
        raise ValueError(f"{value!r}: {e}") from None


def resolve_space(cfg: TuneConfig) -> dict[str, Any]:
    """The space file with the command line's overrides: --backbones as a grid, --image-size fixed."""
    spec = load_space(cfg.space)
    overrides: dict[str, Any] = {}
    if cfg.backbones:
        overrides["backbone"] = {"grid": list(cfg.backbones)}
    if cfg.image_size is not None:
        overrides["image_size"] = cfg.image_size
    return {**spec, **check_space(overrides, source="command line")}


def to_param_space(spec: dict[str, Any]) -> dict[str, Any]:
    """Tune's param_space for a checked space."""
    def domain(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        ((kind, args),) = value.items()
        if kind == "choice":
            return ray.tune.choice(args)
        if kind == "grid":
            return ray.tune.grid_search(args)
        if kind == "uniform":
            return ray.tune.uniform(*args)
        return ray.tune.loguniform(*args)

    return {name: domain(value) for name, value in spec.items()}


def count_trials(spec: dict[str, Any], num_samples: int) -> int:
    """Trials a search runs: --num-samples for every grid point."""
    return num_samples * math.prod(len(v["grid"]) for v in spec.values() if isinstance(v, dict) and "grid" in v)


def varied_options(spec: dict[str, Any]) -> list[str]:
    """Options that differ between trials (the leaderboard's hyper-parameter columns), backbone first."""
    names = [k for k, v in spec.items() if isinstance(v, dict) and len(next(iter(v.values()))) > 1]
    return ["backbone", *[n for n in names if n != "backbone"]]
