#!/usr/bin/env bash
# Issue 24, after the training of run.sh has finished (its own evaluations were not run: ship.sh measures
# the shipped file instead): ship the campaign's weights as densenet_bc100_k12.cifar10.
# 1. package the run's served weights (the weight average: --recipe budget sets --ema-eval) into
#    densenet/assets/weights (float32), measuring single-crop and flip-averaged accuracy on the 10,000
#    test images;
# 2. measure the shipped file by `densenet eval --weights`, single crop and flip-averaged (eval.log);
# 3. the run beside the paper's Table 2 row (table.md);
# 4. issue 26's follow-up: the int8 file of the shipped weights and its accuracy (int8.log).
set -euo pipefail
cd "$(dirname "$0")/../../.."
data=../shared/data/cifar10-jpeg.zip
here=docs/runs/cifar10-bc100-k12-budget
run=~/runs/cifar10-bc100-k12-budget
note="Trained and measured on the project's CIFAR-10 copy (../shared/data/cifar10-jpeg.zip: every image re-encoded \
as baseline JPEG, quality 75), not the original PNG-exact images of the paper's test set. 30 epochs of the short-budget \
recipe (--recipe budget: linear decay to zero after a 1-epoch warm-up, weight decay 5e-4, label smoothing 0.1, the \
exponential moving average of the weights, decay 0.999, which these weights are), not 300 epochs of the paper's steps; \
trained on 2-core CPUs, bf16 autocast. Model card: docs/runs/cifar10-bc100-k12-budget/README.md."
cp "$run/metrics.csv" "$run/report.json" "$run/config.yaml" "$run/curves.png" "$here/"
cp "$run/checkpoint.pt" "$here/"  # package_weights reads the run folder; the checkpoint is not committed
python tools/package_weights.py "$here" --tag cifar10 --data "$data" --tta flip --note "$note" \
    | tee "$here/package.log"
densenet eval --model densenet_bc100_k12 --weights cifar10 --dataset cifar10 --data "$data" --tta flip \
    --out /tmp/eval-bc100-shipped > "$here/eval.log"
densenet table "$here" docs/runs/cifar10-bc40-k12-cpu docs/runs/study-bc40-budget --markdown "$here/table.md" > /dev/null
rm "$here/checkpoint.pt"
{
    echo "\$ densenet export --model densenet_bc100_k12 --weights cifar10 --int8 --calibration $data --out /tmp/bc100.int8.safetensors"
    densenet export --model densenet_bc100_k12 --weights cifar10 --int8 --calibration "$data" --out /tmp/bc100.int8.safetensors
    echo "\$ densenet eval /tmp/bc100.int8.safetensors --dataset cifar10 --data $data"
    densenet eval /tmp/bc100.int8.safetensors --dataset cifar10 --data "$data" --out /tmp/eval-bc100-int8
} > "$here/int8.log"
