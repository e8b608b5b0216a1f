"""One training run, top to bottom, in the order it happens:

    train(config)                      join the process group (torchrun), pick device and precision
      _train_in_run_dir                lock the run folder, prepare it, read the checkpoint to resume
        build_state                    data, model, optimizer; restore the checkpoint or write config.yaml
        run_epochs                     for each epoch:
          train_one_epoch                per batch: the step's learning rate (schedule.lr_at), train_step,
                                         the weight average's update (ema.py); mid-epoch checkpoints, signals
          evaluate_epoch                 validation and test counts of the weights and of their average,
                                         summed over processes
          save_snapshot                  checkpoint at the epoch end
          write_epoch_logs               metrics.csv, curves.png, TensorBoard
        make_report                    report.json; confusion.csv and confusion.png of the test split

A run directory holds ``config.yaml`` (the resolved configuration), ``metrics.csv`` (one row per
epoch), ``curves.png``, TensorBoard events under ``tensorboard/``, ``checkpoint.pt`` (and the one
before it, ``checkpoint.prev.pt``) and, at the end, ``report.json`` and the test split's confusion
matrix (``confusion.csv``, counts; ``confusion.png``, normalised by row). Per-class precision, recall
and F1, their macro averages and the balanced accuracy (by scikit-learn, a core dependency) go into
``metrics.csv`` and ``report.json``; top-5 errors only with more than 5 classes. With a weight average
(``ema_decay``), ``metrics.csv`` has its errors beside the raw weights' (``ema_*`` columns), and with
``ema_eval`` the average is what ``report.json`` and the confusion matrix describe.

Host synchronisation: every ``sync_every`` steps (each step on a CPU) the loop reads back one small
all-reduced vector (loss, hits, images, a signal flag); everything that decides what the ranks do
next is taken from that reduced vector, so that every process takes the same branch.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..analysis.metrics import class_metrics, metric_columns, sklearn_metrics, top5_applies, write_confusion_csv
from ..analysis.multilabel_metrics import choose_thresholds, label_metric_columns, multilabel_metrics
from ..analysis.plots import plot_confusion, plot_curves, plot_roc
from ..data import Data, DataError, ImageOptions, build_data
from ..errors import DenseNetError, MissingDependency
from ..io.atomic import atomic_write_text
from ..io.checkpoint import CheckpointError, load_checkpoint, save_rotating
from ..models import (
    DenseNet,
    convert_sync_batchnorm,
    create_model,
    fused,
    get_weights,
    load_state_dict,
    load_weight_file,
    model_spec,
    read_state_dict,
    weights_file,
)
from . import allocator
from .config import (
    FOLDER_DATASETS,
    RUNTIME_KEYS,
    ConfigError,
    TrainConfig,
    check_keys_and_types,
    native_image_size,
    validate,
)
from .distributed import PEER_HINT, Dist, is_peer_failure, setup, teardown
from .ema import WeightAverage
from .evaluate import EvalCounts, EvalScores, evaluate, score_multilabel
from .memory import check_memory, estimate_memory
from .objective import Objective, positive_weights
from .precision import check_precision, cpu_bf16_instructions, resolve_amp
from .runlock import RunLock
from .schedule import describe, lr_at

__all__ = ["train", "TrainingStopped", "RUN_FILES", "resolve_device", "build_model", "learning_rate",
           "load_run_config", "load_checkpoint_for_resume"]

RUN_FILES = ("config.yaml", "metrics.csv", "curves.png", "checkpoint.pt", "checkpoint.prev.pt", "report.json", "tensorboard",
             "confusion.csv", "confusion.png", "roc.png")
METRIC_COLUMNS = ("epoch", "train_loss", "train_error", "val_error", "test_error", "test_top5_error", "lr", "seconds",
                  "images_per_s", "eval_seconds")
#: after METRIC_COLUMNS, in runs that keep a weight average (ema_decay): its errors
EMA_COLUMNS = ("ema_val_error", "ema_test_error", "ema_test_top5_error")
#: after METRIC_COLUMNS, when scikit-learn is there: the test split's macro averages and balanced accuracy (percent)
CLASS_METRIC_COLUMNS = ("test_macro_precision", "test_macro_recall", "test_macro_f1", "test_balanced_accuracy")
#: after METRIC_COLUMNS, in multi-label runs (dataset csv) and with the plateau schedule: losses and mean AUROC / AP
LABEL_METRIC_COLUMNS = ("val_loss", "val_mean_auroc", "test_mean_auroc", "test_mean_ap", "ema_val_loss",
                        "ema_test_mean_auroc")
PLAN_STEPS = 5  # steps timed after the first one for the estimate of the run's duration
IMBALANCE_NOTE = 10  # a largest-to-smallest class ratio above this is pointed out
SIZE_NOTE = (0.5, 4.0)  # images whose short side is below / above these multiples of image_size are pointed out


class TrainingStopped(DenseNetError, RuntimeError):
    """The run stopped before its last epoch (a signal, or a loss that is not finite)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Run:
    """What stays fixed while a run trains."""

    config: TrainConfig
    dd: Dist
    device: torch.device
    out: Path
    amp_dtype: torch.dtype | None  # autocast dtype, None: full precision
    data: Data
    log: Callable[[str], None]  # rank 0 speaks for the job
    given_amp: str = "off"  # --amp as given (auto: the precision was chosen for the user)
    objective: Objective = field(default_factory=Objective)  # the loss, and what counts as right

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.config.channels_last else torch.contiguous_format


@dataclass
class State:
    """What training changes, and what a checkpoint holds."""

    model: DenseNet
    step_model: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: WeightAverage | None = None  # the exponential moving average of the weights (ema_decay)
    thresholds: list[float] | None = None  # multi-label: per-label decision thresholds chosen on the validation split
    epoch: int = 0  # epochs finished
    step: int = 0  # steps finished in epoch ``epoch``
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch
    partial: dict = field(default_factory=dict)  # running sums of the unfinished epoch


# ---------------------------------------------------------------------------- the run
def train(config: TrainConfig, *, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run (or continue, with ``resume``) the experiment ``config`` describes; return its report.

    Under ``torchrun`` every process calls this: each takes ``batch_size / world_size`` images of
    every (global) batch, gradients are averaged by DistributedDataParallel, metrics are summed over
    processes, and rank 0 alone writes the run directory.
    """
    validate(config)
    model_spec(config.model)  # unknown model: fail before reading any data
    dd, device_name = setup(config.device, config.dist_backend, config.dist_timeout)
    clean = False
    try:
        report = _train_in_run_dir(config, dd, device_name, resume=resume, force=force)
        clean = True
        return report
    except Exception as e:
        if dd.enabled and is_peer_failure(e):
            raise TrainingStopped(f"rank {dd.rank} of {dd.world_size}: {PEER_HINT} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})", 4) from None
        raise
    finally:
        teardown(dd, clean)


def _train_in_run_dir(config: TrainConfig, dd: Dist, device_name: str, *, resume: bool, force: bool) -> dict[str, Any]:
    if config.batch_size % dd.world_size:
        raise ConfigError(f"batch_size {config.batch_size} (the global batch) is not divisible by the "
                          f"{dd.world_size} processes; each process takes batch_size / world_size images per step")
    device = resolve_device(device_name)
    given_amp = config.amp
    config = dataclasses.replace(config, amp=resolve_amp(config.amp, device))  # config.yaml keeps the concrete one
    amp_dtype, use_scaler = check_precision(config.amp, device)
    out = Path(config.out)
    if dd.restart > 0:  # torchrun restarted the job after a worker failed: continue from the last checkpoint
        resume = has_checkpoint(out)
        force = not resume
    with ExitStack() as held:
        # rank 0 alone touches the folder; what it finds wrong stops every rank with the same message
        on_main(dd, lambda: claim_run_dir(out, resume, held))
        on_main(dd, lambda: prepare_run_dir(out, resume=resume, force=force))
        checkpoint = on_main(dd, lambda: load_checkpoint_for_resume(out)) if resume else None
        if config.image_size is None and config.dataset in FOLDER_DATASETS:
            # a run of an earlier version kept None in config.yaml: the size it trained at is in its checkpoint
            image_size = (checkpoint or {}).get("data", {}).get("image_size") or native_image_size(config)
            config = dataclasses.replace(config, image_size=image_size)
        configure_runtime(config, device)
        data = build_data(
            config.dataset, config.data, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
            val_size=config.val_size or None, seed=config.seed, workers=config.workers, image_size=config.image_size,
            train_subset=config.train_subset, test_subset=config.test_subset, download=config.download,
            balanced=config.balanced_sampler, skip_bad_images=config.skip_bad, image_root=config.image_root,
            uncertain=config.uncertain,
            group_column=config.group_column,
            image_options=ImageOptions(config.in_channels, config.fit, config.dicom_window) if config.dataset == "csv" else None,
        )
        if config.schedule == "plateau" and data.val is None:
            raise ConfigError("schedule plateau follows the validation loss, but the data has no validation split: give "
                              "--val-size N, a val split in the label file, or another --schedule")
        if data.num_classes < 2 and not data.multilabel:
            raise DataError(f"{config.data}: one class only ({data.class_names[0]}/); a classifier needs at least 2 "
                            "classes, one folder per class: <class>/<image>, or train/<class>/ and test/<class>/")
        if device.type == "cuda":  # CIFAR/SVHN on the GPU: batches built there, no host in the step
            data.to(device)
        log = (lambda msg: print(msg, flush=True)) if config.quiet else tqdm.write
        run = Run(config, dd, device, out, amp_dtype, data, log if dd.main else (lambda msg: None), given_amp,
                  make_objective(config, data, device))
        state = build_state(run, use_scaler, checkpoint)
        return run_epochs(run, state)


def make_objective(config: TrainConfig, data: Data, device: torch.device) -> Objective:
    """Softmax cross-entropy, or for multi-label data binary cross-entropy (with ``pos_weight auto``
    each label's positives weighed by its negatives / positives in the training split)."""
    weight = None
    if data.multilabel and config.pos_weight == "auto":
        tree = data.train.tree
        weight = torch.from_numpy(positive_weights(tree.targets[data.train.indices])).to(device)
    return Objective(data.multilabel, config.label_smoothing, weight)


def build_state(run: Run, use_scaler: bool, checkpoint: dict | None) -> State:
    """The model (initial weights, frozen parts, synchronised BN), its optimizer and gradient scaler,
    restored from ``checkpoint`` when resuming; the memory of a step checked before anything runs."""
    config, dd, device = run.config, run.dd, run.device
    model = build_model(config, run.data.num_classes, run.data.model_args())
    if config.init and checkpoint is None:  # a head of another class count stays freshly initialised
        run.log(f"--init {config.init}: {load_weight_file(model, config.init, strict=False)}")
    if config.weights and checkpoint is None:
        w = get_weights(config.model, config.weights)
        run.log(f"--weights {w.name}: {load_state_dict(model, read_state_dict(weights_file(w)), strict=False)}")
    if config.freeze_features:
        model.features.requires_grad_(False)
    if config.sync_bn:
        convert_sync_batchnorm(model)
    if config.memory_check:  # stop now, with advice, rather than be killed by the OS minutes later
        estimate = estimate_memory(model, config.batch_size // dd.world_size, run.data.image_size,
                                   amp=run.amp_dtype is not None, name=config.model)
        check_memory(estimate, device=device, processes=1 if device.type == "cuda" else dd.local_world_size)
    # the dense blocks compute in channels_last, so their weight gradients come in that layout; under
    # DDP the weights take it too, so that gradients match DDP's buckets without a copy
    model.to(device, memory_format=torch.channels_last if dd.enabled and model.spatial_dims == 2 else run.memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                                    weight_decay=config.weight_decay)
    state = State(model, model, optimizer, torch.amp.GradScaler(device.type, enabled=use_scaler),
                  WeightAverage(model, config.ema_decay) if config.ema_decay else None)
    if checkpoint is not None:
        restore_checkpoint(run, state, checkpoint)
        started_amp = (checkpoint.get("config") or {}).get("amp", config.amp)
        if started_amp != config.amp:  # only once the resume is accepted: a refused one touches nothing
            on_main(dd, lambda: record_precision_change(run.out, started_amp, config.amp))
    else:
        on_main(dd, lambda: atomic_write_text(run.out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False)))
        if dd.enabled:
            torch.manual_seed(config.seed + dd.rank)  # same initial weights (rank 0's are broadcast), own dropout streams
    if dd.enabled:
        # buffers (BN running statistics) start as rank 0's; with synchronised BN they stay equal
        # on every rank, without it rank 0's are sent to the others before every forward
        state.step_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                               forward_sync_buffers=not config.sync_bn)
    return state


def restore_checkpoint(run: Run, state: State, checkpoint: dict) -> None:
    """Weights, optimizer, scaler, weight average, position, metrics and random-number streams of
    ``checkpoint``; refused (ConfigError) when the run's recipe keys differ from the checkpoint's."""
    check_same_recipe(run, checkpoint.get("config") or {})
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler") and state.scaler.is_enabled():  # empty: saved by a run without a scaler
        state.scaler.load_state_dict(checkpoint["scaler"])
    if state.ema is not None:
        if "ema" not in checkpoint:
            raise ConfigError(f"cannot resume {run.out} with a weight average (ema_decay {run.config.ema_decay}): its "
                              "checkpoint holds none; the run was started without --ema-decay")
        state.ema.load_state_dict(checkpoint["ema"])
    state.epoch, state.step = checkpoint["epoch"], checkpoint["step"]
    state.history, state.partial = checkpoint["history"], checkpoint["partial"]
    state.thresholds = checkpoint.get("data", {}).get("thresholds")
    dd = run.dd
    ranks = checkpoint.get("rng_per_rank") or [checkpoint["rng"]]
    if len(ranks) == dd.world_size:
        set_rng_state(ranks[dd.rank])
    else:  # another number of processes: fresh per-rank streams (only dropout draws from them)
        torch.manual_seed(run.config.seed + 1000 * dd.rank + 1_000_003 * (state.epoch * 100_000 + state.step))


#: what decides how a run learns, besides the optimizer: a resume must keep them (the CLI checks
#: config.yaml in load_run_config; this guards train(config, resume=True) too)
RECIPE_KEYS = ("recipe", "schedule", "warmup_epochs", "label_smoothing", "ema_decay", "ema_eval", "optimizer", "pos_weight",
               "plateau_patience")


def check_same_recipe(run: Run, saved: dict[str, Any]) -> None:
    """ConfigError naming the keys of :data:`RECIPE_KEYS` whose value differs from the checkpoint's (a key
    missing from an older checkpoint had its default)."""
    defaults = TrainConfig().to_dict()
    changed = [k for k in RECIPE_KEYS if saved.get(k, defaults[k]) != getattr(run.config, k)]
    if changed:
        raise ConfigError(f"cannot resume {run.out} with a changed {', '.join(changed)}: its checkpoint was trained with "
                          + ", ".join(f"{k}={saved.get(k, defaults[k])!r}" for k in changed)
                          + "; resume it with the values it started with, or start a new run with another --out")


def run_epochs(run: Run, state: State) -> dict[str, Any]:
    """The remaining epochs of the run, then its report (written to ``report.json``)."""
    config, dd, data = run.config, run.dd, run.data
    writer = SummaryWriter(str(run.out / "tensorboard"), purge_step=state.epoch + 1) if dd.main else None
    num_params = sum(p.numel() for p in state.model.parameters())
    log_plan(run, state, num_params)
    steps_left = (config.epochs - state.epoch) * data.train.num_batches - state.step
    clock = FirstStepsClock(steps_left, run.log)
    test: EvalCounts | EvalScores | None = None
    try:
        with stop_on_signals() as stop:
            for epoch in range(state.epoch, config.epochs):
                row = train_one_epoch(run, state, epoch, stop, clock)
                if evaluation_due(config, epoch):
                    t0 = time.perf_counter()
                    columns, test = evaluate_epoch(run, state)
                    row.update(columns, eval_seconds=round(time.perf_counter() - t0, 3))
                state.history.append(row)
                state.epoch, state.step, state.partial = epoch + 1, 0, {}
                save_snapshot(run, state)
                if writer is not None:
                    write_epoch_logs(run.out, writer, config, state.history)
                run.log(f"epoch {epoch + 1}/{config.epochs}: loss {row['train_loss']:.4f}, train error "
                        f"{row['train_error']:.2f}%, " + (f"val error {row['val_error']:.2f}%, " if "val_error" in row else "")
                        + (f"test error {row['test_error']:.2f}%, " if "test_error" in row else "")
                        + (f"test mean AUROC {row['test_mean_auroc']:.4f}, " if row.get("test_mean_auroc") is not None else "")
                        + (f"average's test error {row['ema_test_error']:.2f}%, " if "ema_test_error" in row else "")
                        + f"lr {row['lr']:g}, {row['images_per_s']:.1f} img/s")
                signalled = dd.sum([float(bool(stop["signal"]))], run.device)[0] > 0  # every rank decides alike
                if signalled and epoch + 1 < config.epochs:
                    signum = stop["signal"] or signal.SIGTERM
                    raise TrainingStopped(f"stopped by signal {signum} after epoch {epoch + 1}; continue with: "
                                          f"densenet train --resume {run.out}", 128 + signum)
    finally:
        if writer is not None:
            writer.close()
    if test is None:  # resumed after the last epoch's checkpoint: the final model's counts once more
        test = evaluate_split(run, served_model(run, state), data.test)
    report = make_report(config, state.history, num_params, str(run.device))
    report.update(label_report(data, test, state.thresholds) if isinstance(test, EvalScores) else class_report(data, test))
    if dd.enabled:
        report["processes"] = dd.world_size
    on_main(dd, lambda: write_final_files(run, report, test))
    top5 = report["test_top5_error"]
    average = {"average": f" of the weight average (raw weights: {report.get('raw_test_error', math.nan):.2f}%)",
               "raw": f" (weight average: {report.get('ema_test_error', math.nan):.2f}%)"}.get(report.get("weights"), "")
    run.log(f"done: final test error {report['test_error']:.2f}%" + ("" if top5 is None else f" (top-5 {top5:.2f}%)")
            + average
            + (f", balanced accuracy {report['test_balanced_accuracy']:.2f}%, macro F1 {report['test_macro_f1']:.2f}%"
               if "test_macro_f1" in report else "")
            + (f", mean AUROC {report['test_mean_auroc']:.4f}" if "test_mean_auroc" in report else "") + f"; run in {run.out}")
    return report


def evaluation_due(config: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with an evaluation: every ``eval_every``-th epoch and the last."""
    return (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs


def evaluate_epoch(run: Run, state: State) -> tuple[dict[str, Any], EvalCounts | EvalScores]:
    """The epoch's validation and test errors (and the test split's class metrics) of the weights, and
    with a weight average its errors beside them (``ema_*``); returns these metrics columns and the test
    counts of the weights that are served: the average with ``ema_eval``, else the weights. Multi-label:
    label errors at thresholds chosen on the validation split (kept in ``state.thresholds``), losses and
    mean AUROC / AP."""
    if run.data.multilabel:
        return evaluate_epoch_multilabel(run, state)
    data, top5 = run.data, top5_applies(run.data.num_classes)
    columns: dict[str, Any] = {}
    served = None
    for prefix, model in [("", state.model)] + ([("ema_", state.ema.model)] if state.ema is not None else []):
        if data.val is not None:
            val = evaluate_split(run, model, data.val)
            columns[f"{prefix}val_error"] = val.top1_error
            if run.config.schedule == "plateau":
                columns[f"{prefix}val_loss"] = val.loss
        test = evaluate_split(run, model, data.test)
        columns.update({f"{prefix}test_error": test.top1_error, f"{prefix}test_top5_error": test.top5_error if top5 else None})
        if not prefix:
            columns.update(metric_columns(split_metrics(data, test), "test", data.class_names))
        if model is served_model(run, state):
            served = test
    return columns, served


def evaluate_epoch_multilabel(run: Run, state: State) -> tuple[dict[str, Any], EvalScores]:
    """:func:`evaluate_epoch` of multi-label data."""
    data, names = run.data, run.data.class_names
    columns: dict[str, Any] = {"test_top5_error": None}
    served = None
    for prefix, model in [("", state.model)] + ([("ema_", state.ema.model)] if state.ema is not None else []):
        thresholds = None
        if data.val is not None:
            val = evaluate_split(run, model, data.val)
            thresholds = choose_thresholds(val.targets, val.scores, run.config.threshold_rule)
            columns.update({f"{prefix}val_error": val.label_error(thresholds), f"{prefix}val_loss": val.loss,
                            f"{prefix}val_mean_auroc": multilabel_metrics(val.targets, val.scores, names)["mean_auroc"]})
        test = evaluate_split(run, model, data.test)
        metrics = multilabel_metrics(test.targets, test.scores, names, thresholds)
        columns.update({f"{prefix}test_error": test.label_error(thresholds), f"{prefix}test_top5_error": None,
                        f"{prefix}test_mean_auroc": metrics["mean_auroc"]})
        if not prefix:
            columns.update(label_metric_columns(metrics, "test_"))
        if model is served_model(run, state):
            served = test
            state.thresholds = None if thresholds is None else [float(t) for t in thresholds]
    return columns, served


def served_model(run: Run, state: State) -> nn.Module:
    """The weights a run reports and serves: their average with ``ema_eval``, else the trained weights."""
    return state.ema.model if run.config.ema_eval and state.ema is not None else state.model


def split_metrics(data: Data, counts: EvalCounts) -> dict[str, Any]:
    """:func:`class_metrics` of a split's confusion matrix; {} without scikit-learn (said at the plan)."""
    if counts.confusion is None:
        return {}
    try:
        return class_metrics(counts.confusion.numpy(), data.class_names)
    except MissingDependency:
        return {}


def class_report(data: Data, test: EvalCounts) -> dict[str, Any]:
    """What report.json says about the classes: their names and training images, the imbalance, and the
    test split's balanced accuracy, macro and per-class precision, recall and F1 (percent)."""
    counts = data.class_counts
    out: dict[str, Any] = {"class_names": list(data.class_names)}
    if counts:
        out["train_class_counts"] = dict(zip(data.class_names, counts))
        out["class_imbalance"] = round(max(counts) / min(counts), 2) if min(counts) else None
    metrics = split_metrics(data, test)
    if metrics:
        out.update({f"test_{k}": metrics[k] for k in ("balanced_accuracy", "macro_precision", "macro_recall", "macro_f1")})
        out["test_per_class"] = metrics["per_class"]
    if test.confusion is not None:
        out["confusion_matrix"] = "confusion.csv"
    return out


def label_report(data: Data, test: EvalScores, thresholds: list[float] | None) -> dict[str, Any]:
    """What report.json says about a multi-label test split: per label its training positives, AUROC,
    average precision, and sensitivity, specificity and F1 at the threshold chosen on the validation
    split; the means; the labels without an AUROC (all test images of one class), named."""
    metrics = multilabel_metrics(test.targets, test.scores, data.class_names, None if thresholds is None else
                                 np.asarray(thresholds))
    return {"label_names": list(data.class_names), "multilabel": True,
            "train_positives": dict(zip(data.class_names, data.class_counts)),
            "test_mean_auroc": metrics["mean_auroc"], "test_mean_average_precision": metrics["mean_average_precision"],
            "test_labels_without_auroc": metrics["undefined"], "test_per_label": metrics["labels"],
            "thresholds": dict(zip(data.class_names, thresholds)) if thresholds is not None else None,
            "threshold_note": "chosen on the validation split" if thresholds is not None else
                              "0.5 (no validation split to choose on)",
            "roc_curves": "roc.png"}


def write_final_files(run: Run, report: dict[str, Any], test: EvalCounts | EvalScores) -> None:
    """report.json, and the test split's confusion matrix as confusion.csv (counts) and confusion.png, or
    for multi-label data its ROC curves (roc.png)."""
    if isinstance(test, EvalScores):
        config = run.config
        plot_roc(run.out / "roc.png", test.targets, test.scores, run.data.class_names,
                 title=f"{config.model} on {Path(config.data or '').name}, epoch {report['epochs']}: test split, "
                       f"{test.images:,} images")
    elif test.confusion is not None:
        names, config = run.data.class_names, run.config
        write_confusion_csv(run.out / "confusion.csv", test.confusion.numpy(), names)
        plot_confusion(run.out / "confusion.png", test.confusion.numpy(), names,
                       title=f"{config.model} on {config.dataset}, epoch {report['epochs']}: test split, "
                             f"{test.images:,} images\n(rows: true class, normalised by row)")
    atomic_write_text(run.out / "report.json", json.dumps(report, indent=2) + "\n")


def train_one_epoch(run: Run, state: State, epoch: int, stop: dict, clock: "FirstStepsClock") -> dict[str, Any]:
    """Train ``epoch`` from step ``state.step`` to its end (mid-epoch checkpoints every
    ``checkpoint_every`` steps); returns the epoch's training metrics.

    The loss and hits of each step stay on the device; every ``sync_every`` steps (and before a
    checkpoint and at the epoch's end) they are summed over processes and read back once. What the
    loop decides (a diverging loss, a signal seen by any rank) is decided there, from the reduced
    values, so that every rank takes the same branch at the same step."""
    config, dd, data = run.config, run.dd, run.data
    steps = data.train.num_batches
    state.model.train()
    if config.freeze_features:
        state.model.features.eval()  # a frozen feature extractor keeps its BN statistics
    step0 = state.step if epoch == state.epoch else 0
    acc = state.partial or {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    bar = tqdm(total=data.train.num_batches, initial=step0, disable=config.quiet or not dd.main, leave=False,
               desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", dynamic_ncols=True, file=sys.stderr)
    t0, seconds_before = time.perf_counter(), acc["seconds"]
    every = config.sync_every or (50 if run.device.type == "cuda" else 1)
    pending = torch.zeros(3, dtype=torch.float64, device=run.device)  # loss x images, hits, images since the last read
    unread = 0
    with closing(data.train.batches(epoch, start=step0, rank=dd.rank, world_size=dd.world_size)) as batches:
        for step, (images, labels) in enumerate(batches, start=step0):
            lr = set_learning_rate(state.optimizer, lr_at(config, epoch * steps + step, steps, val_losses(run, state)))
            pending += train_step(run, state, images, labels)
            if state.ema is not None:
                state.ema.update(state.model)
            unread += 1
            last = step + 1 == data.train.num_batches
            checkpoint_due = bool(config.checkpoint_every) and (step + 1) % config.checkpoint_every == 0
            if not (last or checkpoint_due or unread >= every):
                continue
            # the host synchronisation: one small all-reduce of what the loop decides on
            loss_sum, hits, seen, signalled = dd.sum([*pending.tolist(), float(bool(stop["signal"]))], run.device)
            pending.zero_()
            if not math.isfinite(loss_sum):
                raise TrainingStopped(f"the training loss became {loss_sum / seen} by epoch {epoch + 1}, step {step + 1}: "
                                      f"the run diverged; the last good checkpoint in {run.out} is kept (try a lower --lr)", 3)
            acc = {"loss": acc["loss"] + loss_sum, "correct": acc["correct"] + int(hits), "seen": acc["seen"] + int(seen),
                   "seconds": seconds_before + time.perf_counter() - t0}
            clock.tick(unread)
            bar.update(unread)
            unread = 0
            bar.set_postfix(loss=f"{acc['loss'] / acc['seen']:.3f}", err=f"{100 * (1 - acc['correct'] / acc['seen']):.1f}%",
                            lr=f"{lr:g}", img_s=f"{acc['seen'] / max(acc['seconds'], 1e-9):.0f}", refresh=False)
            if last:
                break  # the epoch end writes its own checkpoint
            if signalled or checkpoint_due:
                state.epoch, state.step, state.partial = epoch, step + 1, acc
                save_snapshot(run, state)
            if signalled:  # decided from the reduced flag: every rank stops at this same step
                signum = stop["signal"] or signal.SIGTERM
                raise TrainingStopped(f"stopped by signal {signum} at epoch {epoch + 1}, step {step + 1}; checkpoint "
                                      f"written; continue with: densenet train --resume {run.out}", 128 + signum)
    bar.close()
    seconds = acc["seconds"]
    return {"epoch": epoch + 1, "train_loss": acc["loss"] / max(acc["seen"], 1),
            "train_error": 100.0 * (1 - acc["correct"] / max(acc["seen"], 1)),
            "lr": learning_rate(config, epoch, steps, val_losses(run, state)),
            "seconds": round(seconds, 3), "images_per_s": round(acc["seen"] / max(seconds, 1e-9), 2)}


def train_step(run: Run, state: State, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One SGD step on this process's share of a global batch. Returns (loss x images, top-1 hits,
    images) as a float64 tensor on the device, without waiting for it."""
    images = images.to(run.device, non_blocking=True, memory_format=run.memory_format)
    labels = labels.to(run.device, non_blocking=True)
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        logits = state.step_model(images)
        loss = run.objective.loss(logits, labels)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    hits = run.objective.correct(logits.detach(), labels)
    n = labels.shape[0]
    return torch.stack([loss.detach().double() * n, hits.double(), loss.new_tensor(n, dtype=torch.float64)])


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set ``lr`` for the next step; return it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def evaluate_split(run: Run, model: nn.Module, loader: Any) -> EvalCounts | EvalScores:
    """Counts of ``model`` over a whole split: each rank scores its shard, the counts are summed;
    multi-label data: every image's probabilities, gathered from the ranks."""
    batches = loader.batches(0, rank=run.dd.rank, world_size=run.dd.world_size)
    if run.data.multilabel:
        scores = score_multilabel(model, batches, run.device)
        return EvalScores.merge(run.dd.gather(scores)) if run.dd.enabled else scores
    counts = evaluate(model, batches, run.device)
    if not run.dd.enabled:
        return counts
    return EvalCounts.from_list(run.dd.sum(counts.as_list(), run.device))


def save_snapshot(run: Run, state: State) -> None:
    """A checkpoint of ``state``: everything needed to continue bit-identically from its step
    (every rank calls it; rank 0 writes). Refuses to save weights that are not finite."""
    model, dd = state.model, run.dd
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise TrainingStopped(f"the weights or BN statistics became NaN or infinite at epoch {state.epoch + 1}, step "
                              f"{state.step}: the run diverged; the last good checkpoint in {run.out} is kept "
                              "(try a lower --lr)", 3)
    rngs = dd.gather(rng_state())
    data = run.data
    data_info = {"dataset": run.config.dataset, "num_classes": data.num_classes, "class_names": list(data.class_names),
                 "mean": list(data.mean), "std": list(data.std), "image_size": data.image_size,
                 "seed": run.config.seed}  # the seed chose the held-out split: eval finds the same test images
    if data.multilabel:  # what predict needs besides: sigmoid outputs, the thresholds, the channels and the fit
        data_info.update(multilabel=True, thresholds=state.thresholds, in_channels=data.in_channels, fit=run.config.fit,
                         uncertain=run.config.uncertain, group_column=run.config.group_column,
                         dicom_window=run.config.dicom_window)
    # the new file complete on disk before the old one becomes checkpoint.prev.pt
    on_main(dd, lambda: save_rotating(run.out, {
        "format": "densenet-checkpoint-v1", "config": run.config.to_dict(), "model_config": model.config(),
        "data": data_info, "model": model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(), "epoch": state.epoch, "step": state.step, "partial": state.partial,
        "history": state.history, "rng": rngs[0], "rng_per_rank": rngs, "world_size": dd.world_size,
        **({"ema": state.ema.state_dict()} if state.ema is not None else {}),
    }))


# ---------------------------------------------------------------------------- the plan and its clock
def precision_note(run: Run) -> str:
    """What the plan line says of the precision: the autocast dtype, and why when it was chosen for the user."""
    if run.amp_dtype is None:
        return "float32" + (f", {fused.float32_status()}" if run.device.type == "cpu" else "")
    note = f"amp {run.config.amp}"
    if run.device.type == "cpu" and run.given_amp == "auto":
        note += f" (by default on this CPU: it has {cpu_bf16_instructions()}; --amp off for float32)"
    if run.device.type == "cpu":  # the fused kernels serve bfloat16/float16
        note += f", {fused.status()}"
    return note


def log_plan(run: Run, state: State, num_params: int) -> None:
    """Say what is about to run (or where it resumes) before the first step."""
    config, dd, data = run.config, run.dd, run.data
    if state.epoch or state.step:
        run.log(f"resuming {run.out} at epoch {state.epoch + 1}, step {state.step}"
                + (f" ({dd.world_size} processes)" if dd.enabled else ""))
        return
    source = "the bundled CIFAR-10 sample" if config.data is None else str(config.data)
    steps = data.train.num_batches
    run.log(f"plan: {config.model} ({num_params:,} parameters) on {config.dataset} from {source}: "
            f"{data.train.num_images:,} training images, {config.epochs} epochs x {steps:,} steps = "
            f"{config.epochs * steps:,} steps of batch {config.batch_size}"
            + (f" ({dd.world_size} processes x {config.batch_size // dd.world_size}, {dd.backend})" if dd.enabled else "")
            + f", device {run.device}, {precision_note(run)}"
            + (f", {allocator.status()}" if allocator.status() else ""))
    run.log(f"learning: {describe(config)}")
    if config.data is None:
        run.log("(a short demo on the 1,000-image sample; give --data for a real dataset and the paper's recipe)")
    for note in data_notes(config, data):
        run.log(f"note: {note}")


def data_notes(config: TrainConfig, data: Data) -> list[str]:
    """What a user should know about their data before a run starts: images much smaller or larger
    than the size they are resized to, classes out of balance, files left out, metrics not available."""
    notes = []
    if data.typical_size:
        w, h = data.typical_size
        factor = min(w, h) / data.image_size
        if not SIZE_NOTE[0] <= factor <= SIZE_NOTE[1]:
            change = f"--image-size {min(w, h)} trains at their size" if factor < 1 else "--image-size N changes the size"
            notes.append(f"the images are about {w}x{h} pixels (median of a sample) and are resized to "
                         f"{data.image_size}x{data.image_size} ({'upscaled' if factor < 1 else 'downscaled'} "
                         f"{max(factor, 1 / factor):.1f}x), the input size of {config.model}; {change}")
    counts = data.class_counts
    if data.multilabel:
        n = data.train.num_images
        rare = [f"{name} {c:,}" for name, c in zip(data.class_names, counts) if c < n / 20]
        if rare:
            notes.append(f"rare labels (positives in {n:,} training images): {', '.join(rare[:10])}"
                         f"{' ...' if len(rare) > 10 else ''}; their AUROC is reported per label"
                         + ("" if config.pos_weight else ", and --pos-weight auto weighs their positives up"))
        if data.skipped:
            notes.append(f"{len(data.skipped):,} row(s) of {data.source} left out (--skip-bad), their images missing: "
                         f"{'; '.join(data.skipped[:3])}{' ...' if len(data.skipped) > 3 else ''}")
    elif counts and max(counts) > IMBALANCE_NOTE * min(counts):
        big, small = counts.index(max(counts)), counts.index(min(counts))
        ratio = "no images" if not counts[small] else f"{counts[big] / counts[small]:.0f}:1"
        notes.append(f"the classes are out of balance ({ratio}: {data.class_names[big]} has {counts[big]:,} training "
                     f"images, {data.class_names[small]} {counts[small]:,}); the balanced accuracy and macro F1 in "
                     "report.json weigh every class alike" + ("" if config.balanced_sampler else
                                                             ", and --balanced-sampler draws classes evenly"))
    if data.ignored:
        notes.append(f"{len(data.ignored):,} file(s) left out, not images by their suffix (e.g. {data.ignored[0]})")
    try:
        sklearn_metrics()
    except MissingDependency as e:
        notes.append(f"{e}; the run goes on without them")
    return notes


class FirstStepsClock:
    """Logs once how long the remaining steps will take, from the pace of the first ``PLAN_STEPS``
    steps after the first one (which warms caches up); evaluation is not included."""

    def __init__(self, steps_left: int, log: Callable[[str], None]) -> None:
        self.steps_left, self.log, self.done, self.first, self.start, self.logged = steps_left, log, 0, 0, 0.0, False

    def tick(self, steps: int = 1) -> None:
        """``steps`` more steps are done (the device has caught up with them)."""
        first = self.done == 0
        self.done += steps
        if first:
            self.start, self.first = time.perf_counter(), self.done
        elif not self.logged and self.done - self.first >= PLAN_STEPS and self.steps_left > self.done:
            self.logged = True
            per_step = (time.perf_counter() - self.start) / (self.done - self.first)
            self.log(f"estimated training time: {_duration(per_step * (self.steps_left - self.done))} for the remaining "
                     f"{self.steps_left - self.done:,} steps ({per_step:.2f} s per step; evaluation not included)")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------- set-up helpers
def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; otherwise any device string torch accepts."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available on this machine; use --device cpu")
    return device


def learning_rate(config: TrainConfig, epoch: int, steps_per_epoch: int = 1, val_loss: list[float | None] | None = None
                  ) -> float:
    """lr at the first step of the given epoch (0-based), the ``lr`` column of metrics.csv; for the
    paper's step schedule, ``lr`` times ``lr_gamma`` for every milestone passed (the whole epoch's);
    ``val_loss``: each epoch's validation loss so far (the plateau schedule's input)."""
    return lr_at(config, epoch * steps_per_epoch, steps_per_epoch, val_loss or ())


def val_losses(run: Run, state: State) -> list[float | None]:
    """The validation loss of each epoch trained so far, of the weights the run serves (the plateau schedule's input)."""
    key = "ema_val_loss" if run.config.ema_eval and state.ema is not None else "val_loss"
    return [r.get(key) for r in state.history]


def build_model(config: TrainConfig, num_classes: int, data_args: dict | None = None) -> DenseNet:
    """The model of ``config`` for ``num_classes``; ``data_args`` (``Data.model_args()``): the spatial
    dimensions and input channels of volume and signal datasets, checked against ``--spatial-dims``."""
    data_args = dict(data_args or {})
    wanted, have = config.spatial_dims, data_args.get("spatial_dims", 2)
    if wanted is not None and wanted != have:
        raise ConfigError(f"--spatial-dims {wanted}, but {config.dataset} is {have}-D data: drop --spatial-dims or "
                          f"choose a dataset of that dimension")
    return create_model(config.model, num_classes=num_classes, drop_rate=config.drop_rate,
                        memory_efficient=config.memory_efficient, **data_args)


def configure_runtime(config: TrainConfig, device: torch.device) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu" and not config.memory_efficient:  # the memory-efficient mode wants the smallest peak
        allocator.keep_freed_memory()
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(config.seed)


def on_main(dd: Dist, fn: Callable[[], Any]) -> Any:
    """``fn()`` run by rank 0 alone, its result (or its ConfigError/CheckpointError) on every rank,
    so that no rank waits for a peer that has already failed."""
    result: tuple[str, Any] = ("ok", None)
    if dd.main:
        try:
            result = ("ok", fn())
        except (ConfigError, CheckpointError, OSError) as e:
            result = ("error", f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
    result = dd.broadcast(result)
    if result[0] == "error":
        raise ConfigError(result[1] if dd.main else f"rank 0 stopped: {result[1]}")
    return result[1]


@contextmanager
def stop_on_signals() -> Iterator[dict]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (restored on exit)."""
    flag: dict[str, int | None] = {"signal": None}

    def handler(signum, frame):  # noqa: ANN001
        flag["signal"] = signum

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- run directory
def claim_run_dir(out: Path, resume: bool, held: ExitStack) -> None:
    """Create ``out`` (it must exist to resume) and hold its lock until ``held`` closes: one training
    per run folder, taken before any file is touched (a dead process's lock goes with it)."""
    if resume and not out.is_dir():
        raise ConfigError(f"cannot resume: {out} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    held.enter_context(RunLock(out))


def has_checkpoint(out: Path) -> bool:
    return any((out / name).exists() for name in ("checkpoint.pt", "checkpoint.prev.pt"))


def prepare_run_dir(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse to mix two runs in one folder unless ``force`` (which clears the old run's files)."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        return
    if existing and not force:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(existing)}); continue it with --resume {out}, "
            f"choose another --out, or start over with --force (deletes those files)"
        )
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def load_run_config(out: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The configuration of the run in ``out``; ``overrides`` may change only how it runs."""
    path = out / "config.yaml"
    if out.is_file() and out.suffix.lower() in (".onnx", ".pt2", ".safetensors"):
        raise ConfigError(f"cannot resume: {out} is an export for serving (int8 and ONNX models carry no optimizer "
                          "state or gradients); resume the run's folder (densenet train --resume RUN_DIR)")
    if not path.is_file():
        raise ConfigError(f"cannot resume: {out} holds no run ({path} is missing)")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot resume: {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"cannot resume: {path} does not hold a configuration mapping")
    check_keys_and_types(values, str(path))
    defaults = TrainConfig().to_dict()  # keys newer than the run's config.yaml: the value it ran with
    changed = sorted(k for k, v in overrides.items() if k not in RUNTIME_KEYS and values.get(k, defaults[k]) != v)
    if changed:
        raise ConfigError(
            f"cannot resume {out} with a changed {', '.join(changed)} (the run was started with "
            + ", ".join(f"{k}={values.get(k, defaults[k])!r}" for k in changed)
            + f"); drop {', '.join('--' + k.replace('_', '-') for k in changed)} to continue it as it started, or start "
            f"a new run with another --out; only {', '.join(sorted(RUNTIME_KEYS - {'out'}))} may change on resume"
        )
    values.update({k: v for k, v in overrides.items() if k in RUNTIME_KEYS})
    values["out"] = str(out)
    config = TrainConfig(**values)
    validate(config)
    return config


def record_precision_change(out: Path, before: str, after: str) -> None:
    """A resume in another precision (``--amp``): say so, and keep the new one in config.yaml for later resumes."""
    print(f"note: the precision changes on resume, from amp {before} to {after}: the steps from here round "
          "differently, so the run is no longer bit-identical to one trained in a single precision", file=sys.stderr)
    values = yaml.safe_load((out / "config.yaml").read_text())
    atomic_write_text(out / "config.yaml", yaml.safe_dump({**values, "amp": after}, sort_keys=False))


def load_checkpoint_for_resume(out: Path) -> dict:
    """The newest readable checkpoint of the run: ``checkpoint.pt``, else the one before it
    (a kill between rotating and writing leaves only ``checkpoint.prev.pt``)."""
    errors = []
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        try:
            state = load_checkpoint(out / name)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if name != "checkpoint.pt":
            print(f"warning: {errors[0]}; resuming from the previous checkpoint {out / name}", file=sys.stderr)
        return state
    raise ConfigError(f"cannot resume {out}: {'; '.join(errors)}; the files in {out} were left as they are")


def write_epoch_logs(out: Path, writer: SummaryWriter, config: TrainConfig, history: list[dict]) -> None:
    """After each epoch: ``metrics.csv`` and ``curves.png`` rewritten from the whole history, and the
    epoch's scalars added to TensorBoard."""
    write_metrics_csv(out / "metrics.csv", history)
    plot_curves(out / "curves.png", [(config.model, history)], title=f"{config.model} on {config.dataset}")
    row = history[-1]
    for key in ("train_loss", "train_error", "val_error", "test_error", "lr", "images_per_s", "ema_val_error",
                "ema_test_error", *CLASS_METRIC_COLUMNS, *LABEL_METRIC_COLUMNS):
        if row.get(key) is not None:
            writer.add_scalar(key, row[key], row["epoch"])
    writer.flush()


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """One row per epoch: :data:`METRIC_COLUMNS`, the weight average's errors (:data:`EMA_COLUMNS`) in runs
    that keep one, then the class metrics the rows hold (macro averages,
    balanced accuracy, per-class ``test_f1[NAME]`` ...); missing values are empty."""
    extra = list(EMA_COLUMNS) if any(k in r for r in rows for k in EMA_COLUMNS) else []
    extra += [k for k in CLASS_METRIC_COLUMNS + LABEL_METRIC_COLUMNS if any(k in r for r in rows)]
    extra += [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("test_") and "[" in k]
    columns = [*METRIC_COLUMNS, *extra]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def hardware_name(device: str) -> str:
    """What ran the training, in words: the GPU's name, or the CPU's model name and core count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def make_report(config: TrainConfig, history: list[dict], num_params: int, device: str) -> dict[str, Any]:
    """report.json: the final epoch's test error (the paper's convention) of the served weights (the
    weight average with ``ema_eval``, the raw weights' beside it; else the raw weights, the average's
    beside them when one is kept), the best validation error, the run's time and versions."""
    last = history[-1]
    served, other = ("ema_", "") if config.ema_eval else ("", "ema_")
    report = {
        "model": config.model, "dataset": config.dataset, "parameters": num_params, "epochs": len(history),
        "test_error": last[f"{served}test_error"], "test_top5_error": last[f"{served}test_top5_error"],
        "test_accuracy": 100.0 - last[f"{served}test_error"], "final_train_loss": last["train_loss"],
        "train_seconds": round(sum(r["seconds"] for r in history), 1), "device": device,
        "hardware": hardware_name(device), "torch": torch.__version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if config.ema_decay is not None and f"{other}test_error" in last:
        report.update({"weights": "average" if config.ema_eval else "raw", "ema_decay": config.ema_decay,
                       f"{other or 'raw_'}test_error": last[f"{other}test_error"],
                       f"{other or 'raw_'}test_top5_error": last[f"{other}test_top5_error"]})
    vals = [(r[f"{served}val_error"], r["epoch"]) for r in history if r.get(f"{served}val_error") is not None]
    if vals:
        best, epoch = min(vals)
        report.update(best_val_error=best, best_val_epoch=epoch, final_val_error=vals[-1][0])
    if not all(math.isfinite(r[f"{served}test_error"]) for r in history if f"{served}test_error" in r):
        report["warning"] = "some test errors are not finite (empty test set?)"
    return report
