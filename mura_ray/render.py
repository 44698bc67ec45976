"""The report as Markdown and as one self-contained HTML page: one list of blocks renders to both, so the two
never drift apart. Tables follow the reference MURA report (a classification report with 4-decimal numbers, ROC AUC
and Cohen's kappa lines, a body-part table)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str


_Block = tuple[str, str] | _Table | list[str]  # ("h1" | "h2" | "p" | "figure:<file>", text), table, bullet list


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables in the reference report's format (figures linked from figures/)."""
    lines: list[str] = []
    for block in _blocks(report):
        if isinstance(block, _Table):
            lines += [*markdown_table(block.headers, block.rows), "", block.caption, ""]
            continue
        if isinstance(block, list):
            lines += [*(f"- {item}" for item in block), ""]
            continue
        kind, text = block
        if kind == "h1":
            lines += [f"# {text}", ""]
        elif kind == "h2":
            lines += [f"## {text}", ""]
        elif kind.startswith("figure:"):
            lines += [f"![{text}](figures/{kind.removeprefix('figure:')})", ""]
        else:
            lines += [text, ""]
    return "\n".join(lines).rstrip() + "\n"


def render_html(
    report: dict[str, Any],
    figures: dict[str, bytes],
    *,
    explanations: Sequence[tuple[str, bytes]] | None = None,
) -> str:
    """One self-contained page: inline CSS, tables, figures embedded as base64 PNG data URIs."""
    body: list[str] = []
    for block in _blocks(report):
        if isinstance(block, _Table):
            body.append(_html_table(block))
            continue
        if isinstance(block, list):
            body.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block) + "</ul>")
            continue
        kind, text = block
        if kind.startswith("figure:"):
            name = kind.removeprefix("figure:")
            if name in figures:
                body.append(_html_figure(figures[name], text))
        elif kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(text)}</{kind}>")
        else:
            body.append(f"<p>{html.escape(text)}</p>")
    if explanations:
        body.append("<h2>Grad-CAM</h2>")
        body += [_html_figure(png, caption) for caption, png in explanations]
    title = html.escape(_title(report))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;"
    "padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
    "caption{caption-side:bottom;font-style:italic;padding-top:.4em;text-align:left}"
    "figure{display:inline-block;margin:1em 1em 1em 0;vertical-align:top}img{max-width:100%}"
    "figcaption{font-style:italic}"
)


def _blocks(report: dict[str, Any]) -> list[_Block]:
    blocks: list[_Block] = [("h1", _title(report))]
    blocks += [("p", line) for line in _summary_lines(report)]
    n = 0

    def table(headers: list[str], rows: list[list[str]], caption: str) -> _Table:
        nonlocal n
        n += 1
        return _Table(headers, rows, f"Table {n}: {caption}")

    for level, name, unit in [("image_level", "Image", "images"), ("study_level", "Study", "studies")]:
        if level not in report:  # an unlabelled run's report: counts and drift
            break
        m = report[level]
        blocks.append(("h2", f"Abnormality classification: {name.lower()} level"))
        blocks.append(table(*_classification_rows(m), f"{name}-level abnormality classification report "
                                                        f"(class 1 = abnormal, {m['n']} {unit})"))
        blocks.append(("p", f"ROC AUC Score: {fmt(m['roc_auc'])}{_ci(m.get('roc_auc_ci95'))}"))
        blocks.append(("p", f"Cohen's Kappa Score: {fmt(m['cohen_kappa'])}{_ci(m.get('cohen_kappa_ci95'))}"))
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        blocks.append(table(["", "Predicted 0", "Predicted 1"], [["True 0", str(tn), str(fp)],
                                                                  ["True 1", str(fn), str(tp)]],
                            f"{name}-level confusion matrix at threshold {m['threshold']:.4f}"))
    if "image_level" in report:
        blocks += [("figure:roc.png", "ROC curves"), ("figure:precision_recall.png", "Precision-recall curves"),
                   ("figure:confusion_matrix.png", "Confusion matrices"), ("figure:calibration.png", "Calibration")]

    if report.get("per_body_part"):
        blocks.append(("h2", "Abnormality classification per body part"))
        blocks.append(table(*_per_body_part_rows(report["per_body_part"]),
                            "Abnormality classification per body part (image and study level)"))
        blocks.append(("figure:per_body_part.png", "ROC AUC and Cohen's kappa per body part"))
    if report.get("body_part"):
        blocks.append(("h2", "Body part classification"))
        blocks.append(table(*_classification_rows(report["body_part"], title=True), "Body part classification report"))
        blocks.append(("figure:body_part_confusion.png", "Body part confusion matrix"))

    if report.get("drift"):
        blocks += _drift_blocks(report["drift"], table)
    notes = _collect_notes(report)
    if notes:
        blocks.append(("h2", "Notes: undefined metrics, bootstrap, study labels"))
        blocks.append([f"{where}: {reason}" for where, reason in notes])
    return blocks


def _drift_blocks(drift: dict[str, Any], table: Any) -> list[_Block]:
    """The drift section: verdict, reasons, a table per quantity, the distributions overlaid."""
    blocks: list[_Block] = [("h2", "Drift from the model's validation split")]
    verdict = {"flagged": "FLAGGED", "ok": "not flagged"}.get(drift["status"], "not judged")
    line = (f"Drift: {verdict}. {drift['n_images']} images scored in this run"
            + (f" against {drift['n_reference']} reference images" if drift.get("n_reference") else "") + ".")
    if drift.get("note"):
        line += f" {drift['note'][0].upper()}{drift['note'][1:]}."
    blocks.append(("p", line))
    thresholds = drift.get("thresholds")
    if thresholds:
        blocks.append(("p", f"A quantity is flagged when its PSI exceeds {thresholds['psi_alarm']} and the value "
                            f"that sampling alone exceeds with probability {thresholds['alpha']} at these sample "
                            f"sizes; under {thresholds['min_images']} images nothing is judged."))
    if drift.get("reasons"):
        blocks.append(list(drift["reasons"]))
    quantities = drift.get("quantities", {})
    if quantities:
        rows = [[name, str(q["n"]), fmt(q.get("psi")), fmt(q.get("psi_threshold")), fmt(q.get("ks")),
                 fmt(q.get("ks_pvalue")), "yes" if q.get("flagged") else q.get("note", "no")]
                for name, q in quantities.items()]
        blocks.append(table(["Quantity", "Images", "PSI", "PSI threshold", "KS", "KS p-value", "Flagged"], rows,
                            "Drift per quantity (PSI over the reference's bins; KS against its sample)"))
        blocks.append(("figure:drift.png", "Reference (validation) and this run's distributions"))
    return blocks


def render_history_markdown(runs: list[dict[str, Any]]) -> str:
    """The scoring runs of OUT/history.jsonl as one Markdown table."""
    lines = ["# Scoring runs", "", *markdown_table(*_history_rows(runs)), ""]
    return "\n".join(lines)


def render_history_html(runs: list[dict[str, Any]], figure: bytes) -> str:
    """One self-contained page: the trend figure and the table of runs."""
    headers, rows = _history_rows(runs)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Scoring runs</title>\n"
            f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>Scoring runs</h1>\n"
            + _html_figure(figure, "Images, positive rate, mean probability and largest PSI per run")
            + _html_table(_Table(headers, rows, f"{len(runs)} runs")) + "\n</body>\n</html>\n")


def _history_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["Run (UTC)", "Images", "Failed", "Positive rate", "Mean probability", "Drift", "Largest PSI"]
    rows = []
    for r in runs:
        top = max(r["psi"].items(), key=lambda kv: kv[1], default=None)
        rows.append([r["run_at"][:19].replace("T", " "), str(r["images"]), str(r["failed"]), pct(r["positive_rate"]),
                     fmt(r["mean_prob_abnormal"]), "FLAGGED" if r["drift_flagged"] else r["drift_status"],
                     "-" if top is None else f"{top[1]:.3f} ({top[0]})"])
    return headers, rows


def _title(report: dict[str, Any]) -> str:
    model = report.get("model_id")
    model_name = ", ".join(model) if isinstance(model, list) else model
    return f"MURA abnormality report: {model_name}" if model_name else "MURA abnormality report"


def _summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    if report.get("predictions"):
        lines.append(f"Predictions: {report['predictions']}")
    if "image_level" not in report:  # an unlabelled run's report
        lines.append(f"Images: {report['n_images']} scored · {report['n_errors']} with scoring errors · no labels: "
                     "no metrics")
        lines.append(f"Threshold: {report['threshold']:.4f} ({report['threshold_source']}) · called abnormal: "
                     f"{pct(report.get('positive_rate'))} · mean probability: {fmt(report.get('mean_prob_abnormal'))}")
        return lines
    lines.append(
        f"Images: {report['n_images']} · Studies: {report['n_studies']} · "
        f"Excluded: {report['n_errors']} with scoring errors, {report.get('n_unlabelled', 0)} unlabelled"
    )
    threshold = f"Threshold: {report['threshold']:.4f} ({report['threshold_source']})"
    point = report.get("operating_point")
    if point:
        chosen = (
            "Youden's J" if point["method"] == "youden"
            else f"highest threshold with sensitivity >= {point['target_sensitivity']}"
        )
        level = point.get("level", "image")
        threshold += (
            f", chosen by {chosen} on the {level}-level probabilities of "
            f"{point.get('calibrated_on', 'validation predictions')}"
        )
        validation = point.get("validation")
        if validation:
            threshold += " (validation: " + "; ".join(
                f"{validation[key]['n']} {unit}, sensitivity {fmt(validation[key]['sensitivity'])}, "
                f"specificity {fmt(validation[key]['specificity'])}"
                for key, unit in (("image_level", "images"), ("study_level", "studies"))
            ) + ")"
        else:  # a report written before both levels were recorded
            threshold += (f" ({point['n_images']} images; sensitivity {fmt(point['val_sensitivity'])}, "
                          f"specificity {fmt(point['val_specificity'])})")
    lines.append(threshold + "; an image or study is abnormal when its probability is at or above it.")
    mixed = report.get("n_studies_mixed_labels")
    lines.append("Study probability = mean of its images' probabilities, study label = max of its images' labels "
                 "(MURA's protocol)" + (f"; {mixed} studies have normal and abnormal images." if mixed else "."))
    boot = report["image_level"].get("bootstrap")
    if boot:
        lines.append(f"95% CIs: percentile bootstrap, {boot['n_resamples']} resamples (seed {boot['seed']}) drawn "
                     f"by {boot.get('unit', 'row')} at both levels (at image level, a drawn study brings all its "
                     "images).")
    return lines


def _classification_rows(m: dict[str, Any], *, title: bool = False) -> tuple[list[str], list[list[str]]]:
    """scikit-learn's classification report as a table (`title`: class names title-cased, as body parts)."""
    headers = ["Class", "Precision", "Recall", "F1-score", "Support"]
    rows = [[c.title() if title else c, fmt(v["precision"]), fmt(v["recall"]), fmt(v["f1"]), str(v["support"])]
            for c, v in m["per_class"].items()]
    total = str(m["n"])
    rows.append(["Accuracy", "", "", fmt(m["accuracy"]), total])
    for key, label in [("macro_avg", "Macro Avg"), ("weighted_avg", "Weighted Avg")]:
        a = m[key]
        rows.append([label, fmt(a["precision"]), fmt(a["recall"]), fmt(a["f1"]), total])
    return headers, rows


def _per_body_part_rows(per_part: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["Body part", "Images", "Abnormal", "Accuracy", "ROC AUC", "Cohen's Kappa",
               "Studies", "Study Accuracy", "Study ROC AUC", "Study Cohen's Kappa"]
    rows = []
    for part, levels in per_part.items():
        im, st = levels["image_level"], levels["study_level"]
        rows.append([part.title(), str(im["n"]), str(im["n_abnormal"]), fmt(im["accuracy"]), fmt(im["roc_auc"]),
                     fmt(im["cohen_kappa"]), str(st["n"]), fmt(st["accuracy"]), fmt(st["roc_auc"]),
                     fmt(st["cohen_kappa"])])
    return headers, rows


def _collect_notes(report: dict[str, Any]) -> list[tuple[str, str]]:
    notes = list(report.get("notes", {}).items())
    for level in ("image_level", "study_level"):
        notes += [(f"{level}.{k}", v) for k, v in report.get(level, {}).get("notes", {}).items()]
    for part, levels in report.get("per_body_part", {}).items():
        for level, m in levels.items():
            notes += [(f"per_body_part.{part}.{level}.{k}", v) for k, v in m.get("notes", {}).items()]
    notes += [(f"body_part.{k}", v) for k, v in report.get("body_part", {}).get("notes", {}).items()]
    return notes


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def _html_table(t: _Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t.rows)
    return f"<table><caption>{html.escape(t.caption)}</caption><tr>{head}</tr>{rows}</table>"


def _html_figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(caption, quote=True)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})"
