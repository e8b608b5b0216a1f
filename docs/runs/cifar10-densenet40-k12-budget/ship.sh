#!/usr/bin/env bash
# Issue 24, part 5, after the 30 epochs of run.sh: ship the run's weight average as
# densenet40_k12.cifar10 (the registry has no DenseNet-40 weights yet).
# 0. refuse unless the run has finished its 30 epochs;
# 1. package the served weights (the weight average: --recipe budget sets --ema-eval) into
#    densenet/assets/weights (float32), measuring single-crop and flip-averaged accuracy on the 10,000
#    test images;
# 2. measure the shipped file by `densenet eval --weights`, single crop and flip-averaged (eval.log);
# 3. the run beside the BC-100 campaigns, the BC-40 runs and the paper's Table 2 (table.md);
# 4. the int8 file of the shipped weights and its accuracy (int8.log).
# The checkpoint committed here during the run is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/../../.."
data=../shared/data/cifar10-jpeg.zip
here=docs/runs/cifar10-densenet40-k12-budget
run=~/runs/cifar10-densenet40-k12-budget
python - "$run" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(f"{sys.argv[1]}/metrics.csv")))
if len(rows) < 30 or not rows[-1]["ema_test_error"]:
    sys.exit(f"ship.sh: the run has {len(rows)} of 30 epochs; finish it first (run.sh)")
print(f"ship.sh: {100 - float(rows[-1]['ema_test_error']):.2f}% after 30 epochs: shipping")
PY
note="Trained and measured on the project's CIFAR-10 copy (../shared/data/cifar10-jpeg.zip: every image re-encoded \
as baseline JPEG, quality 75), not the original PNG-exact images of the paper's test set. 30 epochs of the short-budget \
recipe (--recipe budget: linear decay to zero after a 1-epoch warm-up, weight decay 5e-4, label smoothing 0.1, the \
exponential moving average of the weights, decay 0.999, which these weights are), not 300 epochs of the paper's steps; \
trained on 2-core CPUs (the card says which epochs ran in which precision). Model card: docs/runs/cifar10-densenet40-k12-budget/README.md."
cp "$run/metrics.csv" "$run/report.json" "$run/config.yaml" "$run/curves.png" "$run/checkpoint.pt" "$here/"
python tools/package_weights.py "$here" --tag cifar10 --data "$data" --tta flip --note "$note" \
    | tee "$here/package.log"
densenet eval --model densenet40_k12 --weights cifar10 --dataset cifar10 --data "$data" --tta flip \
    --out /tmp/eval-densenet40-shipped > "$here/eval.log"
densenet table "$here" docs/runs/cifar10-bc100-k12-budget50 docs/runs/cifar10-bc100-k12-budget \
    docs/runs/cifar10-bc40-k12-cpu docs/runs/study-bc40-budget --markdown "$here/table.md" > /dev/null
git rm -q --cached --ignore-unmatch "$here/checkpoint.pt"
rm "$here/checkpoint.pt"
{
    echo "\$ densenet export --model densenet40_k12 --weights cifar10 --int8 --calibration $data --out /tmp/densenet40.int8.safetensors"
    densenet export --model densenet40_k12 --weights cifar10 --int8 --calibration "$data" --out /tmp/densenet40.int8.safetensors
    echo "\$ densenet eval /tmp/densenet40.int8.safetensors --dataset cifar10 --data $data"
    densenet eval /tmp/densenet40.int8.safetensors --dataset cifar10 --data "$data" --out /tmp/eval-densenet40-int8
} > "$here/int8.log"
