"""Test-time augmentation: the prediction of an image averaged with that of its horizontal mirror.

``--tta flip`` on ``densenet eval`` and ``densenet predict``: the model scores each image and its
mirror (the width axis reversed); the two softmax distributions are averaged (as the 10-crop
evaluation averages its crops), and the log of that average stands for the logits. Averaging
probabilities rather than logits keeps one confident view from outvoting an unsure one by the scale
of its logits alone; on 2 views the two rarely disagree on the top class. The single-crop figure is
always reported beside the averaged one, never replaced by it.

Only images have a horizontal axis that a mirror leaves meaningful: models of 1-D signals or 3-D
volumes are refused.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import ArgumentError

__all__ = ["TTA_MODES", "check_tta", "flip_average"]

TTA_MODES = ("flip",)


def check_tta(tta: str | None, spatial_dims: int | None) -> None:
    """ArgumentError naming ``--tta`` unless ``tta`` is None or a mode of :data:`TTA_MODES` that fits a
    model of ``spatial_dims`` dimensions (None: unknown, taken as an image model)."""
    if tta is None:
        return
    if tta not in TTA_MODES:
        raise ArgumentError(f"--tta {tta}: unknown test-time augmentation; use one of {', '.join(TTA_MODES)}")
    if spatial_dims not in (None, 2):
        kind = {1: "1-D signals", 3: "3-D volumes"}.get(spatial_dims, f"{spatial_dims}-D input")
        raise ArgumentError(f"--tta {tta} averages each image with its horizontal mirror, but this model takes {kind}, "
                            "not images: drop --tta")


def flip_average(logits: Tensor, flipped_logits: Tensor) -> Tensor:
    """Log of the mean of the softmax of ``logits`` (the images) and ``flipped_logits`` (their mirrors):
    (N, classes) log-probabilities, usable wherever logits are (argmax, top-k, cross-entropy)."""
    probs = (F.softmax(logits.float(), dim=1) + F.softmax(flipped_logits.float(), dim=1)) / 2
    return probs.clamp_min(1e-12).log()
