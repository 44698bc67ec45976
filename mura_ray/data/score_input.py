"""What a scoring run reads: an ingested Parquet split or a folder/prefix of raw PNG/JPEG images or DICOM files,
listed lazily and turned into a Ray Dataset of input rows, without the images an earlier run already committed.

In a raw folder, PNG/JPEG files are listed by suffix and DICOM candidates by name (`dicom.may_hold_dicom`: a DICOM
suffix, none, or a numeric one), then recognised by content; other files (`README.txt`) are not listed. A DICOM
row's image_id, study_id and body part come from its header (SOPInstanceUID and frame, StudyInstanceUID,
BodyPartExamined); an already-scored file is dropped by its path before it is read (`predictions.load_done_keys`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mura_ray import storage
from mura_ray.config import UserError
from mura_ray.data.dicom import may_hold_dicom, read_header
from mura_ray.data.images import IMAGE_SUFFIXES
from mura_ray.data.listing import image_id_for
from mura_ray.data.pipeline import read_parquet
from mura_ray.labels import BODY_PARTS
from mura_ray.predictions import image_key
from mura_ray.runtime import first_line

INPUT_COLUMNS: tuple[str, ...] = ("image_id", "image", "path", "study_id", "body_part", "label")

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


def is_parquet_input(src: str) -> bool:
    return bool(storage.list_parquet(src)) if storage.is_dir(src) else src.endswith(".parquet")


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


def check_input(src: str) -> None:
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
        yield Chunk(parquet_files=tuple(storage.list_parquet(src) if storage.is_dir(src) else [src]))
        return
    if not storage.is_dir(src):
        raise UserError(f"--input {src}: expected an ingested Parquet split or a folder of PNG/JPEG images or "
                        "DICOM files")
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
            elif name.lower().endswith(IMAGE_SUFFIXES) or may_hold_dicom(name):
                pending.append(info.path[len(base):].lstrip("/"))
        if len(pending) >= chunk_images:
            found = True
            yield Chunk(image_files=tuple(sorted(pending)), root=src)
            pending = []
    if pending or not found:
        if not pending:
            raise UserError(f"--input {src}: no Parquet files and no PNG/JPEG images or DICOM files found")
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
    images, errors = [], []
    for rel in batch["path"]:
        uri = storage.join(root, rel)
        try:
            images.append(storage.read_bytes(uri)), errors.append(None)
        except OSError as e:
            retry = storage.transient(e) or storage.access_denied(e)
            images.append(b""), errors.append(f"{RETRY_LATER}{uri} ({first_line(e)})" if retry else
                                              f"cannot read file: {e}")
    ids = [image_id_for(p) for p in batch["path"]]
    studies: list[str | None] = [None] * len(batch)
    parts = [
        next((p[3:] for p in rel.split("/")[:-1] if p.startswith("XR_") and p[3:] in BODY_PARTS), None)
        for rel in batch["path"]
    ]
    for i, data in enumerate(images):
        header = read_header(data) if data else None  # None: not DICOM (or no header to read; decoding says why)
        if header is not None:
            ids[i], studies[i], parts[i] = header[0], header[1], header[2] or parts[i]
    return pd.DataFrame({
        "image_id": ids, "image": images, "path": batch["path"],
        "study_id": studies, "body_part": parts, "label": [None] * len(batch), "error": errors,
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
        ids = [image_id_for(p) for p in batch["path"]]
    return batch[~np.isin(image_key(ids), done)]


RAW_IMAGES_PER_EXECUTION = 200_000
"""Raw image paths listed ahead on the driver (~20 MB): bounds its memory on archives of any size."""


def executions(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
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


CPU_ACTORS_PER_READ_TASK = 64
"""One Parquet read task delivers 1,600-2,300 images/s (`benchmarks/score.py`'s archive, 2 cores) and a CPU scoring
actor scores ~20 (efficientnet_b0 at 224 px, one thread): one read task feeds 64 CPU actors with room to spare."""


def cpu_read_tasks(actors: int) -> int:
    """Read tasks at once in front of `actors` CPU scoring actors: as many as their rate needs. Unbounded, Ray Data
    reads ahead on every spare CPU while the actors import torch and score their first batch, and delays both
    (docs/benchmarks.md#scoring). GPU actors need every decoding task the cluster can run."""
    return max(1, math.ceil(actors / CPU_ACTORS_PER_READ_TASK))


def chunk_dataset(chunk: Chunk, done_ref: Any, read_cpus: float, read_tasks: int | None = None):
    """A chunk's input rows (INPUT_COLUMNS) without those already scored (`done_ref`): Parquet files read by at
    most `read_tasks` tasks at once (None: as many as Ray Data runs), raw image files read as they are listed."""
    import ray

    if chunk.parquet_files:
        fs, _ = storage.resolve(chunk.parquet_files[0])
        paths = [storage.resolve(f)[1] for f in chunk.parquet_files]
        ds = read_parquet(paths, fs, **({} if read_tasks is None else {"concurrency": read_tasks}))
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



def chunk_rows(chunk: Chunk) -> int:
    """Input rows of a chunk, from the Parquet footers (the first read of each file: a corrupt one fails here)."""
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


def count_done(chunk: Chunk, done: np.ndarray) -> int:
    """Ray task: how many input rows of `chunk` the already-scored filter (`_drop_done`, same keys) removes."""
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


