#!/usr/bin/env bash
# Issue 24's campaign: DenseNet-BC (L=100, k=12) on the 50,000 training images of the shared CIFAR-10
# JPEG copy, the short-budget recipe chosen by the study (docs/recipes.md: --recipe budget), 30 epochs,
# seed 0, bf16 autocast (the default on this 2-core Xeon with AMX), torch 2.14.1. It runs at the lowest
# priority beside other work, across sessions; the run folder lives outside the work tree.
# Resume: from the machine's copy if it is there, else from the checkpoint committed in this folder
# (each session commits its latest checkpoint.pt, config.yaml and metrics.csv here).
set -euo pipefail
cd "$(dirname "$0")/../../.."
data=../shared/data/cifar10-jpeg.zip
here=docs/runs/cifar10-bc100-k12-budget
run=~/runs/cifar10-bc100-k12-budget
if [ ! -f "$run/checkpoint.pt" ] && [ -f "$here/checkpoint.pt" ]; then
    mkdir -p "$run" && cp "$here/checkpoint.pt" "$here/config.yaml" "$run/"
    if [ -f "$here/metrics.csv" ]; then cp "$here/metrics.csv" "$run/"; fi
fi
if [ -f "$run/checkpoint.pt" ]; then
    nice -n 19 densenet train --resume "$run" --quiet
else
    nice -n 19 densenet train --model densenet_bc100_k12 --dataset cifar10+ --data "$data" --epochs 30 --recipe budget \
        --seed 0 --quiet --out "$run"
fi
# the raw weights and their average, single crop and flip-averaged, on the 10,000 test images:
for ema in no yes; do
    densenet eval "$run/checkpoint.pt" --dataset cifar10 --data "$data" --ema "$ema" --tta flip --out /tmp/eval-bc100-$ema \
        > "$here/eval-ema-$ema.log"
done
cp "$run/metrics.csv" "$run/report.json" "$run/config.yaml" "$here/"
