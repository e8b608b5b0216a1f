"""int8 inference (issue 26) against float32, alternating in one run, medians.

Configurations: torchvision's float32 model (eval), this project's fastest float32 path
(``prepare_for_inference``, eager), the float32 ONNX export run by ONNX Runtime, ONNX Runtime's int8
QDQ model (``densenet export --int8 --format onnx``, ``densenet.serving.quantize``), and the int8
model ``densenet export --int8`` writes (``densenet.serving.int8``: PyTorch's oneDNN int8
convolutions). Both int8 models are calibrated here on random images: speed does not depend on the
weights or the calibration. Prints images/s, milliseconds per batch, the ratios to our float32 path,
peak memory of one batch in a fresh process with ``--memory``, and the file sizes.

    python bench/bench_int8.py --model densenet_bc100_k12 --batch 64
    python bench/bench_int8.py --model densenet_bc100_k12 --batch 1 --repeats 20
    python bench/bench_int8.py --model densenet121 --batch 16 --repeats 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
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
from densenet.serving.int8 import load_int8, quantize_densenet, save_int8  # noqa: E402
from densenet.serving.quantize import quantize_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet_bc100_k12")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also each configuration's peak memory, in a fresh process")
    p.add_argument("--peak-of", nargs=2, metavar=("CONFIG", "FILE"), help=argparse.SUPPRESS)  # the child of --memory
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        return peak_of(args, *args.peak_of)
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
    t = time.perf_counter()
    ours_int8 = quantize_densenet(ours, torch.from_numpy(calibration))
    ours_quantize_s = time.perf_counter() - t
    ours_file = folder / "model.int8.safetensors"
    save_int8(ours_int8, ours_file)
    x = torch.randn(args.batch, 3, side, side)
    fast = prepare_for_inference(ours)
    # ONNX Runtime's threads must not spin after a call: they would take the cores from the next configuration
    runs = {"tv_fp32": tv, "ours_fp32": fast, "ort_fp32": load_onnx(f32, threads=args.threads, spin=False)[0],
            "ort_int8": load_onnx(int8, threads=args.threads, spin=False)[0], "ours_int8": ours_int8}
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
          f"int8 calibration + quantization: ONNX Runtime {quantize_s:.0f} s, ours {ours_quantize_s:.0f} s")
    size = f32.stat().st_size
    print(f"files: float32 ONNX {size / 1e6:.2f} MB; int8 ONNX {int8.stat().st_size / 1e6:.2f} MB "
          f"({int8.stat().st_size / size:.2f}x); ours int8 {ours_file.stat().st_size / 1e6:.2f} MB "
          f"({ours_file.stat().st_size / size:.2f}x)")
    files = {"ort_fp32": f32, "ort_int8": int8, "ours_int8": ours_file}
    for k, s in med.items():
        peak = ""
        if args.memory:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--threads",
                                  str(args.threads), "--peak-of", k, str(files.get(k, "-"))],
                                 capture_output=True, text=True, check=True).stdout
            peak = f"  peak +{json.loads(out.splitlines()[-1])['peak_mb']:.0f} MB"
        print(f"  {k:10s} {args.batch / s:8.1f} img/s  {1e3 * s:8.2f} ms/batch  {med['ours_fp32'] / s:5.2f}x ours_fp32{peak}")


def _status_mb(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process from /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_of(args: argparse.Namespace, config: str, file: str) -> None:
    """Print (JSON) the growth of this process's peak resident memory over its resident memory before
    one batch of ``config``, in MB: what serving one batch adds beyond the loaded model."""
    classes = 1000 if args.model == "densenet121" else 10
    side = model_spec(args.model).input_size
    if config == "tv_fp32":
        run = torchvision_model(args.model).eval()
    elif config == "ours_fp32":
        run = prepare_for_inference(create_model(args.model, num_classes=classes).eval())
    elif config == "ours_int8":
        run = load_int8(file)[0]
    else:
        run = load_onnx(file, threads=args.threads)[0]
    x = torch.randn(args.batch, 3, side, side)
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak (VmHWM) starts again from the current resident size
    with torch.no_grad():
        run(x)
    print(json.dumps({"peak_mb": _status_mb("VmHWM") - before}))


if __name__ == "__main__":
    main()
