"""Ray start-up and job plumbing shared by the entry points: attach or start Ray, quiet logs, one-line errors, an
orderly exit on SIGTERM."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

from mura_ray import storage
from mura_ray.config import UserError

logger = logging.getLogger("mura_ray")

LOG_FORMAT, LOG_DATEFMT = "%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"


class _DropRoutineCleanup(logging.Filter):
    """Ray Train's placement-group cleaner warns whenever a Train controller ends before its placement group is
    removed, which is how every Tune trial of Train V2 ends: routine there, and a dead run is reported anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Detected that the Ray Train controller actor")


_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def _quiet_libraries() -> None:
    """Libraries' chatter kept at warnings (Ray Data's progress-bar notice, a warning itself, hidden too)."""
    for noisy in ("ray.data", "ray.train", "ray.tune", "timm", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    cleaner = logging.getLogger(_CLEANER_LOGGER)
    if not any(isinstance(f, _DropRoutineCleanup) for f in cleaner.filters):
        cleaner.addFilter(_DropRoutineCleanup())


def setup_logging(level: int = logging.INFO) -> None:
    """Plain one-line log records for people following a job; libraries' chatter kept at warnings."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATEFMT)
    _quiet_libraries()


def quiet_worker_logs() -> None:
    """Ray `worker_process_setup_hook`: the same log policy in every Ray worker process as on the driver.

    Ray Train's controller runs the per-epoch callback, so mura_ray's own INFO lines get a handler there (Ray
    forwards them to the driver's log); Ray Data's per-execution summaries ("Dataset ... execution finished"),
    Train's "Reporting training result" records and the progress-bar notice stay in the session's log files.
    """
    import ray.data  # noqa: F401 - configures the ray.data logger; adjusted below, after that

    own = logging.getLogger("mura_ray")
    if not own.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt=LOG_DATEFMT))
        own.addHandler(handler)
        own.setLevel(logging.INFO)
        own.propagate = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console one; the session log file keeps everything
            handler.setLevel(logging.WARNING)
    _quiet_libraries()
    # Ray Train's execution context names its logger by file path (`getLogger(__file__)`), outside "ray.train",
    # so RunConfig's LoggingConfig does not reach its per-report INFO record.
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*exclude_resources.*is deprecated")


WORKER_SETUP_HOOK = "mura_ray.runtime.quiet_worker_logs"


def local_ray_environment() -> None:
    """Settings a local Ray must start with (environment defaults; an explicit setting wins). Benchmarks use it too,
    so that they measure what the jobs run."""
    # Keep idle workers a while: Ray kills idle workers beyond one per CPU after 1 s, so every epoch's validation
    # (and every Tune trial, every job) would start (and import into) fresh Python workers for its decode tasks,
    # seconds each on a small machine.
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")
    # Worker groups can take more than Train's default 60 s to start on a busy laptop.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


_started_local = False


def started_local_ray() -> bool:
    """Whether this process started its own local Ray (which no autoscaler will ever grow)."""
    return _started_local


def init_ray(num_cpus: int | None = None, *, train_cpus: float = 0.0, train: bool = True) -> None:
    """Attach to the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local Ray.

    A local Ray gets at least 4 logical CPUs, and 2 more than the Train workers reserve (`train_cpus`): on a
    2-core laptop the Train workers would otherwise take every CPU and the Parquet reads and decode tasks that
    feed them would never be scheduled.

    `train` (Ray Train or Tune will run) sets `quiet_worker_logs` as every worker's setup hook and starts a local
    Ray's dashboard (its State API). A job without Train goes without both: a worker with a setup hook cannot be
    one of the workers Ray starts ahead of time, so every task and actor waited for a worker of its own (1.6-1.9 s
    against 0.2 s, measured on 2 cores), and the dashboard adds about a second to a local Ray's start.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = os.environ.get("RAY_ADDRESS")
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK} if train else None
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        local_ray_environment()
        cpus = num_cpus or max(4, os.cpu_count() or 1, math.ceil(train_cpus) + 2)
        # Name this Ray's API server: Train's placement-group cleaner and Tune use the State API, which cannot
        # choose between several Ray instances on one machine and would leak the CPUs of stopped trials.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=cpus, include_dashboard=train, dashboard_port=port, log_to_driver=True,
                 _node_ip_address="127.0.0.1", runtime_env=runtime_env)
        global _started_local
        _started_local = True
    if _sigterm_held and threading.current_thread() is threading.main_thread():
        # ray.init sets a SIGTERM handler of its own (`sys.exit(15)`; for a Ray it starts, a drain of the node,
        # then exit code 1): take SIGTERM back, and put Ray's back when run_main returns. During ray.init, Ray's
        # handler unwinds the job as well (`finally:` blocks run), only without the one-line message and code 143.
        global _sigterm_previous
        _sigterm_previous = signal.signal(signal.SIGTERM, _on_sigterm)
    ctx = ray.data.DataContext.get_current()
    if not sys.stderr.isatty():
        # Progress bars are for terminals; in `ray job` logs and CI they are walls of carriage returns.
        ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    _quiet_libraries()


def use_gpu(mode: str) -> bool:
    """A job's `--gpu`: `yes`, `no`, or `auto` (when the cluster has a GPU now)."""
    import ray

    return mode == "yes" or (mode == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)


def check_fits(unit: dict[str, float], *, what: str, hint: str) -> int:
    """How many `unit`s (a resource request such as `{"CPU": 3, "GPU": 2}`) the cluster holds at once.

    When none fits, Ray waits for the resources without end: on a local Ray this process started, which no
    autoscaler grows, that is a UserError naming `what` needs what and `hint`; on an attached cluster a warning
    (an autoscaler may add the nodes), and 0.
    """
    import ray

    have = ray.cluster_resources()
    wanted = {k: v for k, v in unit.items() if v > 0}
    fit = min((math.floor(have.get(k, 0) / v + 1e-9) for k, v in wanted.items()), default=0)
    if fit >= 1:
        return fit
    short = [k for k, v in wanted.items() if have.get(k, 0) < v]
    message = (f"{what} needs {', '.join(f'{wanted[k]:g} {k}' for k in short)}, the cluster has "
               f"{', '.join(f'{have.get(k, 0):g} {k}' for k in short)} ({hint})")
    if started_local_ray():
        raise UserError(message)
    logger.warning("The cluster cannot place this yet: %s. It waits for an autoscaler to add nodes.", message)
    return 0


def first_line(e: BaseException) -> str:
    """An exception's message as one line (its type's name when it has none); S3 refusing a request for its
    credentials or permissions, or not answering at all, says so and what to check (`storage.s3_problem`)."""
    return storage.s3_problem(e) or (str(e).strip().splitlines() or [type(e).__name__])[0]


def storage_error_line(exc: BaseException) -> str | None:
    """The `error:` line's text for S3 refusing a request for its credentials or permissions, or an endpoint that
    cannot be reached, naming the location (`s3://bucket/key: access denied (...): ...`), also when raised in a Ray
    task (`RayTaskError.cause`); None for any other error."""
    for e in (getattr(exc, "cause", None), exc.__cause__, exc):
        line = storage.s3_problem(e) if e is not None else None
        if line is not None:
            where = storage.s3_location(e)
            return f"{where}: {line}" if where else line
    return None


def user_error_cause(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, also when raised in a Ray task or Train worker and re-raised by Ray.

    Ray wraps a remote error (`RayTaskError`, an instance of its cause's class too) and Ray Train wraps worker
    and controller errors in `TrainingFailedError` (`worker_failures`, `controller_failure`).
    """
    stack: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            inner = getattr(e, "cause", None)  # a RayTaskError prints Ray's wrapper; its cause, the message
            return inner if isinstance(inner, UserError) else e
        stack.extend(getattr(e, "worker_failures", {}).values())
        stack += [getattr(e, "controller_failure", None), getattr(e, "cause", None), e.__cause__]
    return None


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread by the handler `run_main` installs: the job unwinds as it does after
    Ctrl+C (`finally:` blocks run, so an output lock is released) and exits with 128 + the signal's number, as a
    shell reports a process killed by it. A SystemExit: `except Exception` clauses let it pass, and raised where
    nothing catches it, it still ends the process with that code and no traceback."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


_terminating: int | None = None
"""The signal being handled, once SIGTERM came (repeats are ignored while the job unwinds)."""
_sigterm_held = False
"""`run_main` has SIGTERM (it is taken back after ray.init); `_sigterm_previous` is put back when it returns."""
_sigterm_previous: Any = None


def _on_sigterm(signum: int, frame: Any) -> None:
    global _terminating
    if _terminating is not None:
        return  # a repeat while the first unwinds: let the clean-up (releasing a lock) finish; SIGKILL still kills
    _terminating = signum
    raise Terminated(signum)


def _hold_sigterm() -> None:
    """SIGTERM (`ray job stop`, `kill`, `timeout`, a container being stopped) becomes `Terminated` in the main
    thread. Python's default action ends the process at once, without running `finally:` blocks: the lock of
    the output being written would stay, and refuse the next run until it goes stale. ray.init sets a handler that
    unwinds (see `init_ray`), but only from then on, after a job has taken its lock (on S3: written, then settled
    for seconds), and it exits with code 15, or 1 after draining a local node, without a word. Signal handlers can
    only be set from the main thread; elsewhere (a job run from a thread) SIGTERM keeps its handler."""
    global _sigterm_held, _sigterm_previous, _terminating
    if threading.current_thread() is threading.main_thread():
        _terminating = None
        _sigterm_previous = signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_held = True


def _release_sigterm() -> None:
    global _sigterm_held
    if _sigterm_held:
        _sigterm_held = False
        # None: a handler not set from Python; SIG_DFL is what such a process has for SIGTERM.
        signal.signal(signal.SIGTERM, _sigterm_previous if _sigterm_previous is not None else signal.SIG_DFL)


def _interrupted(signum: int, rerun: str) -> int:
    """The one line of a job stopped by a signal, and its exit code (128 + the signal's number, as shells do)."""
    name = "SIGINT (Ctrl+C)" if signum == signal.SIGINT else signal.Signals(signum).name
    print(f"interrupted by {name}" + (f"; {rerun}" if rerun else ""), file=sys.stderr)
    return 128 + signum


def run_main(fn: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
             argv: list[str] | None, *, rerun: str = "") -> int:
    """Parse argv and run `fn`; a UserError (also one raised remotely, see `user_error_cause`), and S3 refusing
    the credentials or access or not answering (`storage_error_line`), become one `error:` line on stderr and exit
    code 2.

    SIGTERM and SIGINT (Ctrl+C) stop `fn` by an exception in the main thread (`Terminated`, KeyboardInterrupt),
    so its `finally:` blocks run, and end in one `interrupted by ...` line on stderr, followed by `rerun` (what a
    run of the same command again does), and exit code 143 or 130.
    """
    args = parser.parse_args(argv)
    setup_logging()
    _hold_sigterm()
    try:
        return int(fn(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        return _interrupted(e.signum, rerun)
    except Exception as e:
        cause = user_error_cause(e)
        if cause is not None:
            print(f"error: {first_line(cause)}", file=sys.stderr)
            return 2
        denied = storage_error_line(e)  # a storage check that no job step turned into a UserError of its own
        if denied is not None:
            print(f"error: {denied}", file=sys.stderr)
            return 2
        if _terminating is not None:  # a failure while unwinding from SIGTERM (a library turned it into another)
            return _interrupted(_terminating, rerun)
        raise
    except KeyboardInterrupt:
        return _interrupted(signal.SIGINT, rerun)
    finally:
        _release_sigterm()
