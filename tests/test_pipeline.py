"""The training input (`mura_ray.data.pipeline`): decoding fused into the read tasks, blocks of the batch size,
every row delivered once, a seeded row order within a file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mura_ray.data.pipeline import build_input, preprocess_slices, split_files, split_rows


def _png(value: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


def _batch(n: int) -> dict[str, np.ndarray]:
    """`n` uniform square images of grey level 3*i, labelled i (so a row can be told from its label), then a
    corrupt one labelled n."""
    return {
        "image": np.array([_png(3 * i) for i in range(n)] + [b"not an image"], dtype=object),
        "label": np.arange(n + 1),
        "body_part": np.array(["WRIST"] * (n + 1), dtype=object),
    }


def test_slices_keep_every_row_in_the_files_order():
    """Training shuffles in the loop, from a seed (`shuffle_epochs`): slices keep the file's order."""
    slices = list(preprocess_slices(_batch(70), rows=32, image_size=16))
    assert [len(s["image"]) for s in slices] == [32, 32, 7]
    labels = np.concatenate([s["label"] for s in slices])
    assert labels.tolist() == list(range(71))
    ok = np.concatenate([s["ok"] for s in slices])
    assert ok[:70].all() and ok[70] == 0  # the corrupt image keeps its row, flagged
    images = np.concatenate([s["image"] for s in slices])
    assert images.shape == (71, 1, 16, 16) and images.dtype == np.uint8  # load_pixels' pixels, normalised on device
    np.testing.assert_array_equal(images[:70].min(axis=(1, 2, 3)), 3 * np.arange(70))
    assert not images[70].any()


def test_split_files_skips_hidden_files_as_rays_reader_does(tmp_path):
    split = tmp_path / "data" / "train"
    for name in ("part-1.parquet", "part-0.parquet", ".part-2.parquet", "_temporary/part-3.parquet",
                 "notes.txt", "sub/part-4.parquet"):
        (split / name).parent.mkdir(parents=True, exist_ok=True)
        (split / name).write_bytes(b"")
    assert [Path(f).relative_to(split).as_posix() for f in split_files(str(tmp_path / "data"), "train")] == \
        ["part-0.parquet", "part-1.parquet", "sub/part-4.parquet"]


def test_build_input_decodes_inside_the_read_tasks_in_batch_sized_blocks(ray_cluster, mura_dataset):
    summary = json.loads(Path(mura_dataset, "ingest_summary.json").read_text())
    assert len(split_files(mura_dataset, "train")) > 1 and len(split_files(mura_dataset, "val")) == 1
    for split, train in (("train", True), ("val", False)):
        # Training reads its epochs in one execution: a pass over the split per epoch (evaluation reads it once).
        passes = 2 if train else 1
        ds = build_input(mura_dataset, split, image_size=32, train=train, batch_size=8,
                         passes=2)
        blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        assert sum(len(b["image"]) for b in blocks) == passes * summary["splits"][split]["images"] == \
            passes * split_rows(mura_dataset, split)
        assert all(b["ok"].all() and b["image"].shape[1:] == (1, 32, 32) for b in blocks)
        stats = ds.stats()
        if train:
            # One operator: each task reads a whole file, decodes it slice by slice and re-blocks the slices
            # (no read → object store → decode hop); blocks of at most the batch size.
            assert "ReadParquet->MapBatches(preprocess_slices)->StreamingRepartition" in stats
            assert max(len(b["image"]) for b in blocks) <= 8
        else:
            # A one-file split: read blocks decoded by parallel tasks.
            assert "ReadParquet->MapBatches" not in stats and "MapBatches(preprocess_batch)" in stats
    # Validation's dataset as training builds it: every stage in the read tasks, none reserving a CPU (no separate
    # re-blocking tasks, which would reserve one each).
    ds = build_input(mura_dataset, "train", image_size=32, train=False, batch_size=8,
                     num_cpus=0, max_tasks=2)
    assert sum(len(b["ok"]) for b in ds.iter_batches(batch_size=None)) == split_rows(mura_dataset, "train")
    operators = [line for line in ds.stats().splitlines() if line.startswith("Operator")]
    assert len(operators) == 1 and "ReadParquet->MapBatches(preprocess_slices)" in operators[0], operators
    # Placed as rank 0 places validation (`train._validation`: a soft affinity to its node): every task carries the
    # strategy, the operators fuse as without it (a one-file split: read, then decode tasks), every row.
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    for split in ("train", "val"):
        ds = build_input(mura_dataset, split, image_size=32, train=False, batch_size=8,
                         num_cpus=0, max_tasks=2, scheduling_strategy=here)
        ops, stack = [], [ds._logical_plan.dag]
        while stack:
            ops.append(stack.pop())
            stack.extend(ops[-1].input_dependencies)
        tasks = [op for op in ops if op.name.startswith(("ReadParquet", "MapBatches"))]  # the rest runs in these
        assert len(tasks) == 2 and all(op.ray_remote_args.get("scheduling_strategy") is here for op in tasks), \
            [(op.name, op.ray_remote_args) for op in ops]
        assert sum(len(b["ok"]) for b in ds.iter_batches(batch_size=None)) == split_rows(mura_dataset, split)
        operators = [line for line in ds.stats().splitlines() if line.startswith("Operator")]
        assert len(operators) == (1 if split == "train" else 2), operators
    # A one-file split trained on (an older ingest's layout): its passes are the one file read again.
    ds = build_input(mura_dataset, "val", image_size=32, train=True, batch_size=8, passes=3)
    assert ds.count() == 3 * split_rows(mura_dataset, "val")


def test_one_train_worker_reads_its_dataset_without_a_split_and_several_split_it(ray_cluster):
    """`training_data_config`: Ray Train gives one worker the dataset's own iterator (no split coordinator actor),
    every row in the dataset's order; several workers get Train's split iterators."""
    import ray.data
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

    from mura_ray.data.pipeline import training_data_config

    ds = ray.data.range(40, override_num_blocks=8).map_batches(lambda b: {"id": b["id"][::-1]}, batch_size=None)
    expected = [i for block in range(8) for i in reversed(range(5 * block, 5 * block + 5))]
    [[one]] = [list(w.values()) for w in training_data_config(1).configure(
        {"train": ds}, world_size=1, worker_handles=None, worker_node_ids=None)]
    assert not isinstance(one, StreamSplitDataIterator)
    assert [int(i) for b in one.iter_batches(batch_size=None) for i in b["id"]] == expected  # preserve_order
    two = [w["train"] for w in training_data_config(2).configure(
        {"train": ds}, world_size=2, worker_handles=None, worker_node_ids=None)]
    assert all(isinstance(it, StreamSplitDataIterator) for it in two)
