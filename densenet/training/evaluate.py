"""Evaluation: counts of correct top-1 / top-5 predictions, the summed loss and the confusion matrix
over a dataset split; for multi-label data, every image's probabilities (:func:`score_multilabel`),
which AUROC needs.

Counts, not percentages, so that shards (processes of a distributed run) add up exactly; the
errors are computed once, from the totals.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import check_finite
from ..serving.tta import check_tta, flip_average
from .objective import masked_bce

__all__ = ["EvalCounts", "EvalScores", "evaluate", "evaluate_tta", "score_multilabel", "topk_correct"]


@dataclass
class EvalCounts:
    """What an evaluation counted: ``images`` scored, ``top1`` / ``top5`` of them whose label is among
    the 1 / 5 highest scores (all classes when there are fewer), ``loss_sum`` the summed cross-entropy,
    ``confusion`` the (classes, classes) int64 counts of (true class, predicted top-1 class) on the CPU
    (None before the first batch)."""

    images: int = 0
    top1: int = 0
    top5: int = 0
    loss_sum: float = 0.0
    confusion: Tensor | None = field(default=None, repr=False)

    def as_list(self) -> list[float]:
        """The counts as one flat list (the confusion matrix last, row by row), to be summed over processes."""
        matrix = [] if self.confusion is None else self.confusion.flatten().tolist()
        return [self.images, self.top1, self.top5, self.loss_sum, *matrix]

    @classmethod
    def from_list(cls, values: list[float]) -> "EvalCounts":
        images, top1, top5, loss_sum, *matrix = values
        confusion = None
        if matrix:
            c = math.isqrt(len(matrix))
            confusion = torch.tensor(matrix, dtype=torch.float64).round().to(torch.int64).view(c, c)
        return cls(int(round(images)), int(round(top1)), int(round(top5)), float(loss_sum), confusion)

    @property
    def num_classes(self) -> int | None:
        return None if self.confusion is None else self.confusion.shape[0]

    def _percent_wrong(self, correct: int) -> float:
        return 100.0 * (1 - correct / self.images) if self.images else math.nan

    @property
    def top1_error(self) -> float:
        """Top-1 error in percent (NaN for no images)."""
        return self._percent_wrong(self.top1)

    @property
    def top5_error(self) -> float:
        """Top-5 error in percent (NaN for no images)."""
        return self._percent_wrong(self.top5)

    @property
    def loss(self) -> float:
        """Mean cross-entropy per image (NaN for no images)."""
        return self.loss_sum / self.images if self.images else math.nan


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, :k].any(1).sum()) for k in ks]


def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> EvalCounts:
    """Counts of ``model`` over ``batches``, in eval mode (the model's mode is restored after).

    A batch of images shaped (N, C, H, W) is scored directly; one shaped (N, crops, C, H, W)
    (the ImageNet 10-crop evaluation) is scored by averaging the softmax over the crops. A batch
    holding NaN or infinite values is refused (:class:`densenet.data.DataError`) rather than scored.
    The confusion matrix is counted on ``device`` and read back once, at the end.
    """
    return _evaluate(model, batches, device, flip=False)[0]


def evaluate_tta(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
                 tta: str = "flip") -> tuple[EvalCounts, EvalCounts]:
    """(single-crop counts, test-time-augmented counts) of ``model`` over ``batches`` in one pass: as
    :func:`evaluate`, and each image's softmax averaged with its horizontal mirror's
    (:func:`densenet.serving.tta.flip_average`). ArgumentError for a model whose input is not an image."""
    check_tta(tta, getattr(getattr(model, "module", model), "spatial_dims", 2))
    single, flipped = _evaluate(model, batches, device, flip=True)
    return single, flipped


class _Tally:
    """Running counts of one way of scoring: hits, summed loss, confusion cells (on the device)."""

    def __init__(self) -> None:
        self.counts, self.cells, self.classes = EvalCounts(), None, 0

    def add(self, logits: Tensor, labels: Tensor) -> None:
        c1, c5 = topk_correct(logits, labels)
        self.counts.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        self.counts.top1 += c1
        self.counts.top5 += c5
        self.counts.images += labels.numel()
        self.classes = c = logits.shape[1]
        cells = torch.bincount(labels * c + logits.argmax(1), minlength=c * c)
        self.cells = cells if self.cells is None else self.cells + cells

    def result(self) -> EvalCounts:
        if self.cells is not None:
            self.counts.confusion = self.cells.view(self.classes, self.classes).cpu()
        return self.counts


@torch.no_grad()
def _evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device, *,
              flip: bool) -> list[EvalCounts]:
    """The counts of the plain view, and with ``flip`` those of the flip-averaged one."""
    was_training = model.training
    model.eval()
    tallies = [_Tally() for _ in range(1 + flip)]
    spatial_dims = getattr(getattr(model, "module", model), "spatial_dims", 2)
    try:
        for index, (images, labels) in enumerate(batches):
            check_finite(images, f"batch {index + 1} of the evaluation data")
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = _scores(model, images, spatial_dims)
            tallies[0].add(logits, labels)
            if flip:  # the mirror: the width axis, the last one of every image
                tallies[1].add(flip_average(logits, _scores(model, images.flip(-1), spatial_dims)), labels)
    finally:
        model.train(was_training)
    return [t.result() for t in tallies]


def _scores(model: nn.Module, images: Tensor, spatial_dims: int) -> Tensor:
    """Logits of a batch; for (N, crops, C, H, W) batches, the log of the softmax averaged over the crops."""
    if images.dim() == 3 + spatial_dims:  # (N, crops, C, H, W)
        b, crops = images.shape[:2]
        probs = F.softmax(model(images.flatten(0, 1)), dim=1).view(b, crops, -1).mean(1)
        return probs.clamp_min(1e-12).log()
    return model(images)


@dataclass
class EvalScores:
    """A multi-label split's sigmoid probabilities ``scores`` and ``targets`` (N, L) float64 (NaN:
    ignored), and the binary cross-entropy summed over the ``known`` (image, label) pairs."""

    scores: np.ndarray
    targets: np.ndarray
    loss_sum: float = 0.0
    known: int = 0

    @property
    def images(self) -> int:
        return len(self.scores)

    @property
    def loss(self) -> float:
        """Mean binary cross-entropy per known label (NaN for none)."""
        return self.loss_sum / self.known if self.known else math.nan

    def label_error(self, thresholds: np.ndarray | None = None) -> float:
        """Percent of known labels decided wrong at ``thresholds`` (L,) (0.5 each by default), averaged
        per image first (the multi-label counterpart of the top-1 error; NaN for no images)."""
        if not self.images:
            return math.nan
        t = np.full(self.scores.shape[1], 0.5) if thresholds is None else np.asarray(thresholds)
        known = ~np.isnan(self.targets)
        wrong = ((self.scores >= t) != (self.targets > 0.5)) & known
        return 100.0 * float(np.mean(wrong.sum(1) / np.maximum(known.sum(1), 1)))

    @classmethod
    def merge(cls, parts: list["EvalScores"]) -> "EvalScores":
        """The scores of several shards (processes) as one split."""
        return cls(np.concatenate([p.scores for p in parts]), np.concatenate([p.targets for p in parts]),
                   sum(p.loss_sum for p in parts), sum(p.known for p in parts))


@torch.no_grad()
def score_multilabel(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> EvalScores:
    """Sigmoid probabilities of ``model`` over ``batches`` of (images, targets (N, L)), in eval mode (the
    model's mode is restored after); a batch holding NaN or infinite values is refused."""
    was_training = model.training
    model.eval()
    scores, targets, loss_sum, known = [], [], 0.0, 0
    try:
        for index, (images, target) in enumerate(batches):
            check_finite(images, f"batch {index + 1} of the evaluation data")
            logits = model(images.to(device, non_blocking=True)).float().cpu()
            loss_sum += float(masked_bce(logits, target, reduction="sum"))
            known += int((~torch.isnan(target)).sum())
            scores.append(torch.sigmoid(logits).double().numpy())
            targets.append(target.double().numpy())
    finally:
        model.train(was_training)
    width = targets[0].shape[1] if targets else 0
    return EvalScores(np.concatenate(scores) if scores else np.zeros((0, width)),
                      np.concatenate(targets) if targets else np.zeros((0, width)), loss_sum, known)
