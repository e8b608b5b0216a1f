#!/usr/bin/env bash
# 2026-11-30, this project's 2-core CPU machine (shared with another training run), torch 2.14.1 CPU.
# Issue #19: a user's own images, 3 classes of CIFAR-10 laid out as own/<class>/, no --image-size.
set -euo pipefail
# 1,000 training images (0000-0999) of each of cat, dog and ship, as 32x32 JPEGs: own/<class>/NNNN.jpg
unzip -q ../shared/data/cifar10-jpeg.zip 'train/cat/0???.jpg' 'train/dog/0???.jpg' 'train/ship/0???.jpg' -d c10
mv c10/train own && rmdir c10
# train: 10% of each class held out for testing (chosen by the seed), 32x32 (the model's input size)
nice -n 5 densenet train --dataset folder --data own --model densenet_bc40_k12 --epochs 3 --quiet --out runs/own3
# eval: the same held-out split (the checkpoint records the seed) -> runs/own3/eval-folder/
nice -n 5 densenet eval runs/own3/checkpoint.pt --data own
# predict with the truth: 100 images per class of CIFAR-10's own test split, never seen in training
unzip -q ../shared/data/cifar10-jpeg.zip 'test/cat/00??.jpg' 'test/dog/00??.jpg' 'test/ship/00??.jpg' -d heldout
nice -n 5 densenet predict runs/own3/checkpoint.pt heldout/test --truth-from-folders --csv predictions.csv
