"""Radiograph archives (MURA-v1.1, ImageFolder-style sets, raw trees, DICOM exports) to a Parquet dataset, on Ray
Data.

Listing is cheap driver work (MURA's CSVs are the source of truth; folders are walked only for the other sources).
Every image is then read and decoded once by parallel Ray Data tasks, with the decoder training and scoring use;
files it refuses go to `errors.jsonl`. Usable images are streamed again into `DEST/<split>/` Parquet files with
their original bytes (DICOM files: their decoded 8-bit image as PNG, `dicom.encode_png`, which leaves the patient
data of their header behind). `ingest_summary.json` is written last: a dataset without it is incomplete and every
reader refuses it.

One run at a time writes a DEST: it holds `DEST/_lock.json` (`storage.OutputLock`) from before it looks at DEST until
it ends. `--overwrite` replaces only what an ingest writes (a DEST holding anything else is refused), and only once
the new dataset is complete: it is written under `DEST/_staging/` and moved into place at the end (see `_commit`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from mura_ray import storage
from mura_ray.config import IngestConfig, UserError
from mura_ray.data import dicom
from mura_ray.data.cache import CACHE_DIR
from mura_ray.data.images import DecodeError, decode_radiograph
from mura_ray.data.listing import Listing, list_source
from mura_ray.runtime import first_line

logger = logging.getLogger(__name__)

SUMMARY_FILE = "ingest_summary.json"
LAYOUT_VERSION = 2
"""Version of the written layout, in the summary as `layout_version`. 2: the train split's rows are in a seeded
random order over files of at most `IngestConfig.rows_per_file` rows (1: path order, up to 2,000 rows a file)."""
ERRORS_FILE = "errors.jsonl"
STAGING_DIR = "_staging"
"""Where `--overwrite` writes the new dataset (DEST/_staging/) until it is complete. Readers skip `_` folders."""
SPLITS: tuple[str, ...] = ("train", "val", "test")
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),
        ("path", pa.string()),
        ("patient_id", pa.string()),
        ("study_id", pa.string()),
        ("body_part", pa.string()),
        ("label", pa.int8()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
"""Columns of every ingested split."""

def inspect_images(batch: pd.DataFrame, max_pixels: int) -> pd.DataFrame:
    """Ray Data task: decode each image once, with the decoder training and scoring use; width/height, or the
    reason it is unusable (so every image kept decodes for them, and every refused one is in errors.jsonl)."""
    widths, heights, sizes, errors = [], [], [], []
    for uri in batch["uri"]:
        try:
            data = storage.read_bytes(uri)
            height, width = decode_radiograph(data, max_pixels).shape
            widths.append(width), heights.append(height), sizes.append(len(data)), errors.append(None)
        except DecodeError as e:
            widths.append(0), heights.append(0), sizes.append(0), errors.append(str(e))
        except FileNotFoundError:
            widths.append(0), heights.append(0), sizes.append(0), errors.append("listed but missing on disk")
        except OSError as e:
            widths.append(0), heights.append(0), sizes.append(0), errors.append(f"cannot read file: {e}")
    return pd.DataFrame(
        {"image_id": batch["image_id"], "width": widths, "height": heights, "nbytes": sizes, "error": errors}
    )


def attach_bytes(batch: pd.DataFrame, max_pixels: int) -> pa.Table:
    """The rows with their original, unmodified file bytes (DICOM: the decoded image as PNG), cast to the dataset
    schema."""
    columns = {name: batch[name].tolist() for name in SCHEMA.names if name != "image"}
    columns["image"] = [dicom.png_of(uri, max_pixels) if source == "dicom" else storage.read_bytes(uri)
                        for uri, source in zip(batch["uri"], batch["source"], strict=True)]
    columns["label"] = [None if pd.isna(v) else int(v) for v in batch["label"]]
    return pa.table({name: pa.array(columns[name], type=SCHEMA.field(name).type) for name in SCHEMA.names})


ROWS_PER_GROUP = 64
"""Images per Parquet row group: what a writing task holds in memory at once."""


def write_file(block: pd.DataFrame, directory: str, max_pixels: int) -> pd.DataFrame:
    """Ray Data task: write one Parquet file (`block` is one file's rows, `file` its number), row group by row group.

    Ray's own Parquet writer holds a task's whole output before writing it; this one holds one row group, so a
    writing CPU needs a few tens of MB however large its file. A retried task rewrites the same file name.
    """
    import pyarrow.parquet as pq

    name = f"part-{int(block['file'].iloc[0]):05d}.parquet"
    fs, path = storage.resolve(storage.join(directory, name))
    with fs.open_output_stream(path) as stream, pq.ParquetWriter(stream, SCHEMA, compression="snappy") as writer:
        for start in range(0, len(block), ROWS_PER_GROUP):
            writer.write_table(attach_bytes(block.iloc[start : start + ROWS_PER_GROUP], max_pixels))
    return pd.DataFrame({"file": [name], "rows": [len(block)]})


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """Counts per split and per body part: images, studies, patients, positive rate."""

    def _counts(group: pd.DataFrame) -> dict[str, Any]:
        labelled = group["label"].dropna()
        return {
            "images": int(len(group)),
            "studies": int(group["study_id"].nunique()) if group["study_id"].notna().any() else None,
            "patients": int(group["patient_id"].nunique()) if group["patient_id"].notna().any() else None,
            "positive_rate": round(float(labelled.mean()), 4) if len(labelled) else None,
        }

    out: dict[str, Any] = {}
    for split, group in df.groupby("split", sort=False):
        per_part = {
            str(part): _counts(g) for part, g in group.groupby(group["body_part"].fillna("UNKNOWN"), sort=True)
        }
        out[str(split)] = {**_counts(group), "body_parts": per_part}
    return {name: out[name] for name in SPLITS if name in out}


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a fixed-width table for the terminal."""

    def _fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = [f"{'split':<6} {'body part':<10} {'images':>7} {'studies':>8} {'patients':>9} {'positive':>9}"]
    for split, s in summary["splits"].items():
        for part, c in s["body_parts"].items():
            lines.append(
                f"{split:<6} {part:<10} {c['images']:>7} {_fmt(c['studies']):>8} "
                f"{_fmt(c['patients']):>9} {_fmt(c['positive_rate']):>9}"
            )
        lines.append(
            f"{split:<6} {'ALL':<10} {s['images']:>7} {_fmt(s['studies']):>8} "
            f"{_fmt(s['patients']):>9} {_fmt(s['positive_rate']):>9}"
        )
    lines.append(f"skipped: {summary['n_errors']} unusable, {summary['n_ignored']} ignored (see {ERRORS_FILE})")
    for split, c in summary.get("cache", {}).items():
        lines.append(f"cache: {split} at {c['image_size']} px, {c['rows']} images, {c['n_errors']} failed to decode "
                     f"({c['folder']})")
    return "\n".join(lines)


def _check_apart(out: str, archive: str, root: str) -> None:
    """--out must be neither the archive's folder nor inside it nor above it: `--overwrite` would delete the archive
    (`--root X --out X`, or `--root ~/data/MURA-v1.1 --out ~/data`), and a dataset inside a tree of images would
    be read back as part of it by the next run. For MURA the archive is its MURA-v1.1 folder, so an --out beside it
    in --root (`--root ~/data --out ~/data/mura-parquet`) is fine."""
    inside, above = storage.contains(archive, out), storage.contains(out, archive)
    if inside or above:
        where = "the same folder as" if inside and above else ("inside" if inside else "a folder above")
        raise UserError(
            f"--out {out} is {where} the archive it reads ({archive}, from --root {root}); --overwrite would delete "
            "the archive's files: give an --out outside it")


def _ours(info: pafs.FileInfo) -> bool:
    """Whether a top-level entry of --out is one an ingest writes (or a run of it left behind while writing)."""
    name = info.base_name
    if info.type == pafs.FileType.Directory:
        return name in SPLITS or name in (STAGING_DIR, CACHE_DIR)
    return name in (SUMMARY_FILE, ERRORS_FILE) or name.startswith(
        (f"{SUMMARY_FILE}.tmp-", f"{ERRORS_FILE}.tmp-", storage.OutputLock.NAME, storage.PROBE_PREFIX))


def _is_lock(name: str) -> bool:
    """The lock and its transient siblings (`_lock.json.tmp-PID` while it is refreshed, `.stale-TOKEN` while a
    stale one is taken over): never part of the dataset, never deleted by this run."""
    return name.startswith(storage.OutputLock.NAME)


def _contents(out: str) -> tuple[list[pafs.FileInfo], list[str]]:
    """(what an earlier ingest left at the top of --out, the lock aside; names of anything else there). A split
    folder is an ingest's only while it holds nothing but .parquet files: a folder of the user's called `train/`
    is not deleted for being called so."""
    fs, path = storage.resolve(out)
    ours, foreign = [], []
    for info in sorted(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)), key=lambda i: i.base_name):
        if not _ours(info):
            foreign.append(info.base_name + ("/" if info.type == pafs.FileType.Directory else ""))
        elif _is_lock(info.base_name) or info.base_name.startswith(storage.PROBE_PREFIX):
            continue  # no dataset (a probe file is left only by a run killed while writing it)
        elif info.base_name in SPLITS:
            inside = fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
            other = [i for i in inside if i.type != pafs.FileType.File or not i.base_name.endswith(".parquet")]
            if other:
                foreign.append(other[0].path[len(path):].lstrip("/"))
            else:
                ours.append(info)
        else:
            ours.append(info)
    return ours, foreign


def _prepare_destination(out: str, overwrite: bool) -> str:
    """Check what --out holds (with its lock held) and return the folder this run writes its dataset into: --out
    itself when it holds no dataset, else (with --overwrite) `--out/_staging`, moved into place by `_commit` only
    once the new dataset has passed its checks and is written. A re-run that fails (too many unusable images, a
    crash, Ctrl+C) leaves the old dataset as it was.

    Only what an ingest writes is ever replaced: an --out holding anything else (the user's files, a folder above
    other data) is refused, with or without --overwrite, and says what is there.
    """
    ours, foreign = _contents(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"--out {out}: not an ingested dataset (it holds {shown}); give a new or empty folder")
    if not ours:
        return out
    if not overwrite:
        state = "a complete dataset" if storage.exists(storage.join(out, SUMMARY_FILE)) else "an incomplete dataset"
        raise UserError(f"--out {out}: already holds {state}; pass --overwrite to replace it")
    staging = storage.join(out, STAGING_DIR)
    storage.delete_dir(staging)  # what an earlier run that failed or was stopped left there
    logger.info("Writing the new dataset to %s; it replaces the one at %s once it is complete (--overwrite)",
                staging, out)
    return staging


def _open_destination(out: str, overwrite: bool, lock: storage.OutputLock) -> str:
    """Take --out's lock, check that --out can be written (and deleted from), and `_prepare_destination`: all
    before any image is decoded, so that a wrong --out costs seconds, not a decode pass. Storage errors (a path
    under a regular file, a missing bucket, an unreachable endpoint, bad credentials) become one line."""
    try:
        if storage.exists(out) and not storage.is_dir(out):
            raise UserError(f"--out {out}: exists and is not a folder")
        lock.acquire()
        storage.probe_writable(out)
        return _prepare_destination(out, overwrite)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({first_line(e)})") from None


def _commit(out: str, work: str, summary: dict[str, Any], lock: storage.OutputLock) -> None:
    """Make the dataset written to `work` the one at `out`, and write its summary, last.

    With --overwrite (`work` is `out/_staging`) the old dataset goes only now: its summary first, so that from
    here until the new summary is written a reader refuses the folder as incomplete instead of reading a mix of two
    datasets; then its files (never the lock: `_is_lock`), then the new ones are moved in. Locally that window is
    a few renames; on S3 each new file is copied once (server-side). A run stopped inside it leaves an incomplete
    dataset, which the next run with --overwrite replaces.
    """
    lock.check()  # a run whose lock was taken over (judged dead) must not replace what the other run writes
    if work != out:
        fs, path = storage.resolve(out)
        summary_path = storage.resolve(storage.join(out, SUMMARY_FILE))[1]
        if fs.get_file_info(summary_path).type == pafs.FileType.File:
            fs.delete_file(summary_path)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            if not _ours(info) or _is_lock(info.base_name) or info.base_name == STAGING_DIR:
                continue
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
            else:
                fs.delete_file(info.path)
        staged = fs.get_file_info(pafs.FileSelector(storage.resolve(work)[1]))
        for info in staged:
            storage.move(storage.join(work, info.base_name), storage.join(out, info.base_name))
        storage.delete_dir(work)
    # Written last: its presence marks the dataset complete.
    storage.write_json(storage.join(out, SUMMARY_FILE), summary)


def _errors_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


def _chunks(df: pd.DataFrame, n: int) -> list[pd.DataFrame]:
    """`df` in `n` contiguous blocks, so Ray Data schedules the file reads as parallel tasks."""
    step = -(-len(df) // n)
    return [df.iloc[i : i + step] for i in range(0, len(df), step)]


def _file_chunks(df: pd.DataFrame, max_rows: int, max_bytes: int) -> list[pd.DataFrame]:
    """`df` (with an `nbytes` column) in contiguous blocks of at most `max_rows` rows and, past its first row, at
    most `max_bytes` of image bytes, numbered in a `file` column: one block per Parquet file."""
    bounds, start, size = [], 0, 0
    for i, nbytes in enumerate(df["nbytes"].tolist()):
        if i > start and (i - start >= max_rows or size + nbytes > max_bytes):
            bounds.append((start, i))
            start, size = i, 0
        size += nbytes
    bounds.append((start, len(df)))
    return [df.iloc[a:b].assign(file=k) for k, (a, b) in enumerate(bounds)]


def _fingerprint(good: pd.DataFrame) -> str:
    """What a dataset holds, in 16 hex digits: every image's split, id, label and size in bytes (another split
    assignment, relabelled or re-encoded images give another fingerprint; the order of rows does not count)."""
    rows = sorted(f"{s}\t{i}\t{lab}\t{n}" for s, i, lab, n in
                  zip(good["split"], good["image_id"], good["label"].astype("string").fillna(""), good["nbytes"],
                      strict=True))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def ingest(cfg: IngestConfig) -> dict[str, Any]:
    """Run the whole ingestion; returns the summary written to `ingest_summary.json`.

    Holds --out's lock (`storage.OutputLock`) from before it looks at --out until it returns or fails: a second
    ingest into the same --out is refused, and `--overwrite` never deletes another run's work or lock.
    """
    cfg = cfg.validate()
    cfg = replace(cfg, root=storage.absolute(cfg.root), out=storage.absolute(cfg.out),
                  cache_dir=storage.absolute(cfg.cache_dir) if cfg.cache_dir else None)
    try:
        listing = list_source(cfg)
    except OSError as e:  # an unreachable endpoint, a missing bucket, bad credentials, no permission
        raise UserError(f"--root {cfg.root}: cannot read it ({first_line(e)})") from None
    records = listing.records
    if records["image_id"].duplicated().any():
        dup = records.loc[records["image_id"].duplicated(), "path"].iloc[0]
        raise UserError(f"--root {cfg.root}: {dup} is listed more than once")
    _check_apart(cfg.out, listing.archive, cfg.root)
    key = dicom.patient_key(required=cfg.patient_key) if cfg.source == "dicom" else None
    lock = storage.OutputLock(cfg.out, "jobs/ingest.py")
    try:  # lock.release() is a no-op when acquire() failed
        work = _open_destination(cfg.out, cfg.overwrite, lock)
        summary = _ingest_locked(cfg, listing, work, lock, key)
    finally:
        lock.release()
    if cfg.cache_size:  # after the commit: the cache is keyed to the dataset's fingerprint, now final
        from mura_ray.data.cache import ensure_cache

        built = ensure_cache(cfg.out, summary, cfg.cache_size, cfg.cache_dir, flag="--cache-dir")
        summary["cache"] = {split: {"folder": c["folder"], "image_size": cfg.cache_size, "rows": c["marker"]["rows"],
                                    "n_errors": c["marker"]["n_errors"]} for split, c in built.items()}
    return summary


def _ingest_locked(cfg: IngestConfig, listing: Listing, work: str, lock: storage.OutputLock,
                   key: bytes | None) -> dict[str, Any]:
    """`ingest` once this run holds --out's lock: decode, check, write the splits to `work`, `_commit`. Ray is
    started (or attached) here, after --root and --out were checked: a wrong one costs no cluster start-up."""
    import ray

    from mura_ray.runtime import init_ray

    init_ray()
    records = listing.records
    logger.info("Found %d images (%d other files ignored); decoding each once", len(records), len(listing.ignored))

    n_blocks = max(1, min(len(records) // 64, 512))
    inspect, kwargs = ((dicom.inspect_dicom, {"max_pixels": cfg.max_pixels, "key": key}) if cfg.source == "dicom"
                       else (inspect_images, {"max_pixels": cfg.max_pixels}))
    meta = (
        ray.data.from_pandas(_chunks(records[["image_id", "uri"]], n_blocks))
        .map_batches(inspect, batch_format="pandas", fn_kwargs=kwargs)
        .to_pandas()
    )
    ignored = list(listing.ignored)
    if cfg.source == "dicom":
        records, ignored = _with_dicom_fields(records, meta, ignored)
    else:
        records = records.merge(meta, on="image_id", how="left", validate="one_to_one")
    bad = records[records["error"].notna()]
    good = records[records["error"].isna()].copy()
    error_rows = [{"path": p, "reason": r} for p, r in zip(bad["path"], bad["error"], strict=True)]
    error_rows += [{**row, "ignored": True} for row in ignored]
    errors_uri = storage.join(work, ERRORS_FILE)
    storage.write_bytes(errors_uri, _errors_jsonl(error_rows))
    error_rate = len(bad) / max(len(records), 1)  # dicom: every file may have been ignored
    kept = f"; the dataset at {cfg.out} is unchanged" if work != cfg.out else ""
    if len(good) == 0:
        raise IngestFailed(f"no usable images: {len(records)} failed to decode, {len(ignored)} files ignored (see "
                           f"{errors_uri}){kept}")
    if error_rate > cfg.max_error_rate:
        raise IngestFailed(
            f"{len(bad)} of {len(records)} images ({error_rate:.1%}) are unusable, more than --max-error-rate "
            f"{cfg.max_error_rate:.1%} (see {errors_uri}); nothing was written{kept}"
        )

    fs, _ = storage.resolve(work)
    for split in SPLITS:
        rows = good[good["split"] == split].sort_values("path")
        if rows.empty:
            continue
        if split == "train":
            # Seeded random row order, so that training can shuffle by reading these files in a new order each
            # epoch (plus a local buffer) instead of an all-to-all shuffle; val and test stay in path order.
            rows = rows.sample(frac=1.0, random_state=cfg.seed)
        columns = [c for c in SCHEMA.names if c != "image"] + ["uri", "nbytes"]
        # One task per file, each file bounded by --file-mb and written a row group at a time: memory stays at
        # (CPUs writing) x (one row group) however large the archive.
        directory = storage.join(work, split)
        fs.create_dir(storage.resolve(directory)[1], recursive=True)
        written = (
            ray.data.from_pandas(_file_chunks(rows[columns], cfg.rows_per_file, cfg.file_mb * 2**20))
            .map_batches(write_file, batch_format="pandas", batch_size=None,
                         fn_kwargs={"directory": directory, "max_pixels": cfg.max_pixels})
            .to_pandas()
        )
        if int(written["rows"].sum()) != len(rows):  # never a silent loss
            raise RuntimeError(f"{split}: wrote {int(written['rows'].sum())} of {len(rows)} rows")
        logger.info("Wrote %d %s images to %s", len(rows), split, directory)

    summary = {
        "source": cfg.source,
        "root": cfg.root,
        "layout_version": LAYOUT_VERSION,
        "n_images": int(len(good)),
        "n_errors": int(len(bad)),
        "n_ignored": len(ignored),
        "error_rate": round(error_rate, 6),
        "splits": summarize(good),
        "val_fraction": cfg.val_fraction if cfg.source == "mura" else None,
        "seed": cfg.seed,
        "fingerprint": _fingerprint(good),
        "width_median": int(np.median(good["width"])),
        "height_median": int(np.median(good["height"])),
    }
    _commit(cfg.out, work, summary, lock)
    return summary


def _with_dicom_fields(records: pd.DataFrame, meta: pd.DataFrame,
                       ignored: list[dict[str, str]]) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The listing's records with what `dicom.inspect_dicom` read: ids, study, body part and patient hash from the
    headers. Files with nothing to decode (not DICOM, no pixel data) and second copies of a SOP instance are
    ignored with their reason, not counted as unusable images."""
    fields = ["study_id", "body_part", "patient_id"]
    meta = meta.astype(object).where(meta.notna(), None)  # Ray Data's string columns hold pd.NA
    records = records.drop(columns=fields).merge(meta, on="image_id", how="left", validate="one_to_one")
    records = records.sort_values("path", kind="stable")
    skipped = records["skip"].astype(bool)
    copies = records["dicom_id"].notna() & records["dicom_id"].duplicated()
    first = records[records["dicom_id"].notna()].drop_duplicates("dicom_id").set_index("dicom_id")["path"]
    ignored = ignored + [{"path": p, "reason": r} for p, r in zip(records.loc[skipped, "path"],
                                                                 records.loc[skipped, "error"], strict=True)]
    ignored += [{"path": p, "reason": f"the same SOPInstanceUID as {first[i]}"}
                for p, i in zip(records.loc[copies, "path"], records.loc[copies, "dicom_id"], strict=True)]
    records = records[~skipped & ~copies].copy()
    records["image_id"] = records["dicom_id"].where(records["dicom_id"].notna(), records["image_id"])
    return records.drop(columns=["skip", "dicom_id"]), ignored


class IngestFailed(Exception):
    """Too many unusable images, or none usable: the job exits non-zero after writing errors.jsonl."""


def read_summary(data: str) -> dict[str, Any]:
    """The summary of a complete ingested dataset, or a UserError saying what is wrong with `data`."""
    if not storage.exists(data):
        raise UserError(f"--data {data}: no such dataset; create it with jobs/ingest.py")
    uri = storage.join(data, SUMMARY_FILE)
    if not storage.exists(uri):
        raise UserError(
            f"--data {data}: incomplete or not an ingested dataset (no {SUMMARY_FILE}); "
            "re-run jobs/ingest.py with --overwrite"
        )
    return storage.read_json(uri)
