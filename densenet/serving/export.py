"""Export a trained DenseNet for serving: ONNX, a torch.export program, TorchScript, or safetensors
weights with a JSON architecture.

Every format holds the standard layer-by-layer graph in eval mode (a model trained with
``memory_efficient=True`` or the shared-buffer blocks exports exactly like the plain one) with a
dynamic batch size, and carries the data description that ``densenet predict`` needs (class
names, normalisation mean/std, image size):

- ONNX: in the model's ``metadata_props`` under the key ``densenet``;
- torch.export (``.pt2``, ``torch.export.save``): in the archive's extra file ``densenet.json``
  (``torch.export.load(path, extra_files={"densenet.json": ""})``); the successor of TorchScript,
  and the format to prefer for PyTorch serving (AOTInductor, ExecuTorch);
- TorchScript: in the archive's extra file ``densenet.json`` (``torch.jit.load(path, _extra_files=...)``),
  deprecated upstream since torch 2.14 and kept while torch supports it;
- safetensors: in the JSON file beside the weights (``model.safetensors`` + ``model.json``), which
  also names the architecture so that ``create_model(meta["name"], **meta["model_config"])`` rebuilds it.

Each export is read back and run on a random batch of two images; outputs must be within 1e-4 of
PyTorch's, or the file is not written.
"""
from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..errors import MissingFile
from ..io.atomic import atomic_write_bytes, atomic_write_text
from ..models import DenseNet, Transition
from .loading import EXPORT_EXTRA_FILE, METADATA_FORMAT, ExportError, build_from_metadata, model_from_checkpoint

__all__ = [
    "FORMATS",
    "SUFFIXES",
    "TOLERANCE",
    "ExportError",
    "default_export_path",
    "export_checkpoint",
    "export_metadata",
    "export_model",
    "export_onnx",
    "export_program",
    "standard_model",
]

FORMATS = ("onnx", "export", "torchscript", "safetensors")
#: file name ending of each format (``run/checkpoint.pt`` -> ``run/checkpoint.pt2`` for torch.export)
SUFFIXES = {"onnx": ".onnx", "export": ".pt2", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
TOLERANCE = 1e-4  # max |exported - PyTorch| allowed, on logits (plus the same relative to their size)


def standard_model(model: DenseNet) -> DenseNet:
    """A frozen copy of ``model`` in eval mode that runs the plain layer-by-layer graph (no shared
    buffer, no memory-efficient recomputation): what every export format holds."""
    ref = copy.deepcopy(model).eval().set_execution(fast=False, memory_efficient=False)
    ref.requires_grad_(False)
    return ref


def export_onnx(model: DenseNet, example: Tensor, opset: int = 17) -> bytes:
    """ONNX bytes of ``model`` in eval mode (dynamic batch size), exported from the layer-by-layer form
    of the dense blocks, with transitions that pool before their 1x1 convolution (equal outputs,
    4x fewer multiply-adds in the transitions; 8x for 3-D models)."""
    ref = standard_model(model)
    for m in ref.modules():  # pool-first transitions only: the blocks stay layer by layer
        if isinstance(m, Transition):
            m.execution = "fast"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # input checks become constants: fine
        torch.onnx.export(ref, (example,), buf, input_names=["input"], output_names=["logits"], opset_version=opset,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return buf.getvalue()


def export_program(model: DenseNet, example: Tensor) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode, the layer-by-layer form, with a dynamic batch
    dimension (``example``'s other sides are fixed): a program that takes (N, C, *sides) for any N."""
    ref = standard_model(model)
    if ref.spatial_dims == 3:  # 3-D weights are kept channels_last_3d for oneDNN; the archive wants them plain
        for p in ref.parameters():
            p.data = p.data.contiguous()
    batch = torch.export.Dim("batch")
    return torch.export.export(ref, (example,), dynamic_shapes={"x": {0: batch}})


def export_metadata(model: DenseNet, data: dict | None = None, name: str | None = None) -> dict[str, Any]:
    """The JSON description stored with every export: architecture and data description."""
    config = model.config()
    config.update(memory_efficient=False, fast=True)  # training-time choices; the graph is the same
    return {"format": METADATA_FORMAT, "name": name, "model_config": config, "data": dict(data or {})}


def default_export_path(checkpoint: str | os.PathLike, fmt: str) -> Path:
    """``run/checkpoint.pt`` -> ``run/checkpoint.onnx``, ``run/checkpoint.pt2``, ``run/checkpoint.torchscript.pt``,
    ``run/checkpoint.safetensors``."""
    p = Path(checkpoint)
    return p.with_name(p.name.split(".")[0] + SUFFIXES[fmt])


def _check_out(path: Path) -> None:
    if not path.parent.is_dir():
        raise MissingFile(f"cannot write {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a folder")


def _compare(got: Tensor, expected: Tensor, what: str) -> float:
    """Max absolute difference; ExportError if beyond TOLERANCE (absolute plus relative)."""
    if got.shape != expected.shape:
        raise ExportError(f"{what} gives outputs of shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    if not torch.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE):
        raise ExportError(f"{what} differs from PyTorch by up to {diff:.3g} (tolerance {TOLERANCE}); file not written")
    return diff


def _sides(model: DenseNet, image_size: int | Sequence[int]) -> list[int]:
    """``image_size`` as one side per spatial axis of ``model`` (one value: the same on every axis)."""
    sides = [int(image_size)] if isinstance(image_size, (int, float)) else [int(s) for s in image_size]
    sides = sides * model.spatial_dims if len(sides) == 1 else sides
    if len(sides) != model.spatial_dims:
        raise ExportError(f"image size {image_size} does not fit a {model.spatial_dims}-D model: give one side or "
                          f"{model.spatial_dims}")
    return sides


def export_model(model: DenseNet, path: str | os.PathLike, fmt: str, *, image_size: int | Sequence[int],
                 data: dict | None = None, name: str | None = None, opset: int = 17) -> dict[str, Any]:
    """Write ``model`` to ``path`` in format ``fmt`` (``onnx``, ``export`` (torch.export), ``torchscript`` or
    ``safetensors``).

    ``image_size``: side in pixels of the (N, C, image_size, image_size) inputs the export is traced
    and checked with (ONNX and torch.export fix it in the graph's input shape; the batch size N stays free). 1-D and
    3-D models: (N, C, L) and (N, C, D, H, W) inputs, ``image_size`` one side or one per axis.
    Returns ``{"files": [paths written], "max_abs_diff": float}``.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(model, DenseNet):
        raise ExportError(f"can only export a densenet.DenseNet, got {type(model).__name__}")
    path = Path(path)
    _check_out(path)
    sides = _sides(model, image_size)
    model.check_input_size(*sides)
    meta = export_metadata(model, data, name)
    meta["data"].setdefault("image_size", image_size)
    ref = standard_model(model)
    g = torch.Generator().manual_seed(0)
    example = torch.randn(1, model.in_channels, *sides, generator=g)
    check = torch.randn(2, model.in_channels, *sides, generator=g)  # another batch size
    with torch.no_grad():
        expected = ref(check)
    if fmt == "onnx":
        return _export_onnx(ref, path, example, check, expected, meta, opset)
    if fmt == "export":
        return _export_program(ref, path, example, check, expected, meta)
    if fmt == "torchscript":
        return _export_torchscript(ref, path, example, check, expected, meta)
    return _export_safetensors(ref, path, check, expected, meta)


def _export_onnx(ref: DenseNet, path: Path, example: Tensor, check: Tensor, expected: Tensor, meta: dict,
                 opset: int) -> dict[str, Any]:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxruntime packages: pip install 'densenet[export]'") from None
    proto = onnx.load_from_string(export_onnx(ref, example, opset))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "densenet", json.dumps(meta)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: check.numpy()})[0])
    diff = _compare(got, expected, "the ONNX export run by ONNX Runtime")
    atomic_write_bytes(path, data)
    return {"files": [path], "max_abs_diff": diff}


def _export_program(ref: DenseNet, path: Path, example: Tensor, check: Tensor, expected: Tensor,
                    meta: dict) -> dict[str, Any]:
    buffer = io.BytesIO()
    with torch.no_grad():
        program = export_program(ref, check)  # traced on a batch of two: a batch of one would fix N = 1
    torch.export.save(program, buffer, extra_files={EXPORT_EXTRA_FILE: json.dumps(meta)})
    data = buffer.getvalue()
    loaded = torch.export.load(io.BytesIO(data)).module()
    with torch.no_grad():
        diff = _compare(loaded(check), expected, "the torch.export program")
        _compare(loaded(example), ref(example), "the torch.export program on a batch of one")
    atomic_write_bytes(path, data)
    return {"files": [path], "max_abs_diff": diff}


def _export_torchscript(ref: DenseNet, path: Path, example: Tensor, check: Tensor, expected: Tensor,
                        meta: dict) -> dict[str, Any]:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input checks become constants: fine
        # TorchScript is deprecated upstream (torch 2.14), still what many servers load
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        traced = torch.jit.trace(ref, example, check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={"densenet.json": json.dumps(meta)})
        data = buffer.getvalue()
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        got = loaded(check)
    diff = _compare(got, expected, "the TorchScript export")
    atomic_write_bytes(path, data)
    return {"files": [path], "max_abs_diff": diff}


def _export_safetensors(ref: DenseNet, path: Path, check: Tensor, expected: Tensor, meta: dict) -> dict[str, Any]:
    state = {k: v.detach().contiguous() for k, v in ref.state_dict().items()}
    data = safetensors_bytes(state, metadata={"densenet": json.dumps(meta)})
    rebuilt = build_from_metadata(meta, "export")
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        got = rebuilt.eval()(check)
    diff = _compare(got, expected, "the model rebuilt from the safetensors export")
    json_path = path.with_suffix(".json")
    atomic_write_bytes(path, data)
    atomic_write_text(json_path, json.dumps(meta, indent=2) + "\n")
    return {"files": [path, json_path], "max_abs_diff": diff}


def export_checkpoint(checkpoint: str | os.PathLike, path: str | os.PathLike | None, fmt: str, *,
                      image_size: int | None = None, opset: int = 17, ema: bool | None = None) -> dict[str, Any]:
    """Export the model of a ``densenet train`` checkpoint (default path: beside it, see
    :func:`default_export_path`; default image size: the one it was trained on). ``ema``: its weight
    average, its raw weights, or (None) the ones its run serves (:func:`model_from_checkpoint`)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    model, data = model_from_checkpoint(checkpoint, ema=ema)
    size = image_size or data.get("image_size")
    if not size:
        raise ExportError(f"{checkpoint} does not record an image size; give one (--image-size)")
    out = Path(path) if path else default_export_path(checkpoint, fmt)
    size = size if isinstance(size, (list, tuple)) else int(size)
    return export_model(model, out, fmt, image_size=size, data=data, name=data.get("model"), opset=opset)
