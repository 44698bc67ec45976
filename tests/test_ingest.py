"""Ingestion: MURA CSVs as the source of truth, external folder sets, bad input, S3, streaming memory."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import ingest as ingest_job
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mura_ray.data.images import DecodeError, decode_radiograph
from mura_ray.data.ingest import SCHEMA
from mura_ray.data.listing import image_id_for, list_mura

REPO = Path(__file__).resolve().parents[1]


def _read_split(dataset: str | Path, split: str):
    return pq.read_table(os.path.join(dataset, split)).to_pandas()


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path) as f:
        return [row for row in csv.reader(f) if row]


def test_synthetic_mura_ingest_matches_the_csvs(mura_root, mura_dataset):
    mura = mura_root / "MURA-v1.1"
    train_images = [r[0] for r in _csv_rows(mura / "train_image_paths.csv")]
    valid_images = [r[0] for r in _csv_rows(mura / "valid_image_paths.csv")]
    study_labels = {
        r[0].rstrip("/"): int(r[1])
        for name in ("train_labeled_studies.csv", "valid_labeled_studies.csv")
        for r in _csv_rows(mura / name)
    }
    train, val, test = (_read_split(mura_dataset, s) for s in ("train", "val", "test"))
    assert len(train) + len(val) == len(train_images)
    assert sorted(test["path"]) == sorted(valid_images)
    assert set(test["split"]) == {"test"} and set(val["split"]) == {"val"}
    every = __import__("pandas").concat([train, val, test])
    # Labels come from the study CSVs, per study.
    for row in every.itertuples():
        assert row.label == study_labels[row.path.rsplit("/", 1)[0]]
    # Patient-level split: no patient in both train and val.
    assert not set(train["patient_id"]) & set(val["patient_id"])
    assert len(val) > 0
    # Studies are (split, body part, patient, study): the same patient may appear under two body parts.
    assert every["study_id"].str.startswith(("train/XR_", "valid/XR_")).all()
    assert set(every["body_part"]) <= {"ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST"}
    # Image bytes are the original file, unmodified; ids are stable, derived from the relative path.
    for row in every.sample(20, random_state=0).itertuples():
        assert row.image == (mura_root / row.path).read_bytes()
        assert row.image_id == image_id_for(row.path)
        w, h = Image.open(io.BytesIO(row.image)).size
        assert (row.width, row.height) == (w, h)
    schema = pq.read_schema(next(Path(mura_dataset, "train").glob("*.parquet")))
    for field in SCHEMA:
        assert schema.field(field.name).type == field.type
    summary = json.loads(Path(mura_dataset, "ingest_summary.json").read_text())
    assert summary["n_images"] == len(every)
    assert summary["splits"]["test"]["images"] == len(test)
    assert summary["splits"]["train"]["patients"] == train["patient_id"].nunique()
    assert Path(mura_dataset, "errors.jsonl").read_text() == ""


def test_patient_split_is_reproducible_and_root_may_be_mura_folder(mura_root):
    a = list_mura(str(mura_root), 0.2, seed=0).records
    b = list_mura(str(mura_root / "MURA-v1.1"), 0.2, seed=0).records
    c = list_mura(str(mura_root), 0.2, seed=1).records
    assert a["split"].tolist() == b["split"].tolist()
    assert a["image_id"].tolist() == b["image_id"].tolist()
    assert a["split"].tolist() != c["split"].tolist()
    assert a.groupby("patient_id")["split"].nunique().max() == 1


def _external_set(root: Path) -> Path:
    base = root / "Bone_Fracture_Binary_Classification" / "Bone_Fracture_Binary_Classification"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for cls in ("fractured", "not fractured"):
            folder = base / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                img = Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8))
                img.save(folder / f"img{i}.jpeg" if i % 2 else folder / f"img{i}.png")
    (base / "train" / "fractured" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (base / "train" / "notes.txt").write_text("stray text file")
    (base / "val" / "fractured" / "._img0.png").write_bytes(b"macOS metadata")
    return root


def test_external_folder_set(ray_cluster, tmp_path, capsys):
    root = _external_set(tmp_path / "kaggle")
    out = tmp_path / "external"
    assert ingest_job.main(["--source", "folder", "--root", str(root), "--out", str(out),
                            "--max-error-rate", "0.1"]) == 0
    rows = {s: _read_split(out, s) for s in ("train", "val", "test")}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [6, 6, 6]
    for df in rows.values():
        assert (df["label"] == df["path"].str.contains("/fractured/").astype(int)).all()
        assert df["body_part"].isna().all()
    assert rows["train"]["path"].str.endswith(".jpeg").any()
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert "corrupt.png" in reasons and "decode" in reasons["corrupt.png"]
    assert "not an image file name" in reasons["notes.txt"]
    assert reasons["._img0.png"] == "hidden file"
    assert "train" in capsys.readouterr().out

    out2 = tmp_path / "external_wrist"
    assert ingest_job.main(["--source", "folder", "--root", str(root), "--out", str(out2),
                            "--max-error-rate", "0.1", "--body-part", "wrist"]) == 0
    assert set(_read_split(out2, "test")["body_part"]) == {"WRIST"}


def test_unknown_class_folder_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "set" / "train" / "broken"
    folder.mkdir(parents=True)
    Image.new("L", (8, 8)).save(folder / "a.png")
    assert ingest_job.main(["--source", "folder", "--root", str(tmp_path / "set"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'broken'" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["missing", "not_mura", "bad_row", "bad_label"])
def test_wrong_root_is_one_line_and_exit_2(tmp_path, capsys, case):
    root = tmp_path / "root"
    if case != "missing":
        mura = root / "MURA-v1.1"
        mura.mkdir(parents=True)
        if case != "not_mura":
            for name in ("train", "valid"):
                study = f"MURA-v1.1/{name}/XR_HAND/patient1/study1_negative/"
                (mura / f"{name}_image_paths.csv").write_text(f"{study}a.png\n")
                (mura / f"{name}_labeled_studies.csv").write_text(f"{study},0\n")
            if case == "bad_row":
                (mura / "train_image_paths.csv").write_text("some/other/layout.png\n")
            else:
                bad = "MURA-v1.1/train/XR_HAND/patient1/study1_negative/,yes\n"
                (mura / "train_labeled_studies.csv").write_text(bad)
    rc = ingest_job.main(["--source", "mura", "--root", str(root), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert {"missing": "no such folder", "not_mura": "not a MURA-v1.1", "bad_row": "train_image_paths.csv row 1",
            "bad_label": "train_labeled_studies.csv row 1"}[case] in err
    assert not (tmp_path / "out").exists()


def _mura_with_bad_images(root: Path, n_bad: int) -> Path:
    from mura_ray.data.synthetic import generate_mura

    generate_mura(root, n_images=60, image_size=32, seed=3)
    paths = [r[0] for r in _csv_rows(root / "MURA-v1.1" / "train_image_paths.csv")]
    for p in paths[:n_bad]:
        (root / p).write_bytes(b"")
    # Listed in a CSV but missing on disk.
    os.remove(root / paths[n_bad])
    return root


def test_error_rate_over_limit_fails_and_writes_nothing(ray_cluster, tmp_path, capsys):
    root = _mura_with_bad_images(tmp_path / "m", n_bad=5)
    out = tmp_path / "out"
    assert ingest_job.main(["--source", "mura", "--root", str(root), "--out", str(out)]) == 1
    assert "--max-error-rate" in capsys.readouterr().err
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sum(e["reason"] == "empty file" for e in errors) == 5
    assert sum(e["reason"] == "listed but missing on disk" for e in errors) == 1
    assert not (out / "ingest_summary.json").exists()
    assert not (out / "train").exists()

    # Within the limit the job goes on, skipping and reporting the same files; a re-run needs --overwrite.
    assert ingest_job.main(["--source", "mura", "--root", str(root), "--out", str(out), "--overwrite",
                            "--max-error-rate", "0.2"]) == 0
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["n_errors"] == 6
    assert ingest_job.main(["--source", "mura", "--root", str(root), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_raw_images_source(ray_cluster, tmp_path):
    tree = tmp_path / "archive" / "2026-11-26" / "XR_WRIST"
    tree.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (20, 30), color=i * 40).save(tree / f"{i}.png")
    out = tmp_path / "bulk"
    assert ingest_job.main(["--source", "images", "--root", str(tmp_path / "archive"), "--out", str(out)]) == 0
    df = _read_split(out, "test")
    assert len(df) == 3 and df["label"].isna().all() and set(df["body_part"]) == {"WRIST"}
    assert set(df["height"]) == {30}


def test_train_rows_are_shuffled_over_files_and_each_epoch_reads_them_in_a_new_order(ray_cluster, mura_root,
                                                                                     tmp_path, capsys):
    import ray

    from mura_ray.config import IngestConfig
    from mura_ray.data.ingest import LAYOUT_VERSION, ingest
    from mura_ray.data.pipeline import pass_order, read_split, split_files

    out = str(tmp_path / "mura")
    args = ["--source", "mura", "--root", str(mura_root), "--out", out, "--rows-per-file"]
    assert ingest_job.main([*args, "0"]) == 2
    assert "--rows-per-file must be > 0, got 0" in capsys.readouterr().err
    assert ingest_job.main([*args, "16"]) == 0
    summary = json.loads((tmp_path / "mura" / "ingest_summary.json").read_text())
    assert summary["layout_version"] == LAYOUT_VERSION
    files = sorted((tmp_path / "mura" / "train").glob("*.parquet"))
    n_train = summary["splits"]["train"]["images"]
    assert len(files) == -(-n_train // 16) >= 5
    in_files = [pq.read_table(f, columns=["path"]).column("path").to_pylist() for f in files]
    assert all(len(rows) <= 16 for rows in in_files)
    written = [p for rows in in_files for p in rows]
    # Rows in a seeded random order (the same on a re-ingest), not in path order; val and test in path order.
    assert sorted(written) == sorted(set(written)) and written != sorted(written)
    again = ingest(IngestConfig(source="mura", root=str(mura_root), out=str(tmp_path / "again"), rows_per_file=16))
    assert again["fingerprint"] == summary["fingerprint"]
    assert pq.read_table(tmp_path / "again" / "train", columns=["path"]).column("path").to_pylist() == \
        pq.read_table(tmp_path / "mura" / "train", columns=["path"]).column("path").to_pylist()
    for split in ("val", "test"):
        paths = _read_split(out, split)["path"].tolist()
        assert paths == sorted(paths)

    # Training reads its epochs as passes over the files, each pass in a new seeded order (no all-to-all shuffle),
    # in one execution: every pass visits every file once.
    order = pass_order(split_files(out, "train"), 3, seed=7)
    assert order == pass_order(split_files(out, "train"), 3, seed=7)
    ctx = ray.data.DataContext.get_current()
    keep, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        read = [r["path"] for r in read_split(out, "train", ("path",), files=order).take_all()]
    finally:
        ctx.execution_options.preserve_order = keep
    assert len(read) == 3 * len(written)
    epochs = [read[k * len(written):(k + 1) * len(written)] for k in range(3)]
    first_of_file = {rows[0]: k for k, rows in enumerate(in_files)}
    orders = [[first_of_file[p] for p in epoch if p in first_of_file] for epoch in epochs]
    assert all(sorted(epoch) == sorted(written) for epoch in epochs)
    assert all(sorted(order) == list(range(len(files))) for order in orders)
    assert len({tuple(order) for order in orders}) == 3, orders


def test_s3_round_trip(ray_cluster, s3_bucket, mura_root):
    import pyarrow.fs as pafs

    from mura_ray.data.pipeline import read_split
    from mura_ray.storage import read_json, s3_filesystem

    dest = f"s3://{s3_bucket}/datasets/mura"
    assert ingest_job.main(["--source", "mura", "--root", str(mura_root), "--out", dest]) == 0
    summary = read_json(f"{dest}/ingest_summary.json")
    fs = s3_filesystem()
    files = fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/datasets/mura/test", recursive=True))
    assert any(f.path.endswith(".parquet") for f in files)
    assert read_split(dest, "test").count() == summary["splits"]["test"]["images"]
    table = pq.read_table(f"{s3_bucket}/datasets/mura/test", filesystem=fs, columns=["image_id", "path", "image"])
    row = table.slice(0, 1).to_pylist()[0]
    assert row["image"] == (mura_root / row["path"]).read_bytes()


_PEAK_SCRIPT = """
import sys, threading, time, psutil
sys.path.insert(0, {jobs!r})
import ray
# Two CPUs: both sizes keep every writing CPU busy, so the comparison is of data held, not of CPUs used.
ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir={tmp!r})
import ingest
me = psutil.Process()
peak = [0]
def watch():
    # The job's memory: the unique memory (USS) of the driver and every Ray process it started, summed.
    while True:
        total = 0
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_full_info().uss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
rc = ingest.main(["--source", "mura", "--root", {root!r}, "--out", {out!r}, "--file-mb", "8"])
time.sleep(0.5)
print("PEAK", rc, peak[0])
ray.shutdown()
"""


def _peak_ingest_memory(root: Path, out: Path, tmp: Path) -> int:
    script = _PEAK_SCRIPT.format(jobs=str(REPO / "jobs"), root=str(root), out=str(out), tmp=str(tmp))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    _, rc, peak = line[0].split()
    assert rc == "0"
    return int(peak)


@pytest.mark.slow
def test_ingest_streams_memory_does_not_grow_with_images(tmp_path):
    """4x the images (incompressible, ~1 MB each) must not raise the ingest job's peak memory by more than 25%.

    The peak is the whole job's: the driver and the Ray processes it starts, as a user's container would see it. The
    images are large enough that a writer holding a split's bytes would show; one more Ray worker process in one of
    the runs (40-180 MiB, at most ~17% of the job) does not.
    """
    from mura_ray.data.synthetic import generate_mura

    rng = np.random.default_rng(0)
    unique = []
    for _ in range(16):  # 16 distinct incompressible images, each file a copy of one
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (1000, 1000), dtype=np.uint8)).save(buf, format="PNG", compress_level=0)
        unique.append(buf.getvalue())
    peaks = []
    for n in (256, 1024):
        root = tmp_path / f"m{n}"
        generate_mura(root, n_images=n, image_size=32, seed=0)
        for k, p in enumerate(sorted(root.rglob("*.png"))):
            p.write_bytes(unique[k % len(unique)])
        ray_tmp = Path(f"/tmp/rm{n}{time.time_ns() % 10000}")
        peaks.append(_peak_ingest_memory(root, tmp_path / f"out{n}", ray_tmp))
    small, large = peaks
    print(f"ingest job peak memory: 256 images {small / 2**20:.0f} MiB, 1024 images {large / 2**20:.0f} MiB")
    assert large <= small * 1.25, f"peak grew from {small / 2**20:.0f} MiB to {large / 2**20:.0f} MiB"


def test_local_writes_replace_whole_files(tmp_path, monkeypatch):
    """A local write lands whole or not at all: the old content stays until the new one is complete."""
    from mura_ray import storage

    target = tmp_path / "d" / "manifest.json"
    storage.write_json(str(target), {"parts": {"a": 1}})
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((json.loads(target.read_text()), Path(src).read_text()))  # old content still in place
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)
    storage.write_json(str(target), {"parts": {"a": 1, "b": 2}})
    assert seen and seen[0][0] == {"parts": {"a": 1}} and json.loads(seen[0][1]) == {"parts": {"a": 1, "b": 2}}
    assert json.loads(target.read_text()) == {"parts": {"a": 1, "b": 2}}
    assert sorted(p.name for p in target.parent.iterdir()) == ["manifest.json"]


def test_one_s3_filesystem_per_environment(monkeypatch):
    """Reused across reads (one client and connection pool, not one per image), rebuilt when the AWS settings
    change."""
    from mura_ray import storage

    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    first = storage.s3_filesystem()
    assert storage.s3_filesystem() is first and storage.resolve("s3://bucket/key")[0] is first
    assert first.region == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "us-east-2")
    assert storage.s3_filesystem() is not first and storage.s3_filesystem().region == "us-east-2"


def _images_tree(root: Path, n: int = 3) -> Path:
    """A tiny `--source images` archive: `root/XR_WRIST/{0..n-1}.png`."""
    tree = root / "XR_WRIST"
    tree.mkdir(parents=True)
    for i in range(n):
        Image.new("L", (20, 30), color=i * 40).save(tree / f"{i}.png")
    return root


def _png16_rgb(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of `rgb` (H x W x 3, uint16), written by hand: Pillow cannot write 16-bit colour PNGs."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_an_image_the_training_decoder_refuses_is_an_error_not_a_row(ray_cluster, tmp_path):
    """A 16-bit colour PNG with 12-bit values opens in Pillow, but `decode_radiograph` (what training and scoring
    decode with) refuses it: ingest lists it in errors.jsonl with the decoder's reason and leaves it out of the
    dataset, and every image it keeps decodes."""
    archive = _images_tree(tmp_path / "archive")
    twelve_bits = np.broadcast_to(np.array([0, 2000, 4095], dtype=np.uint16)[:, None, None], (3, 5, 3))
    data = _png16_rgb(twelve_bits)
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()  # Pillow alone accepts it
    with pytest.raises(DecodeError) as refused:
        decode_radiograph(data)
    (archive / "XR_WRIST" / "low_bits.png").write_bytes(data)
    out = tmp_path / "out"
    assert ingest_job.main(["--source", "images", "--root", str(archive), "--out", str(out),
                            "--max-error-rate", "0.5"]) == 0
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"path": "XR_WRIST/low_bits.png", "reason": str(refused.value)}]
    assert "16-bit colour PNG whose values use the low bits only" in errors[0]["reason"]
    rows = _read_split(out, "test")
    assert sorted(rows["path"]) == ["XR_WRIST/0.png", "XR_WRIST/1.png", "XR_WRIST/2.png"]
    for row in rows.itertuples():
        assert decode_radiograph(row.image).shape == (row.height, row.width)
    assert json.loads((out / "ingest_summary.json").read_text())["n_errors"] == 1


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _files(folder: Path, skip: str = "_staging") -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and skip not in p.relative_to(folder).parts}


@pytest.mark.parametrize("case", ["same", "out_inside", "root_inside", "link"])
def test_out_overlapping_the_archive_is_refused_and_nothing_is_deleted(ray_cluster, tmp_path, capsys, case):
    archive = _images_tree(tmp_path / "archive")
    if case == "link":
        (tmp_path / "link").symlink_to(archive)
    out = {"same": archive, "out_inside": archive / "parquet", "root_inside": tmp_path, "link": tmp_path / "link"}
    before = sorted(tmp_path.rglob("*"))
    rc = ingest_job.main(["--source", "images", "--root", str(archive), "--out", str(out[case]), "--overwrite"])
    err = _one_error_line(capsys)
    assert rc == 2 and f"--out {out[case]}" in err and "archive" in err and "give an --out outside it" in err
    assert sorted(tmp_path.rglob("*")) == before


def test_out_beside_mura_in_its_parent_is_not_an_overlap(tmp_path):
    """For MURA the archive is its MURA-v1.1 folder: `--root ~/data --out ~/data/mura-parquet` is fine."""
    from mura_ray.config import UserError
    from mura_ray.data.ingest import _check_apart

    mura = str(tmp_path / "MURA-v1.1")
    _check_apart(str(tmp_path / "mura-parquet"), mura, str(tmp_path))
    _check_apart(str(tmp_path / "MURA-v1.1-parquet"), mura, str(tmp_path))
    _check_apart("s3://bucket/data/mura-parquet", "s3://bucket/data/MURA-v1.1", "s3://bucket/data")
    for out, archive in [(str(tmp_path), mura), (mura + "/out", mura), ("s3://bucket//data/", "s3://bucket/data/x"),
                         ("s3://bucket/data/MURA-v1.1/out", "s3://bucket/data/MURA-v1.1")]:
        with pytest.raises(UserError, match="give an --out outside it"):
            _check_apart(out, archive, archive)


@pytest.mark.parametrize("content", ["user_files", "user_train_folder", "dataset_and_user_file"])
def test_overwrite_deletes_only_an_ingested_dataset(ray_cluster, tmp_path, capsys, content):
    archive = _images_tree(tmp_path / "archive")
    out = tmp_path / "out"
    args = ["--source", "images", "--root", str(archive), "--out", str(out)]
    if content == "dataset_and_user_file":
        assert ingest_job.main(args) == 0
        (out / "notes.txt").write_text("mine")
        shown = "notes.txt"
    else:
        (out / "train").mkdir(parents=True)
        (out / "train" / "scan.png").write_bytes(b"not ours")
        shown = "train/scan.png"
        if content == "user_files":
            (out / "notes.txt").write_text("mine")
            shown = "notes.txt, train/scan.png"
    capsys.readouterr()
    before = _files(out)
    for extra in ([], ["--overwrite"]):
        assert ingest_job.main([*args, *extra]) == 2
        err = _one_error_line(capsys)
        assert f"not an ingested dataset (it holds {shown})" in err and "give a new or empty folder" in err
    assert _files(out) == before and not (out / "_lock.json").exists()


def test_relative_root_and_out_are_made_absolute_on_the_driver(ray_cluster, tmp_path, monkeypatch):
    """The README's command, `--root MURA-v1.1 --out DEST`, run from the folder holding MURA-v1.1."""
    from mura_ray.data.synthetic import generate_mura

    generate_mura(tmp_path, n_images=40, image_size=16, seed=2)
    monkeypatch.chdir(tmp_path)
    assert ingest_job.main(["--source", "mura", "--root", "MURA-v1.1", "--out", "ds"]) == 0
    summary = json.loads((tmp_path / "ds" / "ingest_summary.json").read_text())
    assert Path(summary["root"]) == (tmp_path / "MURA-v1.1").resolve()
    n_listed = sum(len(_csv_rows(tmp_path / "MURA-v1.1" / f"{s}_image_paths.csv")) for s in ("train", "valid"))
    assert summary["n_images"] == n_listed


def test_storage_errors_are_one_line_and_come_before_decoding(ray_cluster, s3_bucket, tmp_path, capsys,
                                                              monkeypatch):
    from mura_ray.data import ingest as ingest_module

    def no_decoding(batch, max_pixels):
        raise AssertionError("images decoded before --root and --out were checked")

    monkeypatch.setattr(ingest_module, "inspect_images", no_decoding)
    archive = str(_images_tree(tmp_path / "archive"))
    (tmp_path / "file.txt").write_text("a regular file")
    for root, out, what in [
        (archive, str(tmp_path / "file.txt" / "ds"), "cannot write there"),
        (archive, "s3://no-such-bucket-for-mura/ds", "cannot write there"),
        (f"s3://{s3_bucket}/archive", str(tmp_path / "o"), "cannot read it"),  # with the endpoint below
    ]:
        if root.startswith("s3://"):
            monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
        assert ingest_job.main(["--source", "images", "--root", root, "--out", out]) == 2
        err = _one_error_line(capsys)
        named = f"--root {root}" if what == "cannot read it" else f"--out {out}"
        assert f"{named}: {what} (" in err, err
    # An unreachable endpoint for --out, too.
    assert ingest_job.main(["--source", "images", "--root", archive, "--out", f"s3://{s3_bucket}/ds"]) == 2
    assert f"--out s3://{s3_bucket}/ds: cannot write there (" in _one_error_line(capsys)


@pytest.mark.parametrize("credentials", ["unknown key", "wrong secret", "read-only key"])
def test_refused_s3_credentials_are_one_line_before_ray_starts(credentials, s3_auth_server, tmp_path):
    """`python jobs/ingest.py ... --out s3://...` with credentials S3 refuses: one line naming --out and saying
    access was denied, exit code 2, in about a second (before Ray starts), and nothing written there."""
    import boto3

    srv = s3_auth_server
    key, secret = {"unknown key": ("AKIAWRONGWRONGWRONG0", srv.secret_key), "wrong secret": (srv.access_key, "x" * 40),
                   "read-only key": (srv.read_only_key, srv.read_only_secret)}[credentials]
    archive = str(_images_tree(tmp_path / "archive"))
    out = f"s3://{srv.bucket}/ingest-{credentials.replace(' ', '-')}"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "ingest.py"), "--source", "images", "--root", archive,
                           "--out", out], env=srv.env(key, secret), capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"error: --out {out}: cannot write there (access denied (check AWS_ACCESS_KEY_ID/"
                          "AWS_SECRET_ACCESS_KEY or the bucket policy): When "), err
    assert "Started a local Ray" not in proc.stdout + proc.stderr
    writer = boto3.client("s3", endpoint_url=srv.endpoint, region_name="us-east-1", aws_access_key_id=srv.access_key,
                          aws_secret_access_key=srv.secret_key)
    assert writer.list_objects_v2(Bucket=srv.bucket, Prefix=out.split("/")[-1]).get("KeyCount") == 0


def test_a_failed_or_stopped_overwrite_keeps_the_old_dataset(ray_cluster, tmp_path, capsys, monkeypatch):
    from mura_ray.data import ingest as ingest_module
    from mura_ray.data.synthetic import generate_mura

    root = tmp_path / "m"
    generate_mura(root, n_images=60, image_size=32, seed=3)
    out = tmp_path / "out"
    args = ["--source", "mura", "--root", str(root), "--out", str(out)]
    assert ingest_job.main([*args, "--rows-per-file", "4"]) == 0
    old = _files(out)
    assert len(list((out / "train").glob("*.parquet"))) > 1

    # Too many unusable images: the new dataset fails its check, the old one stays as it was.
    for p in [r[0] for r in _csv_rows(root / "MURA-v1.1" / "train_image_paths.csv")][:5]:
        (root / p).write_bytes(b"")
    capsys.readouterr()
    assert ingest_job.main([*args, "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"see {out}/_staging/errors.jsonl" in err and f"the dataset at {out} is unchanged" in err
    assert _files(out) == old
    staged = [json.loads(line) for line in (out / "_staging" / "errors.jsonl").read_text().splitlines()]
    assert sum(e["reason"] == "empty file" for e in staged) == 5

    # Stopped (Ctrl+C) once the new splits are written, before they replace the old ones: the same, lock released.
    def stopped(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ingest_module, "_commit", stopped)
        assert ingest_job.main([*args, "--overwrite", "--max-error-rate", "0.2"]) == 130
    assert _files(out) == old and (out / "_staging" / "train").is_dir()
    assert not (out / "_lock.json").exists()

    # Within the limit: the new dataset replaces the old one whole (none of its 4-row files left beside the new).
    assert ingest_job.main([*args, "--overwrite", "--max-error-rate", "0.2", "--rows-per-file", "64"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl", "ingest_summary.json", "test", "train", "val"]
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["n_errors"] == 5
    assert [len(list((out / s).glob("*.parquet"))) for s in ("train", "val", "test")] == [1, 1, 1]
    assert sum(len(_read_split(out, s)) for s in ("train", "val", "test")) == summary["n_images"]


def test_one_ingest_at_a_time_writes_an_out(ray_cluster, tmp_path, capsys):
    from mura_ray import storage
    from mura_ray.data.ingest import read_summary
    from mura_ray.data.pipeline import split_files

    archive = str(_images_tree(tmp_path / "archive"))
    out = tmp_path / "bulk"
    args = ["--source", "images", "--root", archive, "--out", str(out)]
    assert ingest_job.main(args) == 0
    assert not (out / "_lock.json").exists()
    capsys.readouterr()
    before = _files(out)
    other = storage.OutputLock(str(out), "another jobs/ingest.py").acquire()
    try:
        for extra in ([], ["--overwrite"]):
            assert ingest_job.main([*args, *extra]) == 2
            err = _one_error_line(capsys)
            assert "is being written by another run (another jobs/ingest.py on" in err
        # Nothing deleted, the other run's lock least of all; readers of the dataset do not mind the lock.
        assert json.loads((out / "_lock.json").read_text())["token"] == other.token
        assert {k: v for k, v in _files(out).items() if k != "_lock.json"} == before
        assert read_summary(str(out))["n_images"] == 3
        assert len(split_files(str(out), "test")) == 1
    finally:
        other.release()

    # The lock of a run killed before it wrote anything is taken over, and is no dataset: no --overwrite needed.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "_lock.json").write_text(json.dumps({"holder": "jobs/ingest.py", "host": "gone", "pid": 1}))
    os.utime(fresh / "_lock.json", (time.time() - 3600, time.time() - 3600))
    assert ingest_job.main([*args[:-1], str(fresh)]) == 0
    assert sorted(p.name for p in fresh.iterdir()) == ["errors.jsonl", "ingest_summary.json", "test"]


def test_s3_overwrite_replaces_the_dataset(ray_cluster, s3_bucket, tmp_path):
    """On S3 the staged dataset is moved into place object by object (S3 has no rename)."""
    from mura_ray import storage
    from mura_ray.data.pipeline import read_split

    archive = str(_images_tree(tmp_path / "archive", n=4))
    dest = f"s3://{s3_bucket}/datasets/bulk"
    args = ["--source", "images", "--root", archive, "--out", dest]
    assert ingest_job.main([*args, "--rows-per-file", "1"]) == 0
    assert len(storage.list_files(dest, ".parquet")) == 4
    assert ingest_job.main([*args, "--rows-per-file", "2", "--overwrite"]) == 0
    assert storage.list_files(dest) == [f"{dest}/{name}" for name in (
        "errors.jsonl", "ingest_summary.json", "test/part-00000.parquet", "test/part-00001.parquet")]
    assert read_split(dest, "test").count() == 4


def test_a_folder_set_without_split_folders_warns_where_its_images_go(tmp_path, caplog):
    """`--source folder --root set/train` (one split's folder, not the set's) puts every image in `test`: said."""
    import logging

    from mura_ray.data.listing import list_folder

    for cls in ("fractured", "not fractured"):
        folder = tmp_path / "set" / "train" / cls
        folder.mkdir(parents=True)
        Image.new("L", (8, 8)).save(folder / "a.png")
    with caplog.at_level(logging.WARNING, logger="mura_ray.data.ingest"):
        listing = list_folder(str(tmp_path / "set" / "train"), None)
    assert set(listing.records["split"]) == {"test"}
    assert "2 of 2 images are not in a train/, val/ (valid/) or test/ folder; they go to the test split" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mura_ray.data.ingest"):
        assert set(list_folder(str(tmp_path / "set"), None).records["split"]) == {"train"}
    assert not caplog.records


def test_the_fingerprint_changes_with_what_the_dataset_holds():
    """The model card's training-data fingerprint: another split assignment, label or file gives another one; the
    order of rows does not count."""
    import pandas as pd

    from mura_ray.data.ingest import _fingerprint

    good = pd.DataFrame({"split": ["train", "train", "val"], "image_id": ["a", "b", "c"],
                         "label": pd.array([1, 0, None], dtype="Int64"), "nbytes": [10, 20, 30]})
    base = _fingerprint(good)
    assert _fingerprint(good.iloc[::-1]) == base
    for column, value in [("split", "val"), ("label", 0), ("nbytes", 11), ("image_id", "z")]:
        changed = good.copy()
        changed.loc[0, column] = value
        assert _fingerprint(changed) != base, column
