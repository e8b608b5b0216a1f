"""Learning-curve and parameter-efficiency figures (matplotlib, no display needed)."""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..io.atomic import atomic_write_bytes
from .metrics import sklearn_metrics

__all__ = ["lr_drops", "plot_confusion", "plot_curves", "plot_efficiency", "plot_roc"]


def lr_drops(rows: Sequence[dict]) -> list[int]:
    """Epochs at whose start the learning rate drops in steps (the paper's schedule): a fall to at most a
    fifth of the previous epoch's, or any fall after an epoch at the same rate. The per-step schedules
    (cosine, linear, one-cycle) fall a little every epoch and have no such drops."""
    lrs = [r.get("lr") or None for r in rows]
    drops = []
    for i in range(1, len(rows)):
        before, now = lrs[i - 1], lrs[i]
        if before is None or now is None or not now < before:
            continue
        if now <= before / 5 or (i >= 2 and lrs[i - 2] == before):
            drops.append(rows[i]["epoch"])
    return drops


def _evaluated(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the rows that hold ``key``: epochs skipped by ``--eval-every`` have no errors."""
    kept = [r for r in rows if r.get(key) not in (None, "")]
    return [r["epoch"] for r in kept], [r[key] for r in kept]


def plot_curves(path: str | os.PathLike, runs: Sequence[tuple[str, list[dict]]], title: str = "") -> None:
    """Write a PNG with training loss (left) and error in % (right) against epoch for each run.

    ``runs``: (label, rows) pairs; each row is a metrics dict with ``epoch``, ``train_loss``,
    ``train_error``, ``test_error`` and optionally ``val_error`` and ``lr`` (errors may be missing from
    epochs that were not evaluated: ``--eval-every``). Epochs where the
    learning rate drops are marked with dotted lines (the paper's Figure 4 style).
    """
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4.2))
    single = len(runs) == 1
    for index, (label, rows) in enumerate(runs):
        if not rows:
            continue
        color = f"C{index}"
        epochs = [r["epoch"] for r in rows]
        prefix = "" if single else f"{label}: "
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], color=color, label=f"{prefix}training loss")
        tested = _evaluated(rows, "test_error")
        ax_err.plot(*tested, color=color, marker="." if len(tested[0]) < len(rows) else None, label=f"{prefix}test error")
        if single:
            ax_err.plot(epochs, [r["train_error"] for r in rows], color=color, ls="--", alpha=0.6, label="training error")
        validated = _evaluated(rows, "val_error")
        if validated[0]:
            ax_err.plot(*validated, color=color, ls=":", label=f"{prefix}validation error")
        for epoch in lr_drops(rows):
            for ax in (ax_loss, ax_err):
                ax.axvline(epoch - 0.5, color=color, ls=":", lw=0.8, alpha=0.7)
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="training loss")
    ax_err.set(xlabel="epoch", ylabel="top-1 error (%)", title="error (dotted verticals: learning-rate drops)")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_efficiency(path: str | os.PathLike, points: Sequence[tuple[str, str, int, float]],
                    reference: Sequence[tuple[str, str, int, float]] = (), title: str = "") -> None:
    """Write a PNG of test error (%) against parameters (log scale): the paper's Figure 4 (left) style.

    ``points``: (label, dataset, parameters, error) per run, one colour per dataset, each point
    labelled; ``reference``: the same for the paper's numbers, drawn as hollow grey markers.
    """
    fig, ax = plt.subplots(figsize=(7.5, 5))
    datasets = list(dict.fromkeys(d for _, d, _, _ in points))
    for index, dataset in enumerate(datasets):
        mine = sorted((p, e, label) for label, d, p, e in points if d == dataset)
        ax.plot([p for p, _, _ in mine], [e for _, e, _ in mine], "o", color=f"C{index}", label=f"{dataset}: these runs")
        for p, e, label in mine:
            ax.annotate(label, (p, e), textcoords="offset points", xytext=(5, 5), fontsize=8, color=f"C{index}")
        ref = sorted((p, e, label) for label, d, p, e in reference if d == dataset)
        if ref:
            ax.plot([p for p, _, _ in ref], [e for _, e, _ in ref], "s", mfc="none", color=f"C{index}", alpha=0.6,
                    label=f"{dataset}: paper (Table 2)")
            for p, e, label in ref:
                ax.annotate(label, (p, e), textcoords="offset points", xytext=(0, 6), fontsize=7, color="grey",
                            rotation=60, rotation_mode="anchor")
    ax.set_xscale("log")
    ax.set(xlabel="parameters (log scale)", ylabel="test error (%)",
           title=title or "Parameter efficiency: test error against parameters")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_confusion(path: str | os.PathLike, confusion: np.ndarray, class_names: Sequence[str], title: str = "") -> None:
    """Write a PNG of a confusion matrix normalised by row: cell (t, p) is the fraction of the images of
    true class t predicted as p (rows of classes without images stay blank). Class names label the
    axes up to 60 classes, and each cell shows its percentage up to 20."""
    counts = np.asarray(confusion, np.float64)
    n = len(class_names)
    totals = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(totals > 0, counts / totals, np.nan)
    side = min(3.0 + 0.5 * n, 24.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 60:
        ax.set_xticks(range(n), class_names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center",
                      fontsize=9 if n <= 20 else 6)
        ax.set_yticks(range(n), class_names, fontsize=9 if n <= 20 else 6)
    if n <= 20:
        for t in range(n):
            for p in range(n):
                if np.isfinite(share[t, p]):
                    ax.text(p, t, f"{share[t, p]:.0%}\n{int(counts[t, p])}", ha="center", va="center", fontsize=8,
                            color="white" if share[t, p] > 0.6 else "black")
    ax.set(xlabel="predicted class", ylabel="true class",
           title=title or f"Confusion matrix ({int(counts.sum()):,} images), normalised by row")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_roc(path: str | os.PathLike, targets: np.ndarray, scores: np.ndarray, names: Sequence[str], title: str = "") -> None:
    """Write a PNG of each label's ROC curve (true against false positive rate) with its AUROC in the
    legend. ``targets`` (N, L): 1, 0 or NaN (left out); ``scores`` (N, L) probabilities. A label whose
    counted images are all of one class has no curve and is named as such."""
    skm = sklearn_metrics()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    colours = plt.get_cmap("tab20")
    for j, name in enumerate(names):
        keep = ~np.isnan(targets[:, j])
        y, s = targets[keep, j].astype(int), scores[keep, j]
        if y.size == 0 or y.min() == y.max():
            ax.plot([], [], " ", label=f"{name}: no AUROC (one class only)")
            continue
        fpr, tpr, _ = skm.roc_curve(y, s)
        ax.plot(fpr, tpr, color=colours(j % 20), linewidth=1.3, label=f"{name} ({skm.roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)", xlim=(0, 1),
           ylim=(0, 1.01), title=title or "ROC curves")
    ax.legend(fontsize=7 if len(names) > 10 else 8, loc="lower right", title="label (AUROC)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
