"""What a run minimises and counts: one class per image (softmax cross-entropy, top-1 hits) or
several labels per image (sigmoid binary cross-entropy, labels decided right at 0.5).

Multi-label targets are (N, L) float: 1 positive, 0 negative, NaN ignored (``--uncertain ignore``).
An ignored label adds nothing to the loss. The training loss is each image's binary cross-entropy
summed over its known labels, averaged over the images: the scale of the softmax cross-entropy, whose
gradient also spreads over every output, so that SGD's learning rates carry over (a mean over all
(image, label) pairs would divide the gradients by the number of labels). Losses reported by an
evaluation are per known label. ``pos_weight`` (L,) multiplies each label's
positive term (``--pos-weight auto``: negatives / positives of the training split, as CheXNet weighs
its rare findings).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Objective", "masked_bce", "positive_weights"]


def masked_bce(logits: Tensor, targets: Tensor, pos_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy of ``logits`` (N, L) against ``targets`` (N, L) with NaN entries left out;
    ``reduction``: ``mean`` over the known entries (0 when there are none), ``image`` (summed over each
    image's labels, averaged over the images: the training loss) or ``sum``. Computed in float32."""
    known = ~torch.isnan(targets)
    loss = F.binary_cross_entropy_with_logits(logits.float(), torch.where(known, targets, 0.0).float(),
                                              pos_weight=pos_weight, reduction="none")
    total = (loss * known).sum()
    if reduction == "sum":
        return total
    return total / (len(targets) if reduction == "image" else known.sum().clamp_min(1))


def positive_weights(targets: np.ndarray) -> np.ndarray:
    """``--pos-weight auto``: negatives / positives of each label over ``targets`` (N, L), NaN left
    out; 1 for a label without positives or negatives (nothing to balance). float32 (L,)."""
    known = ~np.isnan(targets)
    pos = np.where(known, targets, 0).sum(0)
    neg = known.sum(0) - pos
    return np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0).astype(np.float32)


@dataclass
class Objective:
    """The loss of a training step and what counts as right. ``multilabel``: sigmoid outputs; else
    softmax with ``label_smoothing``."""

    multilabel: bool = False
    label_smoothing: float = 0.0
    pos_weight: Tensor | None = None  # (L,) on the training device

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The mean loss of a batch: logits (N, C), targets (N,) class indices or (N, L) multi-label."""
        if self.multilabel:
            return masked_bce(logits, targets, self.pos_weight, reduction="image")
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def correct(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Images counted right, a 0-dim tensor: top-1 hits; multi-label, each image counts the fraction of
        its known labels decided right at probability 0.5 (so ``1 - correct / images`` is the label error)."""
        if not self.multilabel:
            return (logits.argmax(1) == targets).sum()
        known = ~torch.isnan(targets)
        right = ((logits > 0) == (targets > 0.5)) & known
        return (right.sum(1) / known.sum(1).clamp_min(1)).sum()
