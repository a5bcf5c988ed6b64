"""A classifier's report on one split: where it fails, per class, in float and on the board.

``write_report`` takes the float model's and (optionally) the board's probabilities on the
same images and writes, into one folder (whole or not at all):

- ``summary.json``: accuracy, AUGRC, macro F1 and the deployment threshold for each model
  (the largest coverage whose selective risk is at most the target risk, and the
  confidence that gives it), and how many predictions changed between float and board;
- ``per_class.csv``: per class its support, precision, recall, F1, average precision and
  AUGRC (the AUGRC of the images of that class), for each model;
- ``confusion_<model>.csv``/``.png``: rows are the true classes (each sums to the class's
  support), columns the predicted ones; ``confusion_difference`` is device minus float;
- ``pr_<model>.csv``: the precision–recall curve of each class (one against the rest);
- ``risk_coverage_<model>.csv`` and ``risk_coverage.png``: the operating points, with
  the target risk and the threshold that meets it marked;
- ``changed.csv``/``changed.png``: exactly the images whose prediction differs between
  float and board, and how (``device_wrong``: the float model was right);
- ``failures_<model>.png``: contact sheets of the most confident failures, captioned
  true→predicted and confidence.

It reads arrays only (no model, board or tracking server), so it is the same for
``edgetune evaluate`` and for the champion a study reports at its end.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.folders import staged_folder
from tasks.metrics import (
    augrc,
    average_precision,
    coverage_at_risk,
    operating_points,
    precision_recall,
)
from tasks.sheets import contact_sheet

#: Selective risk the deployment threshold is read at, unless asked otherwise.
TARGET_RISK = 0.01
#: Images in each gallery.
GALLERY = 32
SUMMARY = "summary.json"
CHANGED = "changed.csv"


@dataclass(frozen=True)
class ReportInputs:
    """What a report is made of: one split's images and the models' outputs on them.

    ``images``: uint8 N×H×W×3 (the bundle the board saw); ``paths``: each image's file,
    relative to the dataset (None when unknown); ``predictions``: probabilities N×C by
    model name (``float``, ``device``), in the order the report shows them.
    """

    labels: np.ndarray
    classes: Sequence[str]
    images: np.ndarray
    paths: Sequence[str] | None
    predictions: dict[str, np.ndarray]


class ReportError(ValueError):
    """Outputs that do not fit the images or labels; the message names the mismatch."""


def confusion(predicted: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Counts by (true class, predicted class): row ``c`` sums to class ``c``'s support."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def per_class(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> list[dict[str, Any]]:
    """Per class: support, precision, recall, F1, average precision (one against the
    rest) and AUGRC over the images of the class (NaN where a class has none)."""
    predicted = probs.argmax(axis=1)
    matrix = confusion(predicted, labels, len(classes))
    rows = []
    for c, name in enumerate(classes):
        support, hits, said = int(matrix[c].sum()), int(matrix[c, c]), int(matrix[:, c].sum())
        precision = hits / said if said else float("nan")
        recall = hits / support if support else float("nan")
        f1 = (
            2 * precision * recall / (precision + recall)
            if support and said and precision + recall
            else (0.0 if support and said else float("nan"))
        )
        own = labels == c
        rows.append(
            {
                "class": name,
                "support": support,
                "predicted": said,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "average_precision": average_precision(own, probs[:, c])
                if support
                else float("nan"),
                "augrc": augrc(probs[own], labels[own]) if support else float("nan"),
            }
        )
    return rows


def pr_rows(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> list[list[Any]]:
    """Each class's precision–recall curve (one against the rest) as CSV rows."""
    rows: list[list[Any]] = []
    for c, name in enumerate(classes):
        own = labels == c
        if not own.any():
            continue
        precision, recall, thresholds = precision_recall(own, probs[:, c])
        # the curve's last point (recall 0, precision 1) has no threshold
        for p, r, t in zip(precision[:-1], recall[:-1], thresholds, strict=True):
            rows.append([name, float(t), float(p), float(r)])
    return rows


def changed_rows(inputs: ReportInputs) -> list[dict[str, Any]]:
    """The images whose float and device predictions differ, and how."""
    floating, device = inputs.predictions["float"], inputs.predictions["device"]
    f_pred, d_pred = floating.argmax(axis=1), device.argmax(axis=1)
    rows = []
    for i in map(int, np.flatnonzero(f_pred != d_pred)):
        label = int(inputs.labels[i])
        kind = (
            "device_wrong"
            if f_pred[i] == label
            else ("device_right" if d_pred[i] == label else "both_wrong")
        )
        rows.append(
            {
                "index": i,
                "path": inputs.paths[i] if inputs.paths is not None else "",
                "label": inputs.classes[label],
                "float_predicted": inputs.classes[int(f_pred[i])],
                "float_confidence": float(floating[i].max()),
                "device_predicted": inputs.classes[int(d_pred[i])],
                "device_confidence": float(device[i].max()),
                "kind": kind,
            }
        )
    return rows


def model_summary(probs: np.ndarray, labels: np.ndarray, target_risk: float) -> dict[str, Any]:
    """One model's headline figures and its deployment threshold at ``target_risk``."""
    coverage, threshold, risk = coverage_at_risk(probs, labels, target_risk)
    table = per_class(probs, labels, [str(c) for c in range(probs.shape[1])])
    f1 = [row["f1"] for row in table if not np.isnan(row["f1"])]
    return {
        "accuracy": float((probs.argmax(axis=1) == labels).mean()),
        "augrc": augrc(probs, labels),
        "macro_f1": float(np.mean(f1)) if f1 else float("nan"),
        "coverage_at_target_risk": coverage,
        "threshold_at_target_risk": threshold,
        "selective_risk_there": risk,
    }


def write_report(
    inputs: ReportInputs,
    out: Path,
    *,
    title: str,
    target_risk: float = TARGET_RISK,
    gallery: int = GALLERY,
) -> dict[str, Any]:
    """Write the report into folder ``out`` (replaced whole; nothing half-written is left
    there) and return its summary."""
    _check(inputs)
    if out.exists() and not (out / SUMMARY).is_file():
        raise ReportError(
            f"{out} exists and is not an earlier report; choose another folder or remove it"
        )
    with staged_folder(out) as work:
        summary = _write_all(inputs, work, title, target_risk, gallery)
    return summary


def _check(inputs: ReportInputs) -> None:
    n, k = len(inputs.labels), len(inputs.classes)
    if len(inputs.images) != n or (inputs.paths is not None and len(inputs.paths) != n):
        raise ReportError(
            f"{len(inputs.images)} images and {n} labels: the report needs one label per image"
        )
    for name, probs in inputs.predictions.items():
        if probs.shape != (n, k):
            raise ReportError(
                f"{name} outputs have shape {probs.shape}, not ({n}, {k}) (images, classes): "
                f"the model was not run on this split's images"
            )


def _write_all(
    inputs: ReportInputs, work: Path, title: str, target_risk: float, gallery: int
) -> dict[str, Any]:
    labels, classes, k = inputs.labels, inputs.classes, len(inputs.classes)
    summary: dict[str, Any] = {
        "title": title,
        "images": len(labels),
        "classes": list(classes),
        "target_risk": target_risk,
        "models": {},
    }
    tables, matrices = {}, {}
    for name, probs in inputs.predictions.items():
        summary["models"][name] = model_summary(probs, labels, target_risk)
        tables[name] = per_class(probs, labels, classes)
        matrices[name] = confusion(probs.argmax(axis=1), labels, k)
        _write_csv(
            work / f"confusion_{name}.csv",
            ["true \\ predicted", *classes],
            _matrix_rows(matrices[name], classes),
        )
        _heatmap(matrices[name], classes, work / f"confusion_{name}.png", f"{title}: {name}")
        _write_csv(
            work / f"pr_{name}.csv",
            ["class", "threshold", "precision", "recall"],
            pr_rows(probs, labels, classes),
        )
        _write_csv(
            work / f"risk_coverage_{name}.csv",
            ["threshold", "coverage", "generalized_risk", "selective_risk"],
            np.stack(operating_points(probs, labels), axis=1).tolist(),
        )
        _gallery(inputs, name, work / f"failures_{name}.png", gallery)
    _write_per_class(work / "per_class.csv", tables)
    _plot_risk_coverage(inputs, work / "risk_coverage.png", title, target_risk)
    if "float" in matrices and "device" in matrices:
        summary["changed"] = _write_changes(inputs, matrices, work, title, gallery)
    (work / SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return summary


def _write_changes(
    inputs: ReportInputs,
    matrices: dict[str, np.ndarray],
    work: Path,
    title: str,
    gallery: int,
) -> dict[str, int]:
    """``changed.csv``/``.png`` and the device-minus-float confusion; the counts by kind."""
    difference = matrices["device"] - matrices["float"]
    classes = inputs.classes
    header = ["true \\ predicted", *classes]
    _write_csv(work / "confusion_difference.csv", header, _matrix_rows(difference, classes))
    _heatmap(difference, classes, work / "confusion_difference.png", f"{title}: device - float")
    rows = changed_rows(inputs)
    fields = [
        "index",
        "path",
        "label",
        "float_predicted",
        "float_confidence",
        "device_predicted",
        "device_confidence",
        "kind",
    ]
    _write_csv(work / CHANGED, fields, [[row[f] for f in fields] for row in rows])
    shown = sorted(rows, key=lambda row: -row["device_confidence"])[:gallery]
    if shown:
        _sheet(
            inputs.images[[row["index"] for row in shown]],
            [f"{r['label']}:{r['float_predicted']}>{r['device_predicted']}" for r in shown],
            work / "changed.png",
        )
    kinds = ("device_wrong", "device_right", "both_wrong")
    counts = {kind: sum(row["kind"] == kind for row in rows) for kind in kinds}
    return {"total": len(rows), **counts}


def _gallery(inputs: ReportInputs, name: str, path: Path, count: int) -> None:
    """The ``count`` most confident failures of model ``name``, captioned true>predicted."""
    probs = inputs.predictions[name]
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(predicted != inputs.labels)
    if not wrong.size:
        return
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    names = inputs.classes
    captions = [
        f"{names[int(inputs.labels[i])]}>{names[int(predicted[i])]} {confidence[i]:.2f}"
        for i in shown
    ]
    _sheet(inputs.images[shown], captions, path)


def _sheet(images: np.ndarray, captions: list[str], path: Path) -> None:
    sheet, _, _ = contact_sheet(np.ascontiguousarray(images), captions)
    sheet.save(path, format="PNG")


def _matrix_rows(matrix: np.ndarray, classes: Sequence[str]) -> list[list[Any]]:
    return [[name, *map(int, row)] for name, row in zip(classes, matrix, strict=True)]


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _write_per_class(path: Path, tables: dict[str, list[dict[str, Any]]]) -> None:
    """One row per class: its support, then each model's figures under ``<model>_*``."""
    measures = ("precision", "recall", "f1", "average_precision", "augrc")
    header = ["class", "support"] + [f"{m}_{x}" for m in tables for x in measures]
    first = next(iter(tables.values()))
    rows = [
        [row["class"], row["support"]] + [tables[m][c][x] for m in tables for x in measures]
        for c, row in enumerate(first)
    ]
    _write_csv(path, header, rows)


def agg_figure(width: float = 7.0, height: float = 4.5, columns: int = 1) -> tuple[Any, Any]:
    """A figure on the Agg canvas, without pyplot (no global state, safe in threads), and
    its axes (one per column)."""
    # matplotlib loads only where a figure is drawn.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = Figure(figsize=(width * columns, height), layout="constrained")
    FigureCanvasAgg(drawn)
    return drawn, drawn.subplots(1, columns)


def _heatmap(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """The matrix as a heat map with each count written in its cell."""
    k = len(classes)
    side = min(12.0, 2.0 + 0.45 * k)
    figure, axes = agg_figure(side + 1.0, side)
    signed = bool((matrix < 0).any())
    limit = max(1, int(np.abs(matrix).max()))
    image = axes.imshow(
        matrix,
        cmap="RdBu_r" if signed else "Blues",
        vmin=-limit if signed else 0,
        vmax=limit,
    )
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_xticks(range(k), classes, rotation=90 if k > 6 else 0)
    axes.set_yticks(range(k), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if k <= 30:
        for (i, j), value in np.ndenumerate(matrix):
            if value:
                strong = abs(value) > limit / 2
                axes.text(
                    j,
                    i,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if strong else "black",
                    in_layout=False,
                )
    axes.set_title(title, fontsize=10)
    figure.savefig(path, format="png", dpi=110)


def _plot_risk_coverage(inputs: ReportInputs, path: Path, title: str, target: float) -> None:
    """Selective risk against coverage per model, with the target risk and where each
    model meets it."""
    figure, axes = agg_figure(6.0, 4.5)
    for name, probs in inputs.predictions.items():
        _, coverage, _, selective = operating_points(probs, inputs.labels)
        met, threshold, _ = coverage_at_risk(probs, inputs.labels, target)
        where = f": {met:.1%} at confidence ≥ {threshold:.3f}" if threshold is not None else ""
        line = axes.plot(coverage, selective, label=f"{name}{where}")[0]
        if threshold is not None:
            axes.axvline(met, color=line.get_color(), linestyle=":", linewidth=1)
    axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    axes.set_xlabel("coverage")
    axes.set_ylabel("selective risk (wrong / accepted)")
    axes.set_xlim(0.0, 1.0)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(f"{title}: risk-coverage", fontsize=10)
    figure.savefig(path, format="png", dpi=110)
