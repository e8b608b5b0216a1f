"""Objects users print show one short, useful line (name, size, the numbers that matter), not their
whole content; every field stays an attribute away. (Weights: tests/test_pretrained.py.)"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

import densenet
from densenet.analysis import feature_reuse
from densenet.analysis.tables import Run
from densenet.data import build_data
from densenet.data.folder import ImageTree


def test_data_and_its_loaders():
    data = build_data("cifar10", None, batch_size=32)
    assert repr(data) == ("Data(cifar10: 10 classes, 3x32x32, train 1,000 / test 200 images, "
                          "from bundled sample cifar10-sample.zip)")
    assert repr(data.train) == "ArrayLoader(1,000 images in 31 batches of 32, training)"
    assert repr(data.test) == "ArrayLoader(200 images in 7 batches of 32)"
    names = [f"class{i}" for i in range(1000)]
    many = dataclasses.replace(data, class_names=names, num_classes=1000, skipped=names, ignored=names)
    assert len(repr(many)) < 120 and "class999" not in repr(many) and many.class_names[999] == "class999"
    volumes = dataclasses.replace(data, name="volumes", image_size=(8, 16, 16), spatial_dims=3, in_channels=1, source="")
    assert repr(volumes).startswith("Data(volumes: 10 classes, 1x8x16x16, train 1,000")


def test_image_tree_run_and_feature_reuse(tmp_path):
    files = [f"cat/{i:07d}.jpg" for i in range(100_000)]
    tree = ImageTree(tmp_path, "train", ["cat", "dog"], files, np.zeros(len(files), np.int64))
    assert repr(tree) == f"ImageTree({tmp_path / 'train'}: 2 classes, 100,000 images)" and len(tree.files) == 100_000
    run = Run(Path("runs/q"), {"model": "densenet_bc40_k12", "dataset": "cifar10", "test_error": 63.5},
              metrics=[{"epoch": e} for e in range(8)])
    assert repr(run) == "Run(runs/q: densenet_bc40_k12 on cifar10, 8 epochs logged, test error 63.50%)"
    blocks = feature_reuse(densenet.create_model("densenet_bc16_k8"))
    assert repr(blocks[0]) == "BlockReuse(block 1: 2 layers, then features.transition1.conv; matrix (3, 3))"
    assert repr(blocks[-1]).endswith("then classifier; matrix (3, 3))")
