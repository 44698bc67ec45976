"""The training-ready cache: every image of a split decoded once, at the model's input size, in `load_pixels`'
geometry (8-bit, one channel, aspect preserved, zero padded), so that training and validation read pixels instead
of decoding PNGs every epoch (and every Tune trial at that size shares them).

It lives beside the dataset, `DEST/cache/<size>/<split>/`, or under `--cache-dir` for a dataset the trainer may
not write to (`CACHE_DIR/<size>/<split>/`). A split's cache holds one Parquet file per file of the split, of the
same name, then `_complete.json`, written last: the dataset fingerprint it was built from, its files and rows and
the count of images that failed to decode (listed in `_errors.jsonl` beside it; their rows keep their place with
`ok = 0`, as the decoding input gives them). Without that marker, or with another fingerprint, a folder is never
read: it is (re)built, or refused with one line where it cannot be written.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from mura_ray import storage
from mura_ray.config import UserError
from mura_ray.data.images import DEFAULT_MAX_PIXELS, DecodeError, load_pixels
from mura_ray.runtime import first_line

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"
"""The cache's folder inside a dataset (DEST/cache) when no --cache-dir is given."""

MARKER = "_complete.json"
"""Written last: a cache folder without it is half-built and never read."""

ERRORS_FILE = "_errors.jsonl"
"""The images that failed to decode, one JSON line each (a name with `_`: Parquet readers skip it)."""

CACHED_SPLITS: tuple[str, ...] = ("train", "val")
"""The splits training reads; test is scored from the originals (`jobs/score.py`)."""

CARRIED_COLUMNS: tuple[str, ...] = ("image_id", "label", "body_part", "study_id")
"""Source columns copied into the cache beside the pixels (image_id names a failed image in _errors.jsonl)."""


def cache_root(data: str, cache_dir: str | None = None) -> str:
    """Where the caches of dataset `data` live: `cache_dir`, else DEST/cache."""
    return cache_dir.rstrip("/") if cache_dir else storage.join(data, CACHE_DIR)


def split_cache(data: str, split: str, size: int, cache_dir: str | None = None) -> str:
    """The cache folder of one split at one input size."""
    return storage.join(cache_root(data, cache_dir), str(size), split)


def read_marker(folder: str) -> dict[str, Any] | None:
    """The marker of a complete cache folder, or None (absent: missing or half-built)."""
    uri = storage.join(folder, MARKER)
    return storage.read_json(uri) if storage.exists(uri) else None


def is_current(marker: dict[str, Any] | None, fingerprint: str | None, size: int) -> bool:
    """Whether a cache's marker says it was built from this dataset (its fingerprint), at this size."""
    return marker is not None and marker.get("fingerprint") == fingerprint and marker.get("image_size") == size


def cache_files(folder: str, marker: dict[str, Any]) -> list[str]:
    """A complete cache's Parquet files, as listed by its marker (not by listing: a rebuild's or another
    dataset's leftovers beside them are never read), as paths inside their filesystem."""
    return [storage.resolve(storage.join(folder, name))[1] for name in marker["files"]]


def cache_file(source: str, dest: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Decode one Parquet file of a split into one cache file (written whole, atomically: `storage.write_bytes`):
    its rows, in order, with `pixels` (size x size uint8, `load_pixels`) and `ok`. Returns its rows and failures."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(source)
    parquet = pq.ParquetFile(path, filesystem=fs)
    sink = pa.BufferOutputStream()
    schema = pa.schema([("pixels", pa.binary(size * size)), ("ok", pa.bool_()),
                        *(parquet.schema_arrow.field(c) for c in CARRIED_COLUMNS)])
    failed: list[dict[str, str]] = []
    rows = 0
    blank = bytes(size * size)
    # LZ4: a cache file reads at 30,800 img/s a core against Snappy's 9,900, for 5 % more bytes (224-px rows).
    with pq.ParquetWriter(sink, schema, compression="lz4") as writer:
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=["image", *CARRIED_COLUMNS])
            pixels, ok = [], []
            for image_id, data in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist(),
                                      strict=True):
                try:
                    pixels.append(load_pixels(data or b"", size, max_pixels).tobytes())
                    ok.append(True)
                except DecodeError as e:
                    pixels.append(blank)
                    ok.append(False)
                    failed.append({"image_id": image_id, "reason": str(e)})
            rows += len(ok)
            writer.write_table(pa.table(
                {"pixels": pa.array(pixels, pa.binary(size * size)), "ok": pa.array(ok),
                 **{c: table.column(c) for c in CARRIED_COLUMNS}}, schema=schema))
    storage.write_bytes(dest, sink.getvalue().to_pybytes())
    return {"rows": rows, "failed": json.dumps(failed)}


def _cache_task(row: dict[str, Any], *, size: int, max_pixels: int) -> dict[str, Any]:
    return {"name": row["name"], **cache_file(row["source"], row["dest"], size, max_pixels)}


def build_split_cache(data: str, split: str, size: int, fingerprint: str | None, cache_dir: str | None = None,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Build one split's cache with a Ray Data job (one task per file of the split) and write its marker last.

    A stale marker is deleted first, so an interrupted rebuild is never read as complete; a current one (another
    run finished the build meanwhile) is returned as it is. Files are written whole under their source's name, so
    builds racing on one folder (Tune trials starting together) write the same bytes. Returns the marker.
    """
    import ray

    folder = split_cache(data, split, size, cache_dir)
    storage.probe_writable(folder)  # here, not in a task: a folder that cannot be written is one line, not a traceback
    marker = read_marker(folder)
    if is_current(marker, fingerprint, size):  # built meanwhile by another run (a Tune trial started beside this)
        return marker
    if marker is not None:
        fs, marker_path = storage.resolve(storage.join(folder, MARKER))
        fs.delete_file(marker_path)
    items = [{"name": s.rsplit("/", 1)[-1], "source": s, "dest": storage.join(folder, s.rsplit("/", 1)[-1])}
             for s in storage.list_parquet(storage.join(data, split))]
    logger.info("Building the %d px cache of the %s split (%d files) in %s, once", size, split, len(items), folder)
    done = (ray.data.from_items(items, override_num_blocks=max(1, len(items)))
            .map(_cache_task, fn_kwargs={"size": size, "max_pixels": max_pixels})
            .take_all())
    done.sort(key=lambda r: r["name"])
    failed = [f for r in done for f in json.loads(r["failed"])]
    storage.write_bytes(storage.join(folder, ERRORS_FILE),
                        "".join(json.dumps(f, sort_keys=True) + "\n" for f in failed).encode())
    marker = {"fingerprint": fingerprint, "image_size": size, "split": split, "files": [r["name"] for r in done],
              "rows": int(sum(r["rows"] for r in done)), "n_errors": len(failed)}
    storage.write_json(storage.join(folder, MARKER), marker)  # last: the cache is complete
    if failed:
        logger.warning("%d of %d %s images failed to decode while building the cache (see %s); they are counted "
                       "as skipped images in training", len(failed), marker["rows"], split,
                       storage.join(folder, ERRORS_FILE))
    return marker


def ensure_cache(data: str, summary: dict[str, Any], size: int, cache_dir: str | None = None,
                 splits: tuple[str, ...] = CACHED_SPLITS, flag: str = "--cache-dir") -> dict[str, dict[str, Any]]:
    """The complete, current cache of each of `splits` (those the dataset has) at `size`, built where missing or
    stale: {split: {"folder", "marker"}}. A cache that cannot be written is a UserError (one line)."""
    fingerprint = summary.get("fingerprint")
    out = {}
    for split in splits:
        if split not in summary["splits"]:
            continue
        folder = split_cache(data, split, size, cache_dir)
        try:
            marker = read_marker(folder)
            if not is_current(marker, fingerprint, size):
                if marker is not None:
                    logger.warning("The %d px cache of the %s split in %s was built from another version of the "
                                   "dataset (fingerprint %s, now %s): rebuilding it", size, split, folder,
                                   marker.get("fingerprint"), fingerprint)
                marker = build_split_cache(data, split, size, fingerprint, cache_dir)
        except OSError as e:
            raise UserError(
                f"the {size} px cache of {split} at {folder} is missing or stale and cannot be written there "
                f"({first_line(e)}): build it with jobs/ingest.py --cache-size {size}, give a writable {flag}, "
                "or train with --no-cache") from None
        out[split] = {"folder": folder, "marker": marker}
    return out


def cached_pixels(table: pa.Table, size: int) -> np.ndarray:
    """A cache table's `pixels` column as a (rows, 1, size, size) uint8 array, without a copy per row."""
    column = table.column("pixels").combine_chunks()
    flat = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    start = column.offset * size * size
    return flat[start : start + len(column) * size * size].reshape(-1, 1, size, size)
