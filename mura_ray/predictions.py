"""The scoring output format: prediction schema, `manifest.json`, and reading what a scoring run committed.

A scoring output DEST holds `predictions/part-*.parquet` and `manifest.json`. The manifest is the commit record:
a part is visible to readers only once listed under its `parts` (a mapping of part name to `{"chunk": N}`), so
readers never see a staged (`DEST/_staging/`) or half-written part. `jobs/score.py` writes this format
(`Committer`); `jobs/report.py` and Grad-CAM read it. Depends only on storage.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import uuid
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mura_ray import storage
from mura_ray.config import UserError

MANIFEST = "manifest.json"
PREDICTIONS = "predictions"
HISTORY = "history.jsonl"
"""One JSON line per scoring run under DEST (`drift.history_line`), drawn by `jobs/report.py --history`."""
PART_NAME = re.compile(r"part-\d+-\d+\.parquet")

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
        ("image_mean", pa.float32()),
        ("image_contrast", pa.float32()),
        ("image_height", pa.int32()),
        ("image_width", pa.int32()),
        ("model_id", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),
    ]
)
"""One row per input image; rows with an `error` carry no prediction. `image_*` describe the decoded image
(`images.ImageStats`: mean intensity and contrast in [0, 1], stored height and width in pixels), for drift."""

REPORT_COLUMNS = ("image_id", "study_id", "body_part", "body_part_pred", "prob_abnormal", "label", "model_id",
                  "error")
"""The columns a report reads (`load_predictions`)."""


def image_key(image_ids: Any) -> np.ndarray:
    """Compact 64-bit keys of image ids, for the already-scored set."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big") for i in image_ids],
        dtype=np.uint64,
    )



def read_manifest(out: str) -> dict[str, Any] | None:
    """The manifest of scoring output `out`, None when it has none; a file that is not one is a UserError."""
    uri = storage.join(out, MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        manifest = storage.read_json(uri)
    except ValueError as e:
        raise UserError(f"{uri} is not valid JSON ({e}); pass a scoring output or a folder of Parquet "
                        "predictions") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), dict):
        raise UserError(f"{uri} is not a scoring manifest (no 'parts'); pass a scoring output or a folder of "
                        "Parquet predictions")
    return manifest


def find_scoring_output(uri: str) -> tuple[str, dict[str, Any]] | None:
    """(DEST, manifest) when `uri` is a scoring output DEST or its DEST/predictions folder; None otherwise."""
    base = uri.rstrip("/")
    candidates = [base]
    if posixpath.basename(base) == PREDICTIONS:
        candidates.append(posixpath.dirname(base))
    for dest in candidates:
        manifest = read_manifest(dest)
        if manifest is not None:
            return dest, manifest
    return None


def committed_parts(dest: str, manifest: dict[str, Any]) -> list[str]:
    """The URIs of the part files `manifest` commits, sorted."""
    return [storage.join(dest, PREDICTIONS, name) for name in sorted(manifest["parts"])]


def read_predictions(out: str, columns: list[str] | None = None, parts: list[str] | None = None) -> pd.DataFrame:
    """The committed predictions of scoring output `out` (only the parts its manifest lists; of those, only
    `parts` when given). Columns that parts of an older version lack are read as nulls."""
    manifest = read_manifest(out)
    if manifest is None:
        raise UserError(f"{out}: no {MANIFEST}; not a (complete) scoring output")
    files = [p for p in committed_parts(out, manifest) if parts is None or posixpath.basename(p) in parts]
    schema = PREDICTION_SCHEMA if columns is None else pa.schema([PREDICTION_SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table().to_pandas()
    fs, _ = storage.resolve(out)
    dataset = pads.dataset([storage.resolve(p)[1] for p in files], schema=PREDICTION_SCHEMA, filesystem=fs,
                           format="parquet")
    return dataset.to_table(columns=columns).to_pandas()


def load_predictions(uri: str) -> pd.DataFrame:
    """Predictions for a report, only the columns it uses (REPORT_COLUMNS).

    `uri` is a scoring output (DEST or DEST/predictions: only the parts its manifest commits are read, and one with
    nothing committed yet is refused), a Parquet file, or a folder of them (names under `_` or `.` folders, such as
    `_staging/`, are not read). A missing `label` column is fine here; the report needs it.
    """
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no predictions at {uri}; pass the scoring job's output (a Parquet dataset)")
    if info.type == pafs.FileType.Directory:
        found = find_scoring_output(uri)
        if found is not None:
            dest, manifest = found
            files = committed_parts(dest, manifest)
            if not files:
                raise UserError(f"{uri} is a scoring output with nothing committed yet ({storage.join(dest, MANIFEST)}"
                                " lists no parts): wait for its scoring run to commit a chunk, or re-run it")
        else:
            files = storage.list_parquet(uri)
            if not files:
                raise FileNotFoundError(f"no .parquet files under {uri}; pass the scoring job's output directory")
        source: str | list[str] = [storage.resolve(f)[1] for f in files]
    else:
        source = path
    dataset = pq.ParquetDataset(source, filesystem=fs)
    names = dataset.schema.names
    missing = [c for c in ("image_id", "prob_abnormal") if c not in names]
    if missing:
        raise ValueError(f"predictions at {uri} have no {', '.join(map(repr, missing))} column; is it scoring output?")
    return dataset.read(columns=[c for c in REPORT_COLUMNS if c in names]).to_pandas()


def check_continuable(out: str, manifest: dict[str, Any]) -> None:
    """A manifest with committed parts that a run can add to: written by this tool (what it compares, and the
    part names it numbers on from)."""
    missing = [key for key in ("input", "model_ids") if key not in manifest]
    odd = [name for name in manifest["parts"] if not PART_NAME.fullmatch(name)]
    if missing or odd:
        what = f"lacks {', '.join(missing)}" if missing else f"lists parts not named part-N-M.parquet: {odd[:3]}"
        raise UserError(f"{storage.join(out, MANIFEST)} is not a scoring manifest of this tool ({what}); is --out "
                        "another job's folder?")


def load_done_keys(out: str, parts: list[str], by_path: bool = False) -> np.ndarray:
    """Ray task: 64-bit keys of every image id in the committed parts; `by_path` (raw-folder input) also of the
    path-derived id of each row's file (`listing.image_id_for`): a raw DICOM file's id is its SOPInstanceUID, known
    only once it is read, while a re-run drops the files already scored before reading them, by path (for PNG and
    JPEG files the two are the same id)."""
    from mura_ray.data.listing import image_id_for

    keys = []
    for part in parts:
        fs, path = storage.resolve(storage.join(out, PREDICTIONS, part))
        table = pq.read_table(path, filesystem=fs, columns=["image_id", "path"] if by_path else ["image_id"])
        keys.append(image_key(table["image_id"].to_pylist()))
        if by_path:
            keys.append(image_key([image_id_for(p) for p in table["path"].to_pylist() if p is not None]))
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.uint64)


def clean_uncommitted(out: str, committed: set[str]) -> None:
    """Delete staged or stray part files that no manifest lists (left by an interrupted run)."""
    storage.delete_dir(storage.join(out, "_staging"))
    for uri in storage.list_files(storage.join(out, PREDICTIONS), ".parquet"):
        if uri.rsplit("/", 1)[-1] not in committed:
            fs, path = storage.resolve(uri)
            fs.delete_file(path)


def _move_staged(out: str, staging: str, seq: int) -> list[str]:
    """Move a staged chunk's files into predictions/ under their committed names (not yet listed: not visible)."""
    staged = storage.list_files(staging, ".parquet")
    fs, _ = storage.resolve(out)
    fs.create_dir(storage.resolve(storage.join(out, PREDICTIONS))[1], recursive=True)
    names = [f"part-{seq:06d}-{i:04d}.parquet" for i in range(len(staged))]
    for uri, name in zip(staged, names, strict=True):
        fs.move(storage.resolve(uri)[1], storage.resolve(storage.join(out, PREDICTIONS, name))[1])
    storage.delete_dir(staging)
    return names


class _KeySet:
    """A set of 64-bit keys in ~8 bytes a key: sorted runs, merged as they grow (each run at least twice the size of
    the next), so a lookup is a binary search in each of O(log n) runs and a key is copied O(log n) times."""

    # Not a Python set: that holds 69 bytes a key (measured, 1M keys), 0.7 GB on the driver for 10M images.

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


class Committer:
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
        names = _move_staged(self.out, self.staging, self.seq) if self.staged else []
        if names:
            rows = self.chunk_rows
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
