"""Model comparison tables (the reference report's Tables 8 and 9, plus study-level columns) from finished runs or
report directories."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence
from typing import Any

from mura_ray import storage
from mura_ray.config import UserError
from mura_ray.render import fmt, markdown_table, pct

logger = logging.getLogger(__name__)


def compare_reports(dirs: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Markdown comparison tables and their data for finished runs or report directories.

    A run directory holds `report/report.json` and `model/model_card.json` (the model is named by the card's
    `backbone`); a report directory holds `report.json` and is named after itself.
    """
    if not dirs:
        raise ValueError("nothing to compare; pass one or more run or report directories to --compare")
    models = [_load_for_comparison(d) for d in dirs]
    names = [m["name"] for m in models]
    for m in models:
        if names.count(m["name"]) > 1:
            m["name"] = m["source"]  # two runs of one backbone: tell them apart by where they came from

    abnormal_headers = ["Model", "Threshold", "Images", "Studies", "Accuracy", "Macro F1", "ROC AUC",
                        "Cohen's Kappa", "Study Accuracy", "Study Macro F1", "Study ROC AUC", "Study Cohen's Kappa"]
    abnormal_rows = []
    for m in models:
        row = [m["name"], fmt(m["threshold"]), str(m["n_images"]), str(m["n_studies"])]
        for level in ("image_level", "study_level"):
            s = m[level]
            row += [pct(s["accuracy"]), pct(s["macro_f1"]), fmt(s["roc_auc"]), fmt(s["cohen_kappa"])]
        abnormal_rows.append(row)
    notes = []
    if len({(m["n_images"], m["n_studies"]) for m in models}) > 1:
        sizes = ", ".join(f"{m['name']} {m['n_images']} images / {m['n_studies']} studies" for m in models)
        notes.append(f"Note: the reports are not on the same test set ({sizes}); their numbers are not directly "
                     "comparable.")
    lines = ["# Model comparison", "", *markdown_table(abnormal_headers, abnormal_rows), "",
             "Table 1: Abnormality Classification – Model Comparison (image level, then study level; each at its "
             "own threshold)", ""]
    for note in notes:
        lines += [note, ""]
    with_parts = [m for m in models if m["body_part"] is not None]
    if with_parts:
        rows = [[m["name"], pct(m["body_part"]["accuracy"]), pct(m["body_part"]["macro_f1"])] for m in with_parts]
        lines += [*markdown_table(["Model", "Accuracy", "Macro F1"], rows), "",
                  "Table 2: Body Part Classification – Model Comparison", ""]
    return "\n".join(lines).rstrip() + "\n", {"models": models, "notes": notes}


def write_comparison(dirs: Sequence[str], out_uri: str) -> tuple[str, dict[str, Any]]:
    """Write comparison.md and comparison.json under `out_uri`; returns what `compare_reports` returned."""
    markdown, data = compare_reports(dirs)
    storage.write_bytes(storage.join(out_uri, "comparison.md"), markdown.encode("utf-8"))
    storage.write_json(storage.join(out_uri, "comparison.json"), data)
    logger.info("Wrote comparison of %d models to %s", len(data["models"]), out_uri)
    return markdown, data


def _load_for_comparison(uri: str) -> dict[str, Any]:
    name = posixpath.basename(uri.rstrip("/")) or uri
    if storage.exists(storage.join(uri, "report.json")):
        report_uri = storage.join(uri, "report.json")
    elif storage.exists(storage.join(uri, "report", "report.json")):
        report_uri = storage.join(uri, "report", "report.json")
        card_uri = storage.join(uri, "model", "model_card.json")
        if storage.exists(card_uri):
            card = _read_json_or_refuse(card_uri, "a model card")
            backbone = card.get("backbone") if isinstance(card, dict) else None
            name = backbone if isinstance(backbone, str) and backbone else name
    else:
        raise FileNotFoundError(
            f"{uri} is neither a report directory (report.json) nor a run directory (report/report.json)"
        )
    report = _read_json_or_refuse(report_uri, "a jobs/report.py report")
    _check_comparable(report, report_uri)
    entry: dict[str, Any] = {"name": name, "source": uri, "threshold": report["threshold"],
                             "n_images": report["n_images"], "n_studies": report["n_studies"]}
    for level in ("image_level", "study_level"):
        m = report[level]
        entry[level] = {
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_avg"]["f1"],
            "roc_auc": m["roc_auc"],
            "cohen_kappa": m["cohen_kappa"],
        }
    body_part = report.get("body_part")
    entry["body_part"] = (
        {"accuracy": body_part["accuracy"], "macro_f1": body_part["macro_f1"]} if body_part else None
    )
    return entry


def _read_json_or_refuse(uri: str, what: str) -> Any:
    try:
        return storage.read_json(uri)
    except ValueError as e:
        raise UserError(f"{uri} is not {what}: not valid JSON ({e})") from None


def _check_comparable(report: Any, uri: str) -> None:
    """Refuse a report.json without what the comparison reads (written by something else, or damaged)."""

    def number(value: Any, nullable: bool = False) -> bool:
        return (value is None and nullable) or (isinstance(value, int | float) and not isinstance(value, bool))

    if not isinstance(report, dict):
        problems = [f"a JSON {type(report).__name__}, not an object"]
    else:
        problems = [key for key in ("n_images", "n_studies", "threshold") if not number(report.get(key))]
        for level in ("image_level", "study_level"):
            m = report.get(level)
            if not isinstance(m, dict):
                problems.append(level)
                continue
            problems += [f"{level}.{key}" for key, nullable in (("accuracy", False), ("roc_auc", True),
                                                                 ("cohen_kappa", True))
                         if not number(m.get(key), nullable)]
            avg = m.get("macro_avg")
            if not isinstance(avg, dict) or not number(avg.get("f1")):
                problems.append(f"{level}.macro_avg.f1")
        body_part = report.get("body_part")
        if body_part is not None and (not isinstance(body_part, dict) or not all(
                number(body_part.get(key)) for key in ("accuracy", "macro_f1"))):
            problems.append("body_part")
        problems = [f"no valid {p}" for p in problems]
    if problems:
        raise UserError(f"{uri} is not a jobs/report.py report ({', '.join(problems[:6])}); pass report or run "
                        "directories written by jobs/report.py, score or train")
