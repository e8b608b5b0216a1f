#!/usr/bin/env bash
# Issue 24's study: DenseNet-BC (L=40, k=12), 10 epochs on the 50,000 training images of the shared
# CIFAR-10 JPEG copy with the short-budget recipe (--recipe budget), against the shipped 10-epoch run
# of the paper's steps (docs/runs/cifar10-bc40-k12-cpu: 81.48%). 2-core Xeon (AMX), torch 2.14.1,
# bf16 autocast (the default there), run at low priority beside other work; run folder outside the tree.
set -euo pipefail
data=../shared/data/cifar10-jpeg.zip
run=~/runs/study-bc40-budget
if [ -f "$run/checkpoint.pt" ]; then
    nice -n 19 densenet train --resume "$run" --quiet
else
    nice -n 19 densenet train --model densenet_bc40_k12 --dataset cifar10+ --data "$data" --epochs 10 --recipe budget \
        --seed 0 --quiet --out "$run"
fi
# the raw weights and their average, single crop and flip-averaged, on the 10,000 test images:
for ema in no yes; do
    densenet eval "$run/checkpoint.pt" --dataset cifar10 --data "$data" --ema "$ema" --tta flip --out /tmp/eval-$ema \
        > docs/runs/study-bc40-budget/eval-ema-$ema.log
done
cp "$run/metrics.csv" "$run/report.json" "$run/config.yaml" docs/runs/study-bc40-budget/
