#!/usr/bin/env bash
# Issue 24, after the 50 epochs of run.sh have finished: ship the second campaign's weights as
# densenet_bc100_k12.cifar10 in place of the first campaign's (30 epochs, 90.05%), if they are better.
# 0. refuse unless the run has finished its 50 epochs and its weight average (what it reports) beats the
#    registry's current densenet_bc100_k12.cifar10 on the test set (metrics.csv's last row);
# 1. package the run's served weights (the weight average: --recipe budget sets --ema-eval) into
#    densenet/assets/weights (float32), measuring single-crop and flip-averaged accuracy on the 10,000
#    test images;
# 2. measure the shipped file by `densenet eval --weights`, single crop and flip-averaged (eval.log);
# 3. the run beside the first campaign, the BC-40 runs and the paper's Table 2 row (table.md);
# 4. issue 26's follow-up: the int8 file of the shipped weights and its accuracy (int8.log).
# The checkpoint committed in this folder during the campaign is removed at the end: the record keeps
# the shipped weights, metrics.csv, report.json, config.yaml, curves.png and the logs.
set -euo pipefail
cd "$(dirname "$0")/../../.."
data=../shared/data/cifar10-jpeg.zip
here=docs/runs/cifar10-bc100-k12-budget50
run=~/runs/cifar10-bc100-k12-budget50
python - "$run" <<'EOF'
import csv, json, sys
rows = list(csv.DictReader(open(f"{sys.argv[1]}/metrics.csv")))
if len(rows) < 50 or not rows[-1]["ema_test_error"]:
    sys.exit(f"ship.sh: the run has {len(rows)} of 50 epochs; finish it first (run.sh)")
index = json.load(open("densenet/assets/weights/index.json"))
shipped = next(e for e in index if (e["model"], e["tag"]) == ("densenet_bc100_k12", "cifar10"))
new = 100 - float(rows[-1]["ema_test_error"])
if new <= shipped["accuracy"]["top1"]:
    sys.exit(f"ship.sh: {new:.2f}% does not beat the shipped {shipped['accuracy']['top1']}%; nothing shipped")
print(f"ship.sh: {new:.2f}% against the shipped {shipped['accuracy']['top1']}%: shipping")
EOF
note="Trained and measured on the project's CIFAR-10 copy (../shared/data/cifar10-jpeg.zip: every image re-encoded \
as baseline JPEG, quality 75), not the original PNG-exact images of the paper's test set. 50 epochs of the short-budget \
recipe (--recipe budget: linear decay to zero after a 1-epoch warm-up, weight decay 5e-4, label smoothing 0.1, the \
exponential moving average of the weights, decay 0.999, which these weights are), not 300 epochs of the paper's steps; \
trained on 2-core CPUs, partly in bf16 autocast and partly in float32 (the card says which epochs ran how). Model card: docs/runs/cifar10-bc100-k12-budget50/README.md."
cp "$run/metrics.csv" "$run/report.json" "$run/config.yaml" "$run/curves.png" "$run/checkpoint.pt" "$here/"
python tools/package_weights.py "$here" --tag cifar10 --data "$data" --tta flip --note "$note" \
    | tee "$here/package.log"
densenet eval --model densenet_bc100_k12 --weights cifar10 --dataset cifar10 --data "$data" --tta flip \
    --out /tmp/eval-bc100-50-shipped > "$here/eval.log"
densenet table "$here" docs/runs/cifar10-bc100-k12-budget docs/runs/cifar10-bc40-k12-cpu docs/runs/study-bc40-budget \
    --markdown "$here/table.md" > /dev/null
git rm -q --cached --ignore-unmatch "$here/checkpoint.pt"
rm "$here/checkpoint.pt"
{
    echo "\$ densenet export --model densenet_bc100_k12 --weights cifar10 --int8 --calibration $data --out /tmp/bc100-50.int8.safetensors"
    densenet export --model densenet_bc100_k12 --weights cifar10 --int8 --calibration "$data" --out /tmp/bc100-50.int8.safetensors
    echo "\$ densenet eval /tmp/bc100-50.int8.safetensors --dataset cifar10 --data $data"
    densenet eval /tmp/bc100-50.int8.safetensors --dataset cifar10 --data "$data" --out /tmp/eval-bc100-50-int8
} > "$here/int8.log"
