"""int8 inference (issue 26) against float32, alternating in one run, medians.

Configurations: torchvision's float32 model (eval), this project's fastest float32 path
(``prepare_for_inference``, eager), the float32 ONNX export run by ONNX Runtime, and the int8 model
``densenet export --int8`` writes (``densenet.serving.quantize``; calibrated here on random images:
speed does not depend on the weights or the calibration). Prints images/s, milliseconds per batch,
the ratios to our float32 path, and the ONNX file sizes.

    python bench/bench_int8.py --model densenet_bc100_k12 --batch 64
    python bench/bench_int8.py --model densenet_bc100_k12 --batch 1 --repeats 20
    python bench/bench_int8.py --model densenet121 --batch 16 --repeats 3
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import torchvision_model  # noqa: E402  (this folder)

from densenet import create_model, model_spec  # noqa: E402
from densenet.serving.export import export_model  # noqa: E402
from densenet.serving.inference import load_onnx, prepare_for_inference  # noqa: E402
from densenet.serving.quantize import quantize_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet_bc100_k12")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes = 1000 if args.model == "densenet121" else 10
    tv = torchvision_model(args.model).eval()
    ours = create_model(args.model, num_classes=classes).eval()
    ours.load_state_dict(tv.state_dict())
    side = model_spec(args.model).input_size
    info = {"class_names": [str(i) for i in range(classes)], "mean": [0.0] * 3, "std": [1.0] * 3}
    folder = Path(tempfile.mkdtemp())
    f32, int8 = folder / "float32.onnx", folder / "int8.onnx"
    export_model(ours, f32, "onnx", image_size=side, data=info)
    calibration = torch.randn(64, 3, side, side).numpy()
    t = time.perf_counter()
    quantize_model(ours, info, calibration, None, int8, image_size=side, threads=args.threads)
    quantize_s = time.perf_counter() - t
    x = torch.randn(args.batch, 3, side, side)
    fast = prepare_for_inference(ours)
    runs = {"tv_fp32": tv, "ours_fp32": fast, "ort_fp32": load_onnx(f32, threads=args.threads)[0],
            "ort_int8": load_onnx(int8, threads=args.threads)[0]}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn(x), fn(x)
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.model} batch {args.batch}, {side}x{side}, median of {args.repeats} alternating batches; "
          f"int8 calibration + quantization {quantize_s:.0f} s")
    print(f"ONNX files: float32 {f32.stat().st_size / 1e6:.2f} MB, int8 {int8.stat().st_size / 1e6:.2f} MB "
          f"({int8.stat().st_size / f32.stat().st_size:.2f}x)")
    for k, s in med.items():
        print(f"  {k:10s} {args.batch / s:8.1f} img/s  {1e3 * s:8.2f} ms/batch  {med['ours_fp32'] / s:5.2f}x ours_fp32")


if __name__ == "__main__":
    main()
