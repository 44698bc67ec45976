"""Batch scoring on Ray Data: a Predictor actor per model copy, resumable chunked commits, a report when labelled.

Output under DEST: `predictions/part-*.parquet`, `manifest.json` (the committed parts; written after each chunk, so
readers trust only what it lists), `report/` when the input carries labels. One Ray Data execution scores the whole
input (raw folders: runs of 200,000 paths), so the model actors start once; the driver cuts the stream of
predictions into chunks and commits each. A re-run skips every image already in a
committed part (the anti-filter runs inside the Ray Data tasks against a set built by a Ray task, so the driver
never holds per-image state), which makes nightly scoring of an archive safe to repeat after an interruption.

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
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from mura_ray import storage
from mura_ray.config import ScoreConfig, UserError
from mura_ray.data.images import IMAGE_SUFFIXES, DecodeError, decode_radiograph
from mura_ray.data.pipeline import body_part_indices, read_parquet, resize_pad
from mura_ray.labels import BODY_PARTS
from mura_ray.runtime import first_line, user_error_cause

if TYPE_CHECKING:
    import torch

    from mura_ray.models import ModelSpec, MultiTaskNet

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_PART_NAME = re.compile(r"part-\d+-\d+\.parquet")
PREDICTIONS = "predictions"
INPUT_COLUMNS: tuple[str, ...] = ("image_id", "image", "path", "study_id", "body_part", "label")

PREDICTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("study_id", pa.string()),
        ("body_part", pa.string()),
        ("body_part_pred", pa.string()),
        ("body_part_probs", pa.list_(pa.float32())),
        ("prob_abnormal", pa.float32()),
        ("pred_abnormal", pa.int8()),
        ("label", pa.int8()),
        ("model_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),
    ]
)
"""One row per input image; rows with an `error` carry no prediction."""


def image_key(image_ids: Any) -> np.ndarray:
    """Compact 64-bit keys of image ids, for the already-scored set."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big") for i in image_ids],
        dtype=np.uint64,
    )


def _present(value: Any) -> bool:
    """A non-null cell (pandas hands nulls over as None, NaN or pd.NA, by column type)."""
    return value is not None and not pd.isna(value)


def decode_for_scoring(batch: pd.DataFrame, sizes: list[int]) -> pd.DataFrame:
    """Ray Data task: decode each row's image bytes once and resize-pad it to every model input size in `sizes`
    (uint8 `pixels_{size}` columns; the bytes are dropped). A row that cannot be decoded, or that arrives with a
    read error, keeps its `error` and gets zero pixels.

    The scoring job runs this as its own `map_batches` stage before the `Predictor` actors: with CPU actors Ray
    fuses the two (same resources), with GPU actors it stays a pool of CPU tasks, so that the node's CPUs decode
    and the GPU does not wait on a single decoding thread in its actor.
    """
    n = len(batch)
    pixels = {size: np.zeros((n, size, size), dtype=np.uint8) for size in sizes}
    errors: list[str | None] = []
    pre_errors = batch["error"] if "error" in batch else [None] * n
    for i, (data, pre_error) in enumerate(zip(batch["image"], pre_errors, strict=True)):
        if _present(pre_error):
            errors.append(str(pre_error))
            continue
        try:
            image = decode_radiograph(data, draft_size=max(sizes))
        except DecodeError as e:
            errors.append(str(e))
            continue
        for size in sizes:
            pixels[size][i] = np.asarray(resize_pad(image, size), dtype=np.uint8)
        errors.append(None)
    out = batch.drop(columns=["image"]).assign(error=errors)
    for size in sizes:
        out[f"pixels_{size}"] = list(pixels[size])
    return out


class Predictor:
    """Ray Data callable class: loads the model(s) once per actor, scores batches of decoded images.

    Batches come from `decode_for_scoring` (`pixels_{size}` columns), or carry the image bytes, which are then
    decoded here. Several models form an ensemble: probabilities are averaged. With `tta`, each model's
    probabilities are also averaged over a horizontal flip. On a GPU the models run under autocast (`amp`,
    bfloat16 where the GPU has it, else float16). A row whose image cannot be decoded gets an `error` and no
    prediction.
    """

    def __init__(self, model_uris: list[str], *, use_gpu: bool, tta: bool, threshold: float | None,
                 amp: bool = True):
        import torch

        from mura_ray.models import amp_dtype

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.amp = amp_dtype() if amp and self.device.type == "cuda" else None
        self.members = []
        for uri in model_uris:
            model, spec, model_id = _load_model(uri)
            self.members.append((model.to(self.device), spec, model_id))
        specs = [m[1] for m in self.members]
        self.threshold = threshold if threshold is not None else float(np.mean([s.threshold for s in specs]))
        ids = [m[2] for m in self.members]
        ensemble_id = "ensemble-" + hashlib.sha256(",".join(sorted(ids)).encode()).hexdigest()[:16]  # any order
        self.model_id = ids[0] if len(ids) == 1 else ensemble_id
        self.tta = tta
        self.sizes = sorted({s.image_size for s in specs})

    def _inputs(self, pixels: pd.Series, mean: float, std: float) -> torch.Tensor:
        """uint8 images (N of S x S) to the model's normalised float input (N x 1 x S x S), on its device."""
        import torch

        x = torch.from_numpy(np.stack(pixels.to_numpy())).to(self.device).unsqueeze(1)
        return (x.float() / 255.0 - mean) / std

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        import torch

        with torch.inference_mode():
            return self._predict(batch)

    def _predict(self, batch: pd.DataFrame) -> pa.Table:
        import torch

        from mura_ray.models import autocast

        if "image" in batch:
            batch = decode_for_scoring(batch, self.sizes)
        n = len(batch)
        errors = [str(e) if _present(e) else None for e in batch["error"]]
        known = torch.from_numpy(body_part_indices(batch["body_part"])).to(self.device)
        prob = np.zeros(n, dtype=np.float64)
        part_probs = np.zeros((n, len(BODY_PARTS)), dtype=np.float64)
        for model, spec, _ in self.members:
            x = self._inputs(batch[f"pixels_{spec.image_size}"], spec.mean, spec.std)
            views = [x, torch.flip(x, dims=[3])] if self.tta else [x]
            for view in views:
                with autocast(self.device, self.amp):
                    out = model(view, known)
                prob += torch.sigmoid(out["abnormal"].float()).cpu().numpy()
                if "body_part" in out:
                    part_probs += torch.softmax(out["body_part"].float(), dim=1).cpu().numpy()
        prob /= len(self.members) * (2 if self.tta else 1)
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
            "model_id": [self.model_id] * n,
            "scored_at": [now] * n,
            "error": errors,
        }
        return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in PREDICTION_SCHEMA})


# ---------------------------------------------------------------------------------------------------- input
@dataclass(frozen=True)
class Chunk:
    """A unit of listed input: the Parquet files of a split, or some raw image files (commits are cut from the
    prediction stream, not per chunk)."""

    parquet_files: tuple[str, ...] = ()
    image_files: tuple[str, ...] = ()
    root: str = ""

    @property
    def size(self) -> int:
        return len(self.parquet_files) + len(self.image_files)


def parquet_files(src: str) -> list[str]:
    """The Parquet files of an input folder, without those under a name starting with `_` or `.` (as pyarrow's
    datasets and Spark leave them out): an ingest's `_staging/`, a job's temporary files. Only the names below
    `src` count (a relative, `~` or `file://` input is compared as the path it resolves to)."""
    base = storage.resolve(src)[1].rstrip("/")
    return [f for f in storage.list_files(src, ".parquet")
            if not any(part.startswith(("_", ".")) for part in storage.resolve(f)[1][len(base):].split("/"))]


def is_parquet_input(src: str) -> bool:
    return bool(parquet_files(src)) if storage.is_dir(src) else src.endswith(".parquet")


INGEST_MARKS: tuple[str, ...] = ("errors.jsonl", "_staging", "_lock.json")
"""What an ingest writes into its DEST before `ingest_summary.json`, which it writes last."""


def _check_ingest_finished(src: str) -> None:
    """Refuse a split of a dataset whose ingest has not finished (still running, or killed): its summary, written
    last, is missing while ingest's other files are there, so the split may hold only part of its files."""
    for dest in (src.rstrip("/"), src.rstrip("/").rsplit("/", 1)[0]):
        if storage.exists(storage.join(dest, "ingest_summary.json")):
            return
        if any(storage.exists(storage.join(dest, mark)) for mark in INGEST_MARKS):
            raise UserError(f"--input {src}: the ingest writing {dest} has not finished (it has no "
                            "ingest_summary.json yet): wait for it, or re-run jobs/ingest.py with --overwrite")


def _check_input(src: str) -> None:
    """Checked before the lock and Ray (a wrong path, refused credentials or an unreachable endpoint fail in a
    second): the input exists, and is not an ingested dataset's folder holding several splits, whose train, val
    and test images would be scored, and reported on, together (a folder with one split scores that split)."""
    if not storage.exists(src):
        raise UserError(f"--input {src}: no such file or folder")
    summary = storage.join(src, "ingest_summary.json")
    if storage.exists(summary):
        try:
            listed = dict(storage.read_json(summary).get("splits", {}))
        except (ValueError, TypeError, AttributeError):
            raise UserError(f"--input {src}: its ingest_summary.json is not an ingest summary; give a split of an "
                            "ingested dataset, or a folder of images") from None
        splits = sorted(s for s in listed if storage.is_dir(storage.join(src, s)))
        if len(splits) > 1:
            raise UserError(f"--input {src} is a whole ingested dataset ({', '.join(splits)}): give one split, such "
                            f"as {storage.join(src, 'test' if 'test' in splits else splits[-1])}")


def iter_chunks(src: str, chunk_images: int) -> Iterator[Chunk]:
    """The input, listed lazily: every Parquet file of a split in one chunk; raw images folder by folder, in chunks
    of at least `chunk_images` paths (whole folders)."""
    if not storage.exists(src):
        raise UserError(f"--input {src}: no such file or folder")
    if is_parquet_input(src):
        if storage.is_dir(src):
            _check_ingest_finished(src)
        yield Chunk(parquet_files=tuple(parquet_files(src) if storage.is_dir(src) else [src]))
        return
    if not storage.is_dir(src):
        raise UserError(f"--input {src}: expected an ingested Parquet split or a folder of PNG/JPEG images")
    fs, base = storage.resolve(src)
    pending: list[str] = []
    found = False
    stack = [base]
    while stack:
        folder = stack.pop()
        infos = sorted(fs.get_file_info(pafs.FileSelector(folder, recursive=False)), key=lambda i: i.path,
                       reverse=True)
        for info in infos:
            name = info.path.rsplit("/", 1)[-1]
            if name.startswith("."):
                continue
            if info.type == pafs.FileType.Directory:
                stack.append(info.path)
            elif name.lower().endswith(IMAGE_SUFFIXES):
                pending.append(info.path[len(base):].lstrip("/"))
        if len(pending) >= chunk_images:
            found = True
            yield Chunk(image_files=tuple(sorted(pending)), root=src)
            pending = []
    if pending or not found:
        if not pending:
            raise UserError(f"--input {src}: no Parquet files and no PNG/JPEG images found")
        yield Chunk(image_files=tuple(sorted(pending)), root=src)


RETRY_LATER = "cannot read now: "
"""How `_raw_rows` marks a row whose file S3 could not serve now: the run stops on it, its chunk not committed."""


def _raw_rows(batch: pd.DataFrame, root: str) -> pd.DataFrame:
    """Ray Data task: read raw image files into the input columns.

    A file that cannot be read for what it is (gone since the listing, a local permission) carries an error,
    committed as its row: a re-run skips it like any scored image. S3 unreachable, throttling or failing
    (`storage.transient`), or refusing the request (`storage.access_denied`: also what credentials that expired
    mid-run get) is no fault of the file's: its row carries `RETRY_LATER` instead, and the driver stops the run on
    it with one line before its chunk is committed (`_Committer.add`), so that the next run scores these images
    rather than leaving them marked failed for good. (Raised here, the error would reach the driver wrapped by Ray
    Data, its message lost.)
    """
    from mura_ray.data.ingest import image_id_for

    images, errors = [], []
    for rel in batch["path"]:
        uri = storage.join(root, rel)
        try:
            images.append(storage.read_bytes(uri)), errors.append(None)
        except OSError as e:
            retry = storage.transient(e) or storage.access_denied(e)
            images.append(b""), errors.append(f"{RETRY_LATER}{uri} ({first_line(e)})" if retry else
                                              f"cannot read file: {e}")
    parts = [
        next((p[3:] for p in rel.split("/")[:-1] if p.startswith("XR_") and p[3:] in BODY_PARTS), None)
        for rel in batch["path"]
    ]
    return pd.DataFrame({
        "image_id": [image_id_for(p) for p in batch["path"]], "image": images, "path": batch["path"],
        "study_id": [None] * len(batch), "body_part": parts, "label": [None] * len(batch), "error": errors,
    })


def _drop_done(batch: pd.DataFrame, done: Any) -> pd.DataFrame:
    """Ray Data task: drop rows whose image is already in a committed part (`done`: ObjectRef of sorted keys).

    Rows of a raw-folder listing carry only `path`: their ids come from it, so done images are dropped before their
    bytes are read (a nightly re-run over a growing archive reads only the new images).
    """
    import ray

    done = ray.get(done[0])
    if len(done) == 0:
        return batch
    if "image_id" in batch:
        ids = batch["image_id"]
    else:
        from mura_ray.data.ingest import image_id_for

        ids = [image_id_for(p) for p in batch["path"]]
    return batch[~np.isin(image_key(ids), done)]


RAW_IMAGES_PER_EXECUTION = 200_000
"""Raw image paths listed ahead on the driver (~20 MB): bounds its memory on archives of any size."""


def _executions(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """Listed chunks merged into the inputs of Ray Data executions: every Parquet file in one, raw images in runs
    of about RAW_IMAGES_PER_EXECUTION paths."""
    pending: list[Chunk] = []
    for chunk in chunks:
        pending.append(chunk)
        if chunk.image_files and sum(len(c.image_files) for c in pending) >= RAW_IMAGES_PER_EXECUTION:
            yield _merge(pending)
            pending = []
    if pending:
        yield _merge(pending)


def _merge(chunks: list[Chunk]) -> Chunk:
    return Chunk(parquet_files=tuple(f for c in chunks for f in c.parquet_files),
                 image_files=tuple(f for c in chunks for f in c.image_files), root=chunks[0].root)


def _chunk_dataset(chunk: Chunk, done_ref: Any, read_cpus: float):
    import ray

    if chunk.parquet_files:
        fs, _ = storage.resolve(chunk.parquet_files[0])
        paths = [storage.resolve(f)[1] for f in chunk.parquet_files]
        ds = read_parquet(paths, fs)
        names = ds.schema().names
        missing = [c for c in ("image_id", "image") if c not in names]
        if missing:
            raise UserError(f"--input: {chunk.parquet_files[0]} lacks column(s) {', '.join(missing)}; "
                            "expected a split written by jobs/ingest.py")
        ds = ds.select_columns([c for c in INPUT_COLUMNS if c in names])
        for column in INPUT_COLUMNS:
            if column not in names:
                ds = ds.add_column(column, lambda b: pd.Series([None] * len(b)), batch_format="pandas")
    else:
        listing = pd.DataFrame({"path": list(chunk.image_files)})
        blocks = max(1, min(len(listing) // 64, 4096))  # tasks read ~64 images each (bounded blocks)
        step = -(-len(listing) // blocks)
        ds = ray.data.from_pandas([listing.iloc[i : i + step] for i in range(0, len(listing), step)])
        ds = ds.map_batches(_drop_done, batch_format="pandas", fn_kwargs={"done": [done_ref]}, num_cpus=read_cpus)
        return ds.map_batches(_raw_rows, batch_format="pandas", fn_kwargs={"root": chunk.root}, num_cpus=read_cpus)
    return ds.map_batches(_drop_done, batch_format="pandas", fn_kwargs={"done": [done_ref]}, num_cpus=read_cpus)


# ---------------------------------------------------------------------------------------------------- commit
def read_manifest(out: str) -> dict[str, Any] | None:
    uri = storage.join(out, MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        manifest = storage.read_json(uri)
    except ValueError as e:
        raise UserError(f"{uri} is not valid JSON ({e}); is --out another job's folder?") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), dict):
        raise UserError(f"{uri} is not a scoring manifest (no 'parts'); is --out another job's folder?")
    return manifest


def _check_continuable(out: str, manifest: dict[str, Any]) -> None:
    """A manifest with committed parts that a run can add to: written by this tool (what it compares, and the
    part names it numbers on from)."""
    missing = [key for key in ("input", "model_ids") if key not in manifest]
    odd = [name for name in manifest["parts"] if not _PART_NAME.fullmatch(name)]
    if missing or odd:
        what = f"lacks {', '.join(missing)}" if missing else f"lists parts not named part-N-M.parquet: {odd[:3]}"
        raise UserError(f"{storage.join(out, MANIFEST)} is not a scoring manifest of this tool ({what}); is --out "
                        "another job's folder?")


def read_predictions(out: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The committed predictions of a scoring output `out` (only the parts its manifest lists)."""
    import pyarrow.parquet as pq

    manifest = read_manifest(out)
    if manifest is None:
        raise UserError(f"{out}: no {MANIFEST}; not a (complete) scoring output")
    fs, _ = storage.resolve(out)
    paths = [storage.resolve(storage.join(out, PREDICTIONS, p))[1] for p in sorted(manifest["parts"])]
    if not paths:
        return PREDICTION_SCHEMA.empty_table().to_pandas()
    return pq.ParquetDataset(paths, filesystem=fs).read(columns=columns).to_pandas()


def _load_done_keys(out: str, parts: list[str]) -> np.ndarray:
    """Ray task: 64-bit keys of every image id in the committed parts."""
    import pyarrow.parquet as pq

    keys = []
    for part in parts:
        fs, path = storage.resolve(storage.join(out, PREDICTIONS, part))
        keys.append(image_key(pq.read_table(path, filesystem=fs, columns=["image_id"])["image_id"].to_pylist()))
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.uint64)


def _clean_uncommitted(out: str, committed: set[str]) -> None:
    """Delete staged or stray part files that no manifest lists (left by an interrupted run)."""
    storage.delete_dir(storage.join(out, "_staging"))
    for uri in storage.list_files(storage.join(out, PREDICTIONS), ".parquet"):
        if uri.rsplit("/", 1)[-1] not in committed:
            fs, path = storage.resolve(uri)
            fs.delete_file(path)


def _commit_chunk(out: str, staging: str, seq: int) -> tuple[list[str], int]:
    """Verify a staged chunk (row count, unique image ids) and move its files into predictions/."""
    import pyarrow.parquet as pq

    staged = storage.list_files(staging, ".parquet")
    if not staged:
        return [], 0
    fs, _ = storage.resolve(out)
    ids: list[str] = []
    for uri in staged:
        ids.extend(pq.read_table(storage.resolve(uri)[1], filesystem=fs, columns=["image_id"])["image_id"]
                   .to_pylist())
    if len(ids) != len(set(ids)):
        raise RuntimeError(f"staged chunk {staging} holds duplicate image ids; nothing was committed")
    fs.create_dir(storage.resolve(storage.join(out, PREDICTIONS))[1], recursive=True)
    names = []
    for i, uri in enumerate(staged):
        name = f"part-{seq:06d}-{i:04d}.parquet"
        fs.move(storage.resolve(uri)[1], storage.resolve(storage.join(out, PREDICTIONS, name))[1])
        names.append(name)
    storage.delete_dir(staging)
    return names, len(ids)


class _KeySet:
    """A set of 64-bit keys in ~8 bytes a key: sorted runs, merged as they grow (each run at least twice the size of
    the next), so a lookup is a binary search in each of O(log n) runs and a key is copied O(log n) times."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            found |= run[at] == keys
        return found

    def add(self, keys: np.ndarray) -> None:
        """Add keys that are not in the set yet."""
        if not len(keys):
            return
        self.runs.append(np.sort(keys))
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            newer, older = self.runs.pop(), self.runs.pop()
            self.runs.append(np.concatenate([older, newer]))
            self.runs[-1].sort()


class _Committer:
    """Cuts the stream of prediction tables into committed chunks of exactly `chunk_images` rows (the last one
    smaller), staged as Parquet parts of at most `rows_per_file` rows, then moved and listed in the manifest.

    Every image id is committed once: a row whose id this run has already taken (an input that holds an image
    twice, in one chunk or across chunks) is dropped and counted in `duplicates`, the first kept. (Ids committed by
    earlier runs are dropped from the input before it is read, `_drop_done`.) The ids' 64-bit keys are held for the
    run, 8 bytes an image (`_KeySet`).
    """

    def __init__(self, out: str, manifest: dict[str, Any], seq: int, chunk_images: int, rows_per_file: int,
                 lock: storage.OutputLock):
        self.out, self.manifest, self.seq, self.lock = out, manifest, seq, lock
        self.chunk_images, self.rows_per_file = chunk_images, rows_per_file
        self.buffer: list[pa.Table] = []
        self.buffered = self.chunk_rows = self.chunk_errors = self.scored = self.failed = 0
        self.staging = self._new_staging()
        self.staged = 0
        self.seen = _KeySet()
        self.duplicates = 0
        self.duplicate_ids: list[str] = []  # the first few, for the log

    def _new_staging(self) -> str:
        return storage.join(self.out, "_staging", uuid.uuid4().hex)

    def _first_sightings(self, table: pa.Table) -> pa.Table:
        """`table` without the rows whose image id this run has already taken (counted in `duplicates`)."""
        ids = table["image_id"].to_pylist()
        keys = image_key(ids)
        keep = np.zeros(len(keys), dtype=bool)
        keep[np.unique(keys, return_index=True)[1]] = True  # each id's first row in this table
        keep &= ~self.seen.contains(keys)
        self.seen.add(keys[keep])
        if keep.all():
            return table
        repeats = np.flatnonzero(~keep)
        self.duplicates += len(repeats)
        self.duplicate_ids += [ids[i] for i in repeats[: 5 - len(self.duplicate_ids)]]
        return table.filter(pa.array(keep))

    def add(self, table: pa.Table) -> None:
        import pyarrow.compute as pc

        retry = pc.starts_with(table["error"].cast(pa.string()), RETRY_LATER)
        if pc.any(retry).as_py():
            first = table.filter(pc.fill_null(retry, False))["error"][0].as_py().removeprefix(RETRY_LATER)
            raise UserError(f"cannot read {first}; the chunks committed so far are kept: run the same command again "
                            "to score the rest")
        table = self._first_sightings(table)
        while table.num_rows:
            head = table.slice(0, min(self.chunk_images - self.chunk_rows, self.rows_per_file - self.buffered))
            table = table.slice(head.num_rows)
            self.buffer.append(head)
            self.buffered += head.num_rows
            self.chunk_rows += head.num_rows
            self.chunk_errors += int(pc.sum(pc.is_valid(head["error"])).as_py() or 0)
            if self.buffered >= self.rows_per_file:
                self._stage()
            if self.chunk_rows >= self.chunk_images:
                self.commit()

    def _stage(self) -> None:
        import pyarrow.parquet as pq

        if not self.buffered:
            return
        fs, path = storage.resolve(storage.join(self.staging, f"part-{self.staged:04d}.parquet"))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            pq.write_table(pa.concat_tables(self.buffer).cast(PREDICTION_SCHEMA), f)
        self.buffer, self.buffered, self.staged = [], 0, self.staged + 1

    def commit(self) -> None:
        self._stage()
        self.lock.check()  # a run whose lock was taken over (judged dead) must not move parts or write a manifest
        names, rows = _commit_chunk(self.out, self.staging, self.seq)
        if names:
            if rows != self.chunk_rows:
                raise RuntimeError(f"chunk {self.seq}: staged {rows} rows, expected {self.chunk_rows}")
            for name in names:
                self.manifest["parts"][name] = {"chunk": self.seq}
            self.manifest["n_rows"] = self.manifest.get("n_rows", 0) + rows
            self.manifest["n_errors"] = self.manifest.get("n_errors", 0) + self.chunk_errors
            self.manifest["updated_at"] = datetime.now(timezone.utc).isoformat()
            # The manifest is the commit: a part becomes visible to readers only once listed here.
            storage.write_json(storage.join(self.out, MANIFEST), self.manifest)
            self.scored += rows - self.chunk_errors
            self.failed += self.chunk_errors
            self.seq += 1
        self.staging, self.staged = self._new_staging(), 0
        self.chunk_rows = self.chunk_errors = 0


def _resolve_gpu(mode: str) -> bool:
    import ray

    if mode == "yes":
        return True
    return mode == "auto" and ray.cluster_resources().get("GPU", 0) >= 1


def _check_pool_fits(cfg: ScoreConfig, use_gpu: bool) -> None:
    """A pool the cluster cannot place yet is waited for (an autoscaler may add nodes), not an error: say so. On a
    local Ray this process started, which no autoscaler grows, a pool of which not one actor fits would wait
    forever: a UserError."""
    import ray

    from mura_ray.runtime import started_local_ray

    what, one = ("GPU", 1.0) if use_gpu else ("CPU", cfg.cpus_per_actor)
    need = cfg.concurrency * one
    have = ray.cluster_resources().get(what, 0.0)
    if have < one and started_local_ray():
        fix = "use --gpu no to score on CPUs" if use_gpu else "lower --cpus-per-actor"
        raise UserError(f"a scoring actor needs {one:g} {what}, this machine's Ray has {have:g} ({fix})")
    if have < need:
        later = "never, on this local Ray" if started_local_ray() else "when an autoscaler adds nodes"
        logger.warning("The cluster has %g %s, the %d scoring actors need %g: the job scores on the actors that fit, "
                       "the others start %s.", have, what, cfg.concurrency, need, later)


def _same_input(uri: str) -> str:
    """An input as compared between runs: remote URIs without a trailing slash, local paths absolute."""
    return uri.rstrip("/") if storage.is_remote(uri) else os.path.abspath(os.path.expanduser(uri))


def _load_model(uri: str) -> tuple[MultiTaskNet, ModelSpec, str]:
    """`models.load_model`, with what a broken model directory raises (a corrupt or foreign config.json, weights
    of another architecture, an unreadable file) turned into a UserError naming the directory."""
    from safetensors import SafetensorError

    from mura_ray.models import load_model

    try:
        loaded = load_model(uri)
    except (ValueError, TypeError, RuntimeError, OSError, SafetensorError) as e:
        if storage.s3_problem(e):  # nothing wrong with the model: this run may not read it, or reach its storage
            raise UserError(f"--model {uri}: cannot read it ({first_line(e)})") from None
        raise UserError(f"--model {uri}: cannot load the exported model ({type(e).__name__}: {first_line(e)}); "
                        "export it again from its run") from None
    if tuple(loaded[1].body_parts) != BODY_PARTS:  # body_part_probs and body_part_pred are named in this order
        raise UserError(f"--model {uri}: its body parts {list(loaded[1].body_parts)} are not this version's "
                        f"{list(BODY_PARTS)} (in this order)")
    return loaded


def _check_models(models: tuple[str, ...]) -> tuple[list[str], float, list[int]]:
    """Load each model once on the driver (a bad --model fails before any cluster work): ids, mean threshold,
    input sizes."""
    loaded = [_load_model(uri) for uri in models]
    return ([m[2] for m in loaded], float(np.mean([m[1].threshold for m in loaded])),
            sorted({m[1].image_size for m in loaded}))


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
            _check_continuable(cfg.out, manifest)
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
        _clean_uncommitted(cfg.out, set(manifest["parts"]))
        storage.write_json(storage.join(cfg.out, MANIFEST), manifest)
    except OSError as e:
        lock.release()
        raise UserError(f"--out {cfg.out}: cannot write there ({first_line(e)})") from None
    except BaseException:
        lock.release()
        raise
    return manifest


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
    model_ids, model_threshold, sizes = _check_models(cfg.models)
    if cfg.explain:
        import importlib.util

        if importlib.util.find_spec("pytorch_grad_cam") is None:
            raise UserError("--explain needs the optional extra: pip install 'mura_ray[explain]'")
    if storage.overlap(cfg.input, cfg.out):
        # --overwrite would clear the input; predictions inside the input would be read back as input next run
        raise UserError(f"--out {cfg.out} and --input {cfg.input} overlap (the same folder, or one inside the other): "
                        "give an --out outside the input")
    _check_input(cfg.input)
    threshold = cfg.threshold if cfg.threshold is not None else model_threshold
    threshold_source = "cli" if cfg.threshold is not None else "model"
    lock = storage.OutputLock(cfg.out, "jobs/score.py")
    manifest = _open_output(cfg, model_ids, threshold, threshold_source, model_threshold, overwrite=overwrite,
                            lock=lock)
    try:
        return _score_locked(cfg, manifest, lock, sizes, threshold, threshold_source, report_dir)
    finally:
        lock.release()


def _score_locked(cfg: ScoreConfig, manifest: dict[str, Any], lock: storage.OutputLock, sizes: list[int],
                  threshold: float, threshold_source: str, report_dir: str | None) -> dict[str, Any]:
    """`score` once this run holds --out's lock."""
    import ray

    from mura_ray.runtime import init_ray

    init_ray()
    use_gpu = _resolve_gpu(cfg.gpu)
    _check_pool_fits(cfg, use_gpu)
    amp = cfg.amp and use_gpu  # what the Predictor does: autocast on its GPU, float32 on CPU
    _check_precision(cfg, manifest, amp, use_gpu)
    manifest["amp"] = amp
    parts_before = set(manifest["parts"])
    done_ref = ray.remote(_load_done_keys).options(num_cpus=0.25).remote(cfg.out, sorted(parts_before))

    predictor_args = {"use_gpu": use_gpu, "tta": cfg.tta, "threshold": threshold, "amp": cfg.amp}
    started = time.perf_counter()
    seq = max((int(p.split("-")[1]) for p in manifest["parts"]), default=-1) + 1
    committer = _Committer(cfg.out, manifest, seq, cfg.chunk_images, cfg.rows_per_file, lock)
    total = 0
    skipped_refs = []
    # One Ray Data execution per run of listed input (all the Parquet files, or up to RAW_IMAGES_PER_EXECUTION raw
    # image paths held on the driver): the scoring actors start (import torch, load the model, initialise CUDA) once
    # per execution, not once per committed chunk; commits are cut from the stream of predictions.
    for run in _executions(iter_chunks(cfg.input, cfg.chunk_images)):
        total += _chunk_rows(run)
        dataset = _chunk_dataset(run, done_ref, read_cpus=1.0)
        skipped_refs.append(ray.remote(_count_done).options(num_cpus=0.25).remote(run, done_ref))
        predictions = scoring_dataset(dataset, list(cfg.models), sizes, predictor_args, batch_size=cfg.batch_size,
                                      concurrency=cfg.concurrency, cpus_per_actor=cfg.cpus_per_actor,
                                      max_concurrency=cfg.max_concurrency)
        for table in predictions.iter_batches(batch_size=None, batch_format="pyarrow"):
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
    n_rows, duplicates = _get(ray.remote(_check_committed).options(num_cpus=0.25).remote(
        cfg.out, sorted(manifest["parts"]), sorted(set(manifest["parts"]) - parts_before)))
    if duplicates or n_rows != manifest.get("n_rows", 0):
        raise RuntimeError(f"--out {cfg.out}: the committed parts hold {n_rows} rows (manifest: "
                           f"{manifest.get('n_rows', 0)}), duplicated image ids: {duplicates or 'none'}")
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {
        "scored": scored, "skipped_already_done": skipped, "skipped_duplicates": repeated, "failed": failed,
        "seconds": round(elapsed, 2),
        "predictions": storage.join(cfg.out, PREDICTIONS), "n_rows_total": manifest.get("n_rows", 0),
    }
    if cfg.report and manifest.get("n_rows"):
        report_dir = report_dir or storage.join(cfg.out, "report")
        explain = {"n": cfg.explain, "input": cfg.input, "models": list(cfg.models)} if cfg.explain else None
        made = _get(ray.remote(_report_task).options(num_cpus=1).remote(
            cfg.out, report_dir, threshold, threshold_source, cfg.bootstrap, explain))
        if made is not None:
            summary["report"] = report_dir
            summary["report_summary"] = made
    return summary


def _chunk_rows(chunk: Chunk) -> int:
    """Input rows of a chunk, from the Parquet footers (the first read of each file: a corrupt one fails here)."""
    import pyarrow.parquet as pq

    if chunk.image_files:
        return len(chunk.image_files)
    n = 0
    for uri in chunk.parquet_files:
        fs, path = storage.resolve(uri)
        try:
            with fs.open_input_file(path) as f:
                n += pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"--input: cannot read {uri} as Parquet ({first_line(e)}); re-ingest the split "
                            "or remove the file") from None
    return n


def _count_done(chunk: Chunk, done: np.ndarray) -> int:
    """Ray task: how many input rows of `chunk` the already-scored filter (`_drop_done`, same keys) removes."""
    import pyarrow.parquet as pq

    from mura_ray.data.ingest import image_id_for

    if len(done) == 0:
        return 0
    if chunk.image_files:
        return int(np.isin(image_key([image_id_for(p) for p in chunk.image_files]), done).sum())
    n = 0
    for uri in chunk.parquet_files:
        fs, path = storage.resolve(uri)
        ids = pq.read_table(path, filesystem=fs, columns=["image_id"])["image_id"].to_pylist()
        n += int(np.isin(image_key(ids), done).sum())
    return n


def _check_committed(out: str, parts: list[str], new_parts: list[str]) -> tuple[int, list[str]]:
    """Ray task: rows in the committed parts, and (up to 5 of) the image ids that occur in more than one row.

    Ids are compared as the already-scored set's 64-bit keys (8 bytes an image, as `_load_done_keys` holds them);
    the ids named are looked up in this run's parts first.
    """
    import pyarrow.parquet as pq

    def ids_of(part: str) -> list[str]:
        fs, path = storage.resolve(storage.join(out, PREDICTIONS, part))
        return pq.read_table(path, filesystem=fs, columns=["image_id"])["image_id"].to_pylist()

    keys = np.concatenate([image_key(ids_of(part)) for part in parts]) if parts else np.zeros(0, dtype=np.uint64)
    unique, counts = np.unique(keys, return_counts=True)
    repeated = unique[counts > 1]
    named: list[str] = []
    for part in [*new_parts, *(p for p in parts if p not in new_parts)]:
        if not repeated.size or len(named) >= 5:
            break
        ids = ids_of(part)
        named += [i for i, hit in zip(ids, np.isin(image_key(ids), repeated), strict=True) if hit and i not in named]
    return len(keys), named[:5]


def _report_task(out: str, report_dir: str, threshold: float, threshold_source: str, bootstrap: int,
                 explain: dict[str, Any] | None) -> dict[str, Any] | None:
    """Ray task: build and write the metric report when the predictions carry labels (keeps the driver small).

    With `explain`, Grad-CAM heatmaps of the most confident true positives, false negatives and false positives
    are added to the HTML report.
    """
    from mura_ray.report import build_report, load_predictions, write_report

    df = load_predictions(out)
    if "label" not in df or not (df["label"].notna() & df["prob_abnormal"].notna()).any():
        return None  # no image both labelled and scored (an unlabelled input, or every labelled image failed)
    report = build_report(df, threshold=threshold, threshold_source=threshold_source, bootstrap=bootstrap)
    explanations = None
    if explain:
        from mura_ray.explain import explain_report_examples

        explanations = explain_report_examples(read_predictions(out), explain["input"], explain["models"],
                                               explain["n"], threshold)
    write_report(report, df, report_dir, explanations=explanations)
    return report


def score_and_report(model_dir: str, input_uri: str, out: str, report_dir: str, bootstrap: int = 200
                     ) -> dict[str, Any]:
    """Score an ingested split with one model (training's test evaluation), replacing `out`; returns the report."""
    summary = score(ScoreConfig(models=(model_dir,), input=input_uri, out=out, bootstrap=bootstrap),
                    overwrite=True, report_dir=report_dir)
    return summary.get("report_summary") or {}
