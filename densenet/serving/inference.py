"""Fast inference: ``prepare_for_inference(model)`` gives a callable with the model's outputs (within
1e-4 of eager fp32) that serves faster.

- ``backend="eager"`` (default): a frozen copy of the model on its fast eval path whatever its
  settings (shared channels_last buffer per block, BN2 folded into the bottleneck 1x1 conv,
  transitions that run BN-ReLU-pool a few images at a time and then their 1x1 convolution on a
  quarter of the pixels: pooling and the convolution are linear and commute).
- ``backend="onnx"``: the model exported to ONNX (layer-by-layer blocks, pool-first transitions) and
  run by ONNX Runtime.
- ``backend="int8"``: int8 on PyTorch's oneDNN int8 convolutions, each map quantized once when it is
  stored, calibrated on ``calibration`` images (:mod:`densenet.serving.int8`): the fastest on x86 CPUs.
- ``backend="int8-onnx"``: the ONNX model statically quantized to int8 by ONNX Runtime's quantizer
  (QDQ, per-channel weights; :mod:`densenet.serving.quantize`), run by ONNX Runtime.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, MissingFile
from ..models import DenseNet
from .export import export_onnx
from .int8 import quantize_densenet
from .loading import ExportError
from .quantize import quantize_model

__all__ = ["FastInference", "OnnxModel", "load_onnx", "prepare_for_inference"]


class FastInference(nn.Module):
    """Eval-only wrapper around a DenseNet: (N, C, H, W) -> (N, num_classes), no autograd."""

    def __init__(self, model: DenseNet) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval().set_execution(fast=True, memory_efficient=False)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime as an eval-only module, for code that takes a model
    (``densenet eval``): (N, C, S, S) normalised images -> (N, classes) logits on the CPU."""

    def __init__(self, run: Callable[[Tensor], Tensor], data: dict) -> None:
        super().__init__()
        self.run, self.data = run, data
        self.num_classes = len(data["class_names"])
        self.spatial_dims = 2

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x.cpu()).to(x.device)


def prepare_for_inference(model: DenseNet, backend: str = "eager", example: Tensor | None = None,
                          threads: int | None = None, calibration: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """A callable (N, C, H, W) float tensor -> (N, num_classes) logits for serving ``model``.

    ``example`` (any batch size) is needed for ``backend="onnx"``; ``calibration`` (a few hundred
    normalised images (N, C, S, S) like those served) for ``backend="int8"`` and ``"int8-onnx"``;
    ``threads`` sets ONNX Runtime's intra-op threads (default: torch.get_num_threads()).
    """
    if backend == "eager":
        return FastInference(model)
    if backend in ("int8", "int8-onnx") and calibration is None:
        raise ArgumentError(f"backend={backend!r} needs calibration images: calibration=(N, C, S, S) normalised tensor")
    if backend == "int8":
        return quantize_densenet(model, calibration.detach().float())
    if backend == "int8-onnx":
        x = calibration.detach().cpu().float()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "int8.onnx"
            quantize_model(model, {"class_names": [str(i) for i in range(model.num_classes)], "mean": [], "std": []},
                           x.numpy(), None, path, image_size=x.shape[-1], threads=threads)
            run, _ = load_onnx(path, threads=threads)  # the session holds the model: the file may go
        return run
    if backend == "onnx":
        if example is None:
            raise ArgumentError("backend='onnx' needs an example input")
        ort = _onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(export_onnx(model, example), opts, providers=["CPUExecutionProvider"])

        def run(x: Tensor) -> Tensor:
            out = session.run(None, {"input": x.detach().cpu().contiguous().numpy()})[0]
            return torch.from_numpy(out)

        return run
    raise ArgumentError(f"backend must be 'eager', 'onnx', 'int8' or 'int8-onnx', got {backend!r}")


def _onnxruntime():  # noqa: ANN202 - the module
    """The optional onnxruntime package, or a message saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("running ONNX models needs onnxruntime: pip install 'densenet[export]'") from None
    return onnxruntime


def load_onnx(path: str | os.PathLike, image_size: int | None = None, threads: int | None = None,
              spin: bool = True) -> tuple[Callable[[Tensor], Tensor], dict]:
    """An ONNX file written by ``densenet export`` as a callable (N, 3, H, W) float tensor -> (N, classes)
    logits run by ONNX Runtime on the CPU, and its data description (class names, mean, std, image size).

    The image size is the one the graph's input shape fixes; ``image_size`` must agree with it.
    ``spin=False`` stops ONNX Runtime's threads from spinning after each call (they would take the
    cores from whatever runs next in the process, e.g. another model in a benchmark).
    """
    ort = _onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"no ONNX file at {path}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        raise ExportError(f"{path} is not a readable ONNX model: {str(e).splitlines()[0][:300]}") from None
    raw = session.get_modelmeta().custom_metadata_map.get("densenet")
    try:
        data = json.loads(raw)["data"] if raw else None
    except (json.JSONDecodeError, KeyError, TypeError):
        data = None
    if not isinstance(data, dict) or not {"class_names", "mean", "std"} <= set(data):
        raise ExportError(f"{path} carries no densenet data description (class names, mean, std); "
                         "export the model with `densenet export CHECKPOINT --format onnx`")
    inp = session.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4 or shape[1] != 3:
        raise ExportError(f"{path} takes input of shape {shape}; predicting on images needs (batch, 3, height, width)")
    fixed = [d for d in shape[2:] if isinstance(d, int)]
    if fixed and (len(fixed) != 2 or fixed[0] != fixed[1]):
        raise ExportError(f"{path} takes input of shape {shape}; only square images are supported")
    size = fixed[0] if fixed else image_size or data.get("image_size")
    if image_size is not None and image_size != size:
        raise ExportError(f"{path} takes input of shape {shape} ({size}x{size} images), not the {image_size}x{image_size} "
                         f"images asked for; export the model again with --image-size {image_size}")
    if not size:
        raise ExportError(f"{path} does not fix the image size; give one (--image-size)")

    def run(x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != (3, size, size):
            raise ExportError(f"{path} takes input of shape {shape}, got {list(x.shape)}")
        return torch.from_numpy(session.run(None, {inp.name: x.detach().cpu().float().contiguous().numpy()})[0])

    return run, {**data, "image_size": size}
