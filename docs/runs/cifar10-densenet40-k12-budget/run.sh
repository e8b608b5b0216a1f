#!/usr/bin/env bash
# Issue 24, part 5: DenseNet (L=40, k=12), the paper's smallest row (94.76% on C10+ after 300 epochs of
# steps), with the recipe of the BC-100 campaigns (--recipe budget), seed 0, 30 epochs, evaluated every
# 5th epoch and at the end. Not started before the BC-100 campaign (cifar10-bc100-k12-budget50) ends:
# both cores go to one run at a time. Planned from the plan line of
# `densenet train --model densenet40_k12 --dataset cifar10+ --data ../shared/data/cifar10-jpeg.zip
# --epochs 60 --recipe budget --seed 0 --amp off` on a 2-core AMD EPYC Zen 3 (2026-12-07, the machine
# otherwise idle): 1.61 s a step in float32, so 30 epochs (23,430 steps) take about 10.5 h of steps,
# within the issue's 12 hours; 1.24 s (about 8.1 h) with 8fca077's float32 kernels (2026-12-08). --amp auto: bf16 where the CPU has bfloat16 instructions, else float32.
# Same life as the BC-100 campaign: lowest priority, run folder outside the tree, each session stops it
# with SIGTERM and commits checkpoint.pt, config.yaml and metrics.csv here; resume from the machine's
# copy if it is there, else from the committed one. --eval-every is a runtime key: passed on every resume.
set -euo pipefail
cd "$(dirname "$0")/../../.."
data=../shared/data/cifar10-jpeg.zip
here=docs/runs/cifar10-densenet40-k12-budget
run=~/runs/cifar10-densenet40-k12-budget
if [ ! -f "$run/checkpoint.pt" ] && [ -f "$here/checkpoint.pt" ]; then
    mkdir -p "$run" && cp "$here/checkpoint.pt" "$here/config.yaml" "$run/"
    if [ -f "$here/metrics.csv" ]; then cp "$here/metrics.csv" "$run/"; fi
fi
if [ -f "$run/checkpoint.pt" ]; then
    nice -n 19 densenet train --resume "$run" --amp auto --eval-every 5 --quiet
else
    nice -n 19 densenet train --model densenet40_k12 --dataset cifar10+ --data "$data" --epochs 30 --recipe budget \
        --seed 0 --amp auto --eval-every 5 --quiet --out "$run"
fi
