"""One frozen, typed config per job. Validation collects every problem and raises once, naming the CLI flag.

Each class is its job's command line too: `add_config_arguments` gives every field a flag, typed and with choices
from the field's type, whose help is the field's docstring and default. Jobs build the configs from argv (and
`--config FILE.yaml` recipes); library code receives the config and unpacks it into flat arguments at its builder
functions, so models, losses and metrics never see a config object.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import math
import numbers
import os
import textwrap
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from mura_ray.labels import BODY_PARTS


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing input). Jobs print it as one line and exit with code 2."""


GpuMode = Literal["auto", "yes", "no"]
FreezePolicy = Literal["none", "all", "all-but-last"]
LossName = Literal["bce", "weighted", "focal"]
Source = Literal["mura", "folder", "images", "dicom"]
SelectMetric = Literal["val_study_kappa", "val_study_auc", "val_auc", "val_kappa", "val_abnormal_loss", "val_loss"]
METRIC_MODES: dict[str, Literal["min", "max"]] = {
    "val_study_kappa": "max", "val_study_auc": "max", "val_auc": "max", "val_kappa": "max",
    "val_abnormal_loss": "min", "val_loss": "min",
}
"""Validation metrics that rank checkpoints and trials, and their direction."""


_FLAGS = {"chunk_images": "--chunk-size", "models": "--model"}
"""Fields whose CLI flag is not their name with dashes."""


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _check_choice(problems: list[str], cfg: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        problems.append(f"{_flag(name)} {value!r} is not one of {', '.join(allowed)}")


def _check_positive(problems: list[str], cfg: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            problems.append(f"{_flag(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise UserError("; ".join(problems))


def coerce(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` of a config field, or ValueError saying what was expected.

    YAML recipes are loosely typed: `lr: 1e-3` is a string to YAML 1.1, `epochs: 10.0` a float, `gpu: yes` a bool.
    """
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return coerce(value, hint)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        quote = " (YAML reads yes/no/on/off as true/false: quote it)" if isinstance(value, bool) else ""
        raise ValueError(f"must be one of {', '.join(map(str, args))}, got {value!r}{quote}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"must be a whole number, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ValueError(f"must be a number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"must be a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"must be a list of strings, got {value!r}")
    if origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(f"must be a mapping, got {value!r}")
    return value


def replace_from(cfg: Any, values: Mapping[str, Any], *, source: str) -> Any:
    """A copy of `cfg` with `values` applied, each checked (and converted) against its field's type.

    Unknown keys and values of the wrong type are one UserError naming `source` and every bad option.
    """
    known = {f.name for f in fields(cfg)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    hints = get_type_hints(type(cfg))
    checked, problems = {}, []
    for name, value in values.items():
        try:
            checked[name] = coerce(value, hints[name])
        except ValueError as e:
            problems.append(f"{name} {e}")
    if problems:
        raise UserError(f"{source}: {'; '.join(problems)}")
    return dataclasses.replace(cfg, **checked)


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping of option names (dashes or underscores) to values."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --- Command-line flags derived from the config dataclasses ------------------------------------------------------


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal under it in the class body), on one line."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(node, ast.ClassDef)
    docs = {}
    for stmt, after in itertools.pairwise(node.body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def _shown(value: Any) -> str:
    """A default as the help text shows it, in the form the flag accepts."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _flag_kind(hint: Any) -> dict[str, Any]:
    """add_argument options for a field of type `hint` (`X | None` as X)."""
    if get_origin(hint) in (Union, types.UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is Literal:
        return {"choices": get_args(hint)}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(hint) is tuple:
        return {"nargs": "+"}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"no command-line form for {hint!r}: give the field's add_argument options, or skip it")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, demo: Mapping[str, Any] | None = None,
                         skip: Collection[str] = (), **custom: Mapping[str, Any]) -> None:
    """Add a flag to `parser` for each field of the config dataclass `cls`, but those in `skip`.

    A field's flag is its name with dashes (or its `_FLAGS` entry) and its dest the field's name. Its form follows
    the field's type: int, float or str as that type, a Literal as choices, a bool as --name/--no-name, a tuple
    as one or more values; `X | None` as X. Its help is the field's attribute docstring with the default and, where
    it differs, the value of `demo` (the defaults of a run without --data) appended. A field without a default is a
    required flag. Every flag defaults to None, so that a job can tell the options given from those left out and
    layer them over the config's defaults (`options_given`). `custom[name]` overrides the add_argument options of
    field `name` (an `action`, a `type`, a `metavar`).
    """
    names = {f.name for f in fields(cls)}
    unknown = (set(custom) | set(skip) | set(demo or {})) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    hints, docs = get_type_hints(cls), _field_docs(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring to serve as its help")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        notes = []
        if default not in (dataclasses.MISSING, None, ()):
            notes.append(f"default {_shown(default)}")
        if demo and f.name in demo and demo[f.name] != default:
            notes.append(f"{_shown(demo[f.name])} for the demo")
        text = docs[f.name].replace("`", "")
        if notes:
            text = f"{text.rstrip('.')} ({'; '.join(notes)})."
        options = {"dest": f.name, "default": None, "help": text.replace("%", "%%"), **_flag_kind(hints[f.name])}
        if "choices" not in options and "action" not in options:  # named after the flag, not the field
            options["metavar"] = _flag(f.name).removeprefix("--").replace("-", "_").upper()
        if default is dataclasses.MISSING:
            options["required"] = True
        parser.add_argument(_flag(f.name), **{**options, **custom.get(f.name, {})})


def options_given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of config dataclass `cls` given on the command line (flags left out parse as None), each list
    of values (a repeated or multi-value flag) as a tuple."""
    names = {f.name for f in fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names and v is not None}


def threshold_policy(policy: str) -> tuple[str, float]:
    """`--threshold-policy` as (method, target sensitivity): kappa, youden, sensitivity:X or fixed."""
    method, _, target = policy.partition(":")
    if method in ("kappa", "youden", "fixed") and not target:
        return method, 0.9
    if method == "sensitivity":
        try:
            value = float(target or "0.9")
        except ValueError:
            value = math.nan
        if 0.0 < value <= 1.0:
            return method, value
    raise ValueError(f"{policy!r} is not one of kappa, youden, sensitivity:X (0 < X <= 1), fixed")


@dataclass(frozen=True)
class IngestConfig:
    source: Source
    """Archive layout: `mura` (MURA-v1.1 and its CSVs), `folder` ({train,val,test}/{class}/ image folders),
    `images` (any tree of PNG/JPEG for bulk scoring: no labels, all in the test split) or `dicom` (a PACS export:
    every file, recognised by content; no labels, all in the test split; patient_id keyed by
    $MURA_RAY_PATIENT_KEY or $MURA_RAY_PATIENT_KEY_FILE)."""
    root: str
    """The archive: MURA-v1.1 or its parent, the folder set's root, or a tree of images; local or s3://."""
    out: str
    """Destination dataset folder, local or s3://."""
    val_fraction: float = 0.2
    """Share of MURA train patients moved to the val split."""
    seed: int = 0
    """Seed of the patient-level train/val split and of the train split's row order."""
    max_error_rate: float = 0.01
    """Fail (exit 1) when more than this share of images is unusable."""
    body_part: str | None = None
    """Body part of every image of a --source folder set, e.g. WRIST; without it, unknown."""
    overwrite: bool = False
    """Replace an existing dataset at --out, once the new one is complete (a failed run leaves it); an --out
    holding anything but an ingested dataset is refused."""
    max_pixels: int = 64_000_000
    """Images with more pixels are refused as decompression bombs."""
    rows_per_file: int = 256
    """Most images per Parquet file. Training shuffles by reading a split's files in a new order each epoch, so a
    split wants many files (MURA's train split makes over 100): lower it for small sets."""
    file_mb: int = 64
    """Most image MiB per Parquet file. Files are written one 64-image row group at a time, so a writing CPU holds
    one row group, not a file."""
    patient_key: bool = True
    """--source dicom: patient_id is an HMAC of PatientID, keyed only by $MURA_RAY_PATIENT_KEY or the file
    $MURA_RAY_PATIENT_KEY_FILE names, and the job refuses to run without a key; --no-patient-key leaves patient_id
    empty instead."""
    cache_size: int | None = None
    """Also build the training-ready cache of the train and val splits at this input side in pixels (what
    training at --image-size N reads; it builds it itself on first use otherwise)."""
    cache_dir: str | None = None
    """Where --cache-size writes the cache, local or s3:// (default DEST/cache); training reads it with the same
    --cache-dir."""

    def validate(self) -> IngestConfig:
        problems: list[str] = []
        _check_choice(problems, self, "source", ("mura", "folder", "images", "dicom"))
        if not self.patient_key and self.source != "dicom":
            problems.append("--no-patient-key only applies to --source dicom")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            problems.append(f"--max-error-rate must be in [0, 1], got {self.max_error_rate}")
        if self.body_part is not None:
            if self.source != "folder":
                problems.append("--body-part only applies to --source folder")
            elif self.body_part.upper().removeprefix("XR_") not in BODY_PARTS:
                problems.append(f"--body-part {self.body_part!r} is not one of {', '.join(BODY_PARTS)}")
        _check_positive(problems, self, "max_pixels", "rows_per_file", "file_mb")
        if self.cache_size is not None and self.cache_size < 16:
            problems.append(f"--cache-size must be at least 16, got {self.cache_size}")
        _raise_if(problems)
        return self


@dataclass(frozen=True)
class TrainConfig:
    data: str | None = None
    """Ingested dataset from jobs/ingest.py, local or s3://; without it, the demo: built-in synthetic radiographs,
    not MURA."""
    out: str | None = None
    """Run directory, local or s3://: checkpoints, model/ and report/; re-using one resumes that run. Without it,
    runs/<backbone>-<time>."""
    backbone: str = "efficientnet_b0"
    """Any timm model name (efficientnet_b0, resnet50, densenet169, ...), or `custom_cnn`: the reference report's
    from-scratch baseline."""
    epochs: int = 30
    """Most epochs to train."""
    batch_size: int = 32
    """Images per worker per step, at least 2."""
    lr: float = 1e-3
    """Peak learning rate of AdamW, on a cosine schedule after a linear warm-up."""
    weight_decay: float = 1e-4
    """AdamW weight decay (not on biases, norms and embeddings)."""
    warmup_epochs: int = 1
    """Epochs of linear learning-rate warm-up; the rate then follows a cosine to 0, stepped every step."""
    clip_grad: float = 0.0
    """Clip the gradients' global norm to this (0: no clipping)."""
    ema: bool = False
    """Keep an exponential moving average of the weights (timm's ModelEmaV3): it is what validation scores and what
    is exported."""
    ema_decay: float = 0.9998
    """Decay of the weights' moving average per step (warmed up over the first steps)."""
    image_size: int = 224
    """Square input side in pixels; images keep their aspect ratio, padded."""
    cache: bool = True
    """Read the train and val splits from the dataset's training-ready cache at --image-size (each image decoded
    once; built on first use, rebuilt when the dataset changed); --no-cache decodes the images every epoch."""
    cache_dir: str | None = None
    """The cache's folder, local or s3://, for a dataset the trainer may not write to (default DEST/cache)."""
    workers: int = 1
    """Data-parallel Ray Train workers, one GPU each when GPUs are used."""
    gpu: GpuMode = "auto"
    """Use GPUs: `auto` when the cluster has them; `yes` on autoscaling clusters whose GPU nodes start from zero."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per Train worker, also its torch threads on CPU; the rest of the cluster decodes images."""
    amp: bool = True
    """Mixed precision (bfloat16/float16 autocast) on GPU."""
    pretrained: bool = False
    """Load timm's ImageNet weights from the hub."""
    pretrained_file: str | None = None
    """Load weights from a .safetensors, .pth, .pt or .bin file, local or s3:// (air-gapped clusters)."""
    freeze: FreezePolicy = "none"
    """Freeze the feature extractor: `all` of it, or `all-but-last`: all but its last stage."""
    multitask: bool = True
    """Train the auxiliary body-part head."""
    body_part_embedding: bool = True
    """Feed a 32-d body-part embedding to the abnormality head."""
    dropout: float = 0.3
    """Dropout in the heads."""
    body_part_weight: float = 0.5
    """Weight of the body-part cross-entropy in the total loss."""
    loss: LossName = "bce"
    """Abnormality loss: `bce`, `weighted` (positive class weighted by the train negative/positive ratio) or
    `focal`."""
    focal_gamma: float = 2.0
    """Focusing parameter gamma of the focal loss."""
    patience: int = 5
    """Early stopping: epochs without a better --select-metric."""
    num_to_keep: int = 2
    """Checkpoints kept, the best by --select-metric, plus the latest for resuming."""
    select_metric: SelectMetric = "val_study_kappa"
    """Validation metric that picks the kept and the exported checkpoints and that early stopping watches. The
    default is MURA's own measure, Cohen's kappa per study (a study's probability is the mean of its images');
    val_study_auc, val_auc and val_kappa are higher-is-better, val_abnormal_loss (the abnormality loss alone) and
    val_loss (with the body-part term) lower. At an epoch where it is undefined (a validation split of one class)
    early stopping watches val_abnormal_loss instead, with one log line."""
    max_failures: int = 2
    """Worker-group restarts allowed; training resumes from the last checkpoint."""
    seed: int = 0
    """Seed of everything random in a run: the initial weights, each epoch's file order, the shuffle of each
    epoch's rows, augmentation and dropout (per worker and epoch). On CPU, two runs with the same seed, data and
    --workers give the same metrics and the same model, a resumed run included (docs/operations.md)."""
    tta: bool = False
    """Validate with test-time augmentation: the abnormality and body-part probabilities averaged over a horizontal
    flip, as `jobs/score.py --tta` averages them. The selection metric, the threshold and the test report then all
    see the flipped views; the exported model records it (config.json, model card) and scoring applies it by
    default. Doubles validation's model calls."""
    threshold_policy: str = "kappa"
    """How the exported model's operating threshold is chosen, on the validation split at study level (MURA's
    unit): `kappa` maximises Cohen's kappa, `youden` sensitivity + specificity, `sensitivity:X` takes the most
    specific threshold whose sensitivity reaches X (e.g. sensitivity:0.9), `fixed` keeps --threshold. Stored with
    the model (config.json, model card); scoring uses it by default."""
    threshold: float = 0.5
    """Operating threshold with --threshold-policy fixed, and where the validation split cannot choose one (a split
    of one class)."""
    demo_images: int = 2000
    """Size of the synthetic demo set, used only without --data."""

    def validate(self) -> TrainConfig:
        problems: list[str] = []
        _check_choice(problems, self, "gpu", ("auto", "yes", "no"))
        _check_choice(problems, self, "freeze", ("none", "all", "all-but-last"))
        _check_choice(problems, self, "loss", ("bce", "weighted", "focal"))
        _check_choice(problems, self, "select_metric", tuple(METRIC_MODES))
        _check_positive(problems, self, "epochs", "batch_size", "lr", "image_size", "workers", "cpus_per_worker")
        _check_positive(problems, self, "patience", "num_to_keep", "demo_images")
        _check_positive(problems, self, "weight_decay", "warmup_epochs", "clip_grad", "max_failures", "focal_gamma",
                        "body_part_weight", allow_zero=True)
        if not 0.0 < self.ema_decay < 1.0:
            problems.append(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.batch_size == 1:  # batch norm cannot train on one image: every batch would be left out
            problems.append("--batch-size must be at least 2, got 1")
        try:
            threshold_policy(self.threshold_policy)
        except ValueError as e:
            problems.append(f"--threshold-policy {e}")
        if not 0.0 < self.threshold < 1.0:
            problems.append(f"--threshold must be in (0, 1), got {self.threshold}")
        if self.image_size < 16:
            problems.append(f"--image-size must be at least 16, got {self.image_size}")
        if self.pretrained and self.pretrained_file:
            problems.append("give --pretrained or --pretrained-file, not both")
        if self.backbone == "custom_cnn" and (self.pretrained or self.pretrained_file):
            problems.append("custom_cnn is trained from scratch: --pretrained and --pretrained-file do not apply")
        if self.pretrained_file and not (self.pretrained_file.startswith("s3://") or
                                         os.path.isfile(self.pretrained_file)):
            problems.append(f"--pretrained-file {self.pretrained_file}: no such file")
        if self.pretrained_file and not self.pretrained_file.endswith((".safetensors", ".pth", ".pt", ".bin")):
            problems.append("--pretrained-file must be a .safetensors, .pth, .pt or .bin file")
        _raise_if(problems)
        return self


DEMO_TRAIN_DEFAULTS: dict[str, Any] = {
    "backbone": "custom_cnn",
    "image_size": 64,
    # 15 epochs: with fewer the synthetic test AUC varies around the demo's bar of 0.75 (docs/benchmarks.md)
    "epochs": 15,
    "batch_size": 32,
    "lr": 3e-3,
    "patience": 4,
    "dropout": 0.2,
    "cpus_per_worker": 2.0,
}
"""Defaults when no --data is given: a small model that trains on 2 CPU cores in a few minutes (the one Train
worker takes 2 logical CPUs, so torch steps on two threads; the local Ray adds 2 more for the input pipeline)."""


@dataclass(frozen=True)
class ScoreConfig:
    models: tuple[str, ...]
    """Exported model directory (RUN_DIR/model), local or s3://; several (--model repeated) form an ensemble (mean
    probability)."""
    input: str
    """An ingested Parquet split (DEST/test), or a folder/prefix of raw PNG/JPEG images or DICOM files (recognised
    by content; studies by StudyInstanceUID); local or s3://."""
    out: str
    """Destination, local or s3://: predictions/ (Parquet), manifest.json, report/ (metrics when the input has
    labels; drift either way) and history.jsonl (a line per run)."""
    batch_size: int = 64
    """Images per model call."""
    concurrency: int = 1
    """Scoring actors, each with a copy of the model(s), one GPU each when GPUs are used. On the command line N (a
    fixed pool) or MIN-MAX (e.g. 1-8; MAX is `max_concurrency`): a pool that grows while input waits, as far as the
    cluster has or its autoscaler adds room."""
    max_concurrency: int | None = None
    """Autoscaling: the pool grows from `concurrency` up to this many actors while input waits for them (on an
    autoscaling cluster, the GPU nodes they need are added); None: a fixed pool of `concurrency` actors."""
    gpu: GpuMode = "auto"
    """One GPU per actor: `auto` when the cluster has them."""
    tta: bool | None = None
    """Test-time augmentation: average the probabilities over a horizontal flip, as validation does with
    `jobs/train.py --tta`. Default: the model's own setting (its config.json; an ensemble's when all its models
    have it). A re-run into the same --out must use the same setting."""
    threshold: float | None = None
    """Operating threshold; without it, the model's own (its config.json). Recorded in manifest.json, where
    jobs/report.py finds it; a re-run into the same --out must use the same threshold."""
    rows_per_file: int = 5000
    """Target rows per predictions Parquet file."""
    report: bool = True
    """Write OUT/report (metrics when the input has labels, counts otherwise; drift from the model's validation
    split either way) and append the run to OUT/history.jsonl."""
    bootstrap: int = 200
    """Bootstrap resamples for the report's 95% confidence intervals; 0 disables."""
    explain: int = 0
    """Grad-CAM heatmaps of the N most confident true positives, false negatives and false positives to add to the
    report (needs pip install 'mura_ray[explain]'); 0: none."""
    cpus_per_actor: float = 1.0
    """CPUs per scoring actor. Images are decoded by 1-CPU tasks in front of GPU actors, inside CPU actors."""
    amp: bool = True
    """Mixed precision (bfloat16/float16 autocast) on GPU; --no-amp scores in float32. CPU scoring is always
    float32."""
    chunk_images: int = 20000
    """Images per committed chunk: an interruption loses at most one chunk of work."""
    fail_on_drift: bool = False
    """Exit with code 3, after committing the predictions and writing the report, when drift from the model's
    validation split is flagged (report.json's `drift`), so a scheduler can alert; without it a flagged run exits 0."""

    def validate(self) -> ScoreConfig:
        problems: list[str] = []
        if not self.models:
            problems.append("--model is required (an exported model directory)")
        _check_choice(problems, self, "gpu", ("auto", "yes", "no"))
        _check_positive(problems, self, "batch_size", "concurrency", "rows_per_file", "cpus_per_actor",
                        "chunk_images")
        _check_positive(problems, self, "bootstrap", "explain", allow_zero=True)
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            problems.append(f"--threshold must be in (0, 1), got {self.threshold}")
        if self.fail_on_drift and not self.report:
            problems.append("--fail-on-drift needs the report, where drift is judged: drop --no-report")
        if self.max_concurrency is not None and self.max_concurrency < self.concurrency:
            problems.append(f"--concurrency MIN-MAX needs MIN <= MAX, got {self.concurrency}-{self.max_concurrency}")
        _raise_if(problems)
        return self


@dataclass(frozen=True)
class TuneConfig:
    data: str | None = None
    """Ingested dataset from jobs/ingest.py, local or s3://; without it, the demo: built-in synthetic radiographs,
    not MURA."""
    out: str = "runs/tune"
    """Search directory, local or s3://: trials, leaderboard.{csv,md}, best/, comparison.md; re-using one resumes
    that search."""
    space: str | None = None
    """Search space YAML; without it, mura_ray/tune_space.yaml (which documents the grammar)."""
    backbones: tuple[str, ...] = ()
    """Backbones searched as a grid, overriding the space; on the command line comma-separated, e.g.
    custom_cnn,resnet50."""
    num_samples: int = 8
    """Trials per grid point."""
    epochs: int = 10
    """Most epochs per trial."""
    workers_per_trial: int = 1
    """Data-parallel Train workers of each trial."""
    max_concurrent: int = 2
    """Trials running at once."""
    metric: SelectMetric = "val_auc"
    """What ASHA and the leaderboard rank by (each trial's best over its epochs): the AUC and kappa metrics, per
    image or per study, higher is better, the losses lower."""
    image_size: int | None = None
    """Fix every trial's input side in pixels, overriding the space."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (file:///path or http://server): one run per trial."""
    gpu: GpuMode = "auto"
    """Use GPUs: `auto` when the cluster has them."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per Train worker."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it may be stopped."""
    reduction_factor: int = 2
    """ASHA: keep 1/factor of the trials at each rung."""
    seed: int = 0
    """Seed of the sampling; trial N of the search trains with seed + N, shown in the leaderboard's seed column."""
    ensemble_size: int = 3
    """Export the top N trials by --metric, across backbones, as one ensemble in OUT/ensemble/: model/ (scored as
    one --model: the mean of its members' probabilities, at a threshold chosen on validation like a single
    model's), its test report/ and comparison.md (the ensemble beside each member). 0 or 1: no ensemble."""
    demo_images: int = 2000
    """Size of the synthetic demo set, used only without --data."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fixed training options applied to every trial."""

    def validate(self) -> TuneConfig:
        problems: list[str] = []
        _check_choice(problems, self, "metric", tuple(METRIC_MODES))
        _check_choice(problems, self, "gpu", ("auto", "yes", "no"))
        _check_positive(problems, self, "num_samples", "epochs", "workers_per_trial", "max_concurrent",
                        "cpus_per_worker", "grace_period", "demo_images")
        _check_positive(problems, self, "ensemble_size", allow_zero=True)
        if self.reduction_factor < 2:
            problems.append(f"--reduction-factor must be >= 2, got {self.reduction_factor}")
        if self.image_size is not None and self.image_size < 16:
            problems.append(f"--image-size must be at least 16, got {self.image_size}")
        if self.space is not None and not os.path.isfile(self.space):
            problems.append(f"--space {self.space}: no such file")
        _raise_if(problems)
        return self


DEMO_TUNE_DEFAULTS: dict[str, Any] = {
    "backbones": ("custom_cnn", "resnet18"),
    "num_samples": 2,
    "epochs": 3,
    "image_size": 48,
    "max_concurrent": 2,
    "demo_images": 600,
}
"""Defaults when no --data is given: 4 small trials over 2 backbones that finish in minutes on 2 CPU cores."""
