"""Reading weight files safely and exchanging state dicts with torchvision's DenseNet."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import DenseNetError
from ..io.checkpoint import CheckpointError, read_torch_file, verify_digest

__all__ = [
    "WeightsError",
    "read_state_dict",
    "load_state_dict",
    "from_torchvision_state_dict",
    "to_torchvision_state_dict",
    "load_torchvision_weights",
]


class WeightsError(DenseNetError, ValueError):
    """A weight file or state dict that cannot be used; the message names what is wrong."""


# Old torchvision checkpoints name dense-layer parameters "denselayer1.norm.1.weight" where the
# module is now "denselayer1.norm1.weight"; torchvision's own loader fixes them with this pattern.
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "ema")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch file, never unpickling arbitrary objects.

    PyTorch files are read with ``torch.load(weights_only=True)``. A checkpoint that wraps the
    weights (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped, and a ``module.`` prefix
    (DataParallel/DDP) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
    else:
        state = read_torch_file(path, f"weight file {path}", WeightsError)
        if isinstance(state, Mapping):  # this project's checkpoints carry a digest of their content
            try:
                state = verify_digest(state, str(path))
            except CheckpointError as e:
                raise WeightsError(str(e)) from None
    return unwrap_state_dict(state, source=str(path))


def unwrap_state_dict(state: object, source: str = "state dict") -> dict[str, Tensor]:
    """Return the flat ``{name: tensor}`` inside a checkpoint dict, without a ``module.`` prefix."""
    if isinstance(state, Mapping):
        for key in _WRAPPER_KEYS:
            if key in state and isinstance(state[key], Mapping):
                return unwrap_state_dict(state[key], source)
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{source} does not hold a state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


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


def to_torchvision_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """This model's weights in torchvision's layout (loadable by ``torchvision.models.DenseNet``
    when the architecture is one torchvision can build: bottleneck, ImageNet stem, compression 0.5)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_state_dict(model: nn.Module, state: Mapping[str, Tensor], *, strict: bool = True) -> None:
    """Load ``state`` into ``model`` after checking every key and shape, with an error that names them.

    With ``strict=False`` the classifier may be missing or differently shaped (it is then left
    as initialised), which is what fine-tuning on another class count needs.
    """
    state = from_torchvision_state_dict(unwrap_state_dict(state))
    own = model.state_dict()
    # Checkpoints from PyTorch < 0.4.1 (torchvision's published DenseNet weights among them) have
    # no BN ``num_batches_tracked`` counters; those stay as initialised.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if not strict:
        is_head = lambda k: k.startswith("classifier.")  # noqa: E731
        missing = [k for k in missing if not is_head(k)]
        mismatched = [m for m in mismatched if not is_head(m)]
        state = {k: v for k, v in state.items() if k in own and (not is_head(k) or v.shape == own[k].shape)}
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = "; ".join(items[:5]) + (f"; ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsError(
            "the state dict is from a different architecture than the model "
            f"({getattr(model, 'extra_repr', lambda: '')()}): " + " | ".join(problems)
        )
    model.load_state_dict(state, strict=False)  # every key and shape was checked above


def load_torchvision_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Read a torchvision DenseNet weight file (e.g. ``densenet121-a639ec97.pth``) safely into ``model``."""
    load_state_dict(model, read_state_dict(path), strict=strict)
    return model
