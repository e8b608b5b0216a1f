"""An exponential moving average (EMA) of a model's weights, updated after every optimizer step.

Update ``n`` (0-based, counted over the whole run and kept in the checkpoint) moves every averaged
tensor towards the model's::

    d = min(decay, (1 + n) / (10 + n))
    average = d * average + (1 - d) * model          (computed as average.lerp_(model, 1 - d))

The warm-up of the decay (the form of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``)
keeps the average close to the model over the first steps, when the model moves fastest and its
initial weights are worth nothing: ``d`` is 0.1, 0.18, 0.25, ... and reaches 0.999 after about 9,000
updates. ``1 / (1 - decay)`` is the length of the average in steps: 1,000 steps for 0.999, about 1.3
epochs of CIFAR at batch 64.

BatchNorm running statistics (``running_mean``, ``running_var``) are averaged like the weights, as
``torch.optim.swa_utils.AveragedModel(use_buffers=True)`` and timm's ``ModelEmaV2`` do; integer
buffers (``num_batches_tracked``) are copied. The running statistics are themselves averages of the
recent batches under the recent raw weights; averaging them over the same steps as the weights pairs
the averaged weights with statistics of the same stretch of training, whereas copying them would pair
them with the statistics of the latest raw weights alone. Exact statistics of the averaged weights
would need a pass over the training data (SWA's ``update_bn``); that is not done, the evaluation of
the average each epoch shows how good it is.

The average is a copy of the model in eval mode without gradients; it never trains.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError

__all__ = ["WeightAverage", "ema_decay_at"]


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based): ``min(decay, (1 + updates) / (10 + updates))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """The exponential moving average of ``model``'s parameters and floating-point buffers.

    ``average.model`` is the averaged copy (an ``nn.Module`` like ``model``, in eval mode);
    :meth:`update` after each optimizer step; :meth:`state_dict` / :meth:`load_state_dict` for
    checkpoints (the averaged tensors and the number of updates)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ArgumentError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """(averaged floats, the model's floats, (averaged, model's) non-float buffers), in the same order."""
        mine = [*self.model.parameters(), *self.model.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(mine) != len(theirs):
            raise ArgumentError(f"the model has {len(theirs)} parameters and buffers, its average {len(mine)}: "
                                "not the model the average was made from")
        floats = [(a, m) for a, m in zip(mine, theirs) if a.is_floating_point()]
        others = [(a, m) for a, m in zip(mine, theirs) if not a.is_floating_point()]
        return [a for a, _ in floats], [m.detach() for _, m in floats], others

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model`` (the unwrapped model, not its DDP wrapper)."""
        weight = 1.0 - ema_decay_at(self.decay, self.updates)
        averaged, current, others = self._pairs(model)
        torch._foreach_lerp_(averaged, current, weight)
        for a, m in others:
            a.copy_(m)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
