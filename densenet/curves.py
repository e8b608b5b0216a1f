"""Learning-curve figures (matplotlib, no display needed)."""
from __future__ import annotations

import io
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import atomic_write_bytes  # noqa: E402

__all__ = ["plot_curves"]


def plot_curves(path: str | os.PathLike, runs: Sequence[tuple[str, list[dict]]], title: str = "") -> None:
    """Write a PNG with training loss (left) and error in % (right) against epoch for each run.

    ``runs``: (label, rows) pairs; each row is a metrics dict with ``epoch``, ``train_loss``,
    ``train_error``, ``test_error`` and optionally ``val_error`` and ``lr``. Epochs where the
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
        ax_err.plot(epochs, [r["test_error"] for r in rows], color=color, label=f"{prefix}test error")
        if single:
            ax_err.plot(epochs, [r["train_error"] for r in rows], color=color, ls="--", alpha=0.6, label="training error")
        if any(r.get("val_error") not in (None, "") for r in rows):
            ax_err.plot(epochs, [r.get("val_error") for r in rows], color=color, ls=":", label=f"{prefix}validation error")
        drops = [r["epoch"] for prev, r in zip(rows, rows[1:]) if r.get("lr") and prev.get("lr") and r["lr"] < prev["lr"]]
        for epoch in drops:
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
