"""Classification metrics of a confusion matrix (rows: true class, columns: predicted top-1 class).

Per-class precision, recall and F1, their macro averages, accuracy and balanced accuracy, all in
percent, are computed by scikit-learn (a core dependency since 2026-12-05; it was the ``metrics`` extra)
from the matrix's counts as sample weights, so that the counts of several processes or batches can
be summed first and the metrics taken once. The matrix itself is plain counting and needs nothing.
"""
from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import ArgumentError, MissingDependency
from ..io.atomic import atomic_write_text

__all__ = ["METRICS_INSTALL", "PER_CLASS_COLUMNS_MAX", "class_metrics", "confusion_matrix", "format_class_table",
           "format_confusion", "metric_columns", "read_confusion_csv", "sklearn_metrics", "top5_applies",
           "write_confusion_csv"]

METRICS_INSTALL = "pip install scikit-learn"  # a dependency of densenet: missing only from a damaged environment
#: per-class columns go into metrics.csv up to this many classes (report.json always has them)
PER_CLASS_COLUMNS_MAX = 20
#: the text table of a confusion matrix is printed up to this many classes (the CSV always has it)
PRINT_CLASSES_MAX = 30


def top5_applies(num_classes: int) -> bool:
    """Whether a top-5 error says anything: only with more than 5 classes (else it is 0% by construction)."""
    return num_classes > 5


def confusion_matrix(labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: entry (t, p) is the number of images of true class t
    predicted as class p."""
    t, p = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    if t.shape != p.shape or (t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes)):
        raise ArgumentError(f"labels and predictions must be equally long class indices in 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def sklearn_metrics() -> ModuleType:
    """``sklearn.metrics``, or :class:`MissingDependency` saying how to install it."""
    try:
        from sklearn import metrics
    except ImportError as e:
        raise MissingDependency(f"per-class precision, recall, F1 and balanced accuracy need scikit-learn, a dependency "
                                f"of densenet that is missing from this environment ({e}); install it with: "
                                f"{METRICS_INSTALL}") from None
    return metrics


def _percent(x: float) -> float:
    return round(100.0 * float(x), 4)


def class_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of ``confusion`` (C, C) in percent: ``accuracy``, ``balanced_accuracy`` (mean recall over
    the classes that occur in the truth), ``macro_precision`` / ``macro_recall`` / ``macro_f1``
    (unweighted means over the classes that occur in the truth or the predictions: scikit-learn's
    convention), and ``per_class``: {name: precision, recall, f1, support (images)}; a class never
    predicted has precision 0, one absent from the truth recall 0. Empty dict for an empty matrix.
    :class:`MissingDependency` without scikit-learn."""
    m = sklearn_metrics()
    confusion = np.asarray(confusion)
    c = len(class_names)
    if confusion.shape != (c, c):
        raise ArgumentError(f"a confusion matrix of {c} classes must be {c}x{c}, got shape {confusion.shape}")
    truth, predicted = np.nonzero(confusion)
    weights = confusion[truth, predicted].astype(np.float64)
    if not weights.sum():
        return {}
    kw = {"sample_weight": weights, "zero_division": 0.0}
    with warnings.catch_warnings():  # classes absent from the truth or the predictions: defined above
        warnings.simplefilter("ignore")
        precision, recall, f1, _ = m.precision_recall_fscore_support(truth, predicted, labels=np.arange(c), **kw)
        macro = m.precision_recall_fscore_support(truth, predicted, average="macro", **kw)
        balanced = m.balanced_accuracy_score(truth, predicted, sample_weight=weights)
        accuracy = m.accuracy_score(truth, predicted, sample_weight=weights)
    support = confusion.sum(1)
    return {
        "accuracy": _percent(accuracy), "balanced_accuracy": _percent(balanced), "macro_precision": _percent(macro[0]),
        "macro_recall": _percent(macro[1]), "macro_f1": _percent(macro[2]),
        "per_class": {name: {"precision": _percent(precision[i]), "recall": _percent(recall[i]), "f1": _percent(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
    }


def metric_columns(metrics: dict[str, Any], prefix: str, class_names: Sequence[str]) -> dict[str, float]:
    """Flat metrics.csv columns of :func:`class_metrics`: ``{prefix}_macro_precision``, ``_macro_recall``,
    ``_macro_f1``, ``_balanced_accuracy`` and, up to :data:`PER_CLASS_COLUMNS_MAX` classes,
    ``{prefix}_precision[NAME]``, ``_recall[NAME]``, ``_f1[NAME]`` per class (percent)."""
    if not metrics:
        return {}
    out = {f"{prefix}_{k}": metrics[k] for k in ("macro_precision", "macro_recall", "macro_f1", "balanced_accuracy")}
    if len(class_names) <= PER_CLASS_COLUMNS_MAX:
        for name in class_names:
            for k in ("precision", "recall", "f1"):
                out[f"{prefix}_{k}[{name}]"] = metrics["per_class"][name][k]
    return out


def write_confusion_csv(path: str | os.PathLike, confusion: np.ndarray, class_names: Sequence[str]) -> None:
    """The counts as CSV: a header ``true \\ predicted, <classes...>``, then one row per true class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, np.asarray(confusion)):
        writer.writerow([name, *(int(v) for v in row)])
    atomic_write_text(path, buffer.getvalue())


def read_confusion_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """(counts (C, C) int64, class names) of a file :func:`write_confusion_csv` wrote."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return np.array([[int(v) for v in r[1:]] for r in rows[1:]], np.int64).reshape(len(names), len(names)), names


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def format_confusion(confusion: np.ndarray, class_names: Sequence[str]) -> str:
    """The counts as a text table (rows: true class, columns: predicted), or a one-line note past
    :data:`PRINT_CLASSES_MAX` classes."""
    c = len(class_names)
    if c > PRINT_CLASSES_MAX:
        return f"(confusion matrix of {c} classes: too wide to print; see the CSV)"
    width = max(5, *(len(str(int(v))) for v in np.asarray(confusion).ravel()))
    heads = [_short(n, max(width, 8)) for n in class_names]
    first = max(len("true \\ predicted"), *(len(n) for n in class_names))
    lines = ["true \\ predicted".ljust(first) + "".join(f" {h:>{max(width, len(h))}}" for h in heads)]
    for name, row in zip(class_names, np.asarray(confusion)):
        lines.append(name.ljust(first) + "".join(f" {int(v):>{max(width, len(h))}}" for v, h in zip(row, heads)))
    return "\n".join(lines)


def format_class_table(metrics: dict[str, Any]) -> str:
    """Per-class precision, recall, F1 (percent) and images, then the macro averages, as a text table."""
    per = metrics["per_class"]
    first = max(len("macro average"), *(len(n) for n in per))
    lines = [f"{'class':<{first}} {'precision':>9} {'recall':>7} {'F1':>7} {'images':>7}"]
    for name, v in per.items():
        lines.append(f"{name:<{first}} {v['precision']:>8.2f}% {v['recall']:>6.2f}% {v['f1']:>6.2f}% {v['support']:>7}")
    lines.append(f"{'macro average':<{first}} {metrics['macro_precision']:>8.2f}% {metrics['macro_recall']:>6.2f}% "
                 f"{metrics['macro_f1']:>6.2f}% {sum(v['support'] for v in per.values()):>7}")
    return "\n".join(lines)
