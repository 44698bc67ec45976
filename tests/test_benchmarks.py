"""Smoke tests of benchmarks/: each runs end to end with its smallest settings and ends with its JSON result line.

Not timed. The Ray benchmarks start their own local Ray, so they run in a subprocess, never beside the session's.
"""

from __future__ import annotations

import json
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
    for key in ("ours_images_per_s", "baseline_images_per_s", "ratio", "stall_share", "baseline_stall_share"):
        assert isinstance(result[key], float) and result[key] >= 0, key
    assert result["ratio"] == pytest.approx(result["ours_images_per_s"] / result["baseline_images_per_s"], rel=1e-2)
    assert 0 <= result["stall_share"] <= 1
    assert result["images_per_epoch"] > 0
    for side in ("ours", "baseline"):  # input: a warm-up epoch + 1 measured; train: warm-up steps, 1 measured epoch
        assert len(result[side]["input"]["epochs"]) == 2, side
        assert len(result[side]["train"]["epochs"]) == 1, side
    # Ours cuts each phase's epochs from one stream as training does: each epoch ends with the batch that brings
    # the rows delivered to n passes' worth.
    rows = result["ours"]["rows_per_worker"]
    for phase in ("input", "train"):
        delivered = 0
        for n, e in enumerate(result["ours"][phase]["epochs"], 1):
            delivered += e["images"]
            assert n * rows <= delivered < n * rows + 8, (phase, rows, result["ours"][phase]["epochs"])


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
