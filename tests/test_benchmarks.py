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


@pytest.mark.slow
def test_score_benchmark(cache):
    result = _run("score.py", "--images", "60", "--source-size", "48", "--image-size", "32", "--batch-size", "16",
                  "--repeats", "1", "--concurrency", "1", "--baseline-threads", "1",
                  "--cache", cache)
    assert result["name"] == "score"
    for key in ("ours_images_per_s", "baseline_images_per_s", "ratio"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["images"] > 0


def test_report_benchmark():
    result = _run("report.py", "--sizes", "2000", "--bootstrap", "10")
    assert result["name"] == "report"
    assert result["cores"] == 1
    assert set(result["report_s"]) == {"2000"} and result["report_s"]["2000"] > 0
    assert result["sizes"]["2000"]["n_images"] > 1900
