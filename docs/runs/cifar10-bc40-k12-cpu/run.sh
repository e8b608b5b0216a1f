#!/usr/bin/env bash
# The commands behind this folder, from the repository root (2-core CPU VM, torch 2.14.1, 2026-11-30).
set -euo pipefail
data=../shared/data/cifar10-jpeg.zip   # CIFAR-10 re-encoded as JPEG quality 75 (see ../shared/data/README.md)
densenet train --model densenet_bc40_k12 --dataset cifar10+ --data "$data" --epochs 10 --threads 1 --workers 0 \
    --quiet --out docs/runs/cifar10-bc40-k12-cpu
# the first process ended with its session during epoch 3; the run went on from its last checkpoint:
densenet train --resume docs/runs/cifar10-bc40-k12-cpu --threads 2
# the shipped weights (float16 changed 2 of the 10,000 predictions, so float32 is stored):
python tools/package_weights.py docs/runs/cifar10-bc40-k12-cpu --tag cifar10 --data "$data" --half \
    --note "..."   # the note in densenet/assets/weights/index.json
# their accuracy by densenet eval, on the 10,000 test images:
densenet eval --model densenet_bc40_k12 --weights cifar10 --dataset cifar10 --data "$data" --out /tmp/eval > docs/runs/cifar10-bc40-k12-cpu/eval.log
