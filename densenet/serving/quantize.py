"""int8 models for CPU serving: static quantization of a DenseNet's ONNX export by ONNX Runtime.

``quantize_model(model, info, batches, path)`` exports the model to ONNX (as ``densenet export
--format onnx``), calibrates ONNX Runtime's static quantizer on a few hundred images and writes a
QDQ model: int8 weights with one scale per output channel, in 7 bits (``reduce_range``: on CPUs without
VNNI, ONNX Runtime's uint8 x int8 products of two channels are summed in int16, which 8-bit weights
can saturate; on a Zen 3 the shipped BC-40 scored 19.53% top-1 error with them, 18.52% in 7 bits, as
in float32: bench/logs/2026-12-07-int8-onnx-accuracy-zen3.txt), uint8 activations with one scale per
tensor from the calibration images' ranges. ONNX Runtime folds what it can when it loads it (BN
into the convolution that follows a concatenation is not foldable in a DenseNet: BN-ReLU comes
before every convolution, so those stay in float between a dequantize and a quantize).

The file carries the float model's data description (class names, mean, std, image size) plus
``precision: int8`` and the calibration's figures under the ``densenet`` metadata key, so
``densenet eval`` and ``densenet predict`` take it in place of a checkpoint. The quantized model is
checked when it is written: its top-1 agreement with the float32 model on the calibration images
(and both accuracies where the images have labels) is returned and printed, and a model that
agrees on fewer than :data:`AGREEMENT_WARNING` of them is reported as broken.

Why ONNX Runtime and not PyTorch's own int8 path: ``docs/speed.md`` (int8) compares them.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import DataError
from ..io.atomic import atomic_write_bytes
from ..models import DenseNet
from .export import export_model
from .loading import ExportError

__all__ = ["AGREEMENT_WARNING", "MIN_CALIBRATION_IMAGES", "calibration_arrays", "quantize_model"]

MIN_CALIBRATION_IMAGES = 32  # fewer give ranges that the test images exceed
AGREEMENT_WARNING = 0.9  # top-1 agreement with float32 on the calibration images below which the file is called broken


def calibration_arrays(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], model: DenseNet, images: int,
                       source: str) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``images`` normalised images (N, C, H, W) float32 and their labels (N,) from ``batches``,
    checked against ``model`` (channels, size); fewer than :data:`MIN_CALIBRATION_IMAGES` is refused."""
    xs, ys, n = [], [], 0
    for x, y in batches:
        xs.append(x[: images - n].float().numpy())
        ys.append(y[: images - n].numpy())
        n += len(xs[-1])
        if n >= images:
            break
    if n < MIN_CALIBRATION_IMAGES:
        raise DataError(f"{source} gave {n} calibration images; int8 calibration needs at least "
                        f"{MIN_CALIBRATION_IMAGES} (a few hundred is better): give a larger folder or dataset")
    x, y = np.concatenate(xs), np.concatenate(ys)
    if x.shape[1] != model.in_channels:
        raise DataError(f"{source} has {x.shape[1]}-channel images but the model takes {model.in_channels} channels; "
                        "calibrate on images like those it was trained on")
    return x, y


class _Reader:
    """ONNX Runtime's calibration data reader over (N, C, H, W) arrays, ``batch`` images at a time."""

    def __init__(self, x: np.ndarray, name: str, batch: int = 32) -> None:
        self.items = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def _session(data: bytes | str, threads: int | None):  # noqa: ANN202 - an onnxruntime session
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _top1(session, x: np.ndarray, batch: int = 64) -> np.ndarray:  # noqa: ANN001
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])


def quantize_model(model: DenseNet, info: dict, calibration: np.ndarray, labels: np.ndarray | None,
                   path: str | Path, *, image_size: int, name: str | None = None,
                   threads: int | None = None) -> dict[str, Any]:
    """Write ``model`` as an int8 QDQ ONNX file at ``path``, calibrated on ``calibration`` (N, C, S, S)
    normalised float32 images (``labels`` (N,) or None). Returns the files written, the file sizes
    (bytes, float32 and int8), the top-1 agreement with float32 on the calibration images and, with
    labels, both accuracies there (fractions)."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static
    except ImportError:
        raise ExportError("int8 export needs the onnx and onnxruntime packages: pip install 'densenet[export]'") from None
    if calibration.shape[2:] != (image_size, image_size):
        raise DataError(f"the calibration images are {calibration.shape[3]}x{calibration.shape[2]} but the model is "
                        f"exported for {image_size}x{image_size}; calibrate on images of that size (or --image-size)")
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        f32, pre, int8 = Path(tmp) / "float32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        export_model(model, f32, "onnx", image_size=image_size, data=info, name=name)
        quant_pre_process(str(f32), str(pre), skip_symbolic_shape=True)
        float_session = _session(str(f32), threads)
        input_name = float_session.get_inputs()[0].name
        quantize_static(str(pre), str(int8), _Reader(calibration, input_name), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=True, calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load(str(int8))
        meta = json.loads(onnx.load(str(f32)).metadata_props[0].value)
        int8_session = _session(proto.SerializeToString(), threads)
        expected, got = _top1(float_session, calibration), _top1(int8_session, calibration)
        report: dict[str, Any] = {"calibration_images": len(calibration),
                                  "agreement": float(np.mean(expected == got)),
                                  "float32_bytes": f32.stat().st_size}
    if labels is not None:
        report.update(float32_accuracy=float(np.mean(expected == labels)), int8_accuracy=float(np.mean(got == labels)))
    meta["data"] = {**meta["data"], "precision": "int8", "calibration": report}
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "densenet", json.dumps(meta)
    data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    return {**report, "files": [path], "int8_bytes": len(data)}
