"""Named models of the paper: ``create_model(name, **overrides)`` and ``list_models()``.

Besides the registered names, any CIFAR layout of the paper can be asked for by name:
``densenet{L}_k{k}`` (basic DenseNet, L - 4 divisible by 3) and ``densenet_bc{L}_k{k}``
(DenseNet-BC, L - 4 divisible by 6), e.g. ``densenet_bc40_k12``.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..errors import ArgumentError, ArgumentTypeError, check_int
from .densenet import DenseNet
from .pretrained import Weights, get_weights, load_weights

__all__ = ["ModelSpec", "create_model", "list_models", "model_spec", "cifar_densenet", "register_model"]


@dataclass(frozen=True)
class ModelSpec:
    """A named architecture: the DenseNet arguments, the paper's parameter count and native input size."""

    name: str
    kwargs: dict[str, Any] = field(hash=False)
    depth: int
    family: str  # "basic", "BC" or "ImageNet (BC)"
    input_size: int
    paper_params: int | None = None

    @property
    def growth_rate(self) -> int:
        return self.kwargs["growth_rate"]


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ArgumentError(f"a model named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def cifar_layout(depth: int, growth_rate: int, bc: bool) -> dict[str, Any]:
    """DenseNet arguments of the paper's CIFAR/SVHN model of depth L: three equal blocks.

    Basic: (L - 4) / 3 layers per block, 16-map stem, no compression.
    BC: (L - 4) / 6 bottleneck layers per block, 2k-map stem, compression 0.5.
    """
    check_int("depth", depth)
    check_int("growth_rate", growth_rate)
    # L counts the stem conv, the transitions' convs and the classifier (4 layers) and every conv
    # of the dense layers (1 per basic layer, 2 per bottleneck layer).
    per_layer = 6 if bc else 3
    if depth <= 4 or (depth - 4) % per_layer:
        valid = [4 + per_layer * n for n in range(1, 6)]
        raise ArgumentError(
            f"no {'DenseNet-BC' if bc else 'basic DenseNet'} layout has depth {depth}: "
            f"L - 4 must be a positive multiple of {per_layer} (e.g. {', '.join(map(str, valid))}, ...)"
        )
    n = (depth - 4) // per_layer
    return {
        "growth_rate": growth_rate,
        "block_config": (n, n, n),
        "bottleneck": bc,
        "compression": 0.5 if bc else 1.0,
        "stem": "cifar",
        "stem_channels": 2 * growth_rate if bc else 16,
        "num_classes": 10,
    }


def cifar_densenet(depth: int, growth_rate: int, bc: bool = True, **overrides: Any) -> DenseNet:
    """The paper's CIFAR/SVHN DenseNet (bc=False) or DenseNet-BC (bc=True) of depth L and growth rate k."""
    return DenseNet(**{**cifar_layout(depth, growth_rate, bc), **overrides})


def _register_paper_models() -> None:
    cifar = [
        ("densenet40_k12", 40, 12, False, 1_019_722),
        ("densenet100_k12", 100, 12, False, 6_979_642),
        ("densenet100_k24", 100, 24, False, 27_249_082),
        ("densenet_bc100_k12", 100, 12, True, 769_162),
        ("densenet_bc250_k24", 250, 24, True, 15_324_406),
        ("densenet_bc190_k40", 190, 40, True, 25_624_430),
    ]
    for name, depth, k, bc, params in cifar:
        register_model(ModelSpec(name, cifar_layout(depth, k, bc), depth, "BC" if bc else "basic", 32, params))
    imagenet = [
        ("densenet121", 121, 32, (6, 12, 24, 16), 7_978_856),
        ("densenet169", 169, 32, (6, 12, 32, 32), 14_149_480),
        ("densenet201", 201, 32, (6, 12, 48, 32), 20_013_928),
        ("densenet264", 264, 32, (6, 12, 64, 48), 33_337_704),
        ("densenet161", 161, 48, (6, 12, 36, 24), 28_681_000),
    ]
    for name, depth, k, blocks, params in imagenet:
        kwargs = {
            "growth_rate": k,
            "block_config": blocks,
            "bottleneck": True,
            "compression": 0.5,
            "stem": "imagenet",
            "stem_channels": 2 * k,
            "num_classes": 1000,
        }
        register_model(ModelSpec(name, kwargs, depth, "ImageNet (BC)", 224, params))


_register_paper_models()

_GENERIC = re.compile(r"^densenet(?P<bc>_bc)?(?P<depth>\d+)_k(?P<k>\d+)$")


def list_models() -> list[str]:
    """Names of the registered models, in the paper's order."""
    return list(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The spec of a registered name or of a generic CIFAR name (``densenet_bc{L}_k{k}``, ``densenet{L}_k{k}``)."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"model name must be a string, got {type(name).__name__}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    match = _GENERIC.match(name)
    if match:
        bc = bool(match["bc"])
        depth, k = int(match["depth"]), int(match["k"])
        return ModelSpec(name, cifar_layout(depth, k, bc), depth, "BC" if bc else "basic", 32, None)
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ArgumentError(
        f"unknown model {name!r}{hint} Registered models: {', '.join(_REGISTRY)}; "
        f"any CIFAR layout is also available as densenet{{L}}_k{{k}} or densenet_bc{{L}}_k{{k}}."
    )


def create_model(name: str, weights: str | bool | Weights | Enum | None = None, **overrides: Any) -> DenseNet:
    """Build a named model, e.g. ``create_model("densenet_bc100_k12", num_classes=100, drop_rate=0.2)``.

    ``weights``: trained weights to load (a tag such as ``"cifar10"`` or ``"imagenet"``, True or
    ``"DEFAULT"`` for the model's default entry, or torchvision's ``"IMAGENET1K_V1"`` /
    ``DenseNet121_Weights.IMAGENET1K_V1``; see ``densenet.list_weights()``). The model then has the weights' class
    count, unless ``num_classes`` asks for another: the classifier is then freshly initialised
    (fine-tuning). ``overrides`` are any ``DenseNet`` arguments; unknown ones raise a ``TypeError``
    listing the valid ones.
    """
    spec = model_spec(name)
    valid = set(DenseNet.__init__.__code__.co_varnames[1 : DenseNet.__init__.__code__.co_argcount])
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ArgumentTypeError(f"unknown argument(s) for {name}: {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    if weights is None or weights is False:
        return DenseNet(**{**spec.kwargs, **overrides})
    w = get_weights(name, weights)
    classes = overrides.pop("num_classes", w.num_classes)
    model = DenseNet(**{**spec.kwargs, **overrides, "num_classes": classes})
    load_weights(model, w, strict=classes == w.num_classes)
    model.pretrained_cfg.update(input_size=(model.in_channels, w.input_size, w.input_size), mean=w.mean, std=w.std,
                                weights=w.name, license=w.license, source=w.source)
    return model
