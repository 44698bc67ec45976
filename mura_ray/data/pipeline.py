"""Ray Data input pipeline: a training-ready cache (or ingested Parquet, decoded) → batches of uint8 pixels.

By default the input reads the split's cache (`mura_ray.data.cache`: pixels decoded once, at the input size), a read
and a copy; without one, decoding runs in Ray Data's read tasks (fused with the read, see `build_input`). Either way
it streams into the Train workers, which augment and normalise on their device (`mura_ray.data.augment`).
A row that cannot be decoded keeps its place with `ok = 0` so the consumer can skip and count it.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mura_ray import storage
from mura_ray.data.images import DecodeError, load_pixels
from mura_ray.labels import BODY_PART_INDEX

TRAIN_COLUMNS: tuple[str, ...] = ("image", "label", "body_part")
"""Parquet columns the training input reads."""

EVAL_COLUMNS: tuple[str, ...] = (*TRAIN_COLUMNS, "study_id")
"""Parquet columns the validation input reads: its metrics are computed per image and per study too."""

TENSOR_COLUMNS: tuple[str, ...] = ("image", "label", "body_part", "ok", "study")
"""Columns the preprocessing emits for training and evaluation (`study`: `study_codes`, -1 in training)."""


def read_parquet(paths: str | list[str], filesystem: Any, **read_args: Any):
    """`ray.data.read_parquet` through Ray Data's block-splitting Parquet datasource.

    Ray 2.60 reads Parquet through a new (V2) datasource by default, which makes one block of each file: a split
    written as one file is decoded by a single task, its first batch waits for the whole file, and every epoch
    spends seconds in a file-listing task. The file-based datasource splits files into row blocks that stream
    through parallel decode tasks: on the 1,406-image demo split an epoch of input takes about a third of the V2
    datasource's time (docs/benchmarks.md). The choice is scoped to this call.
    `read_args` go to `ray.data.read_parquet` (such as `override_num_blocks`).
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    if not hasattr(ctx, "use_datasource_v2"):
        return ray.data.read_parquet(paths, filesystem=filesystem, **read_args)
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, filesystem=filesystem, **read_args)
    finally:
        ctx.use_datasource_v2 = previous


def read_split(data: str, split: str, columns: tuple[str, ...] | None = None, *, files: list[str] | None = None,
               **read_args: Any):
    """A lazy Ray Dataset over one split of an ingested dataset (local or s3://).

    `files` (from `split_files`, repeats allowed) reads those paths, in that order, instead of listing the
    directory; `read_args` go to `ray.data.read_parquet`.
    """
    fs, path = storage.resolve(storage.join(data, split))
    ds = read_parquet(files if files is not None else path, fs, **read_args)
    return ds.select_columns(list(columns)) if columns else ds


def split_files(data: str, split: str) -> list[str]:
    """The Parquet files of a split (`storage.list_parquet`), as paths inside its filesystem."""
    return [storage.resolve(f)[1] for f in storage.list_parquet(storage.join(data, split))]


def preprocess_images(images: list[bytes | None], *, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode image bytes to the model's input pixels (`load_pixels`): (uint8 array N x 1 x S x S, ok flags N);
    failures are zeros with ok = 0. Augmentation and normalisation run on the Train worker's device
    (`mura_ray.data.augment`)."""
    out = np.zeros((len(images), 1, image_size, image_size), dtype=np.uint8)
    ok = np.zeros(len(images), dtype=np.float32)
    for i, data in enumerate(images):
        if data is None:
            continue
        try:
            out[i, 0] = load_pixels(data, image_size)
        except DecodeError:
            continue
        ok[i] = 1.0
    return out, ok


def body_part_indices(names: Any) -> np.ndarray:
    """Body-part names to head indices; unknown or null → -1."""
    return np.array([BODY_PART_INDEX.get(n, -1) if isinstance(n, str) else -1 for n in names], dtype=np.int64)


def label_values(labels: Any) -> np.ndarray:
    """Labels to float32, null → -1 (unknown)."""
    arr = np.asarray([(-1.0 if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)) for v in labels])
    return arr.astype(np.float32)


def study_codes(study_ids: Any) -> np.ndarray:
    """Study ids as non-negative 62-bit integer codes (a tensor column cannot hold strings); null or "" → -1."""
    return np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") >> 2
                     if isinstance(s, str) and s else -1 for s in study_ids], dtype=np.int64)


def preprocess_batch(batch: dict[str, np.ndarray], *, image_size: int) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function producing the tensor columns of TENSOR_COLUMNS from image bytes."""
    image, ok = preprocess_images(list(batch["image"]), image_size=image_size)
    return {
        "image": image,
        "label": label_values(batch["label"]),
        "body_part": body_part_indices(batch["body_part"]),
        "ok": ok,
        "study": study_codes(batch["study_id"]) if "study_id" in batch else np.full(len(ok), -1, dtype=np.int64),
    }


def preprocess_slices(
    batch: dict[str, np.ndarray], *, rows: int, image_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """`preprocess_batch` over a block `rows` rows at a time, each slice yielded as soon as it is decoded.

    Whatever the size of the block the reader hands over, at most one slice of decoded images is held at once
    (with `build_input`'s block-size target each then leaves the task right away). Rows keep the file's order
    (ingest's seeded random one): the training loop shuffles them (`shuffle_epochs`), from a seed a task could not
    derive (it is given no epoch).
    """
    n = len(batch["image"])
    for start in range(0, n, rows):
        yield preprocess_batch({k: np.asarray(v)[start : start + rows] for k, v in batch.items()},
                               image_size=image_size)


def cache_batch(table: Any, *, image_size: int) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function (pyarrow batches) producing TENSOR_COLUMNS from a training-ready cache's
    rows (`mura_ray.data.cache`): its pixels as they are, no decode."""
    from mura_ray.data.cache import cached_pixels

    return {
        "image": cached_pixels(table, image_size),
        "label": label_values(table.column("label").to_pylist()),
        "body_part": body_part_indices(table.column("body_part").to_pylist()),
        "ok": np.asarray(table.column("ok").to_numpy(zero_copy_only=False), dtype=np.float32),
        "study": study_codes(table.column("study_id").to_pylist()),
    }


def split_rows(data: str, split: str) -> int:
    """Rows of a split, from its Parquet footers (no data read; on S3 a request per file, 16 at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    fs, _ = storage.resolve(storage.join(data, split))
    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(lambda f: pq.ParquetFile(f, filesystem=fs).metadata.num_rows, split_files(data, split)))


def derived_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed drawn from `seed` and `keys` (a rank, an epoch) by NumPy's SeedSequence: nearby inputs give
    unrelated seeds."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def pass_order(files: list[str], passes: int, seed: int) -> list[str]:
    """`passes` passes over `files`, each in its own order drawn from `seed` (the same orders for the same seed)."""
    rng = np.random.default_rng(seed)
    return [files[i] for _ in range(passes) for i in rng.permutation(len(files))]


def build_input(data: str, split: str, *, image_size: int, train: bool, cache: str | None = None,
                num_cpus: float = 1.0, batch_size: int = 32, seed: int = 0, passes: int = 1, first_pass: int = 0,
                files: list[str] | None = None, max_tasks: int | None = None, scheduling_strategy: Any = None):
    """The streaming dataset a Train worker consumes for `split`: TENSOR_COLUMNS, `image` as uint8 pixels.

    With `cache` (a complete cache folder of this split at `image_size`, `mura_ray.data.cache`) it reads the
    cache's files (one read task and block per file, each pass in its seeded order for training) and only turns its
    rows into arrays: the default. Otherwise it decodes the split's image bytes, as follows, in blocks of at most
    `batch_size` rows.

    A split of several files (ingest writes at most `IngestConfig.rows_per_file` rows and `file_mb` MB a file) is
    decoded inside its read tasks: one read task per file, the decode a `map_batches` without a batch size that
    slices what it is given itself (`preprocess_slices`), then re-blocking into `batch_size` rows; Ray Data fuses
    the three into one operator. The dataset's block-size target is one decoded slice, so every slice leaves the
    task as soon as it is decoded (with Ray's default of 128 MiB a task held back all of a file's images until the
    file was done) and the raw blocks read are as small. One block per file keeps the read fused with the decode
    (more blocks than files would send every block read task → object store → decode task).
    Decoding then runs at most one task per file at a time: the file count (`--rows-per-file` at ingest) bounds its
    parallelism.
    A one-file split is cut into blocks decoded by parallel tasks, `batch_size` rows at a time.

    For training (`train`), the dataset is `passes` passes over the split from `first_pass` on, each reading its
    files in its own order drawn from `seed` (`pass_order`): training reads all its epochs in one Ray Data
    execution and cuts them from the stream by rows (`shuffle_epochs`, `EpochStream`), so read and decode never
    stop to start a new execution. The split is shuffled without an all-to-all step: ingest writes its rows in a
    seeded random order across many small files, each pass reads the files in a new order, and the consumer mixes
    the rows of each epoch in seeded windows (`shuffle_epochs`). (`randomize_block_order` waits for the whole split
    to be read into the object store before the first image is decoded.) Evaluation reads the split once, in
    order.
    `files` (paths from `split_files`, repeats allowed) reads those, in that order, instead (decoding only).
    `num_cpus` is each read-and-decode task's CPU reservation, `max_tasks` caps how many run at once (None: as many
    as Ray Data's budget allows; give it with `num_cpus=0`, see `mura_ray.train.build_trainer`): every stage of the
    dataset then runs in those tasks.
    `scheduling_strategy` (a Ray scheduling strategy) places every task of the dataset (see `train._validation`).
    """
    from ray.data import TaskPoolStrategy

    columns = TRAIN_COLUMNS if train else EVAL_COLUMNS
    limits = {} if max_tasks is None else {"concurrency": max_tasks}
    placed = {} if scheduling_strategy is None else {"scheduling_strategy": scheduling_strategy}
    if placed:
        limits["ray_remote_args"] = placed
    compute = TaskPoolStrategy(size=max_tasks)
    if cache is not None:
        return _read_cache(cache, image_size=image_size, train=train, num_cpus=num_cpus, seed=seed,
                           passes=passes, first_pass=first_pass, compute=compute, limits=limits, placed=placed)
    kwargs = {"image_size": image_size}
    if files is None:
        files = split_files(data, split)
        if train:  # from `first_pass` on (a resumed run): the orders those passes have in a run from the start
            files = pass_order(files, passes, seed)[first_pass * len(files):]
    if len(set(files)) <= 1:
        ds = read_split(data, split, columns, files=files or None, num_cpus=num_cpus, **limits)
        ds.context.execution_options.preserve_order = True  # see below
        return ds.map_batches(preprocess_batch, batch_format="numpy", batch_size=batch_size, num_cpus=num_cpus,
                              compute=compute, fn_kwargs=kwargs, **placed)
    # The read's CPUs are the decode's: operators with different resources would not fuse.
    ds = read_split(data, split, columns, files=files, override_num_blocks=len(files), num_cpus=num_cpus,
                    **limits)
    ds.context.target_max_block_size = batch_size * image_size * image_size  # one slice of uint8 images
    # Blocks in the files' order: evaluation's sums (and, through Ray Train's DataConfig, training's batches) come
    # out the same for the same seed.
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(
        preprocess_slices, batch_format="numpy", batch_size=None, num_cpus=num_cpus, compute=compute,
        fn_kwargs={"rows": batch_size, **kwargs}, **placed,
    )
    if max_tasks is not None:
        # The re-blocking would not fuse with tasks of a capped pool or of another CPU reservation: it would run as
        # tasks of its own, reserving a CPU each. Blocks are slices of at most `batch_size` rows without it.
        return ds
    return ds.repartition(target_num_rows_per_block=batch_size)


def _read_cache(cache: str, *, image_size: int, train: bool, num_cpus: float, seed: int, passes: int,
                first_pass: int, compute: Any, limits: dict[str, Any], placed: dict[str, Any]):
    """`build_input` over a complete cache folder: a read task and a block per cache file, rows in file order
    (`preserve_order`: the blocks reach the consumer in the seeded pass order, not in the order tasks finish)."""
    from mura_ray.data.cache import cache_files, read_marker

    marker = read_marker(cache)
    if marker is None:
        raise RuntimeError(f"the cache at {cache} is not complete (no marker): it cannot be read")
    files = cache_files(cache, marker)
    if train:  # as `build_input` orders the split's files
        files = pass_order(files, passes, seed)[first_pass * len(files):]
    fs, _ = storage.resolve(cache)
    ds = read_parquet(files, fs, columns=["pixels", "ok", "label", "body_part", "study_id"],
                      override_num_blocks=len(files), num_cpus=num_cpus, **limits)
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(cache_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          num_cpus=num_cpus, compute=compute, fn_kwargs={"image_size": image_size}, **placed)


SHUFFLE_BATCHES = 16
"""Training rows are shuffled in windows of this many batches of one epoch (`shuffle_epochs`)."""


def iter_batches(shard, batch_size: int, device, prefetch_batches: int = 4):
    """A dataset shard's batches as torch tensors on `device`, images as uint8 pixels, in the dataset's order
    (training shuffles them: `training_batches`), Ray Data fetching `prefetch_batches` ahead."""
    import torch  # here: the decode tasks that import this module need no torch

    return shard.iter_torch_batches(
        batch_size=batch_size,
        dtypes={"image": torch.uint8, "label": torch.float32, "body_part": torch.int64, "ok": torch.float32,
                "study": torch.int64},
        device=device,
        prefetch_batches=prefetch_batches,
    )


def training_batches(shard, *, batch_size: int, rows_per_epoch: int, seed: int, device, first_epoch: int = 0):
    """A Train worker's training batches, for `EpochStream`: its shard's batches cut into epochs and shuffled in
    windows of SHUFFLE_BATCHES batches (`shuffle_epochs`).

    Ray Data fetches none ahead: `EpochStream`'s thread pulls ahead already. Ray's prefetch threads put the first
    batch of an execution ~70 ms later (0.14 s against 0.21-0.24 s after the iterator was made, 224-px cache,
    2 cores)."""
    return shuffle_epochs(iter_batches(shard, batch_size, device, prefetch_batches=0),
                          rows_per_epoch=rows_per_epoch, batch_size=batch_size, window=SHUFFLE_BATCHES * batch_size,
                          seed=seed, first_epoch=first_epoch)


def shuffle_epochs(batches: Iterator[dict[str, Any]], *, rows_per_epoch: int, batch_size: int, window: int,
                   seed: int, first_epoch: int = 0) -> Iterator[dict[str, Any]]:
    """Training batches: `batches` (dicts of equal-length tensors) cut exactly into epochs of `rows_per_epoch` rows,
    and within each epoch shuffled in windows of at least `window` rows by a generator seeded from (`seed`, epoch),
    in batches of `batch_size` rows (an epoch's last may be smaller, or one row larger rather than leave one row
    alone). Each epoch's first window is shorter by a
    seeded random amount, so that the windows, which hold neighbouring rows of the stream, group other rows every
    epoch.

    An epoch's batches depend only on its own rows and seed: a run resumed at epoch k (`first_epoch`) sees the
    batches a run that never stopped saw from epoch k on. Ray Data's local shuffle buffer spans the whole stream,
    so its batches after an epoch boundary depend on the epochs before.
    """
    import torch

    if window < 2 * batch_size:
        raise ValueError(f"window ({window}) must hold at least two batches ({batch_size} rows each)")
    pending: list[dict[str, Any]] = []

    def open_epoch(epoch: int) -> tuple[torch.Generator, int]:
        # The epoch's first window is cut short at random, so windows group other rows every epoch.
        generator = torch.Generator().manual_seed(derived_seed(seed, epoch))
        return generator, int(torch.randint(window // 2, window + 1, (1,), generator=generator))

    epoch, taken = first_epoch, 0  # rows of the epoch taken so far
    generator, cut = open_epoch(epoch)  # where the window being filled ends, in rows of the epoch

    def flush(end_of_epoch: bool) -> Iterator[dict[str, Any]]:
        merged = {k: torch.cat([b[k] for b in pending]) for k in pending[0]}
        n = len(merged["ok"])
        order = torch.randperm(n, generator=generator)
        on_device = {v.device: order.to(v.device) for v in merged.values()}

        def rows(lo: int, hi: int) -> dict[str, Any]:  # rows lo:hi of the window in its shuffled order
            return {k: v[on_device[v.device][lo:hi]] for k, v in merged.items()}

        whole = n if end_of_epoch else n - n % batch_size  # a part batch waits for the next window of its epoch
        ends = list(range(batch_size, whole, batch_size)) + [whole]
        if len(ends) > 1 and ends[-1] - ends[-2] == 1:  # no batch of one row (BatchNorm cannot train on it)
            del ends[-2]
        pending.clear()
        if whole < n:
            pending.append(rows(whole, n))
        # Each batch is gathered as it is taken, not a shuffled copy of the whole window first: the first batch of
        # a 512-row window of 224-px images comes 4 ms after its last rows instead of 26 ms (one core).
        for lo, hi in zip([0, *ends[:-1]], ends, strict=True):
            yield rows(lo, hi)

    for batch in batches:
        while batch is not None:
            # Windows and epochs end at fixed rows, wherever the input's batches happen to end (they end elsewhere
            # in a resumed run): a batch across an end is split there.
            room = min(cut, rows_per_epoch) - taken
            if len(batch["ok"]) > room:
                head, batch = {k: v[:room] for k, v in batch.items()}, {k: v[room:] for k, v in batch.items()}
            else:
                head, batch = batch, None
            pending.append(head)
            taken += len(head["ok"])
            if taken == rows_per_epoch:
                yield from flush(end_of_epoch=True)
                epoch, taken = epoch + 1, 0
                generator, cut = open_epoch(epoch)
            elif taken == cut:
                yield from flush(end_of_epoch=False)
                cut += window
    if pending:  # the input ended inside an epoch (EpochStream says so)
        yield from flush(end_of_epoch=True)


def training_data_config(workers: int):
    """Ray Train's `DataConfig` for the "train" dataset: its blocks reach the workers in the seeded pass order
    (`preserve_order`; Ray Train replaces a dataset's own execution options with these), split among the workers
    when there are several. One worker reads the whole dataset through its own iterator instead, without Train's
    split coordinator (an actor every block passes through): measured, its start-up put the first batch of each
    execution 0.14 s later (0.44 s against 0.31 s from the stream's start, 224-px cache, 2 cores)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=["train"] if workers > 1 else [],
                                execution_options={"train": options})


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class EpochStream:
    """A run's epochs cut from one stream of batches, pulled by a background thread up to `depth` batches ahead.

    The training input is one Ray Data execution over all of a run's epochs (`build_input(passes=...)`: the split's
    files once per epoch, each pass in its own seeded order), so read and decode run on without a break: an
    execution per epoch would spend ~0.9 s starting up at every epoch boundary (docs/benchmarks.md). Epoch e ends
    with the first batch that brings the rows delivered since the stream began to (e + 1) x `rows_per_epoch` (this
    worker's share of the split); training's batches come from `shuffle_epochs`, which ends every epoch at exactly
    that row. Every worker gets the same number of rows in batches of the same size (Ray Train splits the dataset
    into equal shards), so every worker cuts its epochs at the same step, as DDP needs.

    Pulling starts when the stream is made (before the model is built, so the input's start-up overlaps the
    model's set-up) and runs on between epochs, over validation and the checkpoint. Each `epoch()` yields one
    epoch's batches in order (an epoch left part-way is skipped to its end by the next call); after the last epoch
    the iterator is closed, ending this worker's part of the execution, whatever rows are left in it (a resumed run
    reads only the epochs it has left). `close()` does the same at once (early stopping).

    Batches are queued as `make_batches` delivers them: on the GPU when it moves them there, so up to `depth` + 1
    batches of GPU memory stay in use between epochs (51 MB each at 256 single-channel images of 224 px).
    """

    _END = object()

    def __init__(self, make_batches: Callable[[], Any], epochs: int, rows_per_epoch: int, depth: int = 8):
        if rows_per_epoch <= 0:
            raise ValueError(f"rows_per_epoch must be positive, not {rows_per_epoch}")
        self._make = make_batches
        self._unread = epochs  # epochs not yet handed to the loop
        self._open = False  # an epoch handed to the loop whose end it has not reached
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull, args=(epochs, rows_per_epoch), name="epoch-input",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pull(self, epochs: int, rows_per_epoch: int) -> None:
        it = None
        try:
            if epochs <= 0:
                return
            it = iter(self._make())
            delivered = 0
            for epoch in range(epochs):
                until = (epoch + 1) * rows_per_epoch
                while delivered < until:
                    batch = next(it, None)
                    if batch is None:
                        raise RuntimeError(
                            f"the training input ended after {delivered} rows, in epoch {epoch + 1} of {epochs} "
                            f"({rows_per_epoch} rows an epoch): was the dataset changed during the run?")
                    delivered += len(batch["ok"])
                    if not self._put(batch):
                        return
                if not self._put(self._END):
                    return
        except BaseException as e:  # re-raised in the training loop's thread
            self._put(_Failed(e))
        finally:  # ends this worker's part of the Ray Data execution (the rows past the last epoch are not read)
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _next(self) -> Any:
        item = self._queue.get()
        if isinstance(item, _Failed):
            self._open = False
            raise item.error
        if item is self._END:
            self._open = False
        return item

    def epoch(self):
        """The next epoch's batches (an error in the input is raised here); nothing after the last epoch."""
        while self._open:  # the loop left the previous epoch part-way: its rest is not this one's
            self._next()
        if self._unread <= 0 or self._stop.is_set():
            return
        self._unread -= 1
        self._open = True
        while (item := self._next()) is not self._END:
            yield item

    def close(self, timeout: float = 5.0) -> None:
        """Stop pulling and drop what was pulled ahead; again, a no-op. The thread ends after the batch it is
        waiting for, if any; it is not waited for longer than `timeout` (a daemon, and Ray Train shuts the
        dataset's execution down with the workers)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._open = False
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout)
