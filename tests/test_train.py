"""Training end to end on Ray Train: the CLI, DDP on CPU, resume after a worker crash, a two-node cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import train as train_job

from mura_ray.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_cli_run_exports_model_and_report(trained_run: Path):
    model = trained_run / "model"
    assert (model / "model.safetensors").stat().st_size > 0
    config = json.loads((model / "config.json").read_text())
    assert config["backbone"] == "custom_cnn" and config["image_size"] == 32
    card = json.loads((model / "model_card.json").read_text())
    for key in ("model_id", "backbone", "tasks", "input", "training", "metrics", "code_version"):
        assert key in card
    assert card["selected_by"] == "val_auc"  # the fixture's --select-metric
    # The threshold is chosen on the validation split's studies (kappa by default), stored where scoring reads it,
    # and the test report is at that threshold.
    assert card["threshold_policy"] == "kappa" and card["operating_point"]["level"] == "study"
    assert card["threshold"] == config["threshold"] == card["operating_point"]["threshold"]
    val = card["operating_point"]["validation"]["study_level"]
    assert val["cohen_kappa"] is not None and val["n"] > 0
    assert {"val_auc", "val_kappa", "val_study_auc", "val_study_kappa", "val_abnormal_loss"} <= set(
        card["metrics"]["validation"])
    assert card["tasks"]["body_part"][0] == "ELBOW" and card["training"]["fingerprint"]
    # The validation split's reference profile, which scoring runs compare their images with (mura_ray.drift).
    reference = card["drift_reference"]
    assert reference["n_images"] == card["operating_point"]["n_images"] > 0
    assert {"prob_abnormal", "image_mean", "image_contrast", "image_size", "body_part"} <= set(reference["quantities"])
    assert set(card["metrics"]["test"]) >= {"image_roc_auc", "image_cohen_kappa", "body_part_accuracy"}
    report = json.loads((trained_run / "report" / "report.json").read_text())
    assert report["threshold"] == pytest.approx(card["threshold"]) and report["threshold_source"] == "model"
    for key in ("accuracy", "roc_auc", "cohen_kappa"):
        assert key in report["image_level"]
    assert 0.0 <= report["body_part"]["accuracy"] <= 1.0
    assert (trained_run / "report" / "report.html").exists()
    # The best k = 2 of 3 checkpoints by --select-metric val_auc are kept, plus the latest (Ray keeps it for
    # resuming) when it is not among them; each holds the full training state, and the exported model is the one
    # with the highest validation AUC.
    checkpoints = sorted(c for c in trained_run.glob("checkpoint_*") if c.is_dir())
    assert len(checkpoints) in (2, 3) and all((c / "state.pt").exists() for c in checkpoints)
    import torch

    states = [torch.load(c / "state.pt", map_location="cpu", weights_only=True) for c in checkpoints]
    latest = max(states, key=lambda st: st["epoch"])
    assert latest["epoch"] == 2
    if len(states) == 3:  # the latest is kept only for resuming: it must rank last
        assert all(latest["metrics"]["val_auc"] <= st["metrics"]["val_auc"] for st in states)
    best = max(states, key=lambda st: st["metrics"]["val_auc"])
    assert card["training"]["best_epoch"] == best["epoch"] + 1
    assert card["metrics"]["validation"]["val_auc"] == pytest.approx(best["metrics"]["val_auc"])
    # The three epochs are cut from one stream of three passes over the split at exact rows (`shuffle_epochs`):
    # each trains on the split's every row once, in batches of 13 but its last (none of one row).
    n_train = card["training"]["counts"]["train"]
    for st in states:
        assert st["metrics"]["train_images"] + st["metrics"]["skipped_images"] == n_train, (st["epoch"], n_train)
        assert st["metrics"]["left_out_images"] == 0


def test_epoch_stream_cuts_every_epoch_from_one_stream_read_ahead_of_the_loop():
    import threading

    from mura_ray.data.pipeline import EpochStream

    def batch(i: int, rows: int = 4) -> dict:
        return {"i": i, "ok": [1.0] * rows}

    made, pulled_in, closed = [], [], []
    pulled = threading.Event()

    def make():
        made.append(True)

        def batches():
            try:
                for i in range(100):  # more than the epochs need (a resumed run reads only the epochs it has left)
                    pulled_in.append(threading.current_thread().name)
                    if i == 5:
                        pulled.set()
                    yield batch(i, rows=3 if i == 4 else 4)
            finally:
                closed.append(True)

        return batches()

    # 10 rows an epoch in batches of 4 (one of 3): each epoch ends with the batch that brings the rows delivered
    # since the start to a multiple of 10, so epochs never drift from the passes: rows 12, 11 (23), 8 (31).
    stream = EpochStream(make, epochs=3, rows_per_epoch=10, depth=10)
    assert pulled.wait(10)  # no batch taken yet: the first epoch and part of the second were pulled ahead
    assert set(pulled_in) == {"epoch-input"}
    first = stream.epoch()
    assert next(first)["i"] == 0
    assert [b["i"] for b in first] == [1, 2]
    assert [[b["i"] for b in stream.epoch()] for _ in range(3)] == [[3, 4, 5], [6, 7], []]
    stream._thread.join(10)
    assert made == [True] and closed == [True]  # one iterator for the run, closed after the last epoch
    assert len(pulled_in) <= 8 + 1  # nothing read past the last epoch but what the generator had in hand
    stream.close()

    def broken():
        raise OSError("object store lost")
        yield

    failing = EpochStream(broken, epochs=2, rows_per_epoch=4)
    with pytest.raises(OSError, match="object store lost"):
        list(failing.epoch())
    failing.close()

    # A stream shorter than the epochs it was made for is an error, not a silently short run.
    short = EpochStream(lambda: iter([batch(0), batch(1)]), epochs=2, rows_per_epoch=5)
    assert [b["i"] for b in short.epoch()] == [0, 1]
    with pytest.raises(RuntimeError, match="the training input ended after 8 rows, in epoch 2 of 2"):
        list(short.epoch())
    short.close()

    # Early stopping drops what was pulled ahead: the iterator is closed (Ray's ends this worker's part of the
    # execution) and nothing more is pulled.
    closed.clear()
    held = EpochStream(make, epochs=5, rows_per_epoch=40, depth=2)
    assert [b["i"] for _, b in zip(range(3), held.epoch(), strict=False)] == [0, 1, 2]
    held.close()
    assert not held._thread.is_alive()
    assert closed == [True]
    held.close()  # again (the loop's finally after early stopping): nothing to do, nothing waited for
    assert list(held.epoch()) == []  # and no epoch after it (nothing would ever come)

    # An epoch the loop leaves part-way is not continued by the next one.
    partial = EpochStream(lambda: iter([batch(i) for i in range(6)]), epochs=2, rows_per_epoch=12)
    assert next(partial.epoch())["i"] == 0
    assert [b["i"] for b in partial.epoch()] == [3, 4, 5]
    assert list(partial.epoch()) == []
    partial.close()


def test_shuffle_epochs_cuts_exact_epochs_and_a_resumed_run_sees_the_same_batches():
    import torch

    from mura_ray.data.pipeline import shuffle_epochs

    def stream(first_row: int, size: int):  # batches of 7 rows (or 5), which do not divide an epoch of 50
        rows = torch.arange(first_row, 3 * 50)
        for i in range(0, len(rows), size):
            yield {"row": rows[i : i + size], "ok": torch.ones(len(rows[i : i + size]))}

    def run(seed: int = 3, first_row: int = 0, first_epoch: int = 0, size: int = 7) -> list[torch.Tensor]:
        return [b["row"] for b in shuffle_epochs(stream(first_row, size), rows_per_epoch=50, batch_size=8,
                                                 window=24, seed=seed, first_epoch=first_epoch)]

    batches = run()
    epochs, rows = [], 0
    for b in batches:
        if rows % 50 == 0:
            epochs.append([])
        epochs[-1].append(b)
        rows += len(b)
    assert len(epochs) == 3
    for e, epoch in enumerate(epochs):
        # Every row of the epoch once, none of another; whole batches but the epoch's last (50 = 6 x 8 + 2).
        assert sorted(torch.cat(epoch).tolist()) == list(range(e * 50, (e + 1) * 50))
        assert [len(b) for b in epoch] == [8] * 6 + [2]
        assert torch.cat(epoch).tolist() != list(range(e * 50, (e + 1) * 50))  # shuffled
    # An epoch whose last batch would hold one row ends with one of batch size + 1 instead (49 = 5 x 8 + 9).
    odd = list(shuffle_epochs(iter([{"row": torch.arange(49), "ok": torch.ones(49)}]), rows_per_epoch=49,
                              batch_size=8, window=24, seed=0))
    assert [len(b["ok"]) for b in odd] == [8] * 5 + [9]
    assert all(torch.equal(a, b) for a, b in zip(run(), batches, strict=True))  # the same seed: the same batches
    assert not all(torch.equal(a, b) for a, b in zip(run(seed=4), batches, strict=True))
    # A run resumed at epoch 2 (its input starts at that epoch's first row, in batches that end elsewhere) gets the
    # batches of one that never stopped, from epoch 2 on.
    resumed = run(first_row=50, first_epoch=1, size=5)
    assert len(resumed) == 14 and all(torch.equal(a, b) for a, b in zip(resumed, batches[7:], strict=True))
    # The windows group other rows every epoch: the epochs' first batches are not the same permutation shifted.
    firsts = [sorted((b - 50 * e).tolist()) for e, b in enumerate(epochs[i][0] for i in range(3))]
    assert firsts[0] != firsts[1] or firsts[1] != firsts[2]


def test_resume_epoch_is_the_one_after_the_checkpoint_ray_train_restores(tmp_path, caplog):
    from mura_ray.checkpoints import resume_epoch

    assert resume_epoch(str(tmp_path / "new")) == 0
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"checkpoint_results": [{"metrics": {"epoch": 3}}, {"metrics": {"epoch": 5}}],
                                    "latest_checkpoint_result": {"metrics": {"epoch": 4}}}))
    assert resume_epoch(str(tmp_path)) == 4  # the latest (epoch 4, 1-based), not the best: the 0-based epoch 4 next
    snapshot.write_text("{not json")
    with caplog.at_level("WARNING", logger="mura_ray.checkpoints"):
        assert resume_epoch(str(tmp_path)) == 0
    assert "starts at the first pass" in caplog.text


@pytest.mark.parametrize("known_parts, weight", [(False, 1.0), (True, 0.0)])
def test_multitask_loss_gives_every_trained_parameter_a_gradient(known_parts, weight):
    """DDP fails the step after one where a trained parameter got no gradient: a set without body parts (or
    --body-part-weight 0) must still reach the body-part head, at zero weight."""
    import torch

    from mura_ray.losses import multitask_loss
    from mura_ray.models import build_model

    torch.manual_seed(0)
    model = build_model("custom_cnn").train()
    parts = torch.tensor([0, 3, 5, 1]) if known_parts else torch.full((4,), -1)
    out = model(torch.randn(4, 1, 32, 32), parts)
    loss, ab = multitask_loss(out, torch.tensor([0.0, 1.0, 1.0, 0.0]), parts, kind="bce", pos_weight=None,
                              gamma=2.0, body_part_weight=weight)
    loss.backward()
    assert float(loss) == pytest.approx(float(ab))  # the body-part term adds nothing here
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_amp_uses_float16_where_bfloat16_is_only_emulated(monkeypatch):
    import torch

    from mura_ray.models import amp_dtype

    # A T4 or V100: torch's default answer counts emulation; the hardware has no bfloat16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype() == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere, Hopper
    assert amp_dtype() == torch.bfloat16


def test_bad_flags_are_one_line_errors(capsys):
    assert train_job.main(["--backbone", "resnet5O", "--data", "/nonexistent"]) == 2
    assert "Did you mean 'resnet50'" in capsys.readouterr().err
    assert train_job.main(["--epochs", "0", "--lr", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--epochs must be > 0" in err and "--lr must be > 0" in err and "\n" not in err
    assert train_job.main(["--data", "/nonexistent/dataset", "--backbone", "custom_cnn"]) == 2
    assert "no such dataset" in capsys.readouterr().err
    assert train_job.main(["--pretrained"]) == 2  # the demo trains custom_cnn
    assert "custom_cnn is trained from scratch" in capsys.readouterr().err
    assert train_job.main(["--batch-size", "1"]) == 2  # batch norm leaves every one-image batch out: nothing trains
    assert capsys.readouterr().err.strip() == "error: --batch-size must be at least 2, got 1"


@pytest.mark.parametrize("where", ["same", "inside", "above"])
def test_an_out_overlapping_the_dataset_is_refused_before_ray_starts(where, tmp_path, capsys, monkeypatch):
    """The test split is scored into RUN_DIR/test at the end of a run, which clears that folder: with --out the
    dataset's folder, that deleted the ingested test split."""
    monkeypatch.setattr("mura_ray.runtime.init_ray", _no_ray)
    data = tmp_path / "ds"
    out = {"same": data, "inside": data / "runs" / "r1", "above": tmp_path}[where]
    assert train_job.main(["--data", str(data), "--out", str(out), "--backbone", "custom_cnn", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --out {out} and --data {data} overlap (the same folder, or one inside the other): give a run "
        "directory outside the dataset")


def test_the_code_version_names_the_source_without_git(monkeypatch):
    """`ray job submit` uploads the working directory without .git: the model card's code version is then a hash
    of the package's sources, not the bare version number."""
    import subprocess

    from mura_ray import __version__
    from mura_ray.train import _git_version

    in_git = _git_version()
    if subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, cwd=REPO).returncode == 0:
        assert in_git.startswith(f"{__version__}+") and "+src." not in in_git  # this checkout

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    without = _git_version()
    assert without.startswith(f"{__version__}+src.") and len(without.split("+src.")[1]) == 12
    assert _git_version() == without


def test_recipe_values_are_type_checked(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    # YAML 1.1 reads 1e-3 as a string and yes as true: the first is a number to a float option, the second an error.
    recipe.write_text("backbone: custom_cnn\nlr: 1e-3\nepochs: 10\ngpu: \"no\"\n")
    cfg = train_job.build_config(train_job.build_parser().parse_args(["--config", str(recipe)]))
    assert cfg.lr == 0.001 and cfg.epochs == 10 and cfg.gpu == "no"
    recipe.write_text("epochs: 10.5\ngpu: yes\namp: maybe\nlr: .nan\n")
    assert train_job.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert "epochs must be a whole number, got 10.5" in err
    assert "gpu must be one of auto, yes, no, got True (YAML reads yes" in err
    assert "amp must be true or false, got 'maybe'" in err and "lr must be a number, got nan" in err


def test_a_user_error_raised_in_a_worker_is_one_line(capsys):
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    from mura_ray.config import UserError
    from mura_ray.runtime import run_main

    def remote(message: str) -> BaseException:
        try:
            raise UserError(message)
        except UserError as e:
            return RayTaskError("fn", "Traceback ...", e).as_instanceof_cause()

    failures = [WorkerGroupError("rank 1 failed", {0: RuntimeError("peer gone"), 1: remote("bad weights")}),
                ControllerError(RuntimeError("wrapped")), ValueError("a bug")]
    failures[1].controller_failure.__cause__ = remote("no such split")
    parser = train_job.build_parser()
    for failure, line in zip(failures, ["error: bad weights", "error: no such split", None], strict=True):
        def fail(args, failure=failure):
            raise failure

        if line is None:  # not a user mistake: the traceback stays
            with pytest.raises(ValueError, match="a bug"):
                run_main(fail, parser, [])
            continue
        assert run_main(fail, parser, []) == 2
        assert capsys.readouterr().err.strip() == line


def test_a_cluster_that_cannot_place_the_run(monkeypatch, caplog):
    import ray

    from mura_ray import runtime
    from mura_ray.config import UserError
    from mura_ray.train import check_cluster_fits

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    check_cluster_fits(TrainConfig(workers=2, gpu="no"))
    wants_gpus = TrainConfig(workers=2, gpu="yes", cpus_per_worker=2)
    monkeypatch.setattr(runtime, "_started_local", True)
    with pytest.raises(UserError, match=r"--workers 2 .* needs 5 CPU, 2 GPU, the cluster has 4 CPU, 0 GPU "
                                        r"\(use --gpu no to train on CPUs\)"):
        check_cluster_fits(wants_gpus)
    # An attached cluster may grow (autoscaler): the run waits, and says what for.
    monkeypatch.setattr(runtime, "_started_local", False)
    with caplog.at_level("WARNING", logger="mura_ray"):
        check_cluster_fits(wants_gpus)
    assert "waits for an autoscaler" in caplog.text and "needs 5 CPU, 2 GPU" in caplog.text


def test_rerun_with_another_architecture_is_refused(ray_cluster, mura_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint_2026-11-28_10-00-00.000000").mkdir(parents=True)
    (out / "train_config.json").write_text(json.dumps({**TrainConfig().__dict__, "backbone": "resnet18"}))
    assert train_job.main(["--data", mura_dataset, "--out", str(out), "--backbone", "custom_cnn",
                           "--image-size", "32", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another model (--backbone 'resnet18' -> 'custom_cnn', --image-size 224 -> 32)" in err
    assert len(list(out.glob("checkpoint_*"))) == 1

    # A run that failed before its first checkpoint has nothing to resume: its options are simply replaced.
    from mura_ray.checkpoints import check_resumable

    (out / "checkpoint_2026-11-28_10-00-00.000000").rmdir()
    check_resumable(TrainConfig(out=str(out), backbone="custom_cnn"))
    assert json.loads((out / "train_config.json").read_text())["backbone"] == "custom_cnn"


def test_recipes_load(tmp_path):
    for recipe in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        args = train_job.build_parser().parse_args(["--config", str(recipe)])
        cfg = train_job.build_config(args)
        assert isinstance(cfg, TrainConfig)
    # The demo recipe is what `python jobs/train.py` runs without --data: the two must not drift apart.
    from mura_ray.config import DEMO_TRAIN_DEFAULTS, load_yaml

    assert load_yaml(str(REPO / "jobs" / "configs" / "demo.yaml")) == DEMO_TRAIN_DEFAULTS


@pytest.mark.slow
def test_ddp_two_workers_on_cpu(ray_cluster, mura_dataset, tmp_path):
    # The default multi-task loss: DDP fails a step after one where a trained parameter got no gradient, so this
    # also runs what test_multitask_loss_gives_every_trained_parameter_a_gradient checks on one process.
    out = tmp_path / "ddp"
    assert train_job.main([
        "--data", mura_dataset, "--out", str(out), "--backbone", "custom_cnn", "--image-size", "32",
        "--epochs", "2", "--batch-size", "13", "--workers", "2", "--cpus-per-worker", "0.5",
    ]) == 0
    card = json.loads((out / "model" / "model_card.json").read_text())
    assert card["training"]["config"]["workers"] == 2 and card["training"]["config"]["body_part_weight"] == 0.5
    # The epochs' counts are both workers' (not rank 0's half). Each worker's shard of a pass is 85 rows, and
    # epochs are cut at exact rows (`shuffle_epochs`): 6 batches of 13 and one of 7 a worker, every row trained.
    import torch

    n_train = card["training"]["counts"]["train"]
    assert n_train == 170, "the fixture's split changed: recompute the batches below"
    states = {st["epoch"]: st["metrics"] for st in (
        torch.load(c / "state.pt", map_location="cpu", weights_only=True) for c in out.glob("checkpoint_*")
        if c.is_dir())}
    for epoch in (0, 1):
        assert (states[epoch]["train_images"], states[epoch]["left_out_images"]) == (170, 0), epoch


class _KillWorkerAfterFirstEpoch:
    """Driver-side callback that SIGKILLs the training worker once, right after epoch 1 is reported."""

    def __new__(cls, gcs_address: str, marker: Path):
        import ray.train

        class Killer(ray.train.UserCallback):
            def after_report(self, run_context, metrics, checkpoint):  # noqa: ARG002
                if marker.exists() or metrics[0]["epoch"] != 1:
                    return
                from ray.util.state import list_actors

                workers = list_actors(address=gcs_address,
                                      filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                for actor in workers:
                    os.kill(actor.pid, signal.SIGKILL)
                if workers:
                    marker.write_text(",".join(str(a.pid) for a in workers))

        return Killer()


class _RecordReports:
    """Driver-side callback that appends each report's epoch (and whether it came with a checkpoint) to a file."""

    def __new__(cls, log: Path):
        import ray.train

        class Recorder(ray.train.UserCallback):
            def after_report(self, run_context, metrics, checkpoint):  # noqa: ARG002
                with log.open("a") as f:
                    f.write(f"{metrics[0]['epoch']} {checkpoint is not None} {metrics[0]['stopped_early']}\n")

        return Recorder()


def _with_summary(dataset: str, dest: Path, edit) -> Path:
    """`dataset`'s splits (linked) under `dest`, with its ingest summary as `edit` changes it."""
    dest.mkdir()
    for split in ("train", "val", "test"):
        (dest / split).symlink_to(Path(dataset) / split, target_is_directory=True)
    summary = json.loads((Path(dataset) / "ingest_summary.json").read_text())
    edit(summary)
    (dest / "ingest_summary.json").write_text(json.dumps(summary))
    return dest


def test_dataset_of_an_older_ingest_layout_trains_with_a_warning(ray_cluster, mura_dataset, tmp_path, caplog):
    import logging

    from mura_ray.train import prepare_run

    def older(summary):
        assert summary.pop("layout_version") >= 2

    old = _with_summary(mura_dataset, tmp_path / "old", older)
    with caplog.at_level(logging.WARNING, logger="mura_ray.train"):
        prepare_run(TrainConfig(data=mura_dataset, out=str(tmp_path / "new-run"), backbone="custom_cnn"))
        assert "older mura_ray" not in caplog.text
        prepare_run(TrainConfig(data=str(old), out=str(tmp_path / "old-run"), backbone="custom_cnn"))
    assert "was ingested by an older mura_ray" in caplog.text and "--overwrite" in caplog.text


def test_a_batch_larger_than_a_workers_share_of_the_split_is_refused(ray_cluster, mura_dataset, tmp_path, capsys):
    """Epochs are cut from one stream in whole batches: with fewer rows a worker than a batch some epochs would be
    empty (no step, a repeated val loss counted against --patience), so it is refused with one line."""
    assert train_job.main(["--data", mura_dataset, "--out", str(tmp_path / "run"), "--backbone", "custom_cnn",
                           "--epochs", "1", "--workers", "2", "--cpus-per-worker", "0.5", "--batch-size", "86"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"error: --data {mura_dataset}: its train split has 170 images, 85 for each of 2 worker(s), fewer than "
        "--batch-size 86: lower --batch-size or --workers"), err


def test_a_split_without_labelled_images_is_refused_before_training(ray_cluster, mura_dataset, tmp_path, capsys):
    def without_labels(summary):
        summary["splits"]["val"]["positive_rate"] = None  # what ingest writes for a split with no labels

    unlabelled = _with_summary(mura_dataset, tmp_path / "unlabelled", without_labels)
    assert train_job.main(["--data", str(unlabelled), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "val split has no labelled images" in err[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_after_worker_crash(ray_cluster, mura_dataset, tmp_path):
    from mura_ray.checkpoints import best_state
    from mura_ray.train import build_trainer, prepare_run

    # Ranked by the validation loss, which falls epoch by epoch here, the 2 checkpoints kept are the last two.
    cfg = TrainConfig(data=mura_dataset, out=str(tmp_path / "crash"), backbone="custom_cnn", image_size=32,
                      epochs=3, batch_size=16, max_failures=2, select_metric="val_loss")
    run = prepare_run(cfg)
    marker = tmp_path / "killed"
    killer = _KillWorkerAfterFirstEpoch(ray_cluster.get_runtime_context().gcs_address, marker)
    result = build_trainer(run, callbacks=[killer]).fit()
    assert marker.exists(), "the worker was never killed"
    epochs = [int(e) for e in result.metrics_dataframe["epoch"]]
    # The restarted worker group resumed at epoch 2 from epoch 1's checkpoint: epoch 1 was not trained again.
    assert epochs == [2, 3]
    # ... and at epochs 2 and 3's learning rates of the recipe's schedule (each epoch reports its own rate).
    import math

    import torch

    from mura_ray.data.pipeline import split_rows
    from mura_ray.optim import lr_schedule

    steps = math.ceil(split_rows(mura_dataset, "train") // cfg.workers / cfg.batch_size)  # as the workers count
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    rates = [lr_schedule(optimizer, cfg, steps, epoch) and optimizer.param_groups[0]["lr"] for epoch in range(3)]
    assert list(result.metrics_dataframe["lr"]) == pytest.approx(rates[1:])

    # Re-running the same run directory resumes the finished run: nothing is trained again, and the run reports
    # its last epoch once more, without a new checkpoint (a resumed Tune search learns from it how the trial ended).
    checkpoints = sorted(p.name for p in (tmp_path / "crash").glob("checkpoint_*") if p.is_dir())
    reports = tmp_path / "reports.txt"
    again = build_trainer(prepare_run(cfg), callbacks=[_RecordReports(reports)]).fit()
    assert sorted(p.name for p in (tmp_path / "crash").glob("checkpoint_*") if p.is_dir()) == checkpoints
    assert reports.read_text().splitlines() == ["3 False False"]
    assert best_state(again)["epoch"] == best_state(result)["epoch"]


@pytest.mark.slow
def test_seeded_runs_are_identical_epoch_by_epoch_and_across_a_resume(ray_cluster, mura_dataset, tmp_path):
    """Same seed, data and worker count, on CPU: the same metrics at every epoch and the same exported model; and
    so for a run killed after its first epoch and resumed by running it again."""
    import pandas as pd

    from mura_ray.checkpoints import best_state
    from mura_ray.train import build_trainer, export_best, prepare_run

    columns = ["epoch", "train_loss", "train_images", "val_loss", "val_abnormal_loss", "val_auc", "val_kappa",
               "val_study_auc", "val_study_kappa", "val_body_part_acc"]

    def config(name: str, **options) -> TrainConfig:
        return TrainConfig(data=mura_dataset, out=str(tmp_path / name), backbone="custom_cnn", image_size=32,
                           epochs=3, batch_size=16, lr=3e-3, seed=5, dropout=0.3, select_metric="val_loss",
                           num_to_keep=3, **options)  # every epoch's checkpoint: Train keeps their metrics

    def fit(cfg: TrainConfig, callbacks=None):
        run = prepare_run(cfg)
        result = build_trainer(run, callbacks=callbacks).fit()
        model_id = json.loads(Path(export_best(run, best_state(result, "val_loss"))["model_dir"],
                                   "model_card.json").read_text())["model_id"]
        # the kept checkpoints' metrics, in the order Train ranks them: by epoch here
        return result.metrics_dataframe[columns].sort_values("epoch").reset_index(drop=True), model_id

    first, first_model = fit(config("a"))
    second, second_model = fit(config("b"))
    assert list(first["epoch"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(first, second)
    assert first_model == second_model

    cfg = config("c", max_failures=0)
    marker = tmp_path / "killed"
    killer = _KillWorkerAfterFirstEpoch(ray_cluster.get_runtime_context().gcs_address, marker)
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's error for a worker group that may not restart
        build_trainer(prepare_run(cfg), callbacks=[killer]).fit()
    assert marker.exists(), "the worker was never killed"
    reports = tmp_path / "reports.txt"
    resumed, resumed_model = fit(cfg, callbacks=[_RecordReports(reports)])
    assert [line.split()[0] for line in reports.read_text().splitlines()] == ["2", "3"]  # resumed at epoch 2
    # The run's kept checkpoints: epoch 1's from before the kill, epochs 2 and 3 trained after the resume.
    pd.testing.assert_frame_equal(resumed, first)
    assert resumed_model == first_model


_TWO_NODES = """
import sys
sys.path.insert(0, {jobs!r})
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
# 3 CPUs a node and 2 a worker: one Train worker fits on each node (not both on one, as Ray's default packing would
# place them), with a CPU beside it for the input pipeline.
cluster = Cluster(initialize_head=True,
                  head_node_args={{"num_cpus": 3, "include_dashboard": True, "dashboard_port": {port}}})
cluster.add_node(num_cpus=3)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
assert len([n for n in ray.nodes() if n["Alive"]]) == 2
import train
rc = train.main(["--data", {data!r}, "--out", {out!r}, "--backbone", "custom_cnn", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "16", "--workers", "2", "--cpus-per-worker", "2"])
workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=100)
print("WORKER_NODES", len({{a.node_id for a in workers}}))
ray.shutdown()
cluster.shutdown()
print("RC", rc)
"""


@pytest.mark.slow
def test_two_node_cluster(mura_dataset, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = _TWO_NODES.format(jobs=str(REPO / "jobs"), data=mura_dataset, out=str(tmp_path / "multi"), port=port)
    env = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert "RC 0" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WORKER_NODES 2" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "multi" / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_train_from_and_to_s3(mura_dataset, s3_bucket, capsys):
    """--data and --out on the S3 test server: the dataset read by Ray Data, checkpoints, export and report written
    through pyarrow's S3 filesystem."""
    from mura_ray import storage

    fs, _ = storage.resolve(f"s3://{s3_bucket}/x")
    for f in Path(mura_dataset).rglob("*"):
        if f.is_file():
            with fs.open_output_stream(f"{s3_bucket}/data/{f.relative_to(mura_dataset)}") as out:
                out.write(f.read_bytes())
    assert train_job.main(["--data", f"s3://{s3_bucket}/data", "--out", f"s3://{s3_bucket}", "--epochs", "1"]) == 2
    assert "give a folder inside the bucket" in capsys.readouterr().err
    run = f"s3://{s3_bucket}/runs/cnn"
    assert train_job.main(["--data", f"s3://{s3_bucket}/data", "--out", run, "--backbone", "custom_cnn",
                           "--image-size", "32", "--epochs", "1", "--batch-size", "16"]) == 0
    for name in ("model/model.safetensors", "model/config.json", "model/model_card.json", "report/report.json",
                 "train_config.json"):
        assert storage.exists(f"{run}/{name}"), name
    card = storage.read_json(f"{run}/model/model_card.json")
    assert card["training"]["data"] == f"s3://{s3_bucket}/data" and card["metrics"]["test"]["body_part_accuracy"] >= 0
    assert [p for p in storage.list_files(run) if "/checkpoint_" in p and p.endswith("state.pt")]



def test_evaluate_leaves_out_undecoded_and_unlabelled_rows():
    import torch

    from mura_ray.models import build_model
    from mura_ray.train import evaluate

    torch.manual_seed(0)
    model = build_model("custom_cnn")
    image = torch.randn(6, 1, 32, 32)
    batch = {"image": image, "label": torch.tensor([0.0, 1.0, 0.0, 1.0, -1.0, 1.0]),
             "body_part": torch.tensor([0, 1, 2, 3, 4, 5]), "ok": torch.tensor([1.0, 1, 1, 1, 1, 0]),
             "study": torch.tensor([7, 7, 8, 9, -1, 9])}  # -1: no study (the row is its own)
    kwargs = {"kind": "bce", "pos_weight": None, "gamma": 2.0, "body_part_weight": 0.5}
    got = evaluate(model, [batch], torch.device("cpu"), None, kwargs, 0.5)
    clean = {k: v[:4] for k, v in batch.items()}
    want = evaluate(model, [clean], torch.device("cpu"), None, kwargs, 0.5)
    assert got["val_skipped_images"] == 1 and want["val_skipped_images"] == 0
    assert {k: v for k, v in got.items() if k != "val_skipped_images"} == pytest.approx(
        {k: v for k, v in want.items() if k != "val_skipped_images"})
    nothing = {**batch, "ok": torch.tensor([0.0, 0, 0, 0, 1, 0])}  # undecoded, or decoded without a label
    with pytest.raises(RuntimeError, match="no labelled image that decodes"):
        evaluate(model, [nothing], torch.device("cpu"), None, kwargs, 0.5)


def _tiny_batch(dtype=None):
    import torch

    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(4, 1, 32, 32, generator=g, dtype=dtype), "label": torch.tensor([0.0, 1.0, 1.0, 0.0]),
            "body_part": torch.tensor([0, 1, 2, 3]), "ok": torch.ones(4)}


_LOSS = {"kind": "bce", "pos_weight": None, "gamma": 2.0, "body_part_weight": 0.5}


def _state_after_one_step(cfg: TrainConfig) -> dict:
    import torch

    from mura_ray.models import build_model
    from mura_ray.train import setup_training, train_step

    cpu = torch.device("cpu")
    run = setup_training(build_model("custom_cnn", image_size=32), cfg, None, lambda m: m, cpu)
    train_step(run.model, _tiny_batch(), run.optimizer, run.scaler, cpu, None, _LOSS)
    return {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": 0,
            "best": {"val_study_kappa": 0.4}, "bad_epochs": 0}


def test_resumed_optimizer_state_follows_the_prepared_model():
    """The optimizer and its checkpointed state are set up after the model is moved (to its GPU on a cluster; here
    a cast to float64 stands in for the move): state loaded before would stay where the parameters were, and a
    resumed GPU run would fail its first step."""
    import torch

    from mura_ray.models import build_model
    from mura_ray.train import setup_training, train_step

    cfg = TrainConfig(backbone="custom_cnn", image_size=32, epochs=4)
    state = _state_after_one_step(cfg)
    cpu = torch.device("cpu")
    run = setup_training(build_model("custom_cnn", image_size=32), cfg, state, lambda m: m.to(torch.float64), cpu)
    moments = [s["exp_avg"] for s in run.optimizer.state.values()]
    assert moments and all(m.dtype == torch.float64 for m in moments)
    assert (run.start_epoch, run.best) == (1, {"val_study_kappa": 0.4})
    n, _, loss = train_step(run.model, _tiny_batch(torch.float64), run.optimizer, run.scaler, cpu, None, _LOSS)
    assert n == 4 and loss == loss  # a step, not a device/dtype error


def test_a_resumed_run_follows_its_recipe_from_where_it_stopped():
    """The rate is stepped every step (warm-up, then cosine). Same recipe: it goes on exactly as if never
    interrupted. More --epochs or another --lr: the new recipe's rate at that epoch (a restored schedule would keep
    the old length and the old rate); the new --weight-decay, on the weights only."""
    import torch

    from mura_ray.models import build_model
    from mura_ray.optim import lr_schedule
    from mura_ray.train import setup_training

    steps = 3

    def rates(cfg: TrainConfig, start: int, state=None) -> list[float]:
        if state is None:
            optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
            scheduler = lr_schedule(optimizer, cfg, steps, start)
        else:
            run = setup_training(build_model("custom_cnn", image_size=32), cfg, state, lambda m: m,
                                 torch.device("cpu"), steps)
            optimizer, scheduler = run.optimizer, run.scheduler
        out = []
        for update in range(start * steps, cfg.epochs * steps):
            out.append(optimizer.param_groups[0]["lr"])
            scheduler.step_update(update + 1)
        return out

    ten = TrainConfig(backbone="custom_cnn", image_size=32, epochs=10, lr=1e-3, warmup_epochs=2)
    fresh = rates(ten, 0)
    assert fresh[0] == pytest.approx(1e-4) and max(fresh) == pytest.approx(1e-3) and fresh[-1] > 0
    assert fresh[1] > fresh[0] and fresh[-2] > fresh[-1]  # within an epoch too
    assert rates(ten, 4) == pytest.approx(fresh[4 * steps:])
    state = {**_state_after_one_step(ten), "epoch": 5}
    assert rates(ten, 6, state) == pytest.approx(fresh[6 * steps:])
    longer = TrainConfig(backbone="custom_cnn", image_size=32, epochs=20, lr=1e-2, warmup_epochs=2, weight_decay=0.1)
    resumed = setup_training(build_model("custom_cnn", image_size=32), longer, state, lambda m: m,
                             torch.device("cpu"), steps)
    assert sorted(group["weight_decay"] for group in resumed.optimizer.param_groups) == [0.0, 0.1]
    assert rates(longer, 6, state) == pytest.approx(rates(longer, 0)[6 * steps:])


def test_weight_decay_spares_biases_and_norms():
    import torch

    from mura_ray.models import build_model
    from mura_ray.optim import build_optimizer

    model = build_model("custom_cnn", image_size=32)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.05))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        spared = p.ndim <= 1 or name.endswith(".bias") or name == "body_part_embed.weight"
        assert decay[id(p)] == (0.0 if spared else 0.05), name
    assert isinstance(optimizer, torch.optim.AdamW)


def test_pretrained_weights_reach_the_workers_from_the_driver(ray_cluster, mura_dataset, tmp_path):
    """--pretrained-file is read once, on the driver: the Train workers get the weights through the object store
    (on a cluster the file is on the submitting machine only, and worker nodes may have no internet for the hub).
    The file is gone before the workers start; with --freeze all the exported trunk is still the file's."""
    import timm
    import torch
    from safetensors.torch import load_file, save_file

    from mura_ray.checkpoints import best_state
    from mura_ray.train import build_trainer, export_best, prepare_run

    source = timm.create_model("resnet10t", num_classes=10)
    weights = tmp_path / "resnet10t.safetensors"
    save_file(source.state_dict(), str(weights))
    cfg = TrainConfig(data=mura_dataset, out=str(tmp_path / "run"), backbone="resnet10t", pretrained_file=str(weights),
                      freeze="all", image_size=32, epochs=1, batch_size=16)
    run = prepare_run(cfg)
    weights.unlink()
    export_best(run, best_state(build_trainer(run).fit(), run.cfg.select_metric))
    exported = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    name = "layer4.0.conv2.weight"
    torch.testing.assert_close(exported[f"trunk.{name}"], source.state_dict()[name])


def test_an_out_that_cannot_be_written_is_one_line(ray_cluster, mura_dataset, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert train_job.main(["--data", mura_dataset, "--out", str(tmp_path / "a_file" / "run"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot write there" in err and "Traceback" not in err, err


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started before --data was checked")


def test_a_missing_dataset_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mura_ray.runtime.init_ray", _no_ray)
    missing = tmp_path / "nowhere"
    assert train_job.main(["--data", str(missing), "--out", str(tmp_path / "run"), "--backbone", "custom_cnn",
                           "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == \
        f"error: --data {missing}: no such dataset; create it with jobs/ingest.py", err


def test_refused_s3_credentials_for_data_are_one_line(ray_cluster, s3_auth_server, tmp_path, capsys, monkeypatch):
    """--data on S3 with a wrong secret: one line naming it and saying access was denied, exit code 2 (it was a
    traceback of pyarrow's OSError from reading the dataset's summary), before Ray is started for nothing."""
    srv = s3_auth_server
    srv.use(monkeypatch, srv.access_key, "x" * 40)
    monkeypatch.setattr("mura_ray.runtime.init_ray", _no_ray)
    data = f"s3://{srv.bucket}/datasets/mura"
    assert train_job.main(["--data", data, "--out", str(tmp_path / "run"), "--backbone", "custom_cnn",
                           "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(
        f"error: {data}: access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the bucket policy): "), err


_SMALL_OBJECT_STORE_RUN = """
import os, socket, sys
sys.path.insert(0, os.path.join({repo!r}, "jobs"))
import ray
from mura_ray.config import IngestConfig
from mura_ray.data.ingest import ingest
from mura_ray.data.synthetic import generate_mura
from mura_ray.runtime import WORKER_SETUP_HOOK, local_ray_environment

local_ray_environment()
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{{port}}"
ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_port=port, _node_ip_address="127.0.0.1",
         object_store_memory=100 * 1024**2, runtime_env={{"worker_process_setup_hook": WORKER_SETUP_HOOK}})
# The demo's set (1,406 train images in files of 256 rows): the 3 decode tasks beside the Train worker each stream
# a long file and pause mid-way.
generate_mura({tmp!r}, n_images=2000, image_size=128, seed=0)
ingest(IngestConfig(source="mura", root={tmp!r}, out={data!r}))
import train
sys.exit(train.main(["--data", {data!r}, "--out", {out!r}, "--backbone", "custom_cnn", "--image-size", "128",
                     "--epochs", "2", "--batch-size", "16"]))
"""


@pytest.mark.slow
def test_validation_runs_while_the_paused_training_stream_holds_every_cpu(tmp_path):
    """While rank 0 validates, the training stream is paused and its decode tasks, blocked by backpressure, keep
    their CPUs. With a small object store (100 MB: Ray Data's output budget fills with a few hundred 128-px images)
    they held every spare CPU, and validation tasks that reserved a CPU were never scheduled: the run hung after
    epoch 1. Validation's tasks now reserve none. Its own Ray, so the object store can be small."""
    import psutil

    code = _SMALL_OBJECT_STORE_RUN.format(repo=str(REPO), tmp=str(tmp_path / "mura"), data=str(tmp_path / "data"),
                                          out=str(tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):  # its Ray: raylet, GCS, workers
            child.kill()
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail("the run hung (validation waiting for CPUs held by the paused training stream):\n" + out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    assert "epoch 2/2" in out and (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_validation_in_training_equals_scoring_the_split_with_the_exported_model(trained_run, mura_dataset, tmp_path):
    """The validation metrics that training computed for the exported checkpoint (in its Train worker, on inputs
    its decode tasks prepared) are those of jobs/score.py on the same split with the exported model: one
    preprocessing function (`images.load_pixels`), one test-time augmentation (`models.predict`) and the same
    probabilities on both paths."""
    import score as score_job
    from sklearn.metrics import roc_auc_score

    from mura_ray.metrics import aggregate_studies
    from mura_ray.predictions import read_predictions

    card = json.loads((trained_run / "model" / "model_card.json").read_text())
    val = card["metrics"]["validation"]
    assert card["selected_with_tta"] is True  # the run validated over the flips: scoring averages the same ones
    out = tmp_path / "val"
    assert score_job.main(["--model", str(trained_run / "model"), "--input", f"{mura_dataset}/val", "--out", str(out),
                           "--no-report"]) == 0
    assert json.loads((out / "manifest.json").read_text())["tta"] is True
    df = read_predictions(str(out))
    df = df[df["error"].isna() & df["label"].notna()]
    assert len(df) == card["training"]["counts"]["val"] - val["val_skipped_images"] > 0
    y, p = df["label"].astype(int).to_numpy(), df["prob_abnormal"].astype(np.float64).to_numpy()
    assert roc_auc_score(y, p) == pytest.approx(val["val_auc"], abs=1e-6)
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))  # the abnormality loss of training's `bce`
    assert bce == pytest.approx(val["val_abnormal_loss"], rel=1e-5)
    studies = aggregate_studies(df["study_id"], p, y)
    assert roc_auc_score(studies["label"], studies["prob_abnormal"]) == pytest.approx(val["val_study_auc"], abs=1e-6)


def test_best_state_falls_back_to_the_validation_loss_when_the_metric_is_undefined(monkeypatch, caplog):
    """A validation split of one class has no AUC or kappa at any epoch (NaN in a live run, null once the run is
    read back from storage): the export takes the checkpoint with the lowest validation loss, and says so."""
    from mura_ray import checkpoints

    class Result:
        best_checkpoints = [("a", {"val_auc": float("nan"), "val_loss": 0.5}),
                            ("b", {"val_auc": None, "val_loss": 0.4})]

    monkeypatch.setattr(checkpoints, "load_checkpoint_state", lambda checkpoint: {"checkpoint": checkpoint})
    with caplog.at_level("WARNING", logger="mura_ray.checkpoints"):
        assert checkpoints.best_state(Result(), "val_auc") == {"checkpoint": "b"}
    assert "val_auc is undefined at every kept checkpoint" in caplog.text
    Result.best_checkpoints = [("a", {"val_auc": None, "val_abnormal_loss": 0.5}),
                               ("b", {"val_auc": None, "val_abnormal_loss": 0.3})]
    assert checkpoints.best_state(Result(), "val_auc") == {"checkpoint": "b"}  # the abnormality loss, where recorded
    Result.best_checkpoints = [("a", {"val_auc": 0.7, "val_loss": 0.5}),
                               ("b", {"val_auc": float("nan"), "val_loss": 0.4}),
                               ("c", {"val_auc": 0.6, "val_loss": 0.3})]
    assert checkpoints.best_state(Result(), "val_auc") == {"checkpoint": "a"}
    assert checkpoints.best_state(Result(), "val_loss") == {"checkpoint": "c"}


def test_early_stopping_watches_the_selected_metric_and_falls_back_where_it_is_undefined():
    from mura_ray.train import watch

    best: dict[str, float] = {}
    nan = float("nan")
    epochs = [{"val_study_kappa": 0.3, "val_abnormal_loss": 0.6}, {"val_study_kappa": 0.5, "val_abnormal_loss": 0.7},
              {"val_study_kappa": 0.4, "val_abnormal_loss": 0.5}, {"val_study_kappa": nan, "val_abnormal_loss": 0.4},
              {"val_study_kappa": nan, "val_abnormal_loss": 0.45}]
    seen = [watch(val, best, "val_study_kappa") for val in epochs]
    # Kappa higher is better: epoch 3's lower kappa is no better, though its loss is; without kappa, the loss.
    assert seen == [("val_study_kappa", True), ("val_study_kappa", True), ("val_study_kappa", False),
                    ("val_abnormal_loss", True), ("val_abnormal_loss", False)]
    assert best == {"val_study_kappa": 0.5, "val_abnormal_loss": 0.4}
    assert watch({"val_abnormal_loss": 0.3}, {"val_abnormal_loss": 0.4}, "val_abnormal_loss") == ("val_abnormal_loss",
                                                                                                  True)
