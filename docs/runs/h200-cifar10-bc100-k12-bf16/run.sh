#!/usr/bin/env bash
# Device check, 2026-11-28: issue 6 point 5 (amp + channels_last on a GPU) and a short real-data run.
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
# 1) fp16 with the gradient scaler and channels_last, on the bundled sample (1,000 images, 2 epochs)
timeout 45 python3 -m densenet train --model densenet_bc40_k12 --epochs 2 --amp fp16 --channels-last --quiet --out /tmp/fp16 2>&1 | tail -4
# 2) fp32 fast path on the GPU, 1 epoch of the sample
timeout 30 python3 -m densenet train --model densenet_bc40_k12 --epochs 1 --quiet --out /tmp/fp32 2>&1 | tail -2
# 3) DenseNet-BC-100 k=12 on CIFAR-10 (JPEG q75 copy), bf16 + channels_last, the paper's schedule shrunk to EPOCHS epochs
timeout ${LIMIT:-170} python3 -m densenet train --model densenet_bc100_k12 --dataset cifar10+ --data .gpu/cifar10-jpeg.zip \
  --epochs ${EPOCHS:-4} --amp bf16 --channels-last --workers 8 --checkpoint-every 0 --quiet --out /tmp/bc100 2>&1 | tail -8
for f in report.json metrics.csv curves.png config.yaml; do cp /tmp/bc100/$f "${OUT:-/tmp}/" 2>/dev/null; done
ls "${OUT:-/tmp}"
