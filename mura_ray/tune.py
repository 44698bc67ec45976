"""Hyper-parameter search on Ray Tune: every trial is the training job's own TorchTrainer; ASHA stops weak trials.

The three layers Ray documents for Tune over Train V2: `run_trial` is the Tune function trainable (sampled options
→ TrainConfig → `prepare_run` / `build_trainer` → fit) whose Train workers report each epoch to Tune through
`TuneReportCallback`; `tune(cfg)` runs the Tuner (a new one, or the interrupted one found in OUT, restored), then
writes the leaderboard, exports the best trial like jobs/train.py does and compares the best trial of each backbone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
import zlib
from dataclasses import asdict, replace
from typing import Any

import ray.data
import ray.tune

from mura_ray import runtime, storage
from mura_ray.compare import write_comparison
from mura_ray.config import (
    DEMO_TRAIN_DEFAULTS,
    METRIC_MODES,
    TrainConfig,
    TuneConfig,
    UserError,
    replace_from,
)
from mura_ray.runtime import check_fits, first_line, started_local_ray, use_gpu, user_error_cause
from mura_ray.search_space import count_trials, resolve_space, to_param_space, varied_options

logger = logging.getLogger(__name__)

TRIALS_DIR = "trials"
"""OUT/trials/<trial id>/ is each trial's Train run directory (its checkpoints)."""
SEARCH_FILE = "search.json"

STOPPED_BY_ASHA = "stopped by ASHA"
STOPPED_BY_PATIENCE = "stopped by patience"


def trial_seed(seed: int, trial_id: str) -> int:
    """The training seed of trial `trial_id`: --seed plus the trial's index in the search.

    Trials seeded alike would all start from the same initial weights and see their batches in the same order, so
    the search would compare options under a single draw of that noise. The index is the counter Tune's
    BasicVariantGenerator ends a trial id with (`1a2b3_00003`), given when the trial is created and kept by a
    resumed search, so a trial keeps its seed when it is resumed and when it is exported; trial 0 trains with --seed
    itself. An id without that counter (another search algorithm) gets a seed from its hash, stable just the same.
    """
    tail = trial_id.rsplit("_", 1)[-1]
    return seed + (int(tail) if tail.isdigit() else zlib.crc32(trial_id.encode("utf-8")) % 2**31)


def trial_config(search: TuneConfig, params: dict[str, Any], *, trial_id: str, data: str | None,
                 out: str) -> TrainConfig:
    """A trial's training options: training defaults (the demo's without --data), `extra`, the sampled space,
    then what the search sets for every trial (its seed: `trial_seed`)."""
    cfg = TrainConfig()
    if search.data is None:
        cfg = replace_from(cfg, DEMO_TRAIN_DEFAULTS, source="demo defaults")
    cfg = replace_from(cfg, search.extra, source="extra training options")
    cfg = replace_from(cfg, params, source="search space")
    return replace(
        cfg, data=data, out=out, epochs=search.epochs, workers=search.workers_per_trial, gpu=search.gpu,
        cpus_per_worker=search.cpus_per_worker, demo_images=search.demo_images,
        seed=trial_seed(search.seed, trial_id), select_metric=search.metric,
    )


def trial_run_dir(out: str, trial_id: str) -> str:
    return storage.join(out, TRIALS_DIR, trial_id)


# ---------------------------------------------------------------------------------------------------- trial
def run_trial(params: dict[str, Any], *, search: TuneConfig, data: str) -> None:
    """Tune function trainable: one run of the training job with the sampled options, reporting every epoch.

    The trial's Train run directory is named by the trial id, so a trial restarted by a resumed search continues
    from its own last checkpoint.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from mura_ray.train import build_trainer, prepare_run

    # A trial runs in a Ray actor, never at a terminal: keep Ray Data's progress bars out of the search's log.
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    trial_id = ray.tune.get_context().get_trial_id()
    run = prepare_run(trial_config(search, params, trial_id=trial_id, data=data,
                                   out=trial_run_dir(search.out, trial_id)))
    build_trainer(run, callbacks=[TuneReportCallback()]).fit()


def trial_status(last: dict[str, Any], *, error: bool, max_epochs: int) -> str:
    """How a trial ended: completed, stopped by ASHA or by patience (both early), error, or unfinished."""
    if error:
        return "error"
    if not last.get("done"):
        return "unfinished"
    if int(last.get("epoch", 0)) >= max_epochs:
        return "completed"
    return STOPPED_BY_PATIENCE if last.get("stopped_early") else STOPPED_BY_ASHA


def error_line(error: BaseException | str | None) -> str:
    """The line of a trial's error that says what went wrong.

    A UserError raised in the trial or in one of its Train workers is its own message; otherwise the last line of
    Ray's report, the exception's type and message (Ray's report opens with the actor that failed and the traceback,
    so its first line says nothing about the error).
    """
    if isinstance(error, BaseException):
        cause = user_error_cause(error)
        if cause is not None:
            return first_line(cause)
    lines = [ln.strip() for ln in str(error or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


class _TrialLogger(ray.tune.Callback):
    """One log line per finished trial (Tune's own progress tables are off outside a terminal)."""

    def __init__(self, metric: str, epochs: int, total: int, varied: list[str]):
        self.metric, self.epochs, self.total, self.varied = metric, epochs, total, varied

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trials, trial, error=None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trials, trial, error=error_line(trial.get_error()))

    def _log(self, trials: list, trial: Any, error: str | None) -> None:
        finished = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        last = trial.last_result or {}
        status = trial_status({**last, "done": True}, error=error is not None, max_epochs=self.epochs)
        options = " ".join(f"{k}={_fmt_value(k, trial.config.get(k))}" for k in self.varied)
        shown = dict.fromkeys([self.metric, "val_study_kappa", "val_auc", "val_loss"])  # the search's metric first
        scores = "  ".join(f"{k} {_fmt_value(k, last[k])}" for k in shown if k in last)
        logger.info("trial %d/%d %s %s after %d/%d epochs (%.0f s): %s | %s%s", finished, self.total,
                    trial.trial_id, status,
                    int(last.get("epoch", 0)), self.epochs, float(last.get("time_total_s", 0.0)), options,
                    scores or "no epoch finished", f" | {error}" if error else "")


class _MlflowLogger(ray.tune.Callback):
    """One MLflow run per trial: its training options as params, rank 0's metrics every epoch (step = epoch).

    It runs in the search driver, where TuneReportCallback delivers rank 0's reports, so a `file://` store is
    written on the machine the user launched from; a resumed trial keeps logging into its own run.
    """

    def __init__(self, uri: str, experiment_id: str, search: TuneConfig, data: str):
        self.uri, self.experiment_id, self.search, self.data = uri, experiment_id, search, data
        self._client: Any = None
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}}  # Tune stores its callbacks with the search

    def _run_id(self, trial: Any) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(self.uri)
        if trial.trial_id not in self._runs:
            found = self._client.search_runs(
                [self.experiment_id], filter_string=f"tags.`mura_ray.trial_id` = '{trial.trial_id}'", max_results=1
            )
            if found:
                run_id = found[0].info.run_id
            else:
                run_id = self._client.create_run(
                    self.experiment_id, run_name=trial.trial_id,
                    tags={"mura_ray.trial_id": trial.trial_id, "mura_ray.search": self.search.out},
                ).info.run_id
                cfg = trial_config(self.search, trial.config, trial_id=trial.trial_id, data=self.data,
                                   out=trial_run_dir(self.search.out, trial.trial_id))
                self._client.log_batch(run_id, params=[Param(k, str(v)) for k, v in asdict(cfg).items()])
            self._runs[trial.trial_id] = run_id
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric
        from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS

        skip = {*AUTO_RESULT_KEYS, *DEBUG_METRICS, "done", "epoch"}
        step, now = int(result.get("epoch", 0)), int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]
        run_id = self._run_id(trial)
        self._client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status = trial_status({**(trial.last_result or {}), "done": True}, error=False, max_epochs=self.search.epochs)
        run_id = self._run_id(trial)
        self._client.set_tag(run_id, "mura_ray.status", status)
        self._client.set_terminated(run_id, "FINISHED" if status == "completed" else "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        self._client.set_tag(run_id, "mura_ray.status", "error")
        self._client.set_terminated(run_id, "FAILED")


def mlflow_experiment(uri: str, name: str) -> str:
    """The id of MLflow experiment `name` at `uri`, created when new; fails fast on a missing package or bad store."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError("--mlflow-uri needs MLflow: pip install 'mura_ray[mlflow]'") from None
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store unless told otherwise; giving a file-store URI is the user telling it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found else client.create_experiment(name)
    except MlflowException as e:
        raise UserError(f"--mlflow-uri {uri}: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------------- leaderboard
SCORE_COLUMNS = tuple(f"best_{metric}" for metric in METRIC_MODES)


def summarize_trial(trial_id: str, params: dict[str, Any], history: list[dict[str, Any]], *,
                    last: dict[str, Any], error: bool, max_epochs: int) -> dict[str, Any]:
    """One leaderboard row: the trial's options, its best validation scores over the epochs it ran, how it ended."""
    def best(key: str, pick: Any) -> float:
        values = [float(h[key]) for h in history if h.get(key) is not None and not math.isnan(float(h[key]))]
        return pick(values) if values else math.nan

    status = trial_status(last, error=error, max_epochs=max_epochs)
    return {
        "trial_id": trial_id, **params,
        **{f"best_{metric}": best(metric, max if mode == "max" else min) for metric, mode in METRIC_MODES.items()},
        "epochs": max((int(h.get("epoch") or 0) for h in history), default=0),
        "stopped_early": status in (STOPPED_BY_ASHA, STOPPED_BY_PATIENCE), "status": status,
        "wall_time_s": float(last.get("time_total_s", math.nan)),
    }


def rank_trials(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows sorted best first by the trial's best `metric`, numbered from 1; trials without a score come last."""
    key, sign = f"best_{metric}", (-1.0 if METRIC_MODES[metric] == "max" else 1.0)
    ordered = sorted(rows, key=lambda r: (math.isnan(r[key]), 0.0 if math.isnan(r[key]) else sign * r[key]))
    return [{"rank": i, **r} for i, r in enumerate(ordered, start=1)]


def render_leaderboard(rows: list[dict[str, Any]], columns: list[str], metric: str) -> str:
    better = "higher" if METRIC_MODES[metric] == "max" else "lower"
    lines = [
        "# Search leaderboard", "",
        f"{len(rows)} trials ranked by their best validation {metric.removeprefix('val_')} ({better} is better); "
        "scores are the best over the epochs each trial ran.", "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_fmt_value(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_leaderboard(rows: list[dict[str, Any]], out: str, *, metric: str, varied: list[str]) -> str:
    """OUT/leaderboard.csv and OUT/leaderboard.md; returns the Markdown.

    Rows carry each trial's training seed (`trial_seed`) beside its options: with them, jobs/train.py repeats the
    trial."""
    import pandas as pd

    columns = ["rank", "trial_id", *varied, "seed", *SCORE_COLUMNS, "epochs", "stopped_early", "status",
               "wall_time_s"]
    csv = pd.DataFrame(rows, columns=columns).to_csv(index=False)
    storage.write_bytes(storage.join(out, "leaderboard.csv"), csv.encode("utf-8"))
    markdown = render_leaderboard(rows, columns, metric)
    storage.write_bytes(storage.join(out, "leaderboard.md"), markdown.encode("utf-8"))
    return markdown


def _fmt_value(name: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if name in ("lr", "weight_decay"):
            return f"{value:.2e}"
        return f"{value:.0f}" if name == "wall_time_s" else f"{value:.4f}"
    return str(value)


# ---------------------------------------------------------------------------------------------------- driver
def _cannot_write(out: str, e: OSError) -> UserError:
    return UserError(f"--out {out}: cannot write there ({first_line(e)})")


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _search_record(cfg: TuneConfig, spec: dict[str, Any]) -> dict[str, Any]:
    config = {k: v for k, v in asdict(cfg).items() if k not in ("space", "ensemble_size")}  # export only
    return json.loads(json.dumps({"config": config, "space": spec}))


def _check_same_search(out: str, record: dict[str, Any]) -> None:
    """A resumed search keeps its stored settings, so refuse flags that would be silently ignored."""
    uri = storage.join(out, SEARCH_FILE)
    if not storage.exists(uri):
        return
    stored = storage.read_json(uri)
    changed = [f"--{k.replace('_', '-')} {stored['config'].get(k)!r} there, {v!r} now"
               for k, v in record["config"].items() if stored["config"].get(k) != v]
    if stored.get("space") != record["space"]:
        changed.append("the search space differs")
    if changed:
        raise UserError(f"--out {out} holds a search with other settings ({'; '.join(changed)}); run the same "
                        "command to resume it, or choose a new --out")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def export_trial(cfg: TuneConfig, trial_id: str, params: dict[str, Any], dest: str) -> dict[str, Any]:
    """Export a trial's best checkpoint by the search's metric (the epoch its leaderboard score comes from) to
    dest/model/, choose its threshold on the validation split and report on the test split in dest/report/, as
    jobs/train.py does; skipped when dest already holds this trial."""
    import ray.train

    from mura_ray.checkpoints import best_state
    from mura_ray.score import choose_model_threshold, score_test_split
    from mura_ray.train import export_best, prepare_run

    marker = storage.join(dest, "trial.json")
    if storage.exists(marker) and storage.read_json(marker).get("trial_id") == trial_id:
        logger.info("%s already holds trial %s", dest, trial_id)
        return storage.read_json(marker)["result"]
    source = trial_run_dir(cfg.out, trial_id)
    fs, path = storage.resolve(source)
    state = best_state(ray.train.Result.from_path(path, storage_filesystem=fs), cfg.metric)
    logger.info("Exporting trial %s (epoch %d) to %s", trial_id, state["epoch"] + 1, dest)
    run = prepare_run(trial_config(cfg, params, trial_id=trial_id, data=cfg.data, out=dest))
    result = export_best(run, state)
    result.update(choose_model_threshold(result["model_dir"], result["data"], dest, run.cfg.threshold_policy,
                                         run.cfg.threshold))
    if result["has_test"]:
        result["test"] = score_test_split(result["model_dir"], result["data"], dest)
        result["report_dir"] = storage.join(dest, "report")
    storage.write_json(marker, {"trial_id": trial_id, "source": source, "params": params, "result": result})
    return result


LOCK = "_lock/_lock.json"
"""The search's lock file in OUT (see `tune`)."""


def tune(cfg: TuneConfig) -> dict[str, Any]:
    """Run the search in cfg.out (or resume the one there), then leaderboard, best model and comparison.

    Writes OUT/leaderboard.{csv,md}, OUT/best/ (model/ and the test report/, as a jobs/train.py run directory),
    OUT/comparison.md (best trial of each backbone on the test split) and, for the backbones other than the
    winner's, OUT/best_per_backbone/<backbone>/.

    One search at a time writes an OUT: it holds OUT/_lock/_lock.json (`storage.OutputLock`) from before its first
    write until it returns, and a second one is refused with one line naming the first. Without it both would resume
    the same search and train the same trials into the same trial directories. The lock is in a subfolder because
    a resumed Tune search copies the .json files at the top of OUT into its staging directory and uploads them back
    at every save: a lock there would be overwritten with its stale copy (and could come back after its release).
    """
    cfg = cfg.validate()
    storage.check_in_bucket(cfg.out, "--out", "tune/NAME")
    cfg = replace(cfg, out=storage.absolute(cfg.out), data=storage.absolute(cfg.data) if cfg.data else None)
    spec = resolve_space(cfg)
    if cfg.data:
        from mura_ray.train import check_dataset

        check_dataset(cfg.data)  # before the lock and Ray: a dataset the trials cannot train on fails in a second
        if storage.overlap(cfg.data, cfg.out):  # as each trial would find
            raise UserError(f"--out {cfg.out} and --data {cfg.data} overlap (the same folder, or one inside the "
                            "other): give a search directory outside the dataset")
    experiment_id = mlflow_experiment(cfg.mlflow_uri, cfg.out) if cfg.mlflow_uri else None
    lock = storage.OutputLock(cfg.out, "jobs/tune.py", name=LOCK)
    try:  # lock.release() is a no-op when acquire() failed
        try:
            lock.acquire()
        except OSError as e:
            raise _cannot_write(cfg.out, e) from None
        return _tune_locked(cfg, spec, experiment_id, lock)
    finally:
        lock.release()


def check_search_fits(cfg: TuneConfig) -> int:
    """How many trials the cluster has room for at once (`runtime.check_fits`: none is an error on a local Ray this
    process started, a warning on an attached cluster); fewer than --max-concurrent is a warning: the rest queue.

    A trial needs --workers-per-trial GPUs (when it uses GPUs) and --workers-per-trial x --cpus-per-worker CPUs,
    and the cluster one CPU more, to read and decode images, as the training job counts it.
    """
    workers, gpu = cfg.workers_per_trial, use_gpu(cfg.gpu)
    at_once = check_fits(
        {"CPU": workers * cfg.cpus_per_worker + 1, "GPU": workers if gpu else 0},
        what=f"a trial of --workers-per-trial {workers} (x --cpus-per-worker {cfg.cpus_per_worker:g}, one CPU to "
        f"decode images{', one GPU each' if gpu else ''})",
        hint="lower --workers-per-trial, or use --gpu no" if gpu else "lower --workers-per-trial or --cpus-per-worker")
    if 0 < at_once < cfg.max_concurrent:
        logger.warning("--max-concurrent %d: the cluster has room for %d trial(s) at once; the others queue%s",
                       cfg.max_concurrent, at_once, "" if started_local_ray() else " unless an autoscaler adds nodes")
    return at_once


def _tune_locked(cfg: TuneConfig, spec: dict[str, Any], experiment_id: str | None,
                 lock: storage.OutputLock) -> dict[str, Any]:
    """`tune` once this search holds OUT's lock."""
    from mura_ray.train import resolve_data

    varied, total = varied_options(spec), count_trials(spec, cfg.num_samples)
    record = _search_record(cfg, spec)
    fs, path = storage.resolve(cfg.out)
    resuming = ray.tune.Tuner.can_restore(path, storage_filesystem=fs)
    if resuming:
        _check_same_search(cfg.out, record)

    runtime.init_ray(train_cpus=cfg.max_concurrent * cfg.workers_per_trial * cfg.cpus_per_worker)
    check_search_fits(cfg)
    if not cfg.data:
        logger.info("No --data given: searching on the built-in SYNTHETIC demo radiographs (not MURA).")
    # Resolved once here, so concurrent trials never race to build the demo set.
    data = storage.absolute(resolve_data(TrainConfig(data=cfg.data, demo_images=cfg.demo_images)))
    # The trial only drives its TorchTrainer, which reserves the workers' resources itself; a whole CPU per trial
    # would starve those workers on small clusters. Tune refuses an empty request, hence 0.01.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, search=cfg, data=data), {"cpu": 0.01})
    if resuming:
        logger.info("Resuming the search in %s: finished trials are kept, unfinished ones continue", cfg.out)
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        try:
            storage.write_json(storage.join(cfg.out, SEARCH_FILE), record)
        except OSError as e:
            raise _cannot_write(cfg.out, e) from None
        tuner = _new_tuner(cfg, spec, trainable, data=data, experiment_id=experiment_id)
    start = time.time()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        grid = tuner.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            # Tune leaves its Ctrl+C handler installed unless a signal came: restore ours so that Ctrl+C during the
            # export below stops the job instead of being swallowed.
            signal.signal(signal.SIGINT, sigint)

    lock.check()  # a search whose lock was taken over (judged dead) writes nothing more
    rows, configs, failures = _summarize_grid(grid, cfg, varied)
    markdown = write_leaderboard(rows, cfg.out, metric=cfg.metric, varied=varied)
    summary: dict[str, Any] = {"out": cfg.out, "leaderboard": rows, "leaderboard_md": markdown,
                               "resumed": resuming, "interrupted": False}
    # A finished trial's last result says done (ASHA's stops included); after Ctrl+C Tune marks the trials it cut
    # short as terminated, so their results are the only record that they are not finished. Trials the search had
    # not created yet (at most --max-concurrent are created ahead) are in no result at all: the search's trial count
    # is what says they are missing.
    unfinished = sum(r["status"] == "unfinished" for r in rows) + max(0, total - len(rows))
    if unfinished:
        logger.warning("Search interrupted with %d of %d trials unfinished (%d not started); its state is saved in %s: "
                       "run the same command again to resume it", unfinished, total, max(0, total - len(rows)),
                       cfg.out)
        return {**summary, "interrupted": True}
    logger.info("Search finished in %.0f s: %d trials, %d stopped early, %d failed", time.time() - start, len(rows),
                sum(r["stopped_early"] for r in rows), grid.num_errors)
    return {**summary, **_export_best(cfg, rows, configs, failures)}


def _new_tuner(cfg: TuneConfig, spec: dict[str, Any], trainable: Any, *, data: str,
               experiment_id: str | None) -> ray.tune.Tuner:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    total, varied = count_trials(spec, cfg.num_samples), varied_options(spec)
    logger.info("Search in %s: %d trials (%d per grid point), up to %d at a time with %d worker(s) each, %d epochs "
                "max; ASHA on %s (%s) from epoch %d, reduction factor %d", cfg.out, total, cfg.num_samples,
                cfg.max_concurrent, cfg.workers_per_trial, cfg.epochs, cfg.metric, METRIC_MODES[cfg.metric],
                cfg.grace_period, cfg.reduction_factor)
    callbacks: list[ray.tune.Callback] = [_TrialLogger(cfg.metric, cfg.epochs, total, varied)]
    if experiment_id is not None and cfg.mlflow_uri is not None:
        callbacks.append(_MlflowLogger(cfg.mlflow_uri, experiment_id, cfg, data))
    fs, path = storage.resolve(cfg.out)
    return ray.tune.Tuner(
        trainable,
        param_space=to_param_space(spec),
        tune_config=ray.tune.TuneConfig(
            metric=cfg.metric, mode=METRIC_MODES[cfg.metric], num_samples=cfg.num_samples,
            search_alg=BasicVariantGenerator(max_concurrent=cfg.max_concurrent, random_state=cfg.seed),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=cfg.grace_period,
                                    reduction_factor=cfg.reduction_factor),
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=ray.tune.RunConfig(
            name=os.path.basename(path), storage_path=os.path.dirname(path), storage_filesystem=fs,
            callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 0,
        ),
    )


def _summarize_grid(grid: Any, cfg: TuneConfig, varied: list[str]
                    ) -> tuple[list[dict[str, Any]], dict[str, Any], list[tuple[str, str]]]:
    """Ranked leaderboard rows, every trial's sampled options by trial id, and (trial id, error line) of the trials
    that failed, in the order the search created them."""
    configs: dict[str, dict[str, Any]] = {}
    rows, failures = [], []
    for result in grid:
        trial_id = os.path.basename(result.path.rstrip("/"))
        configs[trial_id] = dict(result.config)
        trial_cfg = trial_config(cfg, configs[trial_id], trial_id=trial_id, data=cfg.data,
                                 out=trial_run_dir(cfg.out, trial_id))
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        rows.append(summarize_trial(trial_id, {k: getattr(trial_cfg, k) for k in [*varied, "seed"]}, history,
                                    last=result.metrics or {}, error=result.error is not None,
                                    max_epochs=cfg.epochs))
        if result.error is not None:
            failures.append((trial_id, error_line(result.error)))
    return rank_trials(rows, cfg.metric), configs, failures


def _export_best(cfg: TuneConfig, rows: list[dict[str, Any]], configs: dict[str, Any],
                 failures: list[tuple[str, str]]) -> dict[str, Any]:
    """Export the best trial to OUT/best and compare the best trial of each backbone on the test split."""
    from ray.air.constants import EXPR_ERROR_FILE

    usable = [r for r in rows if r["epochs"] > 0]
    if not usable:
        # Usually one cause for all (data, options, resources): the first trial's error says which, in one line.
        if failures:
            trial_id, line = failures[0]
            first = (f"the first, {trial_id}: {line} (its full error: "
                     f"{storage.join(cfg.out, trial_id, EXPR_ERROR_FILE)})")
        else:
            first = f"see the log above and {cfg.out}"
        raise UserError(f"every trial of the search failed before finishing an epoch; {first}. Fix that and run the "
                        "same command again, which retries the failed trials (with other flags, give a new --out)")
    best = usable[0]
    best_dir = storage.join(cfg.out, "best")
    best_result = export_trial(cfg, best["trial_id"], configs[best["trial_id"]], best_dir)
    out: dict[str, Any] = {"best": {"trial_id": best["trial_id"], **best_result}}
    exported = {best["trial_id"]: best_dir}
    if "report_dir" in best_result:
        compared = []
        for backbone in dict.fromkeys(r["backbone"] for r in usable):
            top = next(r for r in usable if r["backbone"] == backbone)
            if top is not best:
                dest = storage.join(cfg.out, "best_per_backbone", _safe_name(backbone))
                export_trial(cfg, top["trial_id"], configs[top["trial_id"]], dest)
                exported[top["trial_id"]] = dest
            compared.append(exported[top["trial_id"]])
        write_comparison(compared, cfg.out)
        out["comparison"] = storage.join(cfg.out, "comparison.md")
    else:
        logger.info("The dataset has no test split: no test report and no comparison across backbones")
    if cfg.ensemble_size > 1 and len(usable) > 1:
        out["ensemble"] = export_ensemble(cfg, usable[:cfg.ensemble_size], configs, exported)
    return out


def export_ensemble(cfg: TuneConfig, top: list[dict[str, Any]], configs: dict[str, Any],
                    exported: dict[str, str]) -> dict[str, Any]:
    """Export the `top` trials (leaderboard rows, best first) as one ensemble in OUT/ensemble/, as a training run
    directory: model/ (`exported.write_ensemble`), its threshold chosen on the validation split like a single model's,
    and, where the dataset has a test split, report/ and comparison.md with the ensemble beside each member.
    Members not yet exported (as the best trial or a backbone's best) are exported to OUT/top/<trial>/ first.
    Skipped when OUT/ensemble already holds these trials."""
    from mura_ray.exported import write_ensemble
    from mura_ray.score import choose_model_threshold, score_test_split

    dest = storage.join(cfg.out, "ensemble")
    trial_ids = [r["trial_id"] for r in top]
    marker = storage.join(dest, "trial.json")
    if storage.exists(marker) and storage.read_json(marker).get("trial_ids") == trial_ids:
        logger.info("%s already holds the ensemble of %s", dest, ", ".join(trial_ids))
        return storage.read_json(marker)["result"]
    members, results = [], []
    for trial_id in trial_ids:
        run_dir = exported.get(trial_id) or storage.join(cfg.out, "top", _safe_name(trial_id))
        results.append(export_trial(cfg, trial_id, configs[trial_id], run_dir))
        members.append(run_dir)
    trials = [trial_config(cfg, configs[t], trial_id=t, data=cfg.data, out=d) for t, d in zip(trial_ids, members,
                                                                                              strict=True)]
    tta = all(t.tta for t in trials)
    model_dir = storage.join(dest, "model")
    storage.clear_dir(dest)
    logger.info("Exporting the ensemble of the top %d trials (%s) to %s", len(top), ", ".join(trial_ids), dest)
    card = {
        "backbone": "ensemble(" + "+".join(t.backbone for t in trials) + ")",
        "trials": [{"trial_id": r["trial_id"], "backbone": r["backbone"], cfg.metric: r.get(cfg.metric),
                    "model_id": storage.read_json(storage.join(d, "model", "model_card.json"))["model_id"]}
                   for r, d in zip(top, members, strict=True)],
        "selected_by": cfg.metric, "selected_with_tta": tta,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_ensemble([storage.join(d, "model") for d in members], model_dir, card, tta=tta)
    data = results[0]["data"]
    result: dict[str, Any] = {"run_dir": dest, "model_dir": model_dir, "trial_ids": trial_ids}
    result.update(choose_model_threshold(model_dir, data, dest, trials[0].threshold_policy, trials[0].threshold))
    if all(r.get("has_test") for r in results):
        result["test"] = score_test_split(model_dir, data, dest)
        result["report_dir"] = storage.join(dest, "report")
        write_comparison([dest, *members], dest)
        result["comparison"] = storage.join(dest, "comparison.md")
    storage.write_json(marker, {"trial_ids": trial_ids, "result": result})
    return result
