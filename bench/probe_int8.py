"""Probe for issue 26: does ONNX Runtime's static int8 quantization (QDQ, per-channel weights) of a
DenseNet run faster than its float32 graph on this CPU?

Exports DenseNet-BC (k=12) with random weights (speed does not depend on them), quantizes it with
``onnxruntime.quantization.quantize_static`` calibrated on random batches (accuracy is not measured
here), and times float32 ONNX Runtime, int8 ONNX Runtime and this project's eager float32 inference
(``prepare_for_inference``), alternating, median of ``--repeats``. Prints the file sizes and the
ratios to float32 ONNX Runtime.

    python bench/probe_int8.py --model densenet_bc100_k12 --batch 64 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from densenet import create_model, model_spec
from densenet.serving.export import export_onnx
from densenet.serving.inference import prepare_for_inference


class RandomBatches(CalibrationDataReader):
    """``count`` random (16, 3, S, S) batches as ONNX Runtime's calibration input."""

    def __init__(self, side: int, count: int = 4) -> None:
        g = torch.Generator().manual_seed(1)
        self.batches = iter([{"input": torch.randn(16, 3, side, side, generator=g).numpy()} for _ in range(count)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="densenet_bc100_k12")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = create_model(args.model, num_classes=10).eval()
    side = model_spec(args.model).input_size
    folder = Path(tempfile.mkdtemp())
    f32, pre, int8 = folder / "f32.onnx", folder / "pre.onnx", folder / "int8.onnx"
    f32.write_bytes(export_onnx(model, torch.randn(1, 3, side, side)))
    quant_pre_process(str(f32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(int8), RandomBatches(side), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = {name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                for name, path in (("ort_fp32", f32), ("ort_int8", int8))}
    fast = prepare_for_inference(model)
    x = torch.randn(args.batch, 3, side, side)
    xn = x.numpy()
    runs = {"ort_fp32": lambda: sessions["ort_fp32"].run(None, {"input": xn}),
            "ort_int8": lambda: sessions["ort_int8"].run(None, {"input": xn}),
            "ours_fp32": lambda: fast(x)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["ort_fp32"])
    print(f"{args.model}, batch {args.batch}, {side}x{side}, {args.threads} threads, onnxruntime {ort.__version__}")
    print(f"file sizes: float32 {f32.stat().st_size / 1e6:.2f} MB, int8 {int8.stat().st_size / 1e6:.2f} MB")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:10s} {args.batch / m:8.1f} img/s  ({base / m:.2f}x ort_fp32)")


if __name__ == "__main__":
    main()
