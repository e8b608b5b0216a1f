"""The metrics multi-label users judge a model by (issue 25), per label and averaged, with scikit-learn.

Targets are (N, L) arrays of 1 (positive), 0 (negative) and NaN (ignored: an uncertain label under
``--uncertain ignore``), scores (N, L) probabilities. Per label: AUROC, average precision, and
sensitivity, specificity and F1 at a decision threshold chosen on the validation split
(:func:`choose_thresholds`) and saved with the model. A label with no positive (or no negative)
among its counted images has no AUROC: it is named in ``undefined`` and left out of the means,
never averaged in as NaN.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ArgumentError
from .metrics import sklearn_metrics

__all__ = ["THRESHOLD_RULES", "choose_thresholds", "format_label_table", "label_metric_columns", "multilabel_metrics"]

THRESHOLD_RULES = ("youden", "f1")


def _check(targets: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> None:
    if targets.shape != scores.shape or targets.ndim != 2:
        raise ArgumentError(f"targets {targets.shape} and scores {scores.shape} must both be (images, labels)")
    if targets.shape[1] != len(names):
        raise ArgumentError(f"{targets.shape[1]} label columns but {len(names)} label names")


def _counted(targets: np.ndarray, scores: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(targets[:, j])
    return targets[keep, j].astype(int), scores[keep, j]


def choose_thresholds(targets: np.ndarray, scores: np.ndarray, rule: str = "youden") -> np.ndarray:
    """Per-label decision thresholds from validation targets and scores: the score that maximises
    Youden's J (sensitivity + specificity - 1, ``youden``) or F1 (``f1``); 0.5 for a label whose
    validation images are all of one class."""
    if rule not in THRESHOLD_RULES:
        raise ArgumentError(f"threshold rule {rule!r}: choose one of {', '.join(THRESHOLD_RULES)}")
    skm = sklearn_metrics()
    out = np.full(targets.shape[1], 0.5)
    for j in range(targets.shape[1]):
        y, s = _counted(targets, scores, j)
        if y.size == 0 or y.min() == y.max():
            continue
        if rule == "youden":
            fpr, tpr, thr = skm.roc_curve(y, s)
            best = int(np.argmax(tpr - fpr))
        else:
            precision, recall, thr = skm.precision_recall_curve(y, s)
            f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
            best = int(np.argmax(f1))
        out[j] = float(min(thr[best], 1.0))  # roc_curve's first threshold is +inf: "nothing positive"
    return out


def multilabel_metrics(targets: np.ndarray, scores: np.ndarray, names: Sequence[str],
                       thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """Per-label and mean metrics. Returns {"labels": {name: {...}}, "mean_auroc", "mean_average_precision",
    "undefined": [names without both classes]}; rates in [0, 1]."""
    targets, scores = np.asarray(targets, dtype=float), np.asarray(scores, dtype=float)
    _check(targets, scores, names)
    thresholds = np.full(len(names), 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)
    skm = sklearn_metrics()
    per: dict[str, dict[str, float]] = {}
    undefined = []
    for j, name in enumerate(names):
        y, s = _counted(targets, scores, j)
        pred = (s >= thresholds[j]).astype(int)
        tp, fn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 1)).sum())
        tn, fp = int(((pred == 0) & (y == 0)).sum()), int(((pred == 1) & (y == 0)).sum())
        row = {"images": int(y.size), "positives": int(y.sum()), "threshold": float(thresholds[j]),
               "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
               "specificity": tn / (tn + fp) if tn + fp else float("nan"),
               "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")}
        if y.size and y.min() != y.max():
            row["auroc"] = float(skm.roc_auc_score(y, s))
            row["average_precision"] = float(skm.average_precision_score(y, s))
        else:
            row["auroc"] = row["average_precision"] = float("nan")
            undefined.append(name)
        per[name] = row
    defined = [r for n, r in per.items() if n not in undefined]

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in defined])) if defined else float("nan")

    return {"labels": per, "mean_auroc": mean("auroc"), "mean_average_precision": mean("average_precision"),
            "undefined": undefined}


def label_metric_columns(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """Flat ``metrics.csv`` columns: ``{prefix}mean_auroc``, ``{prefix}mean_ap`` and ``{prefix}auroc[LABEL]``
    (the form of the per-class columns)."""
    cols = {f"{prefix}mean_auroc": metrics["mean_auroc"], f"{prefix}mean_ap": metrics["mean_average_precision"]}
    cols.update({f"{prefix}auroc[{name}]": row["auroc"] for name, row in metrics["labels"].items()})
    return cols


def format_label_table(metrics: dict[str, Any]) -> str:
    """The per-label table ``densenet eval`` prints, means last, undefined labels named."""
    width = max([len(n) for n in metrics["labels"]] + [5])
    lines = [f"{'label':<{width}}  {'images':>6}  {'pos':>5}  {'AUROC':>6}  {'AP':>6}  {'thresh':>6}  {'sens':>6}  "
             f"{'spec':>6}  {'F1':>6}"]

    def num(x: float) -> str:
        return f"{x:6.3f}" if x == x else f"{'-':>6}"

    for name, r in metrics["labels"].items():
        lines.append(f"{name:<{width}}  {r['images']:>6}  {r['positives']:>5}  {num(r['auroc'])}  "
                     f"{num(r['average_precision'])}  {num(r['threshold'])}  {num(r['sensitivity'])}  "
                     f"{num(r['specificity'])}  {num(r['f1'])}")
    lines.append(f"{'mean':<{width}}  {'':>6}  {'':>5}  {num(metrics['mean_auroc'])}  "
                 f"{num(metrics['mean_average_precision'])}")
    if metrics["undefined"]:
        lines.append(f"no AUROC (all images of one class), left out of the means: {', '.join(metrics['undefined'])}")
    return "\n".join(lines)
