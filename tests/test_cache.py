"""The training-ready cache (`mura_ray.data.cache`) and the augmentation on the worker's device
(`mura_ray.data.augment`): the pixels scoring sees, complete or never read, decode failures counted, S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mura_ray.config import UserError
from mura_ray.data import cache
from mura_ray.data.augment import augment_batch, augment_generator, model_input
from mura_ray.data.images import load_pixels, normalize
from mura_ray.data.pipeline import build_input, split_rows


def _summary(data: str) -> dict:
    return json.loads(Path(data, "ingest_summary.json").read_text())


def _copy(data: str, dest: Path) -> str:
    """A private copy of an ingested dataset (its splits and summary; no cache)."""
    for item in ("train", "val", "test", "ingest_summary.json"):
        src = Path(data, item)
        if src.is_dir():
            shutil.copytree(src, dest / item)
        elif src.exists():
            shutil.copy(src, dest / item)
    return str(dest)


def _originals(data: str, split: str) -> dict[str, bytes]:
    table = pq.read_table(Path(data, split), columns=["image_id", "image"])
    return dict(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True))


def test_cache_holds_the_pixels_scoring_computes_from_the_originals(ray_cluster, mura_dataset, tmp_path):
    """A model trained on the cache and scored on the originals sees identical pixels: every cached image equals
    `load_pixels` of its original bytes (the one preprocessing scoring uses), and so does what the cached input
    delivers to validation after normalisation."""
    data = _copy(mura_dataset, tmp_path / "data")
    summary = _summary(data)
    built = cache.ensure_cache(data, summary, 32)
    assert set(built) == {"train", "val"}
    for split in ("train", "val"):
        folder, marker = built[split]["folder"], built[split]["marker"]
        assert folder == str(Path(data, "cache", "32", split))
        assert marker["fingerprint"] == summary["fingerprint"] and marker["n_errors"] == 0
        assert marker["rows"] == split_rows(data, split)
        originals = _originals(data, split)
        table = pq.read_table(folder, columns=["image_id", "pixels", "ok"])
        pixels = cache.cached_pixels(table, 32)
        assert len(pixels) == len(originals) and all(table.column("ok").to_pylist())
        for image_id, image in zip(table.column("image_id").to_pylist(), pixels, strict=True):
            np.testing.assert_array_equal(image[0], load_pixels(originals[image_id], 32))
    # What validation reads from the cache, normalised on the device, is scoring's input to the last bit.
    ds = build_input(data, "val", image_size=32, train=False, cache=built["val"]["folder"], batch_size=8)
    rows = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    delivered = np.concatenate([b["image"] for b in rows])
    assert delivered.dtype == np.uint8 and len(delivered) == split_rows(data, "val")
    originals = list(_originals(data, "val").values())  # the split's own order
    got = model_input(torch.from_numpy(delivered[:4]), 0.5, 0.25).numpy()
    want = np.stack([normalize(load_pixels(b, 32), 0.5, 0.25) for b in originals[:4]])[:, None]
    np.testing.assert_array_equal(got, want)


def test_a_built_cache_is_reused_and_a_stale_one_rebuilt(ray_cluster, mura_dataset, tmp_path, caplog):
    data = _copy(mura_dataset, tmp_path / "data")
    summary = _summary(data)
    marker_path = Path(data, "cache", "32", "val", cache.MARKER)
    cache.ensure_cache(data, summary, 32, splits=("val",))
    first = marker_path.stat().st_mtime_ns
    cache.ensure_cache(data, summary, 32, splits=("val",))
    assert marker_path.stat().st_mtime_ns == first  # idempotent: nothing rebuilt
    changed = {**summary, "fingerprint": "0123456789abcdef"}
    with caplog.at_level("WARNING"):
        built = cache.ensure_cache(data, changed, 32, splits=("val",))
    assert "built from another version of the dataset" in caplog.text
    assert built["val"]["marker"]["fingerprint"] == "0123456789abcdef"
    assert json.loads(marker_path.read_text())["fingerprint"] == "0123456789abcdef"


def test_a_half_built_cache_is_never_read_as_complete(ray_cluster, mura_dataset, tmp_path):
    data = _copy(mura_dataset, tmp_path / "data")
    summary = _summary(data)
    built = cache.ensure_cache(data, summary, 32, splits=("val",))
    folder = Path(built["val"]["folder"])
    # An interrupted build: its files written, its marker not yet (the marker is written last).
    (folder / cache.MARKER).unlink()
    assert cache.read_marker(str(folder)) is None
    with pytest.raises(RuntimeError, match="not complete"):
        build_input(data, "val", image_size=32, train=False, cache=str(folder))
    rebuilt = cache.ensure_cache(data, summary, 32, splits=("val",))
    assert rebuilt["val"]["marker"]["rows"] == split_rows(data, "val")
    # Files beside the marker's list (another dataset's leftovers) are never read.
    shutil.copy(next(folder.glob("*.parquet")), folder / "part-99999.parquet")
    ds = build_input(data, "val", image_size=32, train=False, cache=str(folder))
    assert ds.count() == split_rows(data, "val")


def test_a_cache_that_cannot_be_written_is_one_line(ray_cluster, mura_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot be written there .*--no-cache") as e:
        cache.ensure_cache(mura_dataset, _summary(mura_dataset), 32, cache_dir=str(blocker / "cache"))
    assert "\n" not in str(e.value)


def test_images_that_fail_to_decode_are_counted_and_keep_their_rows(ray_cluster, mura_dataset, tmp_path):
    data = _copy(mura_dataset, tmp_path / "data")
    (val_file,) = Path(data, "val").glob("*.parquet")
    table = pq.read_table(val_file)
    images = table.column("image").to_pylist()
    images[3] = b"\x89PNG\r\n\x1a\n truncated"
    bad_id = table.column("image_id")[3].as_py()
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, val_file)
    built = cache.ensure_cache(data, _summary(data), 32, splits=("val",), cache_dir=str(tmp_path / "c"))
    marker = built["val"]["marker"]
    assert marker["n_errors"] == 1 and marker["rows"] == table.num_rows
    errors = [json.loads(line) for line in Path(built["val"]["folder"], cache.ERRORS_FILE).read_text().splitlines()]
    assert [e["image_id"] for e in errors] == [bad_id] and "cannot decode" in errors[0]["reason"]
    ds = build_input(data, "val", image_size=32, train=False, cache=built["val"]["folder"])
    ok = np.concatenate([b["ok"] for b in ds.iter_batches(batch_size=None)])
    assert len(ok) == table.num_rows and ok.tolist().count(0.0) == 1 and ok[3] == 0.0


def test_cache_on_s3(ray_cluster, mura_dataset, s3_bucket):
    from mura_ray import storage

    data = f"s3://{s3_bucket}/data"
    fs, _ = storage.resolve(data)
    for split in ("train", "val"):
        for f in Path(mura_dataset, split).glob("*.parquet"):
            storage.write_bytes(f"{data}/{split}/{f.name}", f.read_bytes())
    storage.write_bytes(f"{data}/ingest_summary.json", Path(mura_dataset, "ingest_summary.json").read_bytes())
    built = cache.ensure_cache(data, _summary(mura_dataset), 32)
    assert built["val"]["folder"] == f"{data}/cache/32/val"
    assert storage.exists(f"{data}/cache/32/val/{cache.MARKER}")
    ds = build_input(data, "train", image_size=32, train=True, cache=built["train"]["folder"], passes=2)
    assert ds.count() == 2 * split_rows(mura_dataset, "train")
    originals = _originals(mura_dataset, "val")
    fs, path = storage.resolve(built["val"]["folder"])
    table = pq.read_table(path, filesystem=fs, columns=["image_id", "pixels"])
    first = table.column("image_id")[0].as_py()
    np.testing.assert_array_equal(cache.cached_pixels(table, 32)[0, 0], load_pixels(originals[first], 32))


def test_ingest_builds_the_cache_with_cache_size(ray_cluster, mura_root, tmp_path, capsys):
    import ingest as ingest_job

    out, elsewhere = tmp_path / "d", tmp_path / "c"
    assert ingest_job.main(["--source", "mura", "--root", str(mura_root), "--out", str(out), "--rows-per-file", "64",
                            "--cache-size", "24", "--cache-dir", str(elsewhere)]) == 0
    printed = capsys.readouterr().out
    assert "cache: train at 24 px" in printed and "0 failed to decode" in printed
    summary = _summary(str(out))
    for split in ("train", "val"):
        marker = json.loads((elsewhere / "24" / split / cache.MARKER).read_text())
        assert marker["fingerprint"] == summary["fingerprint"] and marker["rows"] == summary["splits"][split]["images"]
    assert not (out / "cache").exists() and not (elsewhere / "24" / "test").exists()  # test is scored from PNGs
    # The default place, DEST/cache, is part of the dataset: --overwrite replaces it with the dataset.
    assert ingest_job.main(["--source", "mura", "--root", str(mura_root), "--out", str(out), "--rows-per-file", "64",
                            "--cache-size", "24", "--overwrite"]) == 0
    assert (out / "cache" / "24" / "val" / cache.MARKER).is_file()
    assert ingest_job.main(["--source", "mura", "--root", str(mura_root), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "cache").exists()


def test_training_reads_the_cache_by_default(trained_run, mura_dataset):
    """The shared training run (`trained_run`, --image-size 32, no cache flag) built and read the cache."""
    summary = _summary(mura_dataset)
    for split in ("train", "val"):
        marker = cache.read_marker(cache.split_cache(mura_dataset, split, 32))
        assert cache.is_current(marker, summary["fingerprint"], 32)
    assert json.loads((trained_run / "train_config.json").read_text())["cache"] is True


def test_augmentation_is_seeded_by_seed_epoch_and_rank():
    images = torch.rand(6, 1, 24, 24)
    same = [augment_batch(images, augment_generator(7, 2, 0)) for _ in range(2)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    for other in (augment_generator(8, 2, 0), augment_generator(7, 3, 0), augment_generator(7, 2, 1)):
        assert not torch.equal(augment_batch(images, other), same[0])
    assert same[0].shape == images.shape and 0 <= same[0].min() and same[0].max() <= 1
    # Each image of a batch gets its own draw: identical images come out different.
    twins = augment_batch(images[:1].repeat(4, 1, 1, 1), augment_generator(0, 0, 0))
    assert len({tuple(t.flatten()[:50].tolist()) for t in twins}) == 4


def test_augmentation_is_a_flip_rotation_scale_shift_and_jitter(monkeypatch):
    """With the draws pinned, each op is what it says: no-op draws leave the image, a flip mirrors it, brightness
    shifts it."""
    import mura_ray.data.augment as aug

    image = torch.zeros(1, 1, 16, 16)
    image[0, 0, 4:8, 2:5] = 1.0  # a block off-centre, left of the middle

    def run(u):
        monkeypatch.setattr(torch, "rand", lambda *a, generator=None, **k: torch.tensor([u]))  # noqa: ARG005
        return augment_batch(image, torch.Generator())

    # u: angle, scale, flip, shift x, shift y, contrast, brightness (0.5: none; a flip where < 0.5)
    torch.testing.assert_close(run([0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5]), image)
    torch.testing.assert_close(run([0.5, 0.5, 0.1, 0.5, 0.5, 0.5, 0.5]), image.flip(-1))
    torch.testing.assert_close(run([0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 1.0]), (image + aug.BRIGHTNESS).clamp(0, 1))
    # A quarter turn would exceed the range: the largest draw turns by ROTATION_DEG (30°), a block stays a block.
    turned = run([1.0, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5])
    assert not torch.allclose(turned, image) and float(turned.sum()) == pytest.approx(float(image.sum()), rel=0.15)


def test_sampling_grid_is_affine_grid():
    """Augmentation's own sampling grid is `F.affine_grid`'s, for any affine map and a non-square image."""
    import torch.nn.functional as F

    from mura_ray.data.augment import sampling_grid

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampling_grid(theta, 7, 11), F.affine_grid(theta, [5, 1, 7, 11], align_corners=False))
