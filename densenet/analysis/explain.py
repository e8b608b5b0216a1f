"""Class activation maps: where in an image a DenseNet finds the evidence for a class.

``explain(model, images, method=..., target=...)`` gives one map per image at input resolution,
scaled to [0, 1]. ``"cam"`` is the classifier's weights on the final feature maps (Zhou et al. 2016,
the formula CheXNet shows), computed here; the Grad-CAM family (``"gradcam"``, ``"gradcam++"``,
``"scorecam"``, ``"eigencam"``) comes from the maintained ``grad-cam`` package (pytorch-grad-cam),
an optional dependency: ``pip install 'densenet[explain]'``. CAM is the default: it needs nothing
beyond the core install, and for a DenseNet (global average pooling, then one linear layer) it is
what Grad-CAM gives on the final feature maps before its ReLU, up to a positive factor (there the
gradient of a logit is the classifier's row divided by the number of positions, at every position).

    maps = explain(model, images)                       # (N, H, W) CAM, the top class of each image
    maps = explain(model, images, method="gradcam")     # the last dense block, with grad-cam installed
    save_overlay("cat.png", pixels, maps[0], title="cat 91%")
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError, DenseNetError
from ..io.atomic import atomic_write_bytes
from .plots import plt

__all__ = ["METHODS", "ExplainError", "default_layer", "explain", "save_overlay"]

METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam", "cam")


class ExplainError(DenseNetError, ValueError):
    """An explanation that cannot be made (no gradients, a missing optional package, a bad layer)."""


def default_layer(model: nn.Module) -> str:
    """The last dense block: where the Grad-CAM family looks by default."""
    blocks = [name for name, _ in model.named_modules() if name.startswith("features.denseblock") and name.count(".") == 1]
    if not blocks:
        raise ExplainError(f"{type(model).__name__} has no dense blocks (features.denseblockN): not a densenet DenseNet")
    return blocks[-1]


def _layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or not name:
        choices = [n for n in modules if n.startswith("features.") and n.count(".") == 1]
        raise ArgumentError(f"no layer {name!r} in the model; layers to explain: {', '.join(choices)}")
    return modules[name]


def _targets(logits: Tensor, target: int | Sequence[int] | None) -> list[int]:
    """One class per image: the top prediction, one class for all, or one each."""
    n, classes = logits.shape
    if target is None:
        return logits.argmax(1).tolist()
    chosen = [target] * n if isinstance(target, int) else list(target)
    if len(chosen) != n:
        raise ArgumentError(f"{len(chosen)} target classes for {n} images")
    bad = [t for t in chosen if not 0 <= t < classes]
    if bad:
        raise ArgumentError(f"class {bad[0]} is out of range: the model has {classes} classes (0..{classes - 1})")
    return chosen


def _scaled(maps: Tensor) -> Tensor:
    """Each map (H, W, or any sides) linearly scaled to [0, 1] (a constant map becomes zeros)."""
    flat, shape = maps.flatten(1), (-1,) + (1,) * (maps.dim() - 1)
    low, high = flat.min(1).values.view(shape), flat.max(1).values.view(shape)
    return (maps - low) / (high - low).clamp_min(1e-12)


def _cam(model: nn.Module, images: Tensor, targets: list[int]) -> Tensor:
    """Class activation maps: classifier weights of each image's class over the final feature maps."""
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear) or getattr(getattr(model, "global_pool", None), "pool_type", "avg") != "avg":
        raise ExplainError("CAM needs a linear classifier on average-pooled features; use --method gradcam")
    with torch.no_grad():
        features = model.forward_features(images)  # (N, C, *sides), after the final BN-ReLU
        weights = classifier.weight[targets].to(features.dtype)  # (N, C)
        maps = torch.einsum("nc,nc...->n...", weights, features)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[maps.dim() - 1]
    return F.interpolate(maps[:, None], size=images.shape[2:], mode=mode, align_corners=False)[:, 0]


def _grad_cam_family(model: nn.Module, images: Tensor, targets: list[int], method: str, layer: nn.Module) -> Tensor:
    try:
        import pytorch_grad_cam as gc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise ExplainError(f"--method {method} needs the grad-cam package: pip install 'densenet[explain]' "
                           "(or use --method cam, which needs nothing more)") from None
    if images.dim() == 3:
        raise ExplainError(f"--method {method}: the grad-cam package makes maps of images and volumes, not of 1-D "
                           "signals; use --method cam")
    if images.dim() == 5 and method == "scorecam":
        raise ExplainError("--method scorecam: the grad-cam package scores 2-D images only; for volumes use gradcam, "
                           "gradcam++, eigencam or cam")
    kind = {"gradcam": gc.GradCAM, "gradcam++": gc.GradCAMPlusPlus, "scorecam": gc.ScoreCAM,
            "eigencam": gc.EigenCAM}[method]
    with kind(model=model, target_layers=[layer]) as cam:
        cam.compute_input_gradient = True  # the graph through the input: parameters need no gradients
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
    return torch.from_numpy(np.asarray(maps, dtype=np.float32))


def explain(model: nn.Module, images: Tensor, method: str = "cam", target: int | Sequence[int] | None = None,
            layer: str | None = None) -> Tensor:
    """(N, H, W) maps in [0, 1], one per image of ``images`` (N, C, H, W), normalised as the model was
    trained: where ``model`` sees evidence for ``target`` (None: each image's top class; an int: that
    class for all; a sequence: one per image). 1-D and 3-D models: (N, L) / (N, D, H, W) maps of
    (N, C, L) / (N, C, D, H, W) inputs (CAM for all three; the Grad-CAM family for 2-D and 3-D).
    ``layer``: the module the Grad-CAM family looks at (default: the last dense block); CAM always
    uses the final feature maps. The model's mode is restored afterwards; its parameters are untouched."""
    if method not in METHODS:
        raise ArgumentError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
        raise ExplainError("explanations need gradients through a PyTorch model: an ONNX or TorchScript export has "
                           "none; explain the checkpoint or the trained weights instead")
    dims = getattr(model, "spatial_dims", 2)
    if not isinstance(images, Tensor) or images.dim() != 2 + dims:
        layout = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[dims]
        raise ArgumentError(f"images must be a {layout} tensor for this {dims}-D model, "
                            f"got {tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    module = _layer(model, layer or default_layer(model))
    if method == "cam" and layer not in (None, default_layer(model)):
        raise ArgumentError("CAM (the default method) uses the final feature maps; --layer is for the Grad-CAM family "
                            "(--method gradcam, gradcam++, scorecam or eigencam)")
    was_training = model.training
    params = list(model.parameters())
    grads, flags = [p.grad for p in params], [p.requires_grad for p in params]
    model.eval().requires_grad_(False)  # the parameters and their gradients stay as the caller left them
    try:
        with torch.no_grad():
            targets = _targets(model(images), target)
        if method == "cam":
            maps = _cam(model, images, targets)
        else:
            with torch.enable_grad():
                maps = _grad_cam_family(model, images, targets, method, module)
    finally:
        model.train(was_training)
        for p, grad, flag in zip(params, grads, flags):
            p.requires_grad_(flag)
            p.grad = grad
    return _scaled(maps.float())


def save_overlay(path: str | os.PathLike, pixels: np.ndarray, heat: np.ndarray | Tensor, title: str = "") -> None:
    """A PNG of ``pixels`` (H, W, 3) uint8 with ``heat`` (H, W) in [0, 1] over it (jet, half
    transparent) and ``title``, written atomically."""
    heat = heat.numpy() if isinstance(heat, Tensor) else np.asarray(heat)
    h, w = heat.shape
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.6))
    try:
        axes[0].imshow(pixels, interpolation="nearest")
        axes[0].set_title("image", fontsize=8)
        axes[1].imshow(pixels, interpolation="nearest")
        shown = axes[1].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        axes[1].set_title("where the class is seen", fontsize=8)
        fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
        for ax in axes:
            ax.axis("off")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
