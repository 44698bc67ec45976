"""Batch scoring on Ray Data (`jobs/score.py`): a Predictor actor per model copy, resumable chunked commits, a report
(metrics when labelled) with the drift of what the run scored from the model's validation split (`mura_ray.drift`),
and a line per run in OUT/history.jsonl.

The input is listed by `mura_ray.data.score_input`, without the images already committed; one Ray Data execution
scores it (raw folders: runs of 200,000 paths), so the model actors start once; the driver cuts the stream of
predictions into chunks, and `predictions.Committer` commits each (`predictions/part-*.parquet`, listed in
`manifest.json`). A re-run skips every image already in a committed part, which makes nightly scoring of an archive
safe to repeat after an interruption.

One run at a time writes an --out: it holds `DEST/_lock.json` (`storage.OutputLock`), refreshed every minute; a
second run is refused with one line naming the first, and the lock of a run that died (not refreshed for 10
minutes) is taken over with a warning. Without it, two runs would clean each other's staged parts and commit parts
of the same names.

The manifest also records what the predictions mean: models, input, threshold, TTA and `amp` (whether the models
ran under autocast: on GPU unless --no-amp; CPU scoring is float32). A re-run that differs in any of them is
refused rather than mixing rows of two settings under one --out. A manifest written before the threshold and TTA
were recorded is taken to hold the defaults (the model's threshold, no TTA): only a run with those defaults
continues it, which records them from then on. One written before `amp` was recorded does not say whether it was
scored on GPU (autocast) or on CPU (float32): any run continues it, and records its own setting from then on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mura_ray import runtime, storage
from mura_ray.config import ScoreConfig, UserError, threshold_policy
from mura_ray.data.images import DecodeError, ImageStats, load_pixels_and_stats
from mura_ray.data.pipeline import body_part_indices
from mura_ray.data.score_input import (
    RETRY_LATER,
    check_input,
    chunk_dataset,
    chunk_rows,
    count_done,
    cpu_read_tasks,
    executions,
    iter_chunks,
)
from mura_ray.labels import BODY_PARTS
from mura_ray.predictions import (
    HISTORY,
    MANIFEST,
    PREDICTION_SCHEMA,
    PREDICTIONS,
    Committer,
    check_continuable,
    clean_uncommitted,
    load_done_keys,
    load_predictions,
    read_manifest,
    read_predictions,
)
from mura_ray.runtime import check_fits, first_line, started_local_ray, use_gpu, user_error_cause

if TYPE_CHECKING:
    import torch

    from mura_ray.exported import ModelSpec
    from mura_ray.models import MultiTaskNet

logger = logging.getLogger(__name__)


def _present(value: Any) -> bool:
    """A non-null cell (pandas hands nulls over as None, NaN or pd.NA, by column type)."""
    return value is not None and not pd.isna(value)


def decode_for_scoring(batch: pd.DataFrame, sizes: list[int]) -> pd.DataFrame:
    """Ray Data task: each row's image bytes as the model input pixels of every input size in `sizes`
    (`images.load_pixels`, as training's validation prepares them: uint8 `pixels_{size}` columns; the bytes are
    dropped), and the decoded image's statistics (`images.ImageStats`, as `image_*` columns, for drift). A row
    that cannot be decoded, or that arrives with a read error, keeps its `error` and gets zero pixels.

    The scoring job runs this as its own `map_batches` stage before the `Predictor` actors: with CPU actors Ray
    fuses the two (same resources), with GPU actors it stays a pool of CPU tasks, so that the node's CPUs decode
    and the GPU does not wait on a single decoding thread in its actor.
    """
    n = len(batch)
    pixels = {size: np.zeros((n, size, size), dtype=np.uint8) for size in sizes}
    stats: list[ImageStats | None] = [None] * n
    errors: list[str | None] = []
    pre_errors = batch["error"] if "error" in batch else [None] * n
    for i, (data, pre_error) in enumerate(zip(batch["image"], pre_errors, strict=True)):
        if _present(pre_error):
            errors.append(str(pre_error))
            continue
        try:
            for size in sizes:  # an ensemble of several input sizes decodes once for each (JPEG draft: per size)
                pixels[size][i], stats[i] = load_pixels_and_stats(data, size)
        except DecodeError as e:
            errors.append(str(e))
            continue
        errors.append(None)
    out = batch.drop(columns=["image"]).assign(error=errors)
    for size in sizes:
        out[f"pixels_{size}"] = list(pixels[size])
    for column, field in _STAT_COLUMNS.items():
        out[column] = [None if s is None else getattr(s, field) for s in stats]
    return out


_STAT_COLUMNS = {"image_mean": "mean", "image_contrast": "contrast", "image_height": "height", "image_width": "width"}
"""Prediction columns (`PREDICTION_SCHEMA`) of the decoded image's `images.ImageStats` fields."""


class Predictor:
    """Ray Data callable class: loads the model(s) once per actor, scores batches of decoded images.

    Batches come from `decode_for_scoring` (`pixels_{size}` columns), or carry the image bytes, which are then
    decoded here. Several models form an ensemble: probabilities are averaged. With `tta`, each model's
    probabilities are also averaged over a horizontal flip (`models.predict`, as validation does). On a GPU the
    models run under autocast (`amp`, bfloat16 where the GPU has it, else float16). A row whose image cannot be
    decoded gets an `error` and no prediction.
    """

    def __init__(self, model_uris: list[str], *, use_gpu: bool, tta: bool, threshold: float | None,
                 amp: bool = True):
        import torch

        from mura_ray.models import amp_dtype

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.amp = amp_dtype() if amp and self.device.type == "cuda" else None
        self.members = []
        self.failed: str | None = None  # why the models did not load: every batch's rows say so (MODEL_FAILED)
        try:
            loaded = [_load_model(uri) for uri in model_uris]
        except UserError as e:
            self.failed = str(e)
            return
        for model, spec, model_id in loaded:
            # Channels-last memory: efficientnet_b0 at 224 px scores 1.65x the images/s on one CPU thread (oneDNN's
            # NHWC convolutions), and it is what autocast's tensor-core convolutions want on a GPU.
            self.members.append((model.to(self.device, memory_format=torch.channels_last), spec, model_id))
        specs = [m[1] for m in self.members]
        self.threshold = threshold if threshold is not None else float(np.mean([s.threshold for s in specs]))
        ids = [m[2] for m in self.members]
        ensemble_id = "ensemble-" + hashlib.sha256(",".join(sorted(ids)).encode()).hexdigest()[:16]  # any order
        self.model_id = ids[0] if len(ids) == 1 else ensemble_id
        self.tta = tta
        self.sizes = sorted({s.image_size for s in specs})

    def _inputs(self, pixels: pd.Series, mean: float, std: float) -> torch.Tensor:
        """uint8 images (N of S x S) to the model's float input (N x 1 x S x S): `images.normalize`'s arithmetic,
        on the model's device (a GPU is sent a quarter of the bytes)."""
        import torch

        x = torch.from_numpy(np.stack(pixels.to_numpy())).to(self.device).unsqueeze(1)
        return ((x.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        import torch

        if self.failed is not None:
            # Rows, not an exception: Ray Data would log an exception's stack on the driver beside the one line.
            nulls = {f.name: pa.nulls(len(batch), f.type) for f in PREDICTION_SCHEMA}
            return pa.table({**nulls, "image_id": pa.array(batch["image_id"].tolist(), pa.string()),
                             "error": pa.array([MODEL_FAILED + self.failed] * len(batch), pa.string())},
                            schema=PREDICTION_SCHEMA)

        with torch.inference_mode():
            return self._predict(batch)

    def _predict(self, batch: pd.DataFrame) -> pa.Table:
        import torch

        from mura_ray.models import autocast, predict

        if "image" in batch:
            batch = decode_for_scoring(batch, self.sizes)
        n = len(batch)
        errors = [str(e) if _present(e) else None for e in batch["error"]]
        known = torch.from_numpy(body_part_indices(batch["body_part"])).to(self.device)
        prob = np.zeros(n, dtype=np.float64)
        part_probs = np.zeros((n, len(BODY_PARTS)), dtype=np.float64)
        for model, spec, _ in self.members:
            x = self._inputs(batch[f"pixels_{spec.image_size}"], spec.mean, spec.std)
            with autocast(self.device, self.amp):
                out = predict(model, x, known, tta=self.tta)
            prob += torch.sigmoid(out["abnormal"].float()).cpu().numpy()
            if "body_part" in out:
                part_probs += torch.softmax(out["body_part"].float(), dim=1).cpu().numpy()
        prob /= len(self.members)
        # Decide on the value that is stored (float32), so the report and Grad-CAM, which read it back, agree with
        # pred_abnormal at the threshold (an ensemble's float64 mean can round across it).
        prob = prob.astype(np.float32).astype(np.float64)
        has_part = part_probs.sum(axis=1) > 0
        part_probs[has_part] /= part_probs[has_part].sum(axis=1, keepdims=True)
        ok = np.array([e is None for e in errors])
        part_pred = [BODY_PARTS[i] if ok[j] and has_part[j] else None for j, i in enumerate(part_probs.argmax(1))]
        labels = [int(v) if _present(v) else None for v in batch["label"]]
        now = datetime.now(timezone.utc)
        columns = {
            "image_id": batch["image_id"].tolist(),
            "path": batch["path"].tolist(),
            "study_id": [s if isinstance(s, str) and s else None for s in batch["study_id"]],  # "": none
            "body_part": [s if isinstance(s, str) and s else None for s in batch["body_part"]],
            "body_part_pred": part_pred,
            "body_part_probs": [p.astype(np.float32).tolist() if o and h else None
                                for p, o, h in zip(part_probs, ok, has_part, strict=True)],
            "prob_abnormal": [float(p) if o else None for p, o in zip(prob, ok, strict=True)],
            "pred_abnormal": [int(p >= self.threshold) if o else None for p, o in zip(prob, ok, strict=True)],
            "label": labels,
            # Null where a batch of pixels decoded elsewhere carries no statistics.
            **{c: [v if o and _present(v) else None for v, o in zip(batch.get(c, [None] * n), ok, strict=True)]
               for c in _STAT_COLUMNS},
            "model_id": [self.model_id] * n,
            "scored_at": [now] * n,
            "error": errors,
        }
        return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in PREDICTION_SCHEMA})


def _same_input(uri: str) -> str:
    """An input as compared between runs: remote URIs without a trailing slash, local paths absolute."""
    return storage.absolute(uri).rstrip("/")


def _model_error(uri: str, e: BaseException) -> UserError:
    """What a broken model directory raises (a corrupt or foreign config.json, weights of another architecture, an
    unreadable file), as a UserError naming the directory."""
    if storage.s3_problem(e):  # nothing wrong with the model: this run may not read it, or reach its storage
        return UserError(f"--model {uri}: cannot read it ({first_line(e)})")
    return UserError(f"--model {uri}: cannot load the exported model ({type(e).__name__}: {first_line(e)}); "
                     "export it again from its run")


def _check_body_parts(uri: str, spec: ModelSpec) -> None:
    if tuple(spec.body_parts) != BODY_PARTS:  # body_part_probs and body_part_pred are named in this order
        raise UserError(f"--model {uri}: its body parts {list(spec.body_parts)} are not this version's "
                        f"{list(BODY_PARTS)} (in this order)")


def _read_model(uri: str) -> tuple[ModelSpec, str]:
    """An exported model's spec and id (`exported.read_exported`, no torch), its body parts checked."""
    from mura_ray.exported import read_exported

    try:
        spec, _, model_id = read_exported(uri)
    except (ValueError, TypeError, OSError) as e:
        raise _model_error(uri, e) from None
    _check_body_parts(uri, spec)
    return spec, model_id


def _load_model(uri: str) -> tuple[MultiTaskNet, ModelSpec, str]:
    """`models.load_model`, its failures as `_model_error`s, its body parts checked."""
    from safetensors import SafetensorError

    from mura_ray.models import load_model

    try:
        loaded = load_model(uri)
    except (ValueError, TypeError, RuntimeError, OSError, SafetensorError) as e:
        raise _model_error(uri, e) from None
    _check_body_parts(uri, loaded[1])
    return loaded


def _read_models(models: tuple[str, ...]) -> tuple[tuple[str, ...], list[str], float, list[int], bool]:
    """Each --model's exported files, read on the driver without torch (a missing or foreign model fails before
    any cluster work): the model directories to load (an ensemble directory's members), their ids, the threshold
    (an ensemble directory's, else the mean of the models'), input sizes, and whether the models were validated
    with TTA (the default of --tta). The scoring actors then load their weights (`Predictor`)."""
    from mura_ray.exported import ensemble_members

    def members(uri: str) -> tuple[list[str], dict[str, Any] | None]:
        try:
            return ensemble_members(uri)
        except OSError as e:
            if storage.s3_problem(e):  # as `_model_error` says it
                raise UserError(f"--model {uri}: cannot read it ({first_line(e)})") from None
            raise

    expanded = [members(uri) for uri in models]
    ensembles = [e for _, e in expanded if e is not None]
    if ensembles and len(models) > 1:
        raise UserError("an ensemble directory (with ensemble.json) is scored alone: its threshold was chosen for "
                        "its members' mean; give it as the only --model")
    uris = tuple(m for members, _ in expanded for m in members)
    read = [_read_model(uri) for uri in uris]
    threshold = float(np.mean([spec.threshold for spec, _ in read]))
    tta = all(spec.tta for spec, _ in read)
    if ensembles:
        threshold, tta = float(ensembles[0].get("threshold", threshold)), bool(ensembles[0].get("tta", tta))
    return uris, [model_id for _, model_id in read], threshold, sorted({spec.image_size for spec, _ in read}), tta


def _check_compatible(cfg: ScoreConfig, manifest: dict[str, Any], model_ids: list[str], threshold: float,
                      model_threshold: float) -> None:
    """Refuse to add this run's rows to predictions of other models, another input, threshold or TTA setting."""
    if sorted(manifest["model_ids"]) != sorted(model_ids):  # an ensemble is the same in any --model order
        raise UserError(f"--out {cfg.out}: holds predictions of other model(s) {manifest['model_ids']}; "
                        "use a new --out for a new model")
    if _same_input(manifest["input"]) != _same_input(cfg.input):
        # Image ids are paths relative to the input (raw folders) or to the ingested archive: another input's
        # images could share ids with the ones here and would be skipped as already scored.
        raise UserError(f"--out {cfg.out} holds predictions for --input {manifest['input']}; re-run with that "
                        "input to score what is new there, or give this input its own --out")
    # Manifests older than these keys: the defaults (see the module docstring).
    held_tta = bool(manifest.get("tta", False))
    if held_tta != cfg.tta:
        held, this = ("with", "without") if held_tta else ("without", "with")
        raise UserError(f"--out {cfg.out} holds predictions scored {held} --tta, this run is {this} it; re-run "
                        f"{held} --tta to add to them, or give this run its own --out")
    held_threshold = float(manifest.get("threshold", model_threshold))
    if not math.isclose(held_threshold, threshold, abs_tol=1e-9):
        this = "--threshold" if cfg.threshold is not None else "the model's"
        raise UserError(f"--out {cfg.out} holds predictions at threshold {held_threshold}, this run's is "
                        f"{threshold} ({this}); re-run with --threshold {held_threshold} to add to them, or give "
                        "this run its own --out")


def _check_precision(cfg: ScoreConfig, manifest: dict[str, Any], amp: bool, use_gpu: bool) -> None:
    """Refuse to add rows scored under autocast to rows scored in float32, or the reverse: autocast (bfloat16, or
    float16 on GPUs without it: `models.amp_dtype`, decided on each actor's GPU) changes probabilities slightly,
    enough to flip decisions at the threshold, as TTA does. Known once `--gpu auto` is resolved, with Ray up, so
    checked after `_open_output`; a manifest older than the key is not checked (see the module docstring)."""
    if not manifest["parts"] or "amp" not in manifest or bool(manifest["amp"]) == amp:
        return
    if manifest["amp"]:
        this = "--no-amp" if use_gpu else "on CPU"
        raise UserError(f"--out {cfg.out} holds predictions scored under autocast on GPU, this run scores in "
                        f"float32 ({this}); re-run on GPU (--gpu yes) without --no-amp to add to them, or give "
                        "this run its own --out")
    raise UserError(f"--out {cfg.out} holds predictions scored in float32 (on CPU or with --no-amp), this run "
                    "scores under autocast on GPU; re-run with --no-amp to add to them, or give this run its own "
                    "--out")


def _open_output(cfg: ScoreConfig, model_ids: list[str], threshold: float, threshold_source: str,
                 model_threshold: float, *, overwrite: bool, lock: storage.OutputLock) -> dict[str, Any]:
    """Take --out's lock (another run writing there is refused), then the manifest this run continues (or a new
    one), written back before any scoring: an --out that cannot be written fails now, as one error line, not after
    the first chunk was scored. The lock is released again if this fails."""
    try:  # lock.release() is a no-op when acquire() failed
        lock.acquire()
        if overwrite:  # what another run holds is never deleted: the lock comes first
            storage.clear_dir(cfg.out, keep=(lock.NAME,))
        manifest = read_manifest(cfg.out)
        if manifest and manifest["parts"]:
            check_continuable(cfg.out, manifest)
            _check_compatible(cfg, manifest, model_ids, threshold, model_threshold)
            manifest.setdefault("threshold", threshold)
            manifest.setdefault("threshold_source", threshold_source)
            manifest.setdefault("tta", cfg.tta)
        else:  # nothing committed yet: nothing to be compatible with
            manifest = {  # local paths absolute: jobs/report.py --explain reads them from anywhere
                "version": 1, "input": _same_input(cfg.input), "models": [_same_input(m) for m in cfg.models],
                "model_ids": model_ids,
                "threshold": threshold, "threshold_source": threshold_source, "tta": cfg.tta, "parts": {},
            }
        clean_uncommitted(cfg.out, set(manifest["parts"]))
        storage.write_json(storage.join(cfg.out, MANIFEST), manifest)
    except OSError as e:
        lock.release()
        raise UserError(f"--out {cfg.out}: cannot write there ({first_line(e)})") from None
    except BaseException:
        lock.release()
        raise
    return manifest


def _check_pool_fits(cfg: ScoreConfig, gpu: bool) -> None:
    """`runtime.check_fits` for one scoring actor; a fixed pool larger than the cluster scores on the actors that
    fit, with a warning."""
    fit = check_fits({"GPU": 1} if gpu else {"CPU": cfg.cpus_per_actor}, what="a scoring actor",
                     hint="use --gpu no to score on CPUs" if gpu else "lower --cpus-per-actor")
    if 0 < fit < cfg.concurrency:
        logger.warning("The cluster has room for %d of the %d scoring actors: the job scores on those, the others "
                       "start %s.", fit, cfg.concurrency,
                       "never, on this local Ray" if started_local_ray() else "when an autoscaler adds nodes")


MODEL_FAILED = "the models did not load: "
"""How a `Predictor` whose models did not load marks the rows it was given (the driver stops on them)."""


def _stop_on_failed_rows(table: pa.Table) -> None:
    """Stop the run, before this chunk is committed, on a row that no image of it caused: a file storage could not
    serve now (marked RETRY_LATER by the read task; the next run scores it, instead of it being committed as failed
    for good), or models a scoring actor could not load (MODEL_FAILED: weights that do not fit their architecture,
    found where the models are loaded for scoring, before a first image is scored)."""
    errors = table["error"].cast(pa.string())
    failed = pc.starts_with(errors, MODEL_FAILED)
    if pc.any(failed).as_py():
        raise UserError(table.filter(pc.fill_null(failed, False))["error"][0].as_py().removeprefix(MODEL_FAILED))
    retry = pc.starts_with(errors, RETRY_LATER)
    if pc.any(retry).as_py():
        first = table.filter(pc.fill_null(retry, False))["error"][0].as_py().removeprefix(RETRY_LATER)
        raise UserError(f"cannot read {first}; the chunks committed so far are kept: run the same command again "
                        "to score the rest")


def _get(ref: Any) -> Any:
    """`ray.get`, re-raising a UserError of the task as itself (one `error:` line, not a remote traceback)."""
    import ray

    try:
        return ray.get(ref)
    except Exception as e:
        cause = user_error_cause(e)
        if cause is None:
            raise
        raise cause from None


def scoring_dataset(dataset: Any, models: list[str], sizes: list[int], predictor_args: dict[str, Any], *,
                    batch_size: int, concurrency: int, cpus_per_actor: float,
                    max_concurrency: int | None = None) -> Any:
    """Input rows (image bytes) → predictions: a decode stage, then `Predictor` on an actor pool.

    Decoding is a stage of its own: Ray fuses it into CPU actors (same resources, no extra hand-over), and runs it
    as a pool of CPU tasks in front of GPU actors, where one decoding thread per actor would leave the GPU idle.
    The pool has `concurrency` actors, or autoscales from `concurrency` to `max_concurrency`: Ray Data adds an
    actor while input waits and the cluster has (or its autoscaler adds) room for one, and the job starts as soon
    as the smallest pool runs.
    """
    from ray.data import ActorPoolStrategy

    if max_concurrency is None or max_concurrency == concurrency:
        pool = ActorPoolStrategy(size=concurrency)
    else:
        pool = ActorPoolStrategy(min_size=concurrency, max_size=max_concurrency)

    decoded = dataset.map_batches(decode_for_scoring, batch_format="pandas", fn_kwargs={"sizes": sizes},
                                  num_cpus=1.0)
    return decoded.map_batches(
        Predictor,
        fn_constructor_args=(models,),
        fn_constructor_kwargs=predictor_args,
        batch_size=batch_size,
        batch_format="pandas",
        compute=pool,
        num_gpus=1 if predictor_args["use_gpu"] else 0,
        num_cpus=cpus_per_actor,
    )


def score(cfg: ScoreConfig, *, overwrite: bool = False, report_dir: str | None = None) -> dict[str, Any]:
    """Score `cfg.input` into `cfg.out`; returns the summary (scored, skipped, failed, report path).

    The report goes to `report_dir` (default `OUT/report`).
    """


    cfg = cfg.validate()
    # Local paths absolute, here on the driver: the Ray workers that read the input and load the models may run
    # in another working directory (under `ray job submit --working-dir`, Ray's copy of it).
    cfg = replace(cfg, input=storage.absolute(cfg.input), out=storage.absolute(cfg.out),
                  models=tuple(storage.absolute(m) for m in cfg.models))
    members, model_ids, model_threshold, sizes, model_tta = _read_models(cfg.models)
    cards = list(cfg.models)  # whose reference profiles drift is judged against (an ensemble directory's own)
    cfg = replace(cfg, models=members, tta=model_tta if cfg.tta is None else cfg.tta)
    if cfg.explain:
        import importlib.util

        if importlib.util.find_spec("pytorch_grad_cam") is None:
            raise UserError("--explain needs the optional extra: pip install 'mura_ray[explain]'")
    if storage.overlap(cfg.input, cfg.out):
        # --overwrite would clear the input; predictions inside the input would be read back as input next run
        raise UserError(f"--out {cfg.out} and --input {cfg.input} overlap (the same folder, or one inside the other): "
                        "give an --out outside the input")
    check_input(cfg.input)
    threshold = cfg.threshold if cfg.threshold is not None else model_threshold
    threshold_source = "cli" if cfg.threshold is not None else "model"
    lock = storage.OutputLock(cfg.out, "jobs/score.py")
    manifest = _open_output(cfg, model_ids, threshold, threshold_source, model_threshold, overwrite=overwrite,
                            lock=lock)
    try:
        return _score_locked(cfg, manifest, lock, sizes, threshold, threshold_source, report_dir, cards)
    finally:
        lock.release()


def _score_locked(cfg: ScoreConfig, manifest: dict[str, Any], lock: storage.OutputLock, sizes: list[int],
                  threshold: float, threshold_source: str, report_dir: str | None,
                  cards: list[str]) -> dict[str, Any]:
    """`score` once this run holds --out's lock."""
    import ray

    # The driver read the models without torch (`_read_models`). The scoring actors build them and load their
    # weights; weights that do not fit their architecture mark the actor's rows (MODEL_FAILED), and the run stops
    # on them before anything is committed. Loading them on the driver as well put torch's import beside Ray's
    # start and cost the first prediction ~2 s on 2 cores (docs/benchmarks.md#scoring).
    runtime.init_ray(train=False)
    gpu = use_gpu(cfg.gpu)
    _check_pool_fits(cfg, gpu)
    amp = cfg.amp and gpu  # what the Predictor does: autocast on its GPU, float32 on CPU
    _check_precision(cfg, manifest, amp, gpu)
    manifest["amp"] = amp
    parts_before = set(manifest["parts"])

    predictor_args = {"use_gpu": gpu, "tta": cfg.tta, "threshold": threshold, "amp": cfg.amp}
    started = time.perf_counter()
    seq = max((int(p.split("-")[1]) for p in manifest["parts"]), default=-1) + 1
    committer = Committer(cfg.out, manifest, seq, cfg.chunk_images, cfg.rows_per_file, lock)
    total = 0
    skipped_refs = []
    # One Ray Data execution per run of listed input (all the Parquet files, or up to RAW_IMAGES_PER_EXECUTION raw
    # image paths held on the driver): the scoring actors start (import torch, load the model, initialise CUDA) once
    # per execution, not once per committed chunk; commits are cut from the stream of predictions.
    done_ref = None
    for run in executions(iter_chunks(cfg.input, cfg.chunk_images)):
        if done_ref is None:  # what earlier runs committed; a raw folder's also by path (`load_done_keys`)
            done_ref = ray.remote(load_done_keys).options(num_cpus=0.25).remote(
                cfg.out, sorted(parts_before), bool(run.image_files))
            if run.image_files:
                # A raw DICOM file's id is its SOPInstanceUID: a copy of an instance scored by an earlier run,
                # under another path, is read (its path is new) and then dropped as a repeat, not committed twice.
                committer.seen.add(_get(done_ref))
        total += chunk_rows(run)
        read_tasks = None if gpu else cpu_read_tasks(cfg.max_concurrency or cfg.concurrency)
        dataset = chunk_dataset(run, done_ref, read_cpus=1.0, read_tasks=read_tasks)
        skipped_refs.append(ray.remote(count_done).options(num_cpus=0.25).remote(run, done_ref))
        predictions = scoring_dataset(dataset, list(cfg.models), sizes, predictor_args, batch_size=cfg.batch_size,
                                      concurrency=cfg.concurrency, cpus_per_actor=cfg.cpus_per_actor,
                                      max_concurrency=cfg.max_concurrency)
        for table in predictions.iter_batches(batch_size=None, batch_format="pyarrow"):
            _stop_on_failed_rows(table)
            committer.add(table)
    committer.commit()
    scored, failed, repeated = committer.scored, committer.failed, committer.duplicates
    skipped = sum(_get(skipped_refs))
    if repeated:
        logger.warning("--input %s holds %d image(s) more than once (the same image_id: %s%s); each was scored once, "
                       "the first seen kept", cfg.input, repeated, ", ".join(committer.duplicate_ids),
                       ", ..." if repeated > len(committer.duplicate_ids) else "")
    if scored + failed + skipped + repeated != total:
        raise RuntimeError(f"{cfg.input}: {total} input images, but {scored} scored + {failed} failed + {skipped} "
                           f"already done + {repeated} repeated = {scored + failed + skipped + repeated}: rows "
                           "went missing between reading and "
                           "committing (what was committed is sound; a re-run scores the missing images)")
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {
        "scored": scored, "skipped_already_done": skipped, "skipped_duplicates": repeated, "failed": failed,
        "seconds": round(elapsed, 2),
        "predictions": storage.join(cfg.out, PREDICTIONS), "n_rows_total": manifest.get("n_rows", 0),
    }
    if cfg.report and manifest.get("n_rows"):
        report_dir = report_dir or storage.join(cfg.out, "report")
        explain = {"n": cfg.explain, "input": cfg.input, "models": list(cfg.models)} if cfg.explain else None
        # Drift and the history line cover what was committed since the last report: this run's parts, and those
        # of a run that was stopped before its report.
        profiled = manifest.get("profiled_through", -1)
        new_parts = sorted(name for name, part in manifest["parts"].items() if part["chunk"] > profiled)
        made = _get(ray.remote(_report_task).options(num_cpus=1).remote(
            cfg.out, report_dir, threshold, threshold_source, cfg.bootstrap, explain, cards, new_parts))
        manifest["profiled_through"] = max(part["chunk"] for part in manifest["parts"].values())
        lock.check()
        storage.write_json(storage.join(cfg.out, MANIFEST), manifest)
        summary["report"] = report_dir
        summary["report_summary"] = made
        summary["drift"] = made["drift"]
    return summary


def _report_task(out: str, report_dir: str, threshold: float, threshold_source: str, bootstrap: int,
                 explain: dict[str, Any] | None, models: list[str], new_parts: list[str]) -> dict[str, Any]:
    """Ray task (keeps the driver small): write the report of everything `out` holds (metrics when labelled, the
    counts otherwise) with the drift of the parts committed since the last report (`new_parts`) from the model's
    reference profile, and append their line to OUT/history.jsonl. Returns the report.

    With `explain`, Grad-CAM heatmaps of the most confident true positives, false negatives and false positives
    are added to the HTML report of labelled predictions.
    """
    # Imported here, as torch and timm are in the Predictor: Ray Data's decode tasks import this module, and need
    # neither matplotlib nor torch.
    from mura_ray import drift
    from mura_ray.explain import explain_report_examples
    from mura_ray.report import build_counts, build_report, write_report

    run_at = datetime.now(timezone.utc)
    df = load_predictions(out)
    labelled = "label" in df and bool((df["label"].notna() & df["prob_abnormal"].notna()).any())
    if labelled:
        report = build_report(df, threshold=threshold, threshold_source=threshold_source, bootstrap=bootstrap)
    else:  # an unlabelled archive (or every labelled image failed): counts and drift, no metrics
        report = build_counts(df, threshold=threshold, threshold_source=threshold_source)
    run_rows = read_predictions(out, columns=list(drift.COLUMNS), parts=new_parts)
    report["drift"] = _drift(models, run_rows)
    explanations = None
    if explain and labelled:
        explanations = explain_report_examples(read_predictions(out), explain["input"], explain["models"],
                                               explain["n"], threshold)
    write_report(report, df, report_dir, explanations=explanations)
    history = storage.join(out, HISTORY)
    held = storage.read_bytes(history) if storage.exists(history) else b""
    line = json.dumps(drift.history_line(run_rows, report["drift"], run_at)) + "\n"
    storage.write_bytes(history, held + line.encode())  # object stores cannot append: the file is rewritten
    return report


def _drift(models: list[str], rows: pd.DataFrame) -> dict[str, Any]:
    """`drift.compare` with the reference profile of the first --model whose card holds one (an ensemble
    directory's is its own; of several --model, the first's, whose probabilities are close to, not the same as,
    the ensemble's)."""
    from mura_ray import drift

    for uri in models:
        card_uri = storage.join(uri, "model_card.json")
        card = storage.read_json(card_uri) if storage.exists(card_uri) else {}
        if card.get("drift_reference"):
            result = drift.compare(card["drift_reference"], rows)
            result["reference_model"] = card.get("model_id")
            return result
    scored = int(rows["prob_abnormal"].notna().sum())
    return {"status": "no_reference", "flagged": False, "reasons": [], "n_images": scored,
            "note": "the model card holds no reference profile (exported before profiles were stored): export the "
                    "model again to judge drift"}


def choose_model_threshold(model_dir: str, data: str, run_dir: str, policy: str, fixed: float) -> dict[str, Any]:
    """Choose an exported model's operating threshold by `policy` (`config.threshold_policy`) on the dataset's
    validation split at study level, and store it with the model: `threshold` in its config.json (an ensemble's
    ensemble.json: what scoring uses by default) and in its model card, with `threshold_policy` and the
    `operating_point` (the validation metrics at that threshold, image and study level). The split is scored into
    RUN_DIR/val (replaced) with the exported model: the probabilities training's validation computed. A split of
    one class cannot choose: `fixed` is kept. A card without validation metrics (an ensemble's: no training run
    computed them) gets them from those predictions, at `fixed` as training computes them.

    The model card also gets the split's `drift_reference` (`drift.build_reference`), which every scoring run with
    the model compares its images with."""
    from mura_ray import drift  # as in `_report_task`: the decode tasks need neither scipy nor matplotlib
    from mura_ray.exported import ENSEMBLE_FILE
    from mura_ray.metrics import validation_metrics
    from mura_ray.report import calibrate_threshold

    method, target = threshold_policy(policy)
    point: dict[str, Any] = {"method": "fixed", "threshold": fixed}
    card_uri = storage.join(model_dir, "model_card.json")
    card = storage.read_json(card_uri)
    val = ScoreConfig(models=(model_dir,), input=storage.join(data, "val"), out=storage.join(run_dir, "val"),
                      threshold=fixed, report=False)
    score(val, overwrite=True)
    card["drift_reference"] = drift.build_reference(read_predictions(val.out, columns=list(drift.COLUMNS)))
    predictions = load_predictions(val.out)
    if "validation" not in card.get("metrics", {}):
        rows = predictions[predictions["error"].isna() & predictions["label"].notna()]
        card.setdefault("metrics", {})["validation"] = validation_metrics(
            rows["label"].to_numpy(int), rows["prob_abnormal"].to_numpy(float),
            rows["study_id"].fillna(rows["image_id"]), fixed)
    if method != "fixed":
        try:
            point = calibrate_threshold(predictions, method, target, level="study")
            point["calibrated_on"] = val.out
        except ValueError as e:
            logger.warning("--threshold-policy %s: %s; keeping --threshold %g", policy, e, fixed)
            policy = "fixed"
    threshold = float(point["threshold"])
    config_uri = storage.join(model_dir, ENSEMBLE_FILE)
    if not storage.exists(config_uri):
        config_uri = storage.join(model_dir, "config.json")
    storage.write_json(config_uri, {**storage.read_json(config_uri), "threshold": threshold})
    storage.write_json(card_uri, {**card, "threshold": threshold, "threshold_policy": policy,
                                  "operating_point": point})
    logger.info("Operating threshold %.4f (%s, on the validation split's studies)", threshold, policy)
    return {"threshold": threshold, "threshold_policy": policy, "operating_point": point}


def score_test_split(model_dir: str, data: str, run_dir: str, bootstrap: int = 200) -> dict[str, Any]:
    """Score an ingested dataset's test split with one exported model into RUN_DIR/test (replaced), its report in
    RUN_DIR/report; the test metrics are recorded in the model card too. Returns the report's headline metrics."""
    cfg = ScoreConfig(models=(model_dir,), input=storage.join(data, "test"), out=storage.join(run_dir, "test"),
                      bootstrap=bootstrap)
    summary = score(cfg, overwrite=True, report_dir=storage.join(run_dir, "report"))
    report = summary.get("report_summary") or {}
    image, study = report.get("image_level", {}), report.get("study_level", {})
    headline = {
        "image_accuracy": image.get("accuracy"), "image_roc_auc": image.get("roc_auc"),
        "image_cohen_kappa": image.get("cohen_kappa"), "study_roc_auc": study.get("roc_auc"),
        "study_cohen_kappa": study.get("cohen_kappa"),
        "body_part_accuracy": report.get("body_part", {}).get("accuracy"),
    }
    card_uri = storage.join(model_dir, "model_card.json")
    card = storage.read_json(card_uri)
    card.setdefault("metrics", {})["test"] = headline
    storage.write_json(card_uri, card)
    return headline
