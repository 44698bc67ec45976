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

import pytest

from mura_ray.config import TuneConfig, UserError
from mura_ray.tune import (
    DEFAULT_SPACE,
    STOPPED_BY_ASHA,
    count_trials,
    load_space,
    rank_trials,
    resolve_space,
    summarize_trial,
    to_param_space,
    trial_config,
    varied_options,
)


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


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
    trial = trial_config(cfg, {"backbone": "resnet18", "lr": 1e-3, "loss": "focal"}, data="d", out="o/t/x")
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
    ))
    with pytest.raises(UserError) as e:
        load_space(space)
    msg = str(e.value)
    for part in ("unknown option 'learning_rate'", "epochs is set by --epochs", "dropout: 1.5",
                 "batch_size: uniform draws floats", "'dice'", "Did you mean 'resnet50'", "lr: a searched option"):
        assert part in msg


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
    rc = tune_job.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--space", space])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --space") and "learning_rate" in err[0]
    assert tune_job.main(["--space", str(tmp_path / "missing.yaml")]) == 2


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
    assert {"lr", "dropout", "body_part_weight", "best_val_auc", "best_val_kappa", "best_val_loss", "epochs",
            "stopped_early", "status", "wall_time_s"} <= set(board.columns)
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
    comparison = (out / "comparison.md").read_text()
    assert "custom_cnn" in comparison and "resnet18" in comparison
    other = ({"custom_cnn", "resnet18"} - {board.loc[0, "backbone"]}).pop()
    assert (out / "best_per_backbone" / other / "report" / "report.json").is_file()

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(str(out))
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    for run in runs:
        row = board[board["trial_id"] == run.data.tags["mura_ray.trial_id"]].iloc[0]
        assert run.data.params["backbone"] == row["backbone"]
        assert float(run.data.params["lr"]) == pytest.approx(row["lr"])
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
    assert not (out / "best").exists()
    _release_leftover_placement_groups()

    assert tune_job.main(argv) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    assert (board.loc[0, "status"], board.loc[0, "epochs"]) == ("completed", 2)
    results = [json.loads(line) for line in (out / board.loc[0, "trial_id"] / "result.json").read_text().splitlines()]
    # The restarted trial reported once: its Train run continued from the epoch-1 checkpoint instead of starting over.
    assert (results[-1]["epoch"], results[-1]["iterations_since_restore"]) == (2, 1)
    assert (out / "best" / "model" / "model.safetensors").is_file()
