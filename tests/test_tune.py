"""Ray Tune search: the space grammar, ranking, and one tiny end-to-end search through the real CLI (ASHA early
stopping, leaderboard, exported best model and report, comparison, MLflow, resume by re-running the command)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from mura_ray import storage
from mura_ray.config import TuneConfig, UserError
from mura_ray.search_space import DEFAULT_SPACE, count_trials, load_space, resolve_space, to_param_space, varied_options
from mura_ray.tune import (
    STOPPED_BY_ASHA,
    check_search_fits,
    rank_trials,
    summarize_trial,
    trial_config,
    trial_seed,
)


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _ingested(folder) -> str:
    """A folder that passes the search's --data check (an ingest summary with labelled train and val splits) for
    tests that stop before any trial reads it."""
    from mura_ray.data.ingest import LAYOUT_VERSION, SUMMARY_FILE

    folder.mkdir(parents=True, exist_ok=True)
    split = {"images": 8, "positive_rate": 0.5}
    (folder / SUMMARY_FILE).write_text(json.dumps({"splits": {"train": split, "val": split},
                                                   "layout_version": LAYOUT_VERSION}))
    return str(folder)


def _release_leftover_placement_groups() -> None:
    """Remove the placement groups that trials cut short leave reserved when several Ray instances share a machine.

    Ray Train's PlacementGroupCleaner checks its controller through the State API, whose address auto-detection
    gives up when it finds several Ray instances (a shared dev box or CI host); the placement groups of trials that
    ASHA stopped or Ctrl+C interrupted then stay reserved and the next search starves. Between searches nothing
    holds one, so leftovers are removed.
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    for pg_id, info in placement_group_table().items():
        if info["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))


@pytest.fixture
def search_cluster(ray_cluster):
    yield ray_cluster
    _release_leftover_placement_groups()


def test_shipped_space_loads_and_covers_the_issue():
    spec = load_space(DEFAULT_SPACE)
    for name in ("backbone", "lr", "batch_size", "dropout", "body_part_weight", "freeze", "image_size", "multitask",
                 "loss"):
        assert name in spec
    assert spec["backbone"] == {"grid": ["custom_cnn", "resnet50", "densenet169", "efficientnet_b0"]}
    assert count_trials(spec, 2) == 8


def test_space_grammar(tmp_path):
    space = _write(tmp_path / "s.yaml", (
        "lr: {loguniform: [1e-4, 3e-3]}\n"  # YAML 1.1 reads these as strings; they are numbers here
        "dropout: {uniform: [0.1, 0.5]}\n"
        "batch_size: {choice: [16, 32]}\n"
        "loss: {grid: [bce, focal]}\n"
        "multitask: false\n"
        "body-part-weight: 1\n"
    ))
    spec = load_space(space)
    assert spec["lr"] == {"loguniform": [1e-4, 3e-3]} and spec["body_part_weight"] == 1.0
    assert varied_options(spec) == ["backbone", "lr", "dropout", "batch_size", "loss"]
    params = to_param_space(spec)
    assert params["loss"] == {"grid_search": ["bce", "focal"]} and params["multitask"] is False
    assert 1e-4 <= params["lr"].sample() <= 3e-3 and params["batch_size"].sample() in (16, 32)

    cfg = TuneConfig(data="d", out="o", space=space, backbones=("custom_cnn", "resnet18"), image_size=32, epochs=3)
    resolved = resolve_space(cfg)
    assert resolved["backbone"] == {"grid": ["custom_cnn", "resnet18"]} and resolved["image_size"] == 32
    assert count_trials(resolved, 3) == 12
    trial = trial_config(cfg, {"backbone": "resnet18", "lr": 1e-3, "loss": "focal"}, trial_id="1a2b3_00000",
                         data="d", out="o/t/x")
    assert (trial.backbone, trial.lr, trial.loss, trial.epochs, trial.out) == ("resnet18", 1e-3, "focal", 3, "o/t/x")
    assert trial.select_metric == "val_auc"  # the trial keeps and exports the checkpoint its score comes from


def test_space_errors_name_every_bad_option(tmp_path):
    space = _write(tmp_path / "bad.yaml", (
        "learning_rate: {loguniform: [1e-4, 3e-3]}\n"
        "epochs: 5\n"
        "dropout: {uniform: [0.1, 1.5]}\n"
        "batch_size: {uniform: [8, 64]}\n"
        "loss: {choice: [bce, dice]}\n"
        "backbone: {grid: [resnet5O]}\n"
        "lr: {sample: [1, 2]}\n"
        "select_metric: val_loss\n"  # --metric sets it: the trial must keep the checkpoints its score comes from
    ))
    with pytest.raises(UserError) as e:
        load_space(space)
    msg = str(e.value)
    for part in ("unknown option 'learning_rate'", "epochs is set by --epochs", "dropout: 1.5",
                 "batch_size: uniform draws floats", "'dice'", "Did you mean 'resnet50'", "lr: a searched option",
                 "select_metric is set by --metric"):
        assert part in msg


def test_every_trial_has_its_own_seed_kept_across_resume():
    """--seed plus the index Tune ends the trial id with: distinct per trial, the same whenever the id is seen again
    (a resumed trial, its export, the leaderboard)."""
    cfg = TuneConfig(data="d", out="o", seed=7)
    seeds = [trial_config(cfg, {}, trial_id=f"1a2b3_{i:05d}", data="d", out="o/t").seed for i in range(4)]
    assert seeds == [7, 8, 9, 10]
    assert trial_config(cfg, {}, trial_id="9f8e7_00002", data="d", out="o/t").seed == 9  # a resumed search's prefix
    assert trial_seed(7, "custom-id") == trial_seed(7, "custom-id") != trial_seed(7, "other-id")


def test_ranking_follows_the_metric_direction():
    def row(trial_id, auc, loss, epochs, last):
        history = [{"epoch": e + 1, "val_auc": auc[e], "val_kappa": 0.1, "val_loss": loss[e]} for e in range(epochs)]
        return summarize_trial(trial_id, {"backbone": "custom_cnn"}, history, last=last, error=False, max_epochs=3)

    rows = [
        row("a", [0.6, 0.7, 0.65], [0.7, 0.6, 0.62], 3, {"done": True, "epoch": 3}),
        row("b", [0.8], [0.9], 1, {"done": True, "epoch": 1}),
        row("c", [math.nan], [0.5], 1, {"done": True, "epoch": 1, "stopped_early": True}),
        summarize_trial("d", {"backbone": "resnet18"}, [], last={}, error=False, max_epochs=3),
    ]
    assert rows[0]["best_val_auc"] == 0.7 and rows[0]["best_val_loss"] == 0.6 and rows[0]["status"] == "completed"
    assert rows[1]["status"] == STOPPED_BY_ASHA and rows[1]["stopped_early"]
    assert rows[2]["status"] == "stopped by patience"
    assert rows[3]["status"] == "unfinished" and rows[3]["epochs"] == 0 and not rows[3]["stopped_early"]
    assert [r["trial_id"] for r in rank_trials(rows, "val_auc")] == ["b", "a", "c", "d"]
    assert [r["trial_id"] for r in rank_trials(rows, "val_loss")] == ["c", "a", "b", "d"]
    assert [r["rank"] for r in rank_trials(rows, "val_loss")] == [1, 2, 3, 4]


def test_bad_space_file_exits_2(tmp_path, capsys):
    import tune as tune_job

    space = _write(tmp_path / "bad.yaml", "learning_rate: 0.1\n")
    rc = tune_job.main(["--data", _ingested(tmp_path / "data"), "--out", str(tmp_path / "out"), "--space", space])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --space") and "learning_rate" in err[0]
    assert tune_job.main(["--space", str(tmp_path / "missing.yaml")]) == 2


def test_a_search_the_cluster_cannot_place_is_refused(monkeypatch, caplog):
    """A trial that cannot be placed would wait forever: refused on a Ray this process started, a warning on an
    attached cluster (an autoscaler may add nodes); fewer trials at once than --max-concurrent is a warning."""
    import ray

    from mura_ray import runtime

    def cluster(resources, *, local):
        monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
        monkeypatch.setattr(runtime, "_started_local", local)

    cluster({"CPU": 4.0}, local=True)
    with pytest.raises(UserError, match=r"^a trial of --workers-per-trial 1 .* needs 1 GPU, the cluster has 0 GPU "
                                        r"\(lower --workers-per-trial, or use --gpu no\)$"):
        check_search_fits(TuneConfig(gpu="yes"))
    cluster({"CPU": 8.0, "GPU": 1.0}, local=True)
    with pytest.raises(UserError, match=r"--workers-per-trial 2 .* needs 2 GPU, the cluster has 1 GPU"):
        check_search_fits(TuneConfig(workers_per_trial=2))
    with pytest.raises(UserError, match=r"x --cpus-per-worker 4, one CPU to decode images\) needs 9 CPU, the cluster "
                                        r"has 8 CPU"):
        check_search_fits(TuneConfig(workers_per_trial=2, cpus_per_worker=4, gpu="no"))

    cluster({"CPU": 4.0}, local=False)
    caplog.set_level(logging.WARNING, logger="mura_ray.tune")
    assert check_search_fits(TuneConfig(gpu="yes")) == 0
    assert "cannot place this yet: a trial of" in caplog.text and "autoscaler" in caplog.text

    caplog.clear()
    cluster({"CPU": 16.0, "GPU": 2.0}, local=True)
    assert check_search_fits(TuneConfig(max_concurrent=4)) == 2
    assert "--max-concurrent 4: the cluster has room for 2 trial(s) at once; the others queue" in caplog.text
    caplog.clear()
    assert check_search_fits(TuneConfig(max_concurrent=4, gpu="no")) == 8 and not caplog.text  # 1 CPU each to decode


@pytest.fixture
def no_cluster(monkeypatch):
    """A search that must stop before any cluster work: reaching Ray fails the test instead of starting trials."""
    from mura_ray import runtime

    def init_ray(*args, **kwargs):
        raise AssertionError("the search reached init_ray")

    monkeypatch.setattr(runtime, "init_ray", init_ray)


def test_a_search_that_cannot_be_placed_exits_2_before_writing(tmp_path, monkeypatch, capsys):
    import ray
    import tune as tune_job

    from mura_ray import runtime, train

    monkeypatch.setattr(runtime, "init_ray", lambda *args, **kwargs: None)  # as if this process had started it
    monkeypatch.setattr(runtime, "_started_local", True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})

    def resolve_data(cfg):
        raise AssertionError("the search went past the cluster check")

    monkeypatch.setattr(train, "resolve_data", resolve_data)
    out = tmp_path / "search"
    space = _write(tmp_path / "space.yaml", "batch_size: 16\n")
    rc = tune_job.main(["--data", _ingested(tmp_path / "data"), "--out", str(out), "--space", space,
                        "--backbones", "custom_cnn", "--gpu", "yes"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: a trial of --workers-per-trial 1 (x --cpus-per-worker 1, one CPU to decode "
                               "images, one GPU each) needs 1 GPU, the cluster has 0 GPU (lower --workers-per-trial, "
                               "or use --gpu no)"]
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []  # no search.json, the lock released


def test_out_that_cannot_be_written_or_is_a_bucket_exits_2(no_cluster, tmp_path, capsys):
    import tune as tune_job

    (tmp_path / "a-file").write_text("not a folder")
    space = _write(tmp_path / "space.yaml", "batch_size: 16\n")
    argv = ["--data", _ingested(tmp_path / "data"), "--space", space, "--backbones", "custom_cnn"]
    assert tune_job.main([*argv, "--out", str(tmp_path / "a-file" / "search")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {tmp_path / 'a-file' / 'search'}: cannot write there (")

    assert tune_job.main([*argv, "--out", "s3://bucket/"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --out s3://bucket/: give a folder inside the bucket, such as "
                   "s3://bucket/tune/NAME"]


def test_an_out_overlapping_the_dataset_is_refused_before_ray(no_cluster, tmp_path, capsys):
    """Every trial's run directory would lie in the dataset, and every trial would refuse it (train's check), after
    the search had started: refused up front."""
    import tune as tune_job

    data = _ingested(tmp_path / "data")
    space = _write(tmp_path / "space.yaml", "batch_size: 16\n")
    out = f"{data}/search"
    assert tune_job.main(["--data", data, "--out", out, "--space", space, "--backbones", "custom_cnn"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --out {out} and --data {data} overlap (the same folder, or one inside the other): give a search "
        "directory outside the dataset"]


def test_one_search_at_a_time_writes_an_out(tmp_path, monkeypatch, capsys):
    """The search holds OUT/_lock/_lock.json from before its first write until it returns; a second is refused."""
    import tune as tune_job

    from mura_ray import runtime

    out = tmp_path / "search"
    space = _write(tmp_path / "space.yaml", "batch_size: 16\n")
    argv = ["--data", _ingested(tmp_path / "data"), "--out", str(out), "--space", space, "--backbones", "custom_cnn"]
    held = []

    def init_ray(*args, **kwargs):  # the first cluster work: the lock is this search's by then
        held.append(json.loads((out / "_lock" / "_lock.json").read_text()))
        raise UserError("stopped by the test")

    monkeypatch.setattr(runtime, "init_ray", init_ray)
    assert tune_job.main(argv) == 2
    assert held[0]["holder"] == "jobs/tune.py" and held[0]["pid"] == os.getpid()
    assert not (out / "_lock" / "_lock.json").exists()  # released on the way out
    capsys.readouterr()

    other = storage.OutputLock(str(out), "jobs/tune.py (another search)", name="_lock/_lock.json").acquire()
    try:
        assert tune_job.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out} is being written by another run (jobs/tune.py "
                                                   "(another search) on ")
        assert len(held) == 1 and sorted(p.name for p in out.iterdir()) == ["_lock"]
        assert json.loads((out / "_lock" / "_lock.json").read_text())["token"] == other.token
    finally:
        other.release()


class _Result:
    def __init__(self, out, trial_id, *, epochs=0, error=None, backbone="custom_cnn"):
        import pandas as pd

        self.path, self.error = str(out / trial_id), error
        self.config = {"backbone": backbone, "lr": 1e-3}
        history = [{"epoch": e, "val_auc": 0.5 + e / 10, "val_kappa": 0.1, "val_loss": 0.7}
                   for e in range(1, epochs + 1)]
        self.metrics_dataframe = pd.DataFrame(history) if history else None
        self.metrics = {**history[-1], "done": True, "time_total_s": 3.0} if history else {}


class _Grid(list):
    @property
    def num_errors(self):
        return sum(r.error is not None for r in self)


@pytest.fixture
def fake_search(ray_cluster, tmp_path, monkeypatch):
    """tune() with the Tuner's results given: (cfg, run(results) -> tune's summary); no trial runs."""
    import mura_ray.tune as tune_module

    space = _write(tmp_path / "space.yaml", "lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    cfg = TuneConfig(data=_ingested(tmp_path / "data"), out=str(tmp_path / "search"), space=space,
                     backbones=("custom_cnn", "resnet18"), num_samples=2, epochs=2, gpu="no", seed=3)

    def run(results):
        monkeypatch.setattr(tune_module, "_new_tuner",
                            lambda *args, **kwargs: SimpleNamespace(fit=lambda: _Grid(results)))
        return tune_module.tune(cfg)

    return cfg, run


def test_a_search_missing_trials_is_interrupted_not_exported(fake_search, tmp_path):
    """4 trials (2 backbones x 2 samples); Ctrl+C after the first 2 finished, before the others were created."""
    import pandas as pd

    cfg, run = fake_search
    out = tmp_path / "search"
    summary = run([_Result(out, "1a2b3_00000", epochs=2), _Result(out, "1a2b3_00001", epochs=2)])
    assert summary["interrupted"] and "best" not in summary and not (out / "best").exists()
    board = pd.read_csv(out / "leaderboard.csv")
    assert list(board["status"]) == ["completed", "completed"]
    assert sorted(board["seed"]) == [3, 4]  # --seed 3 + the trial's index
    assert not (out / "_lock" / "_lock.json").exists()


def test_a_search_record_that_cannot_be_written_is_one_line(fake_search, tmp_path, monkeypatch):
    def write_json(uri, obj):
        raise PermissionError(13, "Permission denied", uri)

    monkeypatch.setattr(storage, "write_json", write_json)
    cfg, run = fake_search
    with pytest.raises(UserError, match=rf"^--out {tmp_path / 'search'}: cannot write there \(\[Errno 13\] "
                                        r"Permission denied: '.*search.json'\)$"):
        run([])
    assert not (tmp_path / "search" / "_lock" / "_lock.json").exists()


def test_a_search_whose_every_trial_failed_says_why_in_one_line(fake_search, tmp_path, capsys):
    from ray.exceptions import RayTaskError

    cfg, run = fake_search
    out = tmp_path / "search"
    try:
        raise UserError("--data /d: has no train split; training needs train and val")
    except UserError as e:
        from_trial = RayTaskError("ImplicitFunc.train", "Traceback ...\nUserError: ...", e)
    errors = [RuntimeError("ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n  File x, line 1\nValueError: boom"),
              from_trial, from_trial, from_trial]
    with pytest.raises(UserError) as e:
        run([_Result(out, f"1a2b3_0000{i}", error=err) for i, err in enumerate(errors)])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("every trial of the search failed before finishing an epoch; the "
                                              f"first, 1a2b3_00000: ValueError: boom (its full error: "
                                              f"{out}/1a2b3_00000/error.txt)")
    assert not (out / "_lock" / "_lock.json").exists()

    with pytest.raises(UserError, match="the first, 1a2b3_00000: --data /d: has no train split; training needs"):
        run([_Result(out, f"1a2b3_0000{i}", error=from_trial) for i in range(4)])


@pytest.mark.slow
def test_search_end_to_end_and_resume(search_cluster, mura_dataset, tmp_path, caplog):
    """4 trials (2 backbones x 2 body-part weights), 2 epochs, ASHA on val_loss with grace 1 and factor 2.

    A body-part weight of 5 puts ~10 into the validation loss (5 x the 7-class cross-entropy), 0 keeps it near
    0.7, so whatever the timing, a weight-5 trial reaching epoch 1 after a weight-0 one is below ASHA's cutoff.
    """
    import pandas as pd
    import tune as tune_job
    from mlflow.tracking import MlflowClient

    out = tmp_path / "search"
    mlflow_uri = f"file://{tmp_path / 'mlruns'}"
    space = _write(tmp_path / "space.yaml", (
        "body_part_weight: {grid: [0.0, 5.0]}\n"
        "lr: {loguniform: [1.0e-3, 5.0e-3]}\n"
        "dropout: {uniform: [0.1, 0.3]}\n"
        "batch_size: 16\n"
        "warmup_epochs: 0\n"
    ))
    argv = ["--data", mura_dataset, "--out", str(out), "--space", space, "--backbones", "custom_cnn,resnet18",
            "--num-samples", "1", "--epochs", "2", "--workers-per-trial", "1", "--max-concurrent", "2",
            "--metric", "val_loss", "--image-size", "32", "--grace-period", "1", "--reduction-factor", "2",
            "--mlflow-uri", mlflow_uri]
    assert tune_job.main(argv) == 0

    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 4 and set(board["backbone"]) == {"custom_cnn", "resnet18"}
    assert {"lr", "dropout", "body_part_weight", "seed", "best_val_auc", "best_val_kappa", "best_val_loss", "epochs",
            "stopped_early", "status", "wall_time_s"} <= set(board.columns)
    assert sorted(board["seed"]) == [0, 1, 2, 3]  # --seed 0 + each trial's index
    assert not (out / "_lock" / "_lock.json").exists()
    assert list(board["best_val_loss"]) == sorted(board["best_val_loss"]) and list(board["rank"]) == [1, 2, 3, 4]
    early = board[board["stopped_early"]]
    assert len(early) >= 1 and (early["epochs"] < 2).all() and (early["status"] == STOPPED_BY_ASHA).all()
    assert (board.loc[~board["stopped_early"], "epochs"] == 2).all()
    assert board.loc[0, "body_part_weight"] == 0.0
    assert "stopped by ASHA" in (out / "leaderboard.md").read_text()

    best = board.loc[0, "trial_id"]
    assert (out / "trials" / best).is_dir()
    for name in ("model.safetensors", "config.json", "model_card.json"):
        assert (out / "best" / "model" / name).is_file()
    assert (out / "best" / "report" / "report.json").is_file()
    card = json.loads((out / "best" / "model" / "model_card.json").read_text())
    assert card["training"]["config"]["seed"] == board.loc[0, "seed"]  # the export trains nothing: it records it
    comparison = (out / "comparison.md").read_text()
    assert "custom_cnn" in comparison and "resnet18" in comparison
    other = ({"custom_cnn", "resnet18"} - {board.loc[0, "backbone"]}).pop()
    assert (out / "best_per_backbone" / other / "report" / "report.json").is_file()
    # The top 3 trials across backbones (--ensemble-size's default) as one ensemble model, its threshold chosen on
    # validation, its test report beside its members'.
    ensemble = json.loads((out / "ensemble" / "model" / "ensemble.json").read_text())
    assert ensemble["members"] == ["members/0", "members/1", "members/2"]
    ens_card = json.loads((out / "ensemble" / "model" / "model_card.json").read_text())
    assert [t["trial_id"] for t in ens_card["trials"]] == list(board["trial_id"][:3])
    assert ens_card["threshold_policy"] == "kappa" and ens_card["threshold"] == ensemble["threshold"]
    assert ens_card["metrics"]["test"]["study_roc_auc"] is not None
    assert {"val_auc", "val_kappa", "val_study_auc", "val_study_kappa"} <= set(ens_card["metrics"]["validation"])
    member_ids = {json.loads((out / "ensemble" / "model" / m / "model_card.json").read_text())["model_id"]
                  for m in ensemble["members"]}
    assert member_ids == {t["model_id"] for t in ens_card["trials"]}
    ens_comparison = (out / "ensemble" / "comparison.md").read_text()
    assert ens_comparison.count("\n| ") >= 5 and "ensemble(" in ens_comparison  # header, rule, ensemble, 3 members

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(str(out))
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    for run in runs:
        row = board[board["trial_id"] == run.data.tags["mura_ray.trial_id"]].iloc[0]
        assert run.data.params["backbone"] == row["backbone"]
        assert float(run.data.params["lr"]) == pytest.approx(row["lr"])
        assert int(run.data.params["seed"]) == row["seed"]
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, row["epochs"] + 1))
        assert min(m.value for m in history) == pytest.approx(row["best_val_loss"])

    # The same command again restores the finished search: nothing re-runs, results and runs are kept.
    trial_files = sorted(p.relative_to(out) for p in (out / "trials").rglob("*"))
    caplog.clear()
    caplog.set_level(logging.INFO, logger="mura_ray.tune")
    assert tune_job.main(argv) == 0
    assert "Resuming the search" in caplog.text
    again = pd.read_csv(out / "leaderboard.csv")
    pd.testing.assert_frame_equal(again.drop(columns="wall_time_s"), board.drop(columns="wall_time_s"))
    assert sorted(p.relative_to(out) for p in (out / "trials").rglob("*")) == trial_files
    assert len(client.search_runs([experiment.experiment_id])) == 4
    assert os.path.isfile(out / "best" / "trial.json")
    assert not (out / "_lock" / "_lock.json").exists()

    # Other flags on an existing search are refused rather than silently ignored.
    assert tune_job.main([*argv[:-2], "--epochs", "4"]) == 2


@pytest.mark.slow
def test_interrupted_search_resumes_trials_from_their_checkpoints(search_cluster, mura_dataset, tmp_path):
    """Ctrl+C once the trial has checkpointed epoch 1: exit 130, then the same command finishes only epoch 2."""
    import pandas as pd
    import tune as tune_job

    out = tmp_path / "search"
    space = _write(tmp_path / "space.yaml", "batch_size: 16\nlr: 3.0e-3\n")
    argv = ["--data", mura_dataset, "--out", str(out), "--space", space, "--backbones", "custom_cnn",
            "--num-samples", "1", "--epochs", "2", "--image-size", "32", "--max-concurrent", "1"]

    search_over = threading.Event()

    def interrupt_after_first_checkpoint() -> None:
        while not search_over.is_set():
            if list(out.glob("trials/*/checkpoint_*")):
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl+C sends: Tune saves the search state and stops
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=interrupt_after_first_checkpoint, daemon=True)
    watcher.start()
    try:
        rc = tune_job.main(argv)
    finally:
        search_over.set()
        watcher.join()
    assert rc == 130
    assert pd.read_csv(out / "leaderboard.csv").loc[0, "status"] == "unfinished"
    assert not (out / "best").exists() and not (out / "_lock" / "_lock.json").exists()
    _release_leftover_placement_groups()

    assert tune_job.main(argv) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    assert (board.loc[0, "status"], board.loc[0, "epochs"]) == ("completed", 2)
    results = [json.loads(line) for line in (out / board.loc[0, "trial_id"] / "result.json").read_text().splitlines()]
    # The restarted trial reported once: its Train run continued from the epoch-1 checkpoint instead of starting over.
    assert (results[-1]["epoch"], results[-1]["iterations_since_restore"]) == (2, 1)
    assert (out / "best" / "model" / "model.safetensors").is_file()
    assert not (out / "_lock" / "_lock.json").exists()  # released, and not brought back by Tune's state saves (resumed)
