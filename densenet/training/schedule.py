"""Learning-rate schedules, set before every optimizer step.

One plain function, :func:`lr_at`, gives the learning rate of a step from the configuration and the
step's position; nothing is stored. The position is the global step ``epoch * steps_per_epoch + step``
(0-based, the step about to be taken), which a checkpoint already holds as (epoch, step): a resumed
run sets the same learning rates, bit for bit, as an uninterrupted one.

With ``T = epochs * steps_per_epoch`` steps in all, ``W = warmup_epochs * steps_per_epoch`` (rounded)
steps of warm-up, and ``u = (s - W) / (T - W)`` the fraction of the steps after the warm-up already
taken (0 at the first step after the warm-up):

- ``step`` (the paper's, the default): ``lr * lr_gamma ** (milestones passed by the epoch)``, the
  milestones being ``lr_milestones`` or 50% and 75% of the epochs; the same value for every step of
  an epoch, as before per-step schedules existed. The milestones stay at their epochs whatever the
  warm-up.
- ``cosine``: ``lr * (1 + cos(pi * u)) / 2``, from ``lr`` to zero at the end of the run.
- ``linear``: ``lr * (1 - u)``, from ``lr`` to zero at the end of the run (Li, Yumer and Ramanan,
  "Budgeted Training", ICLR 2020: the most robust schedule when the budget is small).
- ``onecycle`` (Smith 2018, "A disciplined approach to neural network hyper-parameters", with linear
  phases): up from ``lr / 10`` to the peak ``lr`` over the first 45% of ``u``, back down to ``lr / 10``
  at 90%, then down to zero over the last 10% (Smith's final "annihilation" phase).
- ``plateau`` (CheXNet's): ``lr * lr_gamma ** drops``, where a drop happens each time
  ``plateau_patience`` epochs pass without a validation loss below the lowest so far (by more than
  0.01%); computed from the validation losses of the epochs before, which the checkpoint's history holds.
- warm-up (any schedule): over its first ``W`` steps the learning rate rises linearly, as
  ``(s + 1) / W`` times the schedule's value at the warm-up's end, so from about zero to where the
  schedule starts (``lr`` for step, cosine and linear; ``lr / 10`` for one-cycle, whose own rise
  follows).

The last step of a run never has a learning rate of exactly zero (``u < 1``), so no step is wasted.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from .config import SCHEDULES, TrainConfig, milestones

__all__ = ["plateau_drops", "ONECYCLE_DIV", "ONECYCLE_PEAK", "ONECYCLE_FLOOR", "SCHEDULES", "describe", "lr_at", "warmup_steps"]

ONECYCLE_DIV = 10.0  # one-cycle starts at, and comes back down to, lr / ONECYCLE_DIV
ONECYCLE_PEAK = 0.45  # fraction of the (post-warm-up) steps at which one-cycle reaches lr
ONECYCLE_FLOOR = 0.9  # fraction at which it is back at lr / ONECYCLE_DIV; then linearly to zero


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """``warmup_epochs`` in steps (rounded half up; at least 1 when a warm-up is asked for)."""
    if config.warmup_epochs <= 0:
        return 0
    return max(1, math.floor(config.warmup_epochs * steps_per_epoch + 0.5))


def _onecycle(u: float) -> float:
    """The one-cycle factor (of ``lr``) at fraction ``u`` in [0, 1) of the steps."""
    low = 1.0 / ONECYCLE_DIV
    if u < ONECYCLE_PEAK:
        return low + (1.0 - low) * u / ONECYCLE_PEAK
    if u < ONECYCLE_FLOOR:
        return 1.0 - (1.0 - low) * (u - ONECYCLE_PEAK) / (ONECYCLE_FLOOR - ONECYCLE_PEAK)
    return low * (1.0 - u) / (1.0 - ONECYCLE_FLOOR)


def plateau_drops(val_losses: Sequence[float | None], patience: int) -> int:
    """How often the plateau schedule has multiplied lr by lr_gamma after epochs with these validation
    losses: once per ``patience`` epochs in a row without a new lowest loss (the wait restarts after a drop)."""
    best, waited, drops = math.inf, 0, 0
    for v in val_losses:
        if v is not None and math.isfinite(v) and v < best * (1 - 1e-4):
            best, waited = v, 0
            continue
        waited += 1
        if waited >= patience:
            drops, waited = drops + 1, 0
    return drops


def _schedule(config: TrainConfig, s: int, steps_per_epoch: int, w: int, val_losses: Sequence[float | None] = ()) -> float:
    """The schedule's learning rate at global step ``s`` (warm-up not applied)."""
    if config.schedule == "plateau":
        epoch = s // steps_per_epoch
        return config.lr * config.lr_gamma ** plateau_drops(list(val_losses)[:epoch], config.plateau_patience)
    if config.schedule == "step":
        epoch = s // steps_per_epoch
        return config.lr * config.lr_gamma ** sum(epoch >= m for m in milestones(config))
    total = config.epochs * steps_per_epoch
    u = max(0, s - w) / max(1, total - w)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * u))
    if config.schedule == "linear":
        return config.lr * (1.0 - u)
    if config.schedule == "onecycle":
        return config.lr * _onecycle(u)
    raise ValueError(f"unknown schedule {config.schedule!r}")  # validate() refuses it before any run


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int, val_losses: Sequence[float | None] = ()) -> float:
    """The learning rate of global step ``step`` (0-based: ``epoch * steps_per_epoch + step in epoch``)
    of a run of ``config`` with ``steps_per_epoch`` optimizer steps per epoch; ``val_losses``: the
    validation loss of each epoch so far (the plateau schedule's input)."""
    w = warmup_steps(config, steps_per_epoch)
    if step < w:
        return _schedule(config, w, steps_per_epoch, w, val_losses) * (step + 1) / w
    return _schedule(config, step, steps_per_epoch, w, val_losses)


def describe(config: TrainConfig) -> str:
    """One line on how a run of ``config`` learns: recipe, optimizer, schedule, warm-up, label smoothing,
    weight average (the plan printed before training)."""
    if config.schedule == "step":
        drops = milestones(config)
        shape = f"x{config.lr_gamma:g} at epochs {', '.join(map(str, drops))}" if drops else "constant"
    elif config.schedule == "plateau":
        shape = f"x{config.lr_gamma:g} after {config.plateau_patience} epoch(s) without a lower validation loss"
    else:
        shape = {"cosine": "cosine to zero", "linear": "linear decay to zero",
                 "onecycle": f"one-cycle from lr/{ONECYCLE_DIV:g} up to lr and down to zero"}[config.schedule]
    optimizer = (f"Adam lr {config.lr:g} (weight decay {config.weight_decay:g})" if config.optimizer == "adam" else
                 f"SGD lr {config.lr:g} ({'Nesterov ' if config.nesterov else ''}momentum {config.momentum:g}, weight decay "
                 f"{config.weight_decay:g})")
    parts = [f"recipe {config.recipe}", optimizer, f"schedule {config.schedule} ({shape})"]
    if config.warmup_epochs:
        parts.append(f"warm-up {config.warmup_epochs:g} epoch(s)")
    if config.label_smoothing:
        parts.append(f"label smoothing {config.label_smoothing:g}" + (" (single-label only: not applied to the binary "
                                                                      "cross-entropy of label files)"
                                                                      if config.dataset == "csv" else ""))
    if config.ema_decay is not None:
        parts.append(f"weight average (EMA) decay {config.ema_decay:g}"
                     + (", reported and served in place of the weights" if config.ema_eval else ", reported beside them"))
    return ", ".join(parts)
