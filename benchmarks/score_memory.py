"""Scoring driver memory: peak RSS of the `jobs/score.py` driver process scoring N and then 4N raw images.

Bulk scoring of an archive must not hold per-image state on the driver beyond 8 bytes an image (the keys of the ids
this run committed, checked so that no id is committed twice): raw paths are listed at most 200,000 ahead, the
already-scored set lives in a Ray task, predictions stream through the driver and are committed chunk by chunk
(the sizes here stay below the listing bound). Each
size runs `jobs/score.py` in a fresh process (its own local Ray) with the same chunk size, so 4N images means 4x
the chunks; a thread samples the driver's resident memory (the driver only, not the Ray workers). Prints one JSON
line with both peaks and their ratio (target: no growth beyond noise, ratio close to 1).

    .venv/bin/python benchmarks/score_memory.py
    .venv/bin/python benchmarks/score_memory.py --images 200 --chunk-size 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, export_random_model, load_1m, setup_logging

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("benchmarks.score_memory")

# Runs in the child: score through the job's own entry point while a thread samples this process's RSS.
_CHILD = r"""
import json, os, sys, threading, time
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import psutil
sys.path.insert(0, sys.argv[1])
import score as score_job

proc, peak, done = psutil.Process(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
started = time.perf_counter()
rc = score_job.main(sys.argv[3:])
done.set()
print(json.dumps({"rc": rc, "peak_rss_mb": peak[0] / 2**20, "seconds": time.perf_counter() - started}),
      file=open(sys.argv[2], "w"))
"""


def make_archive(root: Path, n: int) -> Path:
    """n small PNG radiographs in study folders, like a nightly archive drop."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"XR_WRIST/patient{i // 6:05d}/study1"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(folder / f"image{i % 6}.png")
    return root


def run_score(model: Path, archive: Path, out: Path, chunk_size: int, workdir: Path) -> dict:
    result_file = workdir / f"result-{archive.name}.json"
    argv = ["--model", str(model), "--input", str(archive), "--out", str(out), "--chunk-size", str(chunk_size),
            "--gpu", "no"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(REPO / "jobs"), str(result_file), *argv], env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"scoring failed:\n{proc.stderr[-3000:]}")
    result = json.loads(result_file.read_text())
    if result["rc"] != 0:
        raise RuntimeError(f"jobs/score.py exited {result['rc']}:\n{proc.stderr[-3000:]}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="N; the second run scores 4N")
    p.add_argument("--chunk-size", type=int, default=250, help="jobs/score.py --chunk-size for both runs")
    args = p.parse_args(argv)
    setup_logging()
    started, load_start = time.perf_counter(), load_1m()
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="bench-score-memory-") as tmp:
        work = Path(tmp)
        model = Path(export_random_model(str(work / "model"), "custom_cnn", 32))
        for n in (args.images, 4 * args.images):
            archive = make_archive(work / f"archive-{n}", n)
            sizes[n] = run_score(model, archive, work / f"scored-{n}", args.chunk_size, work)
            logger.info("%d images: driver peak RSS %.0f MiB, %.0f s", n, sizes[n]["peak_rss_mb"],
                        sizes[n]["seconds"])
    small, large = sizes[args.images], sizes[4 * args.images]
    emit({
        "name": "score_memory",
        "images": [args.images, 4 * args.images],
        "chunks": [-(-args.images // args.chunk_size), -(-4 * args.images // args.chunk_size)],
        "driver_peak_rss_mb": [round(small["peak_rss_mb"], 1), round(large["peak_rss_mb"], 1)],
        "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "seconds": [round(small["seconds"], 1), round(large["seconds"], 1)],
        "load_1m_start": load_start, "load_1m_end": load_1m(),
        "total_seconds": round(time.perf_counter() - started, 1),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
