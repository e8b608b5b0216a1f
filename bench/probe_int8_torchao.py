"""Probe for issue 26: PyTorch's own int8 path (torchao's pt2e X86InductorQuantizer, lowered by
TorchInductor with freezing) against this project's float32 inference, and its agreement with
float32 on real images. Needs torchao, which the project does not install:

    pip install torchao==0.18.0
    python bench/probe_int8_torchao.py --model densenet_bc100_k12 --batch 64
    python bench/probe_int8_torchao.py --model densenet_bc40_k12 --weights cifar10   # agreement on real images

Speed does not depend on the weights; with ``--weights`` the model is the shipped one and the
calibration and agreement use the bundled CIFAR-10 sample (calibration on its training images,
agreement on its 200 test images).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from densenet import create_model, model_spec
from densenet.data import build_data
from densenet.serving.inference import prepare_for_inference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet_bc100_k12")
    p.add_argument("--weights", help="trained weights by tag (e.g. cifar10) for the agreement check")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    torch.set_num_threads(2)
    torch.manual_seed(0)
    side = model_spec(args.model).input_size
    ref = create_model(args.model, num_classes=10, weights=args.weights).eval()
    layered = create_model(args.model, num_classes=10, fast=False).eval()
    layered.load_state_dict(ref.state_dict())
    if args.weights:
        data = build_data("cifar10", None, batch_size=64, eval_batch_size=64, workers=0)
        calibration = [x for x, _ in data.train.batches(0)][:8]
        test = torch.cat([x for x, _ in data.test.batches(0)])
    else:
        calibration = [torch.randn(args.batch, 3, side, side) for _ in range(4)]
        test = torch.randn(256, 3, side, side)
    t = time.perf_counter()
    program = torch.export.export(layered, (calibration[0],)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(program, quantizer)
    for x in calibration:
        prepared(x)
    converted = convert_pt2e(prepared)
    print(f"quantized in {time.perf_counter() - t:.0f} s")
    torch._inductor.config.freezing = True  # the int8 patterns are lowered to oneDNN kernels only when frozen
    x = torch.randn(args.batch, 3, side, side)
    with torch.no_grad():
        t = time.perf_counter()
        int8 = torch.compile(converted)
        int8(x)
        print(f"compiled in {time.perf_counter() - t:.0f} s")
        fast = prepare_for_inference(ref)
        runs = {"ours_fp32": fast, "torchao_int8": int8}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            fn(x), fn(x)
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t)
        base = statistics.median(times["ours_fp32"])
        for k, v in times.items():
            print(f"  {k:13s} {args.batch / statistics.median(v):8.1f} img/s  {base / statistics.median(v):5.2f}x ours_fp32")
        agree = torch.cat([(int8(test[i : i + args.batch]).argmax(1) == ref(test[i : i + args.batch]).argmax(1))
                           for i in range(0, len(test) - args.batch + 1, args.batch)]).float().mean()
    print(f"top-1 agreement with float32 on {'the sample test images' if args.weights else 'random images'}: "
          f"{100 * agree:.1f}%")


if __name__ == "__main__":
    main()
