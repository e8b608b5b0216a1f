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

__all__ = ["ConfigError", "TrainConfig", "paper_recipe", "resolve_config", "load_yaml_config"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what is allowed."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. Units: epochs, images, steps (SGD updates)."""

    model: str = "densenet_bc100_k12"
    dataset: str = "cifar10+"
    data: str | None = None  # directory or archive; None: the bundled CIFAR-10 sample
    out: str = "runs/densenet"
    epochs: int = 300
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    lr_milestones: list[int] = field(default_factory=list)  # epochs where lr is divided; [] = 50% and 75%
    lr_gamma: float = 0.1
    drop_rate: float = 0.0  # the recipe: 0.2 without augmentation (cifar10, cifar100, svhn), else 0
    val_size: int | None = None  # images held out of training for validation; None: no validation split
    train_subset: int | None = None  # train on this many images (chosen by the seed); None: all
    test_subset: int | None = None
    image_size: int | None = None  # for "folder" datasets
    download: bool = False  # fetch missing official CIFAR/SVHN files (MD5-checked) when online
    memory_efficient: bool = False
    sync_bn: bool = False  # synchronised BN across processes (distributed training)
    amp: str = "off"  # mixed precision: off, bf16 or fp16 (fp16 with a gradient scaler; CUDA only)
    channels_last: bool = False  # NHWC memory format for the model and its inputs
    init: str | None = None  # weights to start from (this project's checkpoint or a torchvision state dict)
    freeze_features: bool = False
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    threads: int | None = None
    workers: int = 2
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints (0: epoch ends only)
    dist_backend: str = "auto"  # torch.distributed backend under torchrun: auto (nccl on CUDA, else gloo), nccl, gloo
    dist_timeout: int = 600  # seconds a collective waits for a peer before the run stops with an error
    memory_check: bool = True  # refuse to start when a step's estimated memory clearly exceeds what is available
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that may differ when a run is resumed: they change how it runs, not what it computes.
RUNTIME_KEYS = frozenset({"out", "data", "download", "device", "threads", "workers", "quiet", "checkpoint_every",
                          "channels_last", "dist_backend", "dist_timeout", "memory_check"})


def paper_recipe(dataset: str) -> dict[str, Any]:
    """The paper's training recipe for ``dataset`` (Section 4.2)."""
    base = dataset.rstrip("+")
    if base == "imagenet":
        return {"epochs": 90, "batch_size": 256, "lr_milestones": [30, 60], "drop_rate": 0.0}
    # CIFAR and SVHN: lr divided at 50% and 75% of the epochs (lr_milestones [] means exactly that)
    if base == "svhn":
        return {"epochs": 40, "batch_size": 64, "lr_milestones": [], "drop_rate": 0.2}
    if base in ("cifar10", "cifar100"):
        return {"epochs": 300, "batch_size": 64, "lr_milestones": [], "drop_rate": 0.0 if dataset.endswith("+") else 0.2}
    return {"epochs": 90, "batch_size": 64, "lr_milestones": [], "drop_rate": 0.0}  # folder: a user's data


def _type_ok(value: Any, annotation: Any) -> bool:
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"list": list})  # noqa: S307 - our own annotations
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
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k if isinstance(k, str) else repr(k) for k in values if k not in fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    wrong = [
        f"{k}={_short_repr(v)} (expected {fields[k]})" for k, v in values.items() if not _type_ok(v, fields[k])
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
    dataset = overrides.get("dataset", from_file.get("dataset", TrainConfig.dataset))
    given = {**from_file, **overrides}
    values = {**paper_recipe(dataset), **given}
    if dataset == "imagenet" and "epochs" in given and "lr_milestones" not in given:
        values["lr_milestones"] = [given["epochs"] // 3, 2 * given["epochs"] // 3]  # the paper's 30/90, 60/90
    config = TrainConfig(**values)
    validate(config)
    return config


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
        (config.workers >= 0, "workers must be non-negative"),
        (config.threads is None or config.threads >= 1, "threads must be positive"),
        (config.amp in ("off", "bf16", "fp16"), f"amp must be off, bf16 or fp16, got {config.amp!r}"),
        (config.dist_backend in ("auto", "nccl", "gloo"), f"dist_backend must be auto, nccl or gloo, got {config.dist_backend!r}"),
        (config.dist_timeout >= 1, "dist_timeout must be at least 1 second"),
        (all(0 < m <= config.epochs for m in config.lr_milestones), "lr_milestones must lie in 1..epochs"),
        (all(math.isfinite(getattr(config, k)) for k in ("lr", "momentum", "weight_decay", "lr_gamma", "drop_rate")),
         "lr, momentum, weight_decay, lr_gamma and drop_rate must be finite numbers (not .inf or .nan)"),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
