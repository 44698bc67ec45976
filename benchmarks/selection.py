"""Checkpoint selection: the test split's study-level kappa and AUC of the checkpoint chosen by study kappa
(`--select-metric val_study_kappa`, the default) and of the one chosen by image AUC (`val_auc`), from the same
training run, for several seeds. Not a timing: the question is whether selecting at MURA's unit picks models that
are no worse by MURA's measure.

Each seed trains the demo recipe (synthetic radiographs, custom CNN at 64 px) once, without early stopping and
keeping every epoch's checkpoint, so that the two selections differ only in the checkpoint they pick. Each pick is
exported, given its threshold on the validation split (`--threshold-policy kappa`) and scored on the test split,
as `jobs/train.py` does. Prints one JSON line.

    .venv/bin/python benchmarks/selection.py                  # seeds 0 1 2, demo recipe
    .venv/bin/python benchmarks/selection.py --seeds 0 --epochs 4 --demo-images 300   # a quick look
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import replace

from _common import emit, load_1m, median, setup_logging

logger = logging.getLogger("benchmarks.selection")

METRICS = ("val_study_kappa", "val_auc")


def run_seed(seed: int, out: str, epochs: int | None, demo_images: int | None) -> dict[str, dict[str, float]]:
    from mura_ray.checkpoints import best_state
    from mura_ray.config import DEMO_TRAIN_DEFAULTS, TrainConfig
    from mura_ray.score import choose_model_threshold, score_test_split
    from mura_ray.train import build_trainer, export_best, prepare_run

    cfg = replace(TrainConfig(), **DEMO_TRAIN_DEFAULTS, seed=seed, out=f"{out}/seed{seed}")
    if epochs:
        cfg = replace(cfg, epochs=epochs)
    if demo_images:
        cfg = replace(cfg, demo_images=demo_images)
    cfg = replace(cfg, patience=cfg.epochs, num_to_keep=cfg.epochs)  # every epoch kept, none stopped early
    run = prepare_run(cfg.validate())
    result = build_trainer(run).fit()
    picks = {}
    for metric in METRICS:
        state = best_state(result, metric)
        sub = replace(run, cfg=replace(run.cfg, out=f"{cfg.out}/{metric}", select_metric=metric))
        exported = export_best(sub, state)
        choose_model_threshold(exported["model_dir"], exported["data"], exported["run_dir"], cfg.threshold_policy,
                               cfg.threshold)
        test = score_test_split(exported["model_dir"], exported["data"], exported["run_dir"], bootstrap=0)
        picks[metric] = {"epoch": state["epoch"] + 1, "test_study_kappa": test["study_cohen_kappa"],
                         "test_study_auc": test["study_roc_auc"], "test_image_auc": test["image_roc_auc"]}
        logger.info("seed %d, selected by %s: epoch %d, test study kappa %.3f, study AUC %.3f", seed, metric,
                    picks[metric]["epoch"], test["study_cohen_kappa"], test["study_roc_auc"])
    return picks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    p.add_argument("--demo-images", type=int, default=None, help="default: the demo's")
    args = p.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory(prefix="selection-") as out:  # the job's own local Ray (prepare_run)
        per_seed = {seed: run_seed(seed, out, args.epochs, args.demo_images) for seed in args.seeds}
    result = {"name": "selection", "seeds": args.seeds, "load_1m": load_1m()}
    for metric in METRICS:
        for key in ("test_study_kappa", "test_study_auc"):
            result[f"{metric}_{key}_median"] = median([per_seed[s][metric][key] for s in args.seeds])
    diffs = [per_seed[s]["val_study_kappa"]["test_study_kappa"] - per_seed[s]["val_auc"]["test_study_kappa"]
             for s in args.seeds]
    result["study_minus_image_selection_kappa"] = diffs
    result["per_seed"] = per_seed
    emit(result)


if __name__ == "__main__":
    main()
