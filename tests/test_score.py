"""Batch scoring: ingested splits and raw folders, error rows, resumable commits without duplicates, ensembles, S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import score as score_job
from PIL import Image

from mura_ray import score as score_lib


def _predictions(out: Path) -> pd.DataFrame:
    return score_lib.read_predictions(str(out))


def _raw_folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "night1" / ("XR_HAND" if i % 2 else "misc") / f"study{i // 3}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 255, (40 + i, 36), dtype=np.uint8))
        img.save(folder / (f"{i}.jpg" if i % 3 == 0 else f"{i}.png"))
    (root / "night1" / "misc" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "night1" / "README.txt").write_text("not an image")
    return root / "night1"


def test_score_ingested_split_with_report(trained_run, mura_dataset, tmp_path):
    out = tmp_path / "scored"
    model = trained_run / "model"
    assert score_job.main(["--model", str(model), "--input", f"{mura_dataset}/test", "--out", str(out),
                           "--bootstrap", "20"]) == 0
    df = _predictions(out)
    test = pq.read_table(f"{mura_dataset}/test", columns=["image_id", "label", "body_part"]).to_pandas()
    assert sorted(df["image_id"]) == sorted(test["image_id"])
    assert df["error"].isna().all()
    card = json.loads((model / "model_card.json").read_text())
    assert set(df["model_id"]) == {card["model_id"]}
    assert all(len(p) == 7 and abs(sum(p) - 1) < 1e-4 for p in df["body_part_probs"])
    assert df["prob_abnormal"].between(0, 1).all()
    threshold = json.loads((model / "config.json").read_text())["threshold"]
    assert (df["pred_abnormal"] == (df["prob_abnormal"] >= threshold).astype(int)).all()
    merged = df.merge(test, on="image_id", suffixes=("", "_in"))
    assert (merged["label"] == merged["label_in"]).all() and (merged["body_part"] == merged["body_part_in"]).all()
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["n_images"] == len(test) and "study_level" in report and "per_body_part" in report


def _predictor_actors() -> int:
    """Scoring actors (alive or dead) this Ray session has created so far."""
    from ray.util.state import list_actors

    return sum("Predictor" in a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False))


def test_raw_folder_error_rows_and_resume_without_duplicates(trained_run, tmp_path, monkeypatch, capsys):
    src = _raw_folder(tmp_path / "archive", 13)
    out = tmp_path / "bulk"
    args = ["--model", str(trained_run / "model"), "--input", str(src), "--out", str(out), "--chunk-size", "4"]

    # Interrupt the first run after two committed chunks.
    real_commit = score_lib._commit_chunk
    calls = {"n": 0}

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_commit(*a, **k)

    monkeypatch.setattr(score_lib, "_commit_chunk", crash_on_third)
    predictors_before = _predictor_actors()
    assert score_job.main(args) == 130
    # Two chunks committed by one Ray Data execution: the model was loaded by one actor (--concurrency 1), once,
    # not by a new actor pool per chunk.
    assert _predictor_actors() - predictors_before == 1
    committed = json.loads((out / "manifest.json").read_text())
    first = _predictions(out)
    assert 0 < len(first) < 14 and first["image_id"].is_unique
    # A stray part no manifest lists (as a crash between move and manifest write would leave) is not trusted.
    (out / "predictions" / "part-999999-0000.parquet").write_bytes(b"junk")
    monkeypatch.setattr(score_lib, "_commit_chunk", real_commit)
    capsys.readouterr()

    assert score_job.main(args) == 0
    line = capsys.readouterr().out
    df = _predictions(out)
    assert len(df) == 14 and df["image_id"].is_unique
    assert f"skipped {len(first)} already done" in line
    broken = df[df["path"].str.endswith("broken.png")].iloc[0]
    assert broken["error"] and pd.isna(broken["prob_abnormal"]) and pd.isna(broken["pred_abnormal"])
    assert df["error"].notna().sum() == 1
    ok = df[df["error"].isna()]
    assert ok["prob_abnormal"].notna().all() and ok["label"].isna().all()
    assert set(ok.loc[ok["path"].str.contains("XR_HAND"), "body_part"]) == {"HAND"}
    assert ok.loc[~ok["path"].str.contains("XR_HAND"), "body_part"].isna().all()
    assert not (out / "report").exists()
    assert len(json.loads((out / "manifest.json").read_text())["parts"]) > len(committed["parts"])

    # A third run finds nothing to do and writes nothing new.
    assert score_job.main(args) == 0
    assert "scored 0 images, skipped 14 already done" in capsys.readouterr().out
    assert len(_predictions(out)) == 14

    # Another archive with the same layout has the same relative paths, hence the same image ids: scored into this
    # --out it would be skipped as already done. It is refused instead (the same input with a trailing slash is not).
    other = _raw_folder(tmp_path / "archive2", 13)
    assert score_job.main([*args[:2], "--input", str(other), *args[4:]]) == 2
    assert "give this input its own --out" in capsys.readouterr().err
    assert score_job.main([*args[:2], "--input", f"{src}/", *args[4:]]) == 0
    assert len(_predictions(out)) == 14


def test_done_images_of_a_raw_listing_are_dropped_before_their_bytes_are_read(ray_cluster):
    import ray

    from mura_ray.data.ingest import image_id_for

    paths = ["night1/a.png", "night1/b.png", "night1/c.png"]
    done = ray.put(np.sort(score_lib.image_key([image_id_for(paths[1])])))
    listing = pd.DataFrame({"path": paths})  # a listing row has no bytes and no image_id yet
    assert score_lib._drop_done(listing, [done])["path"].tolist() == ["night1/a.png", "night1/c.png"]
    ingested = pd.DataFrame({"image_id": ["x", image_id_for(paths[1])], "path": ["p", "q"]})
    assert score_lib._drop_done(ingested, [done])["path"].tolist() == ["p"]


def test_ensemble_averages_members(trained_run, mura_dataset, tmp_path):
    model = str(trained_run / "model")
    split = f"{mura_dataset}/test"
    assert score_job.main(["--model", model, "--input", split, "--out", str(tmp_path / "one"), "--no-report"]) == 0
    assert score_job.main(["--model", model, "--model", model, "--input", split, "--out",
                           str(tmp_path / "two"), "--no-report"]) == 0
    one = _predictions(tmp_path / "one").set_index("image_id").sort_index()
    two = _predictions(tmp_path / "two").set_index("image_id").sort_index()
    assert two["model_id"].iloc[0].startswith("ensemble-") and one["model_id"].iloc[0] != two["model_id"].iloc[0]
    np.testing.assert_allclose(one["prob_abnormal"], two["prob_abnormal"], atol=1e-5)
    assert not (tmp_path / "two" / "report").exists()


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_tta_is_the_mean_over_a_horizontal_flip(trained_run):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(4)]

    def batch(arrays):
        return pd.DataFrame({"image_id": [str(i) for i in range(4)], "image": [_png_bytes(a) for a in arrays],
                             "path": ["p"] * 4, "study_id": [None] * 4, "body_part": ["HAND", None, "WRIST", None],
                             "label": [None] * 4})

    model = [str(trained_run / "model")]
    plain = score_lib.Predictor(model, use_gpu=False, tta=False, threshold=None)
    tta = score_lib.Predictor(model, use_gpu=False, tta=True, threshold=None)
    p = np.array(plain(batch(images))["prob_abnormal"].to_pylist())
    p_flip = np.array(plain(batch([a[:, ::-1].copy() for a in images]))["prob_abnormal"].to_pylist())
    p_tta = np.array(tta(batch(images))["prob_abnormal"].to_pylist())
    np.testing.assert_allclose(p_tta, (p + p_flip) / 2, atol=1e-5)


def test_bad_inputs_are_one_line_errors(trained_run, tmp_path, capsys):
    assert score_job.main(["--model", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not an exported model directory" in capsys.readouterr().err
    assert score_job.main(["--model", str(trained_run / "model"), "--input", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_score_s3_in_and_out(exported_model, mura_dataset, s3_bucket):
    """Model, input split and output all on the S3 test server (a random model: this tests the storage paths)."""
    from mura_ray.storage import resolve

    fs, _ = resolve(f"s3://{s3_bucket}/x")
    local = Path(mura_dataset) / "test"
    uploads = [(f, f"in/test/{f.name}") for f in local.glob("*.parquet")]
    uploads += [(f, f"models/m/{f.name}") for f in exported_model.iterdir()]
    for f, key in uploads:
        with fs.open_output_stream(f"{s3_bucket}/{key}") as out:
            out.write(f.read_bytes())
    dest = f"s3://{s3_bucket}/scored"
    assert score_job.main(["--model", f"s3://{s3_bucket}/models/m", "--input", f"s3://{s3_bucket}/in/test",
                           "--out", dest, "--bootstrap", "0"]) == 0
    df = score_lib.read_predictions(dest)
    assert len(df) == pq.read_table(local).num_rows and df["image_id"].is_unique
    from mura_ray.storage import exists

    assert exists(f"{dest}/report/report.json") and exists(f"{dest}/manifest.json")


def test_executions_merge_chunks(monkeypatch):
    """Parquet files go to one Ray Data execution; raw images to runs bounded by RAW_IMAGES_PER_EXECUTION."""
    from mura_ray.score import Chunk, _executions

    parquet = [Chunk(parquet_files=(f"s3://b/p{i}.parquet",)) for i in range(5)]
    assert [c.parquet_files for c in _executions(iter(parquet))] == [tuple(f"s3://b/p{i}.parquet" for i in range(5))]
    monkeypatch.setattr(score_lib, "RAW_IMAGES_PER_EXECUTION", 5)
    raw = [Chunk(image_files=tuple(f"{k}/{i}.png" for i in range(3)), root="/a") for k in range(5)]
    runs = list(_executions(iter(raw)))
    assert [len(r.image_files) for r in runs] == [6, 6, 3] and all(r.root == "/a" for r in runs)
    assert sum((r.image_files for r in runs), ()) == sum((c.image_files for c in raw), ())


def test_scoring_module_leaves_torch_to_the_predictor():
    """Raw-folder read tasks and the already-scored task run functions of `mura_ray.score` in pooled Ray workers:
    importing the module must not import torch there (here: 0.9 s and 110 MiB instead of 3.1 s and 581 MiB)."""
    import subprocess
    import sys

    code = "import sys, mura_ray.score; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
