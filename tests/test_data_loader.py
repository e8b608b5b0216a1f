"""densenet.data loaders: augmentation, determinism, exact resume, sharding, ImageNet views."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import unnormalise, write_cifar10_binary, write_image_tree
from PIL import Image

from densenet.data import ArrayLoader, DataError, build_data
from densenet.data.transforms import (
    crop_flip_params,
    eval_image,
    generator,
    normalize,
    pad_crop_flip,
    random_resized_crop_box,
    ten_crop_image,
    train_image,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))


def array_loader(n=100, batch_size=10, train=True, augment=True, seed=0, prefetch=0) -> ArrayLoader:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return ArrayLoader(x, np.arange(n) % 10, np.arange(n), batch_size, train=train, augment=augment, seed=seed,
                       mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), prefetch=prefetch)


def collect(it):
    return [(x.clone(), y.clone()) for x, y in it]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


# ----------------------------------------------------------------------------------- batch-wise augmentation
def test_pad_crop_flip_matches_a_per_image_reference():
    x = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    dy, dx, flip = crop_flip_params(300, 4, generator(1, 2, 3))
    out = torch.from_numpy(pad_crop_flip(x.numpy(), dy, dx, flip))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(300):
        ref = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))  # offsets 0..8: +-4 pixels
    assert 100 < int(flip.sum()) < 200  # p = 0.5
    # zero padding is visible where the crop leaves the image
    corner = pad_crop_flip(np.full((1, 3, 32, 32), 200, np.uint8), np.array([0]), np.array([0]), np.array([False]))
    assert (corner[0, :, :4, :] == 0).all() and (corner[0, :, 4:, 4:] == 200).all()
    assert (pad_crop_flip(x.numpy(), np.full(300, 4), np.full(300, 4), np.zeros(300, bool)) == x.numpy()).all()


def test_normalize_is_per_channel_float32():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    y = normalize(x, (0.0, 0.5, 0.1), (1.0, 0.5, 0.2))
    assert y.dtype == torch.float32 and y.shape == (2, 3, 2, 2)
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.5]))
    crops = normalize(torch.zeros(2, 10, 3, 4, 4, dtype=torch.uint8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert crops.shape == (2, 10, 3, 4, 4) and crops.eq(-1).all()


def test_plus_augments_and_plain_does_not(tmp_path):
    w = write_cifar10_binary(tmp_path, archive=False)
    plain = build_data("cifar10", w["path"], batch_size=20)
    plus = build_data("cifar10+", w["path"], batch_size=20)
    ref = {a.tobytes() for a in w["train_x"]}
    for x, _ in plain.train.batches(0):
        assert all(a.tobytes() in ref for a in unnormalise(x, plain.mean, plain.std))
    changed = sum(a.tobytes() not in ref for x, _ in plus.train.batches(0) for a in unnormalise(x, plus.mean, plus.std))
    assert changed > 80  # almost every image is shifted or mirrored
    for x, _ in plus.test.batches(0):  # no augmentation at test time
        assert all(a.tobytes() in {b.tobytes() for b in w["test_x"]} for a in unnormalise(x, plus.mean, plus.std))
    assert plain.mean == plus.mean and plain.std == plus.std


def test_normalised_training_data_is_centred(tmp_path):
    w = write_cifar10_binary(tmp_path, archive=False)
    data = build_data("cifar10", w["path"], batch_size=100)
    (x, _), = list(data.train.batches(0))
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- determinism and resume
@pytest.mark.parametrize("prefetch", [0, 2])
def test_same_seed_same_batches_and_exact_resume(prefetch):
    a, b = array_loader(prefetch=prefetch), array_loader(prefetch=prefetch)
    full = collect(a.batches(3))
    assert len(full) == a.num_batches == len(a) == 10
    assert same(full, collect(b.batches(3)))
    for start in (1, 4, 9, 10):
        assert same(full[start:], collect(b.batches(3, start=start)))
    assert not same(full, collect(a.batches(4)))  # another epoch: another order and augmentation
    assert not same(full, collect(array_loader(seed=1).batches(3)))
    labels = torch.cat([y for _, y in full])
    assert sorted(labels.tolist()) == sorted((np.arange(100) % 10).tolist())  # a permutation: each image once


def test_resume_from_a_broken_off_iteration():
    loader = array_loader(prefetch=2)
    it = loader.batches(0)
    first = [next(it) for _ in range(3)]
    it.close()  # training interrupted (the prefetch thread stops)
    rest = collect(loader.batches(0, start=3))
    assert same(first + rest, collect(array_loader(prefetch=0).batches(0)))


def test_drop_last_for_training_keep_for_eval():
    train = array_loader(n=105, batch_size=10)
    assert train.num_batches == 10 and sum(len(y) for _, y in train.batches(0)) == 100
    ev = array_loader(n=105, batch_size=10, train=False)
    batches = collect(ev.batches(0))
    assert ev.num_batches == len(batches) == 11 and len(batches[-1][1]) == 5
    assert torch.cat([y for _, y in batches]).tolist() == (np.arange(105) % 10).tolist()  # in order
    assert same(batches, collect(ev.batches(7)))  # eval: the epoch does not matter


def test_bad_arguments():
    loader = array_loader()
    with pytest.raises(DataError, match="start 11 is not in 0..10"):
        list(loader.batches(0, start=11))
    with pytest.raises(DataError, match="batch_size 10 is not divisible by world_size 3"):
        list(loader.batches(0, rank=0, world_size=3))
    with pytest.raises(DataError, match="rank 2 is not in"):
        list(loader.batches(0, rank=2, world_size=2))
    with pytest.raises(DataError, match="10-crop"):
        loader.batches(0, ten_crop=True)
    with pytest.raises(DataError, match="image_size 64 is not available"):
        build_data("cifar10", None, image_size=64)
    with pytest.raises(DataError, match="validation of 1000 images asked from 1000"):
        build_data("cifar10", None, val_size=1000)
    with pytest.raises(DataError, match="train_subset of 2000 images asked from 1000"):
        build_data("cifar10", None, train_subset=2000)


# ----------------------------------------------------------------------------------- sharding
def test_training_shards_union_is_the_global_batch():
    loader = array_loader(batch_size=20)
    whole = collect(loader.batches(2))
    shards = [collect(loader.batches(2, rank=r, world_size=4)) for r in range(4)]
    for i, (x, y) in enumerate(whole):
        parts = [s[i] for s in shards]
        assert all(len(p[1]) == 5 for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert same(collect(loader.batches(2, start=3, rank=1, world_size=4)), shards[1][3:])


def test_eval_shards_see_every_image_once():
    loader = array_loader(n=103, batch_size=8, train=False)
    seen = []
    counts = []
    for r in range(3):
        batches = collect(loader.batches(0, rank=r, world_size=3))
        counts.append(len(batches))
        seen += [a.numpy().tobytes() for x, _ in batches for a in x]
    assert counts == [loader.num_batches] * 3
    assert len(seen) == 103 and len(set(seen)) == 103


# ----------------------------------------------------------------------------------- validation split
def test_validation_split_disjoint_and_seeded(tmp_path):
    w = write_cifar10_binary(tmp_path, archive=False)
    data = build_data("cifar10+", w["path"], val_size=30, seed=4, batch_size=10)
    assert (data.train.num_images, data.val.num_images) == (70, 30)
    assert not set(data.train.indices) & set(data.val.indices)
    assert set(data.train.indices) | set(data.val.indices) == set(range(100))
    again = build_data("cifar10+", w["path"], val_size=30, seed=4)
    assert np.array_equal(again.val.indices, data.val.indices)
    assert not np.array_equal(build_data("cifar10", w["path"], val_size=30, seed=5).val.indices, data.val.indices)
    # statistics of the training images only
    m = w["train_x"][data.train.indices].astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1).mean(1) / 255
    np.testing.assert_allclose(data.mean, m, rtol=1e-9)
    sub = build_data("cifar10", w["path"], val_size=30, train_subset=20, test_subset=5, seed=4)
    assert sub.train.num_images == 20 and set(sub.train.indices) <= set(data.train.indices) and sub.test.num_images == 5


# ----------------------------------------------------------------------------------- image folders / ImageNet
def test_random_resized_crop_box_inside_the_image():
    rng = np.random.default_rng(0)
    areas = []
    for w, h in [(500, 375), (50, 400), (400, 50), (224, 224)]:
        for _ in range(200):
            l, t, r, b = random_resized_crop_box(w, h, rng)
            assert 0 <= l < r <= w and 0 <= t < b <= h
            areas.append((r - l) * (b - t) / (w * h))
    assert min(areas) < 0.2 and max(areas) > 0.9


def test_imagenet_views():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    assert train_image(im, 224, np.random.default_rng(1)).shape == (3, 224, 224)
    centre = eval_image(im, 224)
    ten = ten_crop_image(im, 224)
    assert centre.shape == (3, 224, 224) and ten.shape == (10, 3, 224, 224)
    np.testing.assert_array_equal(ten[4], centre)  # resize 256, centre 224
    np.testing.assert_array_equal(ten[5:], ten[:5, :, :, ::-1])  # the mirrors
    small = im.resize((341, 256), Image.BILINEAR)  # 4 corners of the 256-short-side image
    np.testing.assert_array_equal(ten[0], np.asarray(small)[:224, :224].transpose(2, 0, 1))
    np.testing.assert_array_equal(ten[3], np.asarray(small)[-224:, -224:].transpose(2, 0, 1))
    assert eval_image(im, 32).shape == (3, 32, 32)


def test_imagenet_loaders_ten_crop_workers_and_determinism(tmp_path):
    root = write_image_tree(tmp_path / "imagenet", {"train": {"n01": 5, "n02": 5}, "val": {"n01": 2, "n02": 3}},
                            size=(80, 60), fmt="JPEG")
    data = build_data("imagenet", root, batch_size=4, eval_batch_size=3, workers=0, image_size=64)
    assert data.num_classes == 2 and data.class_names == ["n01", "n02"] and data.image_size == 64
    assert data.mean == (0.485, 0.456, 0.406) and data.val is None
    train0 = collect(data.train.batches(1))
    assert len(train0) == 2 and train0[0][0].shape == (4, 3, 64, 64)
    par = build_data("imagenet", root, batch_size=4, eval_batch_size=3, workers=2, image_size=64)
    assert same(train0, collect(par.train.batches(1)))  # worker count does not change the batches
    assert same(train0[1:], collect(par.train.batches(1, start=1)))
    assert not same(train0, collect(par.train.batches(2)))
    shards = [collect(par.train.batches(1, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([shards[0][0][0], shards[1][0][0]]), train0[0][0])
    test = collect(data.test.batches(0))
    ten = collect(data.test.batches(0, ten_crop=True))
    assert [len(y) for _, y in test] == [3, 2] and ten[0][0].shape == (3, 10, 3, 64, 64)
    assert torch.cat([y for _, y in ten]).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="ten_crop is an evaluation view"):
        data.train.batches(0, ten_crop=True)
    held = build_data("imagenet", root, val_size=3, workers=0, image_size=64)
    assert held.val.num_images == 3 and held.train.num_images == 7


def test_folder_from_zip_equals_folder_from_directory(tmp_path):
    spec = {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}}
    d = build_data("folder", write_image_tree(tmp_path / "d", spec, size=(48, 40)), image_size=32, batch_size=4, workers=0)
    z = build_data("folder", write_image_tree(tmp_path / "z.zip", spec, size=(48, 40), as_zip=True), image_size=32,
                   batch_size=4, workers=2)
    assert same(collect(d.train.batches(5)), collect(z.train.batches(5)))
    assert same(collect(d.test.batches(0)), collect(z.test.batches(0)))


@pytest.mark.parametrize("dataset", ["cifar10+", "cifar10"])
def test_batches_built_on_the_device_equal_the_host_ones(dataset):
    """Data held on a device (here the CPU, as it would be on a GPU): gathering, augmentation and
    normalisation there give the host path's batches bit for bit, in every split and shard."""
    host = build_data(dataset, None, batch_size=64, eval_batch_size=100, seed=5, val_size=100)
    device = build_data(dataset, None, batch_size=64, eval_batch_size=100, seed=5, val_size=100).to("cpu")
    assert device.train.on_device is not None and host.train.on_device is None
    for split in ("train", "val", "test"):
        for kw in ({}, {"start": 1}, {"rank": 1, "world_size": 2}):
            a, b = list(getattr(host, split).batches(2, **kw)), list(getattr(device, split).batches(2, **kw))
            assert len(a) == len(b) and (len(a) > 0 or "start" in kw)
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb) and xb.dtype == torch.float32
