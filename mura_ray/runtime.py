"""Ray start-up and job plumbing shared by the entry points: attach or start Ray, quiet logs, one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable

from mura_ray.config import UserError

logger = logging.getLogger("mura_ray")


def setup_logging(level: int = logging.INFO) -> None:
    """Plain one-line log records for people following a job; libraries' chatter kept at warnings."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray.data", "ray.train", "ray.tune", "timm", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_ray(num_cpus: int | None = None) -> None:
    """Attach to the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local Ray.

    A local Ray gets at least 4 logical CPUs: on a 2-core laptop one Train worker plus one decode stage would
    otherwise take every CPU and the Parquet reads would never be scheduled.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Keep idle workers a while: restarting a Python worker per Ray Data task dominates on small machines.
        os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")
        # Worker groups can take more than Train's default 60 s to start on a busy laptop.
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        # Name this Ray's API server: Train's placement-group cleaner and Tune use the State API, which cannot
        # choose between several Ray instances on one machine and would leak the CPUs of stopped trials.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_port=port, log_to_driver=True,
                 _node_ip_address="127.0.0.1")
    ctx = ray.data.DataContext.get_current()
    if not sys.stderr.isatty():
        # Progress bars are for terminals; in `ray job` logs and CI they are walls of carriage returns.
        ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for noisy in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(fn: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
             argv: list[str] | None) -> int:
    """Parse argv and run `fn`; a UserError becomes one `error:` line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return int(fn(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
