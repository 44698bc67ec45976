"""Smoke tests of benchmarks/: each runs end to end with its smallest settings and ends with its JSON result line.

Not timed. The Ray benchmarks start their own local Ray, so they run in a subprocess, never beside the session's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing on stdout; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One tiny cached dataset shared by the Ray benchmarks (generated and ingested by the first)."""
    return str(tmp_path_factory.mktemp("bench-cache"))


@pytest.mark.slow
def test_input_pipeline_benchmark(cache):
    result = _run("input_pipeline.py", "--images", "60", "--source-size", "48", "--image-size", "32",
                  "--batch-size", "8", "--input-epochs", "1", "--train-epochs", "1", "--cache", cache)
    assert result["name"] == "input_pipeline"
    for key in ("ours_images_per_s", "baseline_images_per_s", "ratio", "same_input_images_per_s",
                "ratio_same_input", "stall_share", "baseline_stall_share", "cache_build_images_per_s",
                "plain_build_images_per_s"):
        assert isinstance(result[key], float) and result[key] >= 0, key
    assert result["ratio"] == pytest.approx(result["ours_images_per_s"] / result["baseline_images_per_s"], rel=1e-2)
    assert result["ratio_same_input"] == pytest.approx(
        result["ours_images_per_s"] / result["same_input_images_per_s"], rel=1e-2)
    assert (result["source_px"], result["image_size"], result["consumer_images_per_s"]) == (48, 32, 1000)
    assert 0 <= result["stall_share"] <= 1
    assert result["images_per_epoch"] > 0 and result["cache_errors"] == 0
    for side in ("ours", "baseline", "same_input"):  # input: a warm-up epoch + 1 measured; train: 1 measured epoch
        assert len(result[side]["input"]["epochs"]) == 2, side
        assert len(result[side]["train"]["epochs"]) == 1, side
    # Ours cuts each phase's epochs from one stream as training does: at exact rows, a pass's worth each.
    rows = result["ours"]["rows_per_worker"]
    for phase in ("input", "train"):
        assert [e["images"] for e in result["ours"][phase]["epochs"]] == [rows] * len(result["ours"][phase]["epochs"])


@pytest.mark.slow
def test_score_benchmark(cache):
    """Both sides run as their own processes (the job through jobs/score.py) and scored the same images with the same
    probabilities (the benchmark checks that before it prints)."""
    result = _run("score.py", "--images", "40", "--source-size", "48", "--backbone", "custom_cnn", "--image-size",
                  "32", "--batch-size", "8", "--repeats", "1", "--concurrency", "1", "--loader-workers", "1",
                  "--baseline-threads", "1", "--cache", cache)
    assert list(result) == ["name", "images", "ours_images_per_s", "baseline_images_per_s", "ratio",
                            "ours_steady_images_per_s", "baseline_steady_images_per_s", "steady_ratio",
                            "ours_first_prediction_s", "baseline_first_prediction_s"]
    assert result["name"] == "score" and result["images"] >= 40
    for key in list(result)[2:]:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["ours_images_per_s"] / result["baseline_images_per_s"], rel=1e-2)
    assert result["steady_ratio"] == pytest.approx(
        result["ours_steady_images_per_s"] / result["baseline_steady_images_per_s"], rel=1e-2)


def test_report_benchmark():
    result = _run("report.py", "--sizes", "2000", "--bootstrap", "10")
    assert result["name"] == "report"
    assert result["cores"] == 1
    assert set(result["report_s"]) == {"2000"} and result["report_s"]["2000"] > 0
    assert result["sizes"]["2000"]["n_images"] > 1900


def test_dicom_decode_benchmark():
    result = _run("dicom_decode.py", "--files", "1", "--side", "64", "--image-size", "32", "--rounds", "1")
    assert result["name"] == "dicom_decode" and result["cores"] == 1
    for syntax in ("uncompressed", "jpeg2000"):
        assert result[syntax]["ours_img_per_cpu_s"] > 0 and result[syntax]["baseline_img_per_cpu_s"] > 0


def test_gpu_check_smoke_on_cpu(tmp_path):
    """The GPU check (benchmarks/gpu_check.py, for a GPU machine) runs its every section on CPU:
    training steps in float32 and under (bfloat16) autocast from the same weights, scoring, decode, all-reduce."""
    result = _run("gpu_check.py", "--device", "cpu", "--backbones", "custom_cnn", "--image-size", "32",
                  "--batch-size", "4", "--score-batch-size", "8", "--warmup", "1", "--steps", "2",
                  "--decode-images", "4", "--source-size", "64", "--all-reduce-mb", "1", "--out", str(tmp_path))
    assert result["name"] == "gpu_check"
    train, score = result["backbones"]["custom_cnn"]["train"], result["backbones"]["custom_cnn"]["score"]
    for mode in ("float32", "amp"):
        assert train[mode]["images_per_s"] > 0 and train[mode]["losses_finite"], mode
        assert score[mode]["images_per_s"] > 0, mode
    assert train["first_loss_relative_difference"] < 0.05  # bfloat16 rounding, not another model or batch
    assert result["decode"]["failed"] == 0 and result["decode"]["score_images_per_s_per_core"] > 0
    assert result["all_reduce"]["sum_correct"] and result["all_reduce"]["processes"] == 2
    assert result["resume"]["ok"] and result["resume"]["optimizer_state_devices"] == ["cpu"]
    assert "| custom_cnn |" in (tmp_path / "gpu_check.md").read_text()
    assert json.loads((tmp_path / "gpu_check.json").read_text())["backbones"].keys() == {"custom_cnn"}


def test_gpu_check_without_a_gpu_is_a_one_line_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no CUDA device visible"), proc.stderr


@pytest.mark.slow
def test_selection_benchmark(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "selection.py"), "--seeds", "0", "--epochs", "2", "--demo-images", "300"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "MURA_RAY_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-4000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["name"] == "selection" and line["seeds"] == [0]
    picks = line["per_seed"]["0"]
    assert set(picks) == {"val_study_kappa", "val_auc"}
    for pick in picks.values():
        assert pick["epoch"] in (1, 2) and 0 <= pick["test_study_auc"] <= 1
    assert len(line["study_minus_image_selection_kappa"]) == 1


@pytest.mark.slow
def test_score_dicom_benchmark():
    result = _run("score_dicom.py", "--images", "12", "--source-size", "96", "--image-size", "32", "--backbone",
                  "custom_cnn", "--repeats", "1", "--concurrency", "1")
    assert result["name"] == "score_dicom" and result["images"] == 12
    for key in ("dicom_images_per_s", "png_images_per_s", "ratio"):
        assert isinstance(result[key], float) and result[key] > 0, key
