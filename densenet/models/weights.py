"""Reading weight files safely and exchanging state dicts with torchvision's DenseNet.

State dicts from other code load too, with every renaming reported (:class:`LoadReport`): nested in a
checkpoint (``{"state_dict": ...}``), under ``module.`` (DataParallel/DDP) and one wrapper prefix
(``densenet121.``, ``model.``, ``backbone.``), with torchvision's legacy key names, a ``classifier.0``
head (``nn.Sequential(nn.Linear, ...)``, as in CheXNet), or MONAI's names (``...denselayer1.layers.norm1``,
``class_layers.out``; 1-D, 2-D and 3-D). timm's DenseNet state dicts already use torchvision's names.
:func:`to_monai_state_dict` gives a model's weights under MONAI's names, for ``monai.networks.nets.DenseNet``
built with :func:`monai_arguments`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import DenseNetError
from ..io.checkpoint import CheckpointError, read_torch_file, verify_digest

__all__ = [
    "WeightsError",
    "LoadReport",
    "read_state_dict",
    "unwrap_state_dict",
    "load_state_dict",
    "load_weight_file",
    "from_torchvision_state_dict",
    "to_torchvision_state_dict",
    "load_torchvision_weights",
    "monai_arguments",
    "to_monai_state_dict",
]

log = logging.getLogger("densenet.weights")


class WeightsError(DenseNetError, ValueError):
    """A weight file or state dict that cannot be used; the message names what is wrong."""


# Old torchvision checkpoints name dense-layer parameters "denselayer1.norm.1.weight" where the
# module is now "denselayer1.norm1.weight"; torchvision's own loader fixes them with this pattern.
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
# MONAI's DenseNet holds a dense layer's modules in a Sequential "layers", and its head in
# "class_layers" (relu, pool, flatten: no parameters; "out": the Linear).
_MONAI_LAYER = re.compile(r"^(.*denselayer\d+)\.layers\.(.*)$")
_MONAI_HEAD = "class_layers.out."
# a classifier inside an nn.Sequential: "classifier.0.weight" (CheXNet: Sequential(Linear, Sigmoid))
_SEQUENTIAL_HEAD = re.compile(r"^classifier\.(\d+)\.(weight|bias)$")
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "ema", "module")
# prefixes that wrappers add and that are always removed: DataParallel/DDP, torch.compile
_KNOWN_PREFIXES = ("module.", "_orig_mod.")
_HEAD = "classifier."


@dataclass
class LoadReport:
    """What :func:`load_state_dict` did to make a state dict fit the model.

    ``loaded``: how many tensors were copied into the model. ``renamed``: each change of names, one
    line each (where the weights were found in a checkpoint, a prefix removed, legacy / ``classifier.0``
    / MONAI names). ``dropped``: tensors of the file that were not loaded and tensors of the model
    that the file did not fill (left as the model had them), one line per kind.
    """

    loaded: int = 0
    renamed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors"
        text += "; renamed: " + "; ".join(self.renamed) if self.renamed else ", names as in the model"
        if self.dropped:
            text += "; not loaded: " + "; ".join(self.dropped)
        return text


def _read_file(path: str | os.PathLike) -> object:
    """The content of a weight file, read safely (tensors and plain data only), not yet unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
    # training scripts (timm's among them) save their argparse options beside the weights: a
    # Namespace holds plain values only, so it is read too (older torch: refused as before)
    allow = getattr(torch.serialization, "safe_globals", None)
    with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
        state = read_torch_file(path, f"weight file {path}", WeightsError)
    if isinstance(state, Mapping):  # this project's checkpoints carry a digest of their content
        try:
            state = verify_digest(state, str(path))
        except CheckpointError as e:
            raise WeightsError(str(e)) from None
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch file, never unpickling arbitrary objects.

    PyTorch files are read with ``torch.load(weights_only=True)``. A checkpoint that wraps the
    weights (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped, and a ``module.`` prefix
    (DataParallel/DDP) is removed. Other renaming waits for :func:`load_state_dict`, which knows
    the model (:func:`load_weight_file` does both and reports every change).
    """
    return unwrap_state_dict(_read_file(path), source=str(path))


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def _find_state_dict(state: object, source: str, where: str = "") -> tuple[dict[str, Tensor], str]:
    """The flat ``{name: tensor}`` inside nested checkpoint dicts, and where it was (``"['state_dict']"``)."""
    if isinstance(state, Mapping):
        for key in _WRAPPER_KEYS:
            if key in state and isinstance(state[key], Mapping):
                others = [k for k, v in state.items() if k != key and _is_state_dict(v)]
                also = f" (the file also holds {', '.join(map(repr, others))})" if others else ""
                return _find_state_dict(state[key], source, f"{where}[{key!r}]{also}")
    if not _is_state_dict(state):
        raise WeightsError(f"{source} does not hold a state dict (a mapping of parameter names to tensors)")
    if not all(isinstance(k, str) for k in state):
        raise WeightsError(f"{source} does not hold a state dict (its keys are not all parameter names)")
    return dict(state), where


def unwrap_state_dict(state: object, source: str = "state dict") -> dict[str, Tensor]:
    """Return the flat ``{name: tensor}`` inside a checkpoint dict, without a ``module.`` prefix."""
    state, _ = _find_state_dict(state, source)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def from_torchvision_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision DenseNet state dict (legacy key names included) to this project's names.

    Both use ``features.denseblockB.denselayerL.{norm1,conv1,norm2,conv2}`` and ``classifier``;
    only the legacy ``norm.1``/``conv.2`` spellings need renaming.
    """
    out = {}
    for key, value in state.items():
        match = _LEGACY_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _rename(key: str) -> tuple[str, str | None]:
    """This project's name for ``key`` (a torchvision legacy or MONAI name), and which kind of name it was."""
    match = _LEGACY_KEY.match(key)
    if match:
        return match.group(1) + match.group(2), "legacy"
    match = _MONAI_LAYER.match(key)
    if match:
        return match.group(1) + "." + match.group(2), "MONAI"
    if key.startswith(_MONAI_HEAD):
        return _HEAD + key[len(_MONAI_HEAD) :], "MONAI"
    return key, None


def _matches(keys, own: Mapping[str, Tensor]) -> int:
    """How many of ``keys`` name a tensor of the model once renamed (and rid of DDP/compile prefixes)."""
    count = 0
    for key in keys:
        while key.startswith(_KNOWN_PREFIXES):
            key = key.split(".", 1)[1]
        count += _rename(key)[0] in own
    return count


def _strip_prefixes(keys: list[str], own: Mapping[str, Tensor]) -> str:
    """The prefix shared by every key that wrappers added: ``module.`` / ``_orig_mod.`` whenever
    every key has it, and at most one other ``word.`` when removing it makes keys match the model
    (never the model's own ``features.`` of a backbone-only state dict, whose keys match as they are)."""
    prefix, other = "", False
    while True:
        rest = [k[len(prefix) :] for k in keys]
        known = next((p for p in _KNOWN_PREFIXES if all(k.startswith(p) for k in rest)), None)
        if known:
            prefix += known
            continue
        word = rest[0].split(".", 1)[0] + "."
        if (not other and "." in rest[0] and all(k.startswith(word) and len(k) > len(word) for k in rest)
                and _matches((k[len(word) :] for k in rest), own) > _matches(rest, own)):
            prefix, other = prefix + word, True
            continue
        return prefix


def _adapt(state: object, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str], LoadReport]:
    """``state`` under the model's names, the file's name of each (new -> old) and the renamings made."""
    flat, where = _find_state_dict(state, "the state dict")
    report = LoadReport()
    if where:
        report.renamed.append(f"weights taken from checkpoint{where}")
    own = model.state_dict()
    prefix = _strip_prefixes(list(flat), own)
    if prefix:
        report.renamed.append(f"removed prefix {prefix!r}")
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}  # our name -> the file's
    kinds: dict[str, int] = {}
    for key, value in flat.items():
        new, kind = _rename(key[len(prefix) :])
        if new in out:
            raise WeightsError(f"the state dict has both {source[new]!r} and {key!r}, which name the same tensor {new!r}")
        out[new], source[new] = value, key
        if kind:
            kinds[kind] = kinds.get(kind, 0) + 1
    if "legacy" in kinds:
        report.renamed.append(f"renamed {kinds['legacy']} legacy keys (denselayerL.norm.1 -> denselayerL.norm1)")
    if "MONAI" in kinds:
        report.renamed.append(f"MONAI names: {kinds['MONAI']} keys (denselayerL.layers.* -> denselayerL.*, "
                              "class_layers.out -> classifier)")
    # a head inside an nn.Sequential: one Linear at index i -> the model's plain classifier
    head = {k for k in out if k.startswith(_HEAD)}
    indices = {m.group(1) for m in map(_SEQUENTIAL_HEAD.match, head) if m}
    i = next(iter(indices)) if len(indices) == 1 else None
    if i is not None and head == {f"{_HEAD}{i}.weight", f"{_HEAD}{i}.bias"} and {_HEAD + "weight", _HEAD + "bias"} <= set(own):
        for name in ("weight", "bias"):
            old = f"{_HEAD}{i}.{name}"
            out[_HEAD + name], source[_HEAD + name] = out.pop(old), source.pop(old)
        report.renamed.append(f"classifier.{i} -> classifier")
    # the file's name beside ours in messages where more than the reported prefix differs
    origin = {new: old for new, old in source.items() if old[len(prefix) :] != new}
    return out, origin, report


def _to_one_channel(state: dict[str, Tensor], own: Mapping[str, Tensor], report: LoadReport) -> None:
    """RGB weights into a one-channel (greyscale) model: a convolution that reads the 3 image channels in
    the file and 1 in the model gets the file's weights summed over the three, so that a grey image
    x gives what the RGB model gives for (x, x, x) (timm's ``adapt_input_conv`` does the same)."""
    for k, mine in own.items():
        theirs = state.get(k)
        if (theirs is not None and mine.dim() >= 3 and theirs.dim() == mine.dim() and theirs.shape[1] == 3
                and mine.shape[1] == 1 and theirs.shape[0] == mine.shape[0] and theirs.shape[2:] == mine.shape[2:]):
            state[k] = theirs.sum(1, keepdim=True)
            report.renamed.append(f"{k}: summed over its 3 input channels for the model's 1 (greyscale)")


def _shapes(tensors) -> str:
    return " / ".join(str(tuple(t.shape)) for t in tensors)


def load_state_dict(model: nn.Module, state: Mapping, *, strict: bool = True) -> LoadReport:
    """Load ``state`` into ``model`` after checking every key and shape, with an error that names them;
    returns what was renamed and what was not loaded (:class:`LoadReport`).

    ``state`` may be a checkpoint that nests the weights (``{"state_dict": ...}``), with names from
    torchvision (legacy ones too), timm, MONAI (2-D), under ``module.`` and one wrapper prefix, with a
    ``classifier.0`` head. With ``strict=False`` the classifier may be missing, of another shape or of
    another structure (it is then left as initialised), which is what fine-tuning on another class
    count needs; everything else must still fit.
    """
    state, origin, report = _adapt(state, model)
    own = model.state_dict()
    _to_one_channel(state, own, report)
    named = lambda k: f"{k} ({origin[k]} in the file)" if k in origin else k  # noqa: E731
    is_head = lambda k: k.startswith(_HEAD)  # noqa: E731
    # Checkpoints from PyTorch < 0.4.1 (torchvision's published DenseNet weights among them) have
    # no BN ``num_batches_tracked`` counters; those stay as initialised.
    counters = [k for k in own if k not in state and k.endswith("num_batches_tracked")]
    missing = [k for k in own if k not in state and k not in counters]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if not strict:
        head_missing = [k for k in missing if is_head(k)]
        head_unexpected = [k for k in unexpected if is_head(k)]
        head_mismatched = [k for k in mismatched if is_head(k)]
        missing = [k for k in missing if not is_head(k)]
        unexpected = [k for k in unexpected if not is_head(k)]
        mismatched = [k for k in mismatched if not is_head(k)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", [named(k) for k in unexpected]),
                         ("shape mismatch", [f"{named(k)}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                                             for k in mismatched])):
        if items:
            shown = "; ".join(items[:5]) + (f"; ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        message = _mismatch_message(model, state, own, missing, unexpected, mismatched, problems)
        raise WeightsError(message + (f" (names compared after: {'; '.join(report.renamed)})" if report.renamed else ""))
    if not strict:
        if head_mismatched:
            report.dropped.append(f"{', '.join(head_mismatched)} of shape {_shapes(state[k] for k in head_mismatched)} "
                                  f"(the model's is {_shapes(own[k] for k in head_mismatched)}): "
                                  "the model's freshly initialised classifier is kept")
        if head_missing:
            report.dropped.append(f"{', '.join(head_missing)}: not in the file, the model's freshly initialised "
                                  "classifier is kept")
        if head_unexpected:
            report.dropped.append(f"{', '.join(named(k) for k in head_unexpected)}: a head of another structure, "
                                  "not loaded")
        state = {k: v for k, v in state.items() if k in own and (not is_head(k) or v.shape == own[k].shape)}
    if counters:
        report.dropped.append(f"{len(counters)} BatchNorm num_batches_tracked counters: not in the file "
                              "(older PyTorch), left as the model had them")
    model.load_state_dict(state, strict=False)  # every key and shape was checked above
    report.loaded = len(state)
    return report


def _mismatch_message(model, state, own, missing, unexpected, mismatched, problems) -> str:
    """The error for a state dict that does not fit: what differs, and what to do where that is known."""
    described = getattr(model, "extra_repr", lambda: "")()
    listed = " | ".join(problems)
    if all(k.startswith(_HEAD) for k in missing + unexpected + mismatched):
        theirs, ours = state.get(_HEAD + "weight"), own.get(_HEAD + "weight")
        fix = ""
        if theirs is None:
            what = "the file has no classifier for the model"
        elif ours is not None and theirs.dim() == ours.dim() == 2 and theirs.shape[1] == ours.shape[1]:
            what = f"the file's classifier is for {theirs.shape[0]} classes, the model's for {ours.shape[0]}"
            fix = f"create the model with num_classes={theirs.shape[0]}, or "
        else:
            what = "the file's classifier does not fit the model's"
        return (f"{what} ({listed}): {fix}load with strict=False to keep the model's freshly initialised "
                "classifier (what `densenet train --init` does, for fine-tuning)")
    conv_dims = {state[k].dim() - 2 for k in mismatched if k.endswith("conv0.weight") or ".conv" in k}
    ours = getattr(model, "spatial_dims", 2)
    if any(state[k].dim() != own[k].dim() and k.endswith("weight") and state[k].dim() >= 3 for k in mismatched):
        theirs = max(conv_dims) if conv_dims else None
        what = f"{theirs}-D convolutions ({theirs + 2}-D weights" if theirs else "convolutions of another dimension ("
        hint = f"; create the model with spatial_dims={theirs}" if theirs in (1, 2, 3) else ""
        return (f"the state dict holds {what}, e.g. a MONAI DenseNet with spatial_dims={theirs}); this DenseNet is "
                f"{ours}-D{hint}: {listed}")
    return f"the state dict is from a different architecture than the model ({described}): {listed}"


def to_torchvision_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """This model's weights in torchvision's layout (loadable by ``torchvision.models.DenseNet``
    when the architecture is one torchvision can build: bottleneck, ImageNet stem, compression 0.5)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


_MONAI_LAYER_OURS = re.compile(r"^(features\.denseblock\d+\.denselayer\d+)\.(.*)$")


def monai_arguments(model: nn.Module) -> dict[str, object]:
    """The arguments of ``monai.networks.nets.DenseNet`` that build the architecture of ``model`` (whose
    parameters then match one to one, :func:`to_monai_state_dict`). MONAI's DenseNet is the ImageNet
    layout only: bottleneck layers, the 7x7/2 stem, compression 0.5, average pooling and a classifier;
    anything else raises :class:`WeightsError` naming what MONAI cannot build. (MONAI applies dropout
    once per dense layer, after its 3x3 convolution; this model after each convolution: the weights
    are the same, training with dropout is not.)"""
    problems = []
    if not getattr(model, "bottleneck", False):
        problems.append("bottleneck=False (MONAI's dense layers always have the 1x1 bottleneck)")
    if getattr(model, "stem", None) != "imagenet":
        problems.append(f"stem={getattr(model, 'stem', None)!r} (MONAI's is the 7x7/2 convolution and 3x3/2 max pool)")
    if getattr(model, "compression", None) != 0.5:
        problems.append(f"compression={getattr(model, 'compression', None)} (MONAI's transitions halve the maps)")
    if getattr(model, "num_classes", 0) < 1:
        problems.append("num_classes=0 (MONAI's DenseNet always ends in a linear classifier)")
    pool = getattr(getattr(model, "global_pool", None), "pool_type", "avg")
    if pool != "avg":
        problems.append(f"global_pool={pool!r} (MONAI's is the average)")
    if problems:
        raise WeightsError("MONAI's DenseNet cannot hold this model: " + "; ".join(problems))
    return {"spatial_dims": model.spatial_dims, "in_channels": model.in_channels, "out_channels": model.num_classes,
            "init_features": model.stem_channels, "growth_rate": model.growth_rate,
            "block_config": tuple(model.block_config), "bn_size": model.bn_size}


def to_monai_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """This model's weights under the names of MONAI's ``DenseNet`` (``...denselayerL.layers.norm1.weight``,
    ``class_layers.out.weight``), loadable with ``strict=True`` into
    ``monai.networks.nets.DenseNet(**monai_arguments(model))`` (1-D, 2-D and 3-D models; tested to give
    the same outputs). :class:`WeightsError` for an architecture MONAI cannot build."""
    monai_arguments(model)  # refuses what MONAI cannot hold
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        match = _MONAI_LAYER_OURS.match(key)
        if match:
            key = f"{match.group(1)}.layers.{match.group(2)}"
        elif key.startswith(_HEAD):
            key = _MONAI_HEAD + key[len(_HEAD) :]
        out[key] = value.detach().clone()
    return out


def load_weight_file(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> LoadReport:
    """Read a weight file safely (as :func:`read_state_dict`) into ``model`` (as :func:`load_state_dict`)
    and return the :class:`LoadReport`, which names everything renamed from the file's own layout."""
    state = _read_file(path)
    _find_state_dict(state, str(path))  # "PATH does not hold a state dict" rather than a wrapped message
    try:
        return load_state_dict(model, state, strict=strict)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None


def load_torchvision_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Read a torchvision DenseNet weight file (e.g. ``densenet121-a639ec97.pth``) safely into ``model``
    and return the model; what was renamed or not loaded is logged (logger ``densenet.weights``, INFO);
    :func:`load_weight_file` returns it."""
    report = load_weight_file(model, path, strict=strict)
    log.info("%s: %s", path, report)
    return model
