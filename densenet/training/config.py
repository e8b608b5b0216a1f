"""Training configuration: the paper's recipe per dataset, overridable by YAML and flags."""
from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..analysis.paper import PAPER_EPOCHS
from ..errors import DenseNetError
from ..models import model_spec

__all__ = ["ConfigError", "TrainConfig", "field_help", "field_types", "paper_recipe", "resolve_config",
           "load_yaml_config", "SAMPLE_RECIPE", "type_name", "FOLDER_DATASETS", "native_image_size", "RECIPES",
           "SCHEDULES", "named_recipe", "OPTIMIZERS"]

#: datasets read from image files, whose images are resized to ``image_size`` (csv: a multi-label label file)
FOLDER_DATASETS = ("folder", "imagenet", "csv")

#: --optimizer: SGD (the paper's) or Adam (CheXNet's)
OPTIMIZERS = ("sgd", "adam")


#: --amp: auto, bf16, off (none is the same), fp16 (densenet.training.precision)
AMP_CHOICES = ("auto", "bf16", "off", "none", "fp16")


class ConfigError(DenseNetError, ValueError):
    """A configuration that cannot be used; the message names the key and what is allowed."""


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - the argparse word
    """A configuration field with its ``--flag`` help text (the one description of the key)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_EPOCHS_HELP = ", ".join(f"{n} {d}" for d, n in PAPER_EPOCHS.items() if d != "cifar100")

#: learning-rate schedules (densenet/training/schedule.py says what each does)
SCHEDULES = ("step", "cosine", "linear", "onecycle", "plateau")

#: what each ``--recipe`` sets over the paper's recipe of the dataset (explicit flags and YAML keys win).
#: ``budget``: a starting point for short runs (10-30 epochs), to be confirmed by measurement; why each
#: value: docs/recipes.md, "The short-budget recipe".
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "budget": {"schedule": "linear", "warmup_epochs": 1.0, "lr": 0.1, "momentum": 0.9, "nesterov": True,
               "weight_decay": 5e-4, "label_smoothing": 0.1, "ema_decay": 0.999, "ema_eval": True},
    # CheXNet (Rajpurkar et al. 2017): DenseNet-121 from ImageNet weights (--init FILE), 224 px, Adam 1e-3, batch 16,
    # weighted binary cross-entropy, lr / 10 when the validation loss plateaus (docs/multilabel.md)
    "chexnet": {"model": "densenet121", "image_size": 224, "optimizer": "adam", "lr": 1e-3, "batch_size": 16,
                "weight_decay": 0.0, "schedule": "plateau", "lr_gamma": 0.1, "pos_weight": "auto"},
}
_BUDGET_HELP = " ".join(f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v:g}"
                        if isinstance(v, float) else f"--{k.replace('_', '-')} {v}" for k, v in RECIPES["budget"].items())


@dataclass
class TrainConfig:
    """Everything that defines a training run. Units: epochs, images, steps (SGD updates).
    Each field's help text is the ``densenet train --help`` line of its flag."""

    model: str = _opt("densenet_bc100_k12", "registered name or densenet_bc{L}_k{k} (default densenet_bc100_k12; "
                      "densenet_bc40_k12 for the bundled sample)")
    dataset: str = _opt("cifar10+", "cifar10, cifar10+, cifar100, cifar100+, svhn, imagenet, folder, csv (a multi-label "
                                    "label file, docs/multilabel.md), volumes (3-D: NIfTI or .npy) or signals (1-D .npy) "
                                    "(default cifar10+)")
    data: str | None = _opt(None, "dataset directory or archive (default: the bundled CIFAR-10 sample, with a short "
                                  "demo recipe)")
    out: str = _opt("runs/densenet", "run directory")
    epochs: int = _opt(300, f"default: the paper's ({_EPOCHS_HELP}); 8 on the bundled sample")
    recipe: str = _opt("paper", "paper (the default: the paper's recipe of the dataset, Section 4.2), chexnet (multi-label "
                                "chest X-rays: DenseNet-121, 224 px, Adam 1e-3, batch 16, --pos-weight auto, lr / 10 on a "
                                "validation-loss plateau; give ImageNet weights with --init FILE) or budget, for short "
                                f"runs (e.g. --recipe budget --epochs 30): {_BUDGET_HELP}. Linear decay to zero is the "
                                "most robust schedule on a small budget (Li et al., ICLR 2020); label smoothing and an "
                                "average of the weights helped most in short CIFAR-10 runs (Page, Jordan's airbench); "
                                "explicit flags override it; see docs/recipes.md")
    batch_size: int = _opt(64, "images per step, over all processes (the paper: 64, 256 for ImageNet)")
    eval_batch_size: int = _opt(256, "images per evaluation batch")
    lr: float = _opt(0.1, "base learning rate: where the step, cosine and linear schedules start (after any warm-up), "
                          "the peak of onecycle")
    optimizer: str = _opt("sgd", "sgd (the paper's; --momentum, --nesterov) or adam (betas 0.9, 0.999; --weight-decay "
                                 "as L2, as in CheXNet)")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(True, "Nesterov momentum")
    weight_decay: float = _opt(1e-4, "L2 weight decay")
    lr_milestones: list[int] = _opt([], "epochs at which lr is multiplied by lr_gamma (default: 50%% and 75%% of "
                                        "the epochs; 30 60 for ImageNet)")
    lr_gamma: float = _opt(0.1, "learning-rate factor at each milestone")
    schedule: str = _opt("step", "learning-rate schedule, set before every step: step (the paper's: lr times lr_gamma at "
                                 "each milestone; the default), cosine (to zero), linear (decay to zero over the run) or "
                                 "onecycle (Smith 2018, linear phases: from lr/10 up to lr at 45%% of the steps, down to "
                                 "lr/10 at 90%%, then to zero; at least 2 epochs) or plateau (lr times lr_gamma after "
                                 "each --plateau-patience epochs without a lower validation loss; needs a validation "
                                 "split)")
    plateau_patience: int = _opt(1, "schedule plateau: epochs without a new lowest validation loss before lr is "
                                    "multiplied by lr_gamma (default 1)")
    warmup_epochs: float = _opt(0.0, "epochs (fractions allowed) of linear warm-up from about zero to the schedule's "
                                     "starting lr, before any schedule (default 0: none)")
    label_smoothing: float = _opt(0.0, "label smoothing of the training loss, in [0, 1) (default 0: none)")
    ema_decay: float | None = _opt(None, "keep an exponential moving average of the weights and BN statistics, updated "
                                         "after every step with this decay in (0, 1), e.g. 0.999 (warmed up as "
                                         "min(decay, (1 + n) / (10 + n)) at update n); evaluated each epoch beside the "
                                         "raw weights (default: off; none turns a recipe's off)")
    ema_eval: bool = _opt(False, "the averaged weights (--ema-decay) replace the raw ones in report.json, and in "
                                 "`densenet eval`, `predict` and `export` of the checkpoint")
    drop_rate: float = _opt(0.0, "dropout after each convolution; default 0.2 without augmentation (cifar10, "
                                 "cifar100, svhn), else 0")
    val_size: int | None = _opt(None, "training images held out for validation (paper: 5000 CIFAR, 6000 SVHN); "
                                      "default none")
    train_subset: int | None = _opt(None, "train on this many training images, chosen by the seed")
    test_subset: int | None = _opt(None, "evaluate on this many test images, chosen by the seed")
    image_size: list[int] | int | None = _opt(None, "image side in pixels for folder and imagenet datasets (default: the "
                                                    "model's native size, 32 for the CIFAR models, 224 for the ImageNet "
                                                    "ones); volumes: one side or three (default 64); signals: the length")
    balanced_sampler: bool = _opt(False, "draw training batches class-balanced (each image weighted by 1 / its class's "
                                         "images, with replacement; as many draws per epoch as images), for imbalanced "
                                         "classes")
    image_root: str | None = _opt(None, "dataset csv: the folder the label file's image paths are relative to (default: "
                                        "the label file's folder)")
    uncertain: str = _opt("zeros", "dataset csv: uncertain (-1) labels count as ones, zeros (the default) or ignore "
                                   "(left out of the loss and the metrics for that label)")
    group_column: str | None = _opt(None, "dataset csv: the column of patient (group) ids kept on one side of the "
                                          "seeded split (default: Patient ID and the like when the file has one)")
    pos_weight: str | None = _opt(None, "multi-label: auto weighs each label's positives by negatives / positives of "
                                        "the training split (default: none)")
    in_channels: int = _opt(3, "dataset csv: 1 (greyscale, e.g. X-rays; RGB weights are summed over their channels) "
                               "or 3 (default)")
    fit: str = _opt("crop", "dataset csv: a non-square image is centre-cropped (crop, the default) or padded with black "
                            "bands (pad) to become square, keeping its aspect ratio")
    dicom_window: bool = _opt(False, "dataset csv: DICOM images use their VOI window (WindowCenter/Width) when they "
                                     "have one (default: the full range)")
    skip_bad: bool = _opt(False, "image folders and label files: images that are missing or cannot be decoded are "
                                 "counted, the first few named, and left out (default: stop at the first, naming it)")
    threshold_rule: str = _opt("youden", "multi-label: each label's decision threshold is chosen on the validation split "
                                         "by youden (max sensitivity + specificity, the default) or f1")
    spatial_dims: int | None = _opt(None, "1, 2 or 3: the model's spatial dimensions (default: the dataset's, 3 for "
                                          "volumes, 1 for signals, else 2)")
    download: bool = _opt(False, "download missing official CIFAR/SVHN files (MD5-checked); needs internet")
    memory_efficient: bool = _opt(False, "keep only each dense block's buffer for backward (memory linear in depth)")
    sync_bn: bool = _opt(False, "synchronised BN over all processes (distributed training; matters for small "
                                "per-process batches)")
    amp: str = _opt("auto", "mixed precision: auto (bf16 on a CPU with bfloat16 instructions, AVX512_BF16 or AMX, where "
                            "it trains faster; else off), bf16, off or none (float32), fp16 (CUDA only, with a gradient "
                            "scaler). BN statistics, weights and the optimizer's state stay float32")
    channels_last: bool = _opt(False, "NHWC memory format for the model and its inputs (faster convolutions on GPUs)")
    init: str | None = _opt(None, "start from this project's checkpoint or a torchvision DenseNet state dict")
    weights: str | None = _opt(None, "start from trained weights by name, a tag of --model such as imagenet "
                                     "(`densenet weights` lists them); a head of another class count starts afresh")
    freeze_features: bool = _opt(False, "train the classifier only")
    seed: int = _opt(0, "random seed (initial weights, data order, augmentation, dropout)")
    deterministic: bool = _opt(False, "deterministic algorithms (bit-identical reruns and resumes)")
    device: str = _opt("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    threads: int | None = _opt(None, "CPU threads")
    workers: int = _opt(2, "data-loading worker processes (image folders)")
    checkpoint_every: int = _opt(200, "steps between mid-epoch checkpoints (0: epoch ends only)")
    eval_every: int = _opt(1, "epochs between evaluations of the validation and test splits; the last epoch is "
                              "always evaluated, the others leave those columns of metrics.csv empty (saves time "
                              "in long CPU runs; the plateau schedule needs 1)")
    sync_every: int | None = _opt(None, "steps between reading the running loss and accuracy back from the device "
                                        "(signals and a diverging loss are acted on then); default 1 on a CPU, 50 on "
                                        "a GPU, where each read makes the host wait for the GPU")
    dist_backend: str = _opt("auto", "under torchrun: auto (nccl on CUDA, else gloo), nccl or gloo")
    dist_timeout: int = _opt(600, "seconds a collective waits for a peer process before the run stops (default 600)")
    memory_check: bool = _opt(True, "refuse to start when a step's estimated memory clearly exceeds the available "
                                    "memory (default on)")
    quiet: bool = _opt(False, "no progress bar: one line per epoch, for log files")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_types() -> dict[str, Any]:
    """Each TrainConfig key with its type (``int``, ``str | None``, ``list[int]``, ...)."""
    return typing.get_type_hints(TrainConfig)


def type_name(annotation: Any) -> str:
    """``int``, ``str | None``, ``list[int]``: a field's type as written in the dataclass."""
    return annotation.__name__ if annotation in (int, float, str, bool) else str(annotation)


def field_help(name: str) -> str:
    """The help text of TrainConfig key ``name``."""
    return next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == name)


# Keys that may differ when a run is resumed: they change how it runs, not what it computes. ``amp``
# changes only the rounding (a run moved to a machine without bfloat16 instructions, or to a GPU): the
# resume says so, since the steps after it are no longer bit-identical to a run left in one precision.
RUNTIME_KEYS = frozenset({"out", "data", "image_root", "skip_bad",
                          "download", "device", "threads", "workers", "quiet", "checkpoint_every", "eval_every", "sync_every",
                          "channels_last", "dist_backend", "dist_timeout", "memory_check", "amp"})

#: what a run on the bundled 1,000-image sample changes in the recipe when not given: a demo that
#: finishes in about a minute on a CPU (DenseNet-BC L=40 k=12, 8 epochs) instead of 300 epochs of BC-100
SAMPLE_RECIPE = {"model": "densenet_bc40_k12", "epochs": 8}


def paper_recipe(dataset: str) -> dict[str, Any]:
    """The paper's training recipe for ``dataset`` (Section 4.2)."""
    base = dataset.rstrip("+")
    if base in ("volumes", "signals"):  # DenseNet-121 of the right dimension, batches that fit a CPU
        return {"model": "densenet121", "epochs": 50, "batch_size": 4 if base == "volumes" else 64,
                "lr_milestones": [], "drop_rate": 0.0}
    if base == "imagenet":
        return {"epochs": PAPER_EPOCHS["imagenet"], "batch_size": 256, "lr_milestones": [30, 60], "drop_rate": 0.0}
    # CIFAR and SVHN: lr divided at 50% and 75% of the epochs (lr_milestones [] means exactly that)
    if base == "svhn":
        return {"epochs": PAPER_EPOCHS["svhn"], "batch_size": 64, "lr_milestones": [], "drop_rate": 0.2}
    if base in ("cifar10", "cifar100"):
        return {"epochs": PAPER_EPOCHS[base], "batch_size": 64, "lr_milestones": [],
                "drop_rate": 0.0 if dataset.endswith("+") else 0.2}
    return {"epochs": 90, "batch_size": 64, "lr_milestones": [], "drop_rate": 0.0}  # folder: a user's data


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _short_repr(value: Any) -> str:
    """repr of a value for a message, bounded (YAML aliases can nest a value exponentially)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlevel = 80, 80, 3
    return r.repr(value)


def check_keys_and_types(values: dict[str, Any], source: str) -> None:
    """Raise ``ConfigError`` naming unknown keys and values of the wrong type."""
    fields = field_types()
    unknown = sorted(k if isinstance(k, str) else repr(k) for k in values if k not in fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    wrong = [
        f"{k}={_short_repr(v)} (expected {type_name(fields[k])})" for k, v in values.items() if not _type_ok(v, fields[k])
    ]
    if wrong:
        raise ConfigError(f"{source}: wrong type for {'; '.join(wrong)}")


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of TrainConfig keys."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests lists or mappings too deeply to be a configuration") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}")
    check_keys_and_types(values, f"config file {path}")
    return values


def resolve_config(overrides: dict[str, Any], config_file: str | os.PathLike | None = None) -> TrainConfig:
    """Defaults < paper recipe of the dataset < YAML file < explicit overrides (flags)."""
    check_keys_and_types(overrides, "command line")
    from_file = load_yaml_config(config_file) if config_file else {}
    given = {**from_file, **overrides}
    dataset = given.get("dataset", TrainConfig.dataset)
    sample = given.get("data") is None and dataset.rstrip("+") in ("cifar10", "cifar100")
    values = {**paper_recipe(dataset), **(SAMPLE_RECIPE if sample else {}), **named_recipe(given.get("recipe", "paper")),
              **given}
    if dataset == "imagenet" and "epochs" in given and "lr_milestones" not in given:
        values["lr_milestones"] = [given["epochs"] // 3, 2 * given["epochs"] // 3]  # the paper's 30/90, 60/90
    if values.get("ema_decay") is None and "ema_eval" not in given:
        values["ema_eval"] = False  # a recipe's --ema-eval applies to an average kept: --ema-decay none turns both off
    if isinstance(values.get("image_size"), list) and len(values["image_size"]) == 1:
        values["image_size"] = values["image_size"][0]  # --image-size 96: one side
    config = TrainConfig(**values)
    validate(config)
    config.image_size = native_image_size(config)
    return config


def named_recipe(name: str) -> dict[str, Any]:
    """The keys recipe ``name`` sets (:data:`RECIPES`); ConfigError naming the recipes for another name."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r} (--recipe / recipe:); use one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def native_image_size(config: TrainConfig) -> int | None:
    """``config.image_size`` if set; for image-folder datasets (folder, imagenet) otherwise the model's
    native input size (32 for the CIFAR models, 224 for the ImageNet ones); None for the 32x32 datasets."""
    if config.image_size is not None or config.dataset not in FOLDER_DATASETS:
        return config.image_size
    return model_spec(config.model).input_size


def milestones(config: TrainConfig) -> list[int]:
    """Epochs at whose start the learning rate is multiplied by ``lr_gamma``: the configured ones,
    or 50% and 75% of the epochs (the paper's CIFAR/SVHN schedule)."""
    if config.lr_milestones:
        return list(config.lr_milestones)
    return [config.epochs // 2, (config.epochs * 3) // 4] if config.epochs >= 4 else []


def validate(config: TrainConfig) -> None:
    checks = [
        (config.epochs >= 1, "epochs must be at least 1"),
        (config.batch_size >= 1, "batch_size must be at least 1"),
        (config.eval_batch_size >= 1, "eval_batch_size must be at least 1"),
        (config.lr > 0, "lr must be positive"),
        (0 <= config.momentum < 1, "momentum must be in [0, 1)"),
        (config.weight_decay >= 0, "weight_decay must be non-negative"),
        (0 <= config.drop_rate < 1, "drop_rate must be in [0, 1)"),
        (config.val_size is None or config.val_size >= 0, "val_size must be non-negative"),
        (config.train_subset is None or config.train_subset >= 1, "train_subset must be positive"),
        (config.test_subset is None or config.test_subset >= 1, "test_subset must be positive"),
        (config.checkpoint_every >= 0, "checkpoint_every must be non-negative (0: only at epoch ends)"),
        (config.eval_every >= 1, f"eval_every (--eval-every) must be at least 1 epoch, got {config.eval_every}"),
        (config.eval_every == 1 or config.schedule != "plateau",
         f"eval_every (--eval-every) {config.eval_every} leaves epochs without a validation loss, which the plateau "
         "schedule reads after every epoch: use --eval-every 1 with --schedule plateau"),
        (config.sync_every is None or config.sync_every >= 1, "sync_every must be at least 1"),
        (config.workers >= 0, "workers must be non-negative"),
        (config.threads is None or config.threads >= 1, "threads must be positive"),
        (config.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}, got {config.amp!r}"),
        (config.spatial_dims in (None, 1, 2, 3), f"spatial_dims must be 1, 2 or 3, got {config.spatial_dims}"),
        (not isinstance(config.image_size, list) or (len(config.image_size) in (1, 3) and min(config.image_size) >= 1),
         f"image_size must be one side or three (depth, height, width), got {config.image_size}"),
        (not isinstance(config.image_size, list) or config.dataset == "volumes",
         f"three sides ({' '.join(map(str, config.image_size)) if isinstance(config.image_size, list) else ''}) are for "
         "--dataset volumes; "
         f"images and signals take one: --image-size N"),
        (config.dist_backend in ("auto", "nccl", "gloo"),
         f"dist_backend must be auto, nccl or gloo, got {config.dist_backend!r}"),
        (config.dist_timeout >= 1, "dist_timeout must be at least 1 second"),
        (not (config.init and config.weights), "init and weights both give starting weights: use one"),
        (all(0 < m <= config.epochs for m in config.lr_milestones), "lr_milestones must lie in 1..epochs"),
        (all(math.isfinite(getattr(config, k)) for k in ("lr", "momentum", "weight_decay", "lr_gamma", "drop_rate")),
         "lr, momentum, weight_decay, lr_gamma and drop_rate must be finite numbers (not .inf or .nan)"),
        *_recipe_checks(config),
        *_label_file_checks(config),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))


def _label_file_checks(config: TrainConfig) -> list[tuple[bool, str]]:
    """(ok, message) for the keys of multi-label label files (dataset csv) and the optimizer."""
    csv_only = [k for k, default in (("image_root", None), ("group_column", None), ("in_channels", 3), ("fit", "crop"),
                                     ("dicom_window", False), ("uncertain", "zeros")) if getattr(config, k) != default]
    return [
        (config.optimizer in OPTIMIZERS, f"optimizer (--optimizer) must be one of {', '.join(OPTIMIZERS)}, "
                                         f"got {config.optimizer!r}"),
        (config.plateau_patience >= 1, f"plateau_patience (--plateau-patience) must be at least 1, got "
                                       f"{config.plateau_patience}"),
        (config.uncertain in ("ones", "zeros", "ignore"),
         f"uncertain (--uncertain) must be ones, zeros or ignore, got {config.uncertain!r}"),
        (config.pos_weight in (None, "auto"), f"pos_weight (--pos-weight) must be auto (or left out), got "
                                              f"{config.pos_weight!r}"),
        (config.in_channels in (1, 3), f"in_channels (--in-channels) must be 1 or 3, got {config.in_channels}"),
        (config.fit in ("crop", "pad"), f"fit (--fit) must be crop or pad, got {config.fit!r}"),
        (config.threshold_rule in ("youden", "f1"),
         f"threshold_rule (--threshold-rule) must be youden or f1, got {config.threshold_rule!r}"),
        (config.dataset == "csv" or not csv_only,
         f"{', '.join(csv_only)} {'is' if len(csv_only) == 1 else 'are'} for label files (--dataset csv), not "
         f"{config.dataset}"),
        (config.dataset == "csv" or config.pos_weight is None,
         f"pos_weight (--pos-weight) is for multi-label label files (--dataset csv), not {config.dataset}"),
    ]


def _recipe_checks(config: TrainConfig) -> list[tuple[bool, str]]:
    """(ok, message) for the schedule, warm-up, label smoothing and weight average: each message names
    the key, its flag and the fix."""
    warmup, epochs = config.warmup_epochs, config.epochs
    return [
        (config.recipe in RECIPES, f"recipe (--recipe) must be one of {', '.join(RECIPES)}, got {config.recipe!r}"),
        (config.schedule in SCHEDULES,
         f"schedule (--schedule) must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}"),
        (math.isfinite(warmup) and warmup >= 0,
         f"warmup_epochs (--warmup-epochs) must be a non-negative number of epochs, got {warmup}"),
        (not math.isfinite(warmup) or warmup < epochs,
         f"warmup_epochs (--warmup-epochs) {warmup:g} is not shorter than the run ({epochs} epochs): the warm-up "
         "would take the whole run; shorten it or train for more --epochs"),
        (config.schedule != "onecycle" or not math.isfinite(warmup) or epochs - warmup >= 2,
         f"schedule onecycle needs at least 2 epochs after the warm-up (the run has {epochs} epoch(s), "
         f"warm-up {warmup:g}): its rise and fall span the run's epochs; train for more --epochs, or use "
         "--schedule linear (with --warmup-epochs for a rise) for a single epoch"),
        (0 <= config.label_smoothing < 1,
         f"label_smoothing (--label-smoothing) must be in [0, 1), got {config.label_smoothing} (0: none; 0.1 is usual)"),
        (config.ema_decay is None or 0 < config.ema_decay < 1,
         f"ema_decay (--ema-decay) must be in (0, 1), got {config.ema_decay} (e.g. 0.999: an average over about "
         "1/(1 - decay) = 1000 steps); leave it out for no average"),
        (not config.ema_eval or config.ema_decay is not None,
         "ema_eval (--ema-eval) uses the average of the weights, but none is kept: give --ema-decay (e.g. 0.999) "
         "or drop --ema-eval"),
    ]
