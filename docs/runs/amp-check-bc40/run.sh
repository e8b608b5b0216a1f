#!/usr/bin/env bash
# Does bf16 autocast (the default on a CPU with bfloat16 instructions) cost accuracy? The same run twice,
# float32 (--amp off) and bf16 (--amp bf16): DenseNet-BC (L=40, k=12), 10,000 training images of the
# shared CIFAR-10 JPEG copy, 5 epochs of the paper's recipe, seed 0, evaluated on the 10,000 test images.
# From the repository root; run folders under ~/runs, logs copied here (2-core Xeon with AMX, torch 2.14.1).
set -euo pipefail
data=../shared/data/cifar10-jpeg.zip
here=docs/runs/amp-check-bc40
for amp in off bf16; do
    densenet train --model densenet_bc40_k12 --dataset cifar10+ --data "$data" --train-subset 10000 --epochs 5 \
        --seed 0 --amp "$amp" --quiet --force --out ~/runs/amp-check-bc40-$amp > "$here/train-$amp.log" 2>&1
    cp ~/runs/amp-check-bc40-$amp/metrics.csv "$here/metrics-$amp.csv"
    cp ~/runs/amp-check-bc40-$amp/report.json "$here/report-$amp.json"
done
