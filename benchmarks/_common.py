"""Shared benchmark plumbing: the cached synthetic dataset, a private local Ray, medians and the JSON result line.

Each benchmark prints exactly one JSON line on stdout (its last line); progress goes to stderr through logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

# Bind a local Ray to 127.0.0.1; Ray reads this when it is imported, so it is set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# On a loaded machine Ray's dashboard agent can take over the default 30 s to start, and the raylet then aborts.
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

logger = logging.getLogger("benchmarks")

DATASET_SEED = 0


def cores() -> int:
    """CPU cores this process may run on (what both sides of every comparison get)."""
    return len(os.sched_getaffinity(0))


def load_1m() -> float:
    """The 1-minute load average, recorded with every measurement (other work on the machine skews it)."""
    return round(os.getloadavg()[0], 2)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def cache_dir(explicit: str | None) -> pathlib.Path:
    """`--cache`, else $MURA_RAY_CACHE/benchmarks, else ~/.cache/mura_ray/benchmarks."""
    if explicit:
        return pathlib.Path(explicit)
    base = os.environ.get("MURA_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mura_ray")
    return pathlib.Path(base) / "benchmarks"


def add_dataset_args(p: argparse.ArgumentParser, default_source_size: int = 256) -> None:
    """The synthetic dataset options shared by the benchmarks that read an ingested split (one cached set)."""
    p.add_argument("--images", type=int, default=1200, help="synthetic images generated (train split ~68%%)")
    p.add_argument("--source-size", type=int, default=default_source_size,
                   help="side of the generated PNGs in pixels")
    p.add_argument("--cache", default=None, help="dataset cache (default ~/.cache/mura_ray/benchmarks)")


def synthetic_dataset(cache: pathlib.Path, n_images: int, source_size: int, *, archive: bool = False) -> str:
    """An ingested synthetic MURA set (generate_mura + the real ingest), built once per size and cached.

    `archive`: the set as a nightly scoring run meets it: every image an 8-bit grayscale PNG (MURA's RGB and
    16-bit files re-saved through `images.decode_radiograph`), ingested as `--source images`, so that the whole
    set is one unlabelled split, `test`.

    A Ray is started for the ingest only when the set is not cached yet, and stopped again, so that a benchmark's
    plain-PyTorch side never runs beside an idle Ray.
    """
    from mura_ray.config import IngestConfig
    from mura_ray.data.ingest import LAYOUT_VERSION, ingest

    kind = "archive-grey8" if archive else "mura"
    out = cache / f"{kind}-n{n_images}-px{source_size}-seed{DATASET_SEED}-layout{LAYOUT_VERSION}-parquet"
    if (out / "ingest_summary.json").is_file():
        return str(out)
    from mura_ray.data.synthetic import generate_mura

    cache.mkdir(parents=True, exist_ok=True)
    root = pathlib.Path(tempfile.mkdtemp(prefix=".mura-", dir=cache))
    started = time.perf_counter()
    try:
        tree = generate_mura(root, n_images=n_images, image_size=source_size, seed=DATASET_SEED, workers=cores())
        if archive:
            _as_grey8(tree)
        with local_ray(4):
            ingest(IngestConfig(source="images" if archive else "mura", root=str(tree if archive else root),
                                out=str(out), overwrite=True))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    logger.info("Built and ingested %d synthetic images into %s in %.0f s", n_images, out,
                time.perf_counter() - started)
    return str(out)


def _as_grey8(tree: pathlib.Path) -> None:
    """Re-save every PNG under `tree` that is not 8-bit grayscale as one, through the decoding every job uses."""
    from PIL import Image

    from mura_ray.data.images import decode_radiograph

    for path in tree.rglob("*.png"):
        with Image.open(path) as img:
            if img.mode == "L":
                continue
        Image.fromarray(decode_radiograph(path.read_bytes())).save(path)


def export_random_model(out: str, backbone: str, image_size: int) -> str:
    """A randomly initialised model exported like training exports one."""
    import torch

    from mura_ray.exported import ModelSpec
    from mura_ray.models import build_model, export_model, trunk_normalization

    torch.manual_seed(0)
    model = build_model(backbone).eval()
    mean, std = trunk_normalization(model.trunk)
    export_model(model, ModelSpec(backbone=backbone, image_size=image_size, mean=mean, std=std), out,
                 card={"note": "random weights, for benchmarks only"})
    return out


class local_ray:  # noqa: N801 - used like a function: `with local_ray(4):`
    """A private local Ray for one benchmark: more logical CPUs than cores (or Train and Data deadlock),
    127.0.0.1, its own short temp dir (removed after), no dashboard. Never touches other clusters."""

    def __init__(self, num_cpus: int):
        self.num_cpus = num_cpus
        self.temp_dir = ""

    def __enter__(self) -> local_ray:
        import ray

        from mura_ray.runtime import local_ray_environment

        os.environ.pop("RAY_ADDRESS", None)
        local_ray_environment()  # the jobs' local Ray settings: measure what they run
        self.temp_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")
        for attempt in range(1, 4):
            try:
                ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, _temp_dir=self.temp_dir,
                         _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
                break
            except Exception as e:  # Ray raises a bare Exception when its raylet misses a fixed 30 s start deadline
                if "timed out during startup" not in str(e) or attempt == 3:
                    shutil.rmtree(self.temp_dir, ignore_errors=True)
                    raise
                logger.warning("Ray did not start in time (machine load %.1f); retrying", load_1m())
                ray.shutdown()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        ray.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "ray.data", "ray.train", "timm", "filelock", "mura_ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def emit(result: dict[str, Any]) -> None:
    """The benchmark's result: one JSON line, the last line on stdout."""
    print(json.dumps(result, sort_keys=False), flush=True)
