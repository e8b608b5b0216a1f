"""Weight files: torchvision round trip (legacy keys included), safe reading, clear mismatches;
checkpoints from other code (CheXNet, DDP, Lightning-style wrappers, timm, MONAI) with what was renamed."""
import argparse
import pickle
import re

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from densenet import (
    DenseNet,
    WeightsError,
    create_model,
    load_state_dict,
    load_torchvision_weights,
    read_state_dict,
    to_torchvision_state_dict,
)
from densenet.models.weights import LoadReport, load_weight_file

torch.set_num_threads(2)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine weights, so that a wrong mapping shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def torchvision_cifar_bc(k=12, depth=100):
    """torchvision's DenseNet class configured as the paper's CIFAR DenseNet-BC (3x3 stem, 3 blocks)."""
    n = (depth - 4) // 6
    tv = torchvision.models.DenseNet(growth_rate=k, block_config=(n, n, n), num_init_features=2 * k, num_classes=10)
    tv.features.conv0 = nn.Conv2d(3, 2 * k, 3, padding=1, bias=False)
    del tv.features.norm0, tv.features.relu0, tv.features.pool0
    return tv


def legacy_keys(state):
    """Rename to the key names of old torchvision checkpoints: denselayer1.norm1.weight -> denselayer1.norm.1.weight."""
    return {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}


@pytest.mark.parametrize("name", ["densenet121", "densenet161"])
def test_torchvision_imagenet_round_trip(name):
    torch.manual_seed(0)
    tv = randomise_bn(getattr(torchvision.models, name)(weights=None))
    ours = create_model(name)
    load_state_dict(ours, tv.state_dict())
    ours.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = tv(x)
        assert (ours(x) - expected).abs().max().item() < 1e-5
        # ... and back: our weights in torchvision's layout load strictly into torchvision
        back = getattr(torchvision.models, name)(weights=None).eval()
        back.load_state_dict(to_torchvision_state_dict(ours))
        assert (back(x) - expected).abs().max().item() < 1e-5


def test_torchvision_cifar_configuration_round_trip():
    torch.manual_seed(1)
    tv = randomise_bn(torchvision_cifar_bc())
    ours = create_model("densenet_bc100_k12")
    load_state_dict(ours, tv.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (ours.eval()(x) - tv(x)).abs().max().item() < 1e-5
    tv2 = torchvision_cifar_bc()
    tv2.load_state_dict(to_torchvision_state_dict(ours))
    with torch.no_grad():
        assert (tv2.eval()(x) - tv(x)).abs().max().item() < 1e-5


def test_legacy_key_names_from_a_file(tmp_path):
    torch.manual_seed(2)
    tv = randomise_bn(torchvision.models.densenet121(weights=None))
    state = legacy_keys(tv.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    # published torchvision weights predate BN's num_batches_tracked
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "densenet121-legacy.pth"
    torch.save(state, path)
    ours = load_torchvision_weights(create_model("densenet121"), path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - tv(x)).abs().max().item() < 1e-5


def test_read_state_dict_formats_and_wrappers(tmp_path):
    model = create_model("densenet_bc40_k12")
    state = model.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("plain.pth", "wrapped.pth", "w.safetensors"):
        read = read_state_dict(tmp_path / name)
        assert read.keys() == state.keys()
        assert all(torch.equal(read[k], state[k]) for k in state)


class _CreatesAFile:
    """Unpickling this runs code that would create a file: it must never be unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"features.conv0.weight": _CreatesAFile(str(marker))}, f, protocol=2)
    with pytest.raises(WeightsError, match="refused for safety"):
        read_state_dict(path)
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(create_model("densenet_bc40_k12").state_dict(), path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="weight file .*cut.pth is truncated or corrupted"):
        read_state_dict(tmp_path / "cut.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(WeightsError, match="cut.safetensors is not a readable safetensors file"):
        read_state_dict(tmp_path / "cut.safetensors")
    with pytest.raises(WeightsError, match="weight file not found"):
        read_state_dict(tmp_path / "nope.pth")
    torch.save({"lr": 0.1}, tmp_path / "nostate.pth")
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "nostate.pth")


def test_state_dict_from_another_architecture_names_the_difference():
    with pytest.raises(WeightsError,
                       match=r"missing: features\.denseblock1\.denselayer7.*\| shape mismatch: features\.conv0\.weight"):
        load_state_dict(create_model("densenet_bc100_k12"), create_model("densenet_bc40_k16").state_dict())
    with pytest.raises(WeightsError, match=r"unexpected: features\.norm0"):
        load_state_dict(create_model("densenet_bc100_k12"),
                        torchvision_cifar_bc().state_dict() | {"features.norm0.weight": torch.ones(24)})
    with pytest.raises(WeightsError, match=r"shape mismatch: classifier\.weight: file \(1000, 1024\) vs model \(10, 1024\)"):
        load_state_dict(create_model("densenet121", num_classes=10), torchvision.models.densenet121(weights=None).state_dict())


def test_non_strict_loading_skips_only_a_different_classifier():
    tv = torchvision.models.densenet121(weights=None)
    model = create_model("densenet121", num_classes=10)
    head = model.classifier.weight.clone()
    load_state_dict(model, tv.state_dict(), strict=False)
    assert torch.equal(model.features.conv0.weight, tv.features.conv0.weight)
    assert torch.equal(model.classifier.weight, head)
    with pytest.raises(WeightsError, match="missing"):
        load_state_dict(create_model("densenet169", num_classes=10), tv.state_dict(), strict=False)


# ---------------------------------------------------------------------------- checkpoints from the wild
# Each file below is built from one of our models by renaming its keys as the other code names
# them (names checked against timm 1.0 and MONAI 1.6), saved with torch.save and read back through
# the public functions; the loaded model must compute what the source model computes.


def small_imagenet_densenet(num_classes=5):
    """A small DenseNet with the ImageNet stem (the layout of torchvision's, timm's and MONAI's)."""
    return DenseNet(growth_rate=8, block_config=(2, 3), stem="imagenet", stem_channels=16, num_classes=num_classes)


def same_outputs(a: nn.Module, b: nn.Module, size=64) -> bool:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return (a.eval()(x) - b.eval()(x)).abs().max().item() < 1e-5


def no_counters(state):
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def monai_keys(state):
    """MONAI's DenseNet names: a dense layer's modules in ``layers``, the head's Linear in ``class_layers.out``."""
    return {re.sub(r"(denselayer\d+)\.", r"\1.layers.", k).replace("classifier.", "class_layers.out."): v
            for k, v in state.items()}


def test_chexnet_checkpoint_loads_with_every_renaming_reported(tmp_path):
    """CheXNet's model.pth.tar: {"state_dict": {"module.densenet121.features...", "...classifier.0.weight"}}
    with legacy norm.1 keys, saved in the pre-zip format of the PyTorch it was trained with."""
    source = randomise_bn(create_model("densenet121", num_classes=14))
    state = legacy_keys(no_counters(source.state_dict()))
    state = {re.sub(r"^classifier\.", "classifier.0.", k): v for k, v in state.items()}
    state = {f"module.densenet121.{k}": v for k, v in state.items()}
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in state
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 7, "arch": "densenet121", "best_loss": 0.152, "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}},
               path, _use_new_zipfile_serialization=False)

    model = create_model("densenet121", num_classes=14)
    report = load_weight_file(model, path)
    assert isinstance(report, LoadReport)
    assert report.renamed == [
        "weights taken from checkpoint['state_dict']",
        "removed prefix 'module.densenet121.'",
        "renamed 580 legacy keys (denselayerL.norm.1 -> denselayerL.norm1)",  # 58 layers x 10 tensors
        "classifier.0 -> classifier",
    ]
    assert report.dropped == ["121 BatchNorm num_batches_tracked counters: not in the file (older PyTorch), "
                              "left as the model had them"]
    assert report.loaded == len(state)
    assert same_outputs(model, source)
    assert same_outputs(load_torchvision_weights(create_model("densenet121", num_classes=14), path), source)

    # fine-tuning on 3 classes (--init): everything but the head, and the head's drop reported
    model = create_model("densenet121", num_classes=3)
    head = model.classifier.weight.clone()
    report = load_weight_file(model, path, strict=False)
    assert torch.equal(model.features.denseblock4.denselayer16.conv2.weight,
                       source.features.denseblock4.denselayer16.conv2.weight)
    assert torch.equal(model.classifier.weight, head)
    assert report.dropped[0] == ("classifier.weight, classifier.bias of shape (14, 1024) / (14,) (the model's is "
                                 "(3, 1024) / (3,)): the model's freshly initialised classifier is kept")
    assert report.loaded == len(state) - 2
    # ... and refused with the way out under strict=True
    with pytest.raises(WeightsError, match=r"model\.pth\.tar: the file's classifier is for 14 classes, the model's "
                                           r"for 3 .*shape mismatch: classifier\.weight \(module\.densenet121\.classifier"
                                           r"\.0\.weight in the file\): file \(14, 1024\) vs model \(3, 1024\).*"
                                           r"num_classes=14, or load with strict=False"):
        load_weight_file(create_model("densenet121", num_classes=3), path)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_data_parallel_and_compile_prefixes(tmp_path, prefix):
    source = randomise_bn(small_imagenet_densenet())
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, tmp_path / "w.pth")
    model = small_imagenet_densenet()
    report = load_weight_file(model, tmp_path / "w.pth")
    assert report.renamed == [f"removed prefix {prefix!r}"] and report.dropped == []
    assert same_outputs(model, source)


@pytest.mark.parametrize("wrapper", ["model.", "backbone.", "densenet121.", "net.module."])
def test_one_wrapper_prefix_is_found(tmp_path, wrapper):
    """A model held in another module (a Lightning module's ``self.model``, a ``backbone``), nested in
    the checkpoint as Lightning saves it."""
    source = randomise_bn(small_imagenet_densenet())
    torch.save({"epoch": 1, "global_step": 10, "state_dict": {wrapper + k: v for k, v in source.state_dict().items()}},
               tmp_path / "last.ckpt")
    model = small_imagenet_densenet()
    report = load_weight_file(model, tmp_path / "last.ckpt")
    assert report.renamed == ["weights taken from checkpoint['state_dict']", f"removed prefix {wrapper!r}"]
    assert same_outputs(model, source)
    # read_state_dict alone keeps its contract: flat, without module. only
    assert next(iter(read_state_dict(tmp_path / "last.ckpt"))).startswith(wrapper)


def test_own_features_prefix_is_not_stripped(tmp_path):
    """A backbone-only state dict (every key under ``features.``) keeps its names: the head is what is missing."""
    source = randomise_bn(small_imagenet_densenet())
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("features.")}, tmp_path / "backbone.pth")
    model = small_imagenet_densenet()
    report = load_weight_file(model, tmp_path / "backbone.pth", strict=False)
    assert report.renamed == []
    assert report.dropped == ["classifier.weight, classifier.bias: not in the file, the model's freshly initialised "
                              "classifier is kept"]
    assert torch.equal(model.features.conv0.weight, source.features.conv0.weight)
    with pytest.raises(WeightsError, match=r"the file has no classifier for the model \(missing: classifier\.weight; "
                                           r"classifier\.bias\): load with strict=False"):
        load_weight_file(small_imagenet_densenet(), tmp_path / "backbone.pth")
    # ... and a wrapper whose name is one of ours is removed only when that makes the keys match
    torch.save({f"features.{k}": v for k, v in source.state_dict().items()}, tmp_path / "features.pth")
    model = small_imagenet_densenet()
    assert load_weight_file(model, tmp_path / "features.pth").renamed == ["removed prefix 'features.'"]
    assert same_outputs(model, source)


@pytest.mark.skipif(not hasattr(torch.serialization, "safe_globals"), reason="torch < 2.5 cannot allow argparse.Namespace")
def test_timm_training_checkpoint(tmp_path):
    """timm's DenseNet state dict has torchvision's names (its global_pool and BatchNormAct2d hold no other
    parameters); its train.py saves {"state_dict", "state_dict_ema", "optimizer", "args": Namespace, ...}."""
    source = randomise_bn(small_imagenet_densenet(), seed=1)
    ema = randomise_bn(small_imagenet_densenet(), seed=2)
    torch.save({"epoch": 3, "arch": "densenet121", "state_dict": source.state_dict(), "state_dict_ema": ema.state_dict(),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, "version": 2,
                "args": argparse.Namespace(model="densenet121", lr=0.1, epochs=3, mean=None)},
               tmp_path / "model_best.pth.tar")
    model = small_imagenet_densenet()
    report = load_weight_file(model, tmp_path / "model_best.pth.tar")
    assert report.renamed == ["weights taken from checkpoint['state_dict'] (the file also holds 'state_dict_ema')"]
    assert same_outputs(model, source)
    # timm's cleaned checkpoint (clean_checkpoint.py): the bare state dict, loaded as named
    torch.save(ema.state_dict(), tmp_path / "densenet121-clean.pth")
    report = load_weight_file(model, tmp_path / "densenet121-clean.pth")
    assert report.renamed == [] and report.dropped == [] and str(report).endswith("names as in the model")
    assert same_outputs(model, ema)


def test_monai_2d_state_dict(tmp_path):
    source = randomise_bn(small_imagenet_densenet(num_classes=4))
    state = monai_keys(source.state_dict())
    assert "features.denseblock1.denselayer1.layers.norm1.weight" in state and "class_layers.out.bias" in state
    assert "features.transition1.conv.weight" in state  # transitions keep their names
    torch.save(state, tmp_path / "monai.pt")
    model = small_imagenet_densenet(num_classes=4)
    report = load_weight_file(model, tmp_path / "monai.pt")
    renamed_keys = sum(k != n for k, n in zip(state, source.state_dict()))
    assert report.renamed == [f"MONAI names: {renamed_keys} keys (denselayerL.layers.* -> denselayerL.*, "
                              "class_layers.out -> classifier)"]
    assert same_outputs(model, source)


def test_monai_3d_state_dict_is_refused_naming_the_tensor(tmp_path):
    source = small_imagenet_densenet(num_classes=4)
    state = {k: v.unsqueeze(-1).expand(*v.shape, v.shape[-1]).clone() if v.dim() == 4 else v
             for k, v in monai_keys(source.state_dict()).items()}
    torch.save(state, tmp_path / "monai3d.pt")
    for strict in (True, False):
        with pytest.raises(WeightsError, match=r"monai3d\.pt: the state dict holds 3-D convolutions .*this DenseNet is "
                                               r"2-D; create the model with spatial_dims=3: shape mismatch: "
                                               r"features\.conv0\.weight: file \(16, 3, 7, 7, 7\) vs "
                                               r"model \(16, 3, 7, 7\); features\.denseblock1\.denselayer1\.conv1\.weight "
                                               r"\(features\.denseblock1\.denselayer1\.layers\.conv1\.weight in the file\)"):
            load_weight_file(small_imagenet_densenet(num_classes=4), tmp_path / "monai3d.pt", strict=strict)


def test_another_architecture_from_a_file_names_the_difference(tmp_path):
    torch.save({"state_dict": {f"module.{k}": v for k, v in create_model("densenet_bc40_k16").state_dict().items()}},
               tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"other\.pth: the state dict is from a different architecture than the model "
                                           r"\(growth_rate=12.*missing: features\.denseblock1\.denselayer7.*"
                                           r"\| shape mismatch: features\.conv0\.weight: file \(32, 3, 3, 3\)"):
        load_weight_file(create_model("densenet_bc100_k12"), tmp_path / "other.pth", strict=False)


def test_head_of_another_structure_and_ambiguous_names():
    source = small_imagenet_densenet()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.")}
    mlp = {"classifier.0.weight": torch.zeros(32, 40), "classifier.0.bias": torch.zeros(32),
           "classifier.2.weight": torch.zeros(5, 32), "classifier.2.bias": torch.zeros(5)}
    report = load_state_dict(small_imagenet_densenet(), state | mlp, strict=False)
    assert report.dropped == [
        "classifier.weight, classifier.bias: not in the file, the model's freshly initialised classifier is kept",
        "classifier.0.weight, classifier.0.bias, classifier.2.weight, classifier.2.bias: a head of another structure, "
        "not loaded",
    ]
    with pytest.raises(WeightsError, match=r"the file has no classifier for the model \(missing: classifier\.weight; "
                                           r"classifier\.bias \| unexpected: classifier\.0\.weight"):
        load_state_dict(small_imagenet_densenet(), state | mlp)
    both = source.state_dict() | legacy_keys({k: v for k, v in source.state_dict().items() if "denselayer1.norm1" in k})
    with pytest.raises(WeightsError, match=r"both 'features\.denseblock1\.denselayer1\.norm1\.weight' and "
                                           r"'features\.denseblock1\.denselayer1\.norm\.1\.weight'"):
        load_state_dict(small_imagenet_densenet(), both)


def test_load_report_text():
    assert str(LoadReport(loaded=3)) == "loaded 3 tensors, names as in the model"
    assert str(LoadReport(loaded=3, renamed=["removed prefix 'module.'", "classifier.0 -> classifier"],
                          dropped=["classifier.weight: kept"])) == (
        "loaded 3 tensors; renamed: removed prefix 'module.'; classifier.0 -> classifier; not loaded: classifier.weight: kept")


# ----------------------------------------------------------------------------------- small models, every rule (issue #20)
def tiny(num_classes: int = 5, **kw) -> nn.Module:
    from densenet import DenseNet

    return DenseNet(growth_rate=4, block_config=(2, 2), num_classes=num_classes, **kw)


def test_legacy_names_are_renamed_and_nothing_else():
    from densenet.models.weights import from_torchvision_state_dict

    t = torch.zeros(1)
    state = {"features.denseblock1.denselayer1.norm.1.weight": t, "features.denseblock1.denselayer1.conv.2.weight": t,
             "features.denseblock2.denselayer12.norm.2.running_var": t, "features.denseblock1.denselayer1.relu.1.bias": t,
             "features.norm.1.weight": t, "features.denseblock1.denselayer1.norm.3.weight": t,
             "features.denseblock1.denselayer2.conv1.weight": t, "features.denseblock1.denselayer1.norm.1.num_batches_tracked": t}
    assert list(from_torchvision_state_dict(state)) == [
        "features.denseblock1.denselayer1.norm1.weight", "features.denseblock1.denselayer1.conv2.weight",
        "features.denseblock2.denselayer12.norm2.running_var", "features.denseblock1.denselayer1.relu1.bias",
        "features.norm.1.weight", "features.denseblock1.denselayer1.norm.3.weight",
        "features.denseblock1.denselayer2.conv1.weight", "features.denseblock1.denselayer1.norm.1.num_batches_tracked"]


def test_wrappers_and_prefixes_are_removed_only_where_they_are(tmp_path):
    from densenet.models.weights import unwrap_state_dict

    w = {"a.weight": torch.ones(1), "b.bias": torch.zeros(1)}
    for key in ["state_dict", "model", "model_state", "model_state_dict", "ema"]:
        assert unwrap_state_dict({"epoch": 1, key: w}) == w
        assert unwrap_state_dict({key: {"model": {f"module.{k}": v for k, v in w.items()}}}) == w
    assert unwrap_state_dict({"model": "resnet", "state_dict": w}) == w  # a wrapper key whose value is no mapping
    mixed = {"module.a.weight": torch.ones(1), "b.bias": torch.zeros(1)}
    assert unwrap_state_dict(mixed) == mixed  # a prefix on only some keys stays
    assert unwrap_state_dict({"module.module.x": torch.ones(1)}) == {"module.x": torch.ones(1)}
    for bad in [{}, [torch.ones(1)], {"a": 1}, {"a": torch.ones(1), "b": [1]}, {"model": {}}]:
        with pytest.raises(WeightsError, match="^here does not hold a state dict"):
            unwrap_state_dict(bad, "here")
    torch.save({"model": {"module.a.weight": torch.ones(2)}}, tmp_path / "c.pt")
    assert list(read_state_dict(tmp_path / "c.pt")) == ["a.weight"]


def test_a_damaged_checkpoint_of_this_project_is_refused_as_weights(tmp_path):
    from densenet.io.checkpoint import save_checkpoint

    model = tiny()
    save_checkpoint(tmp_path / "c.pt", {"config": {}, "model": model.state_dict(), "step": 3})
    assert read_state_dict(tmp_path / "c.pt").keys() == model.state_dict().keys()
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    raw["step"] = 4
    torch.save(raw, tmp_path / "changed.pt")
    with pytest.raises(WeightsError, match=r"changed.pt is corrupted: its content does not match the SHA-256 digest"):
        read_state_dict(tmp_path / "changed.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(WeightsError, match="bad.safetensors is not a readable safetensors file"):
        read_state_dict(tmp_path / "bad.safetensors")
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(WeightsError, match="weight file not found"):
        read_state_dict(tmp_path / "folder.pth")


def test_to_torchvision_gives_detached_copies():
    model = tiny()
    state = to_torchvision_state_dict(model)
    assert list(state) == list(model.state_dict())
    weight = model.features.conv0.weight
    assert not state["features.conv0.weight"].requires_grad
    assert torch.equal(state["features.conv0.weight"], weight)
    state["features.conv0.weight"].add_(1)
    assert not torch.equal(state["features.conv0.weight"], weight)


def test_loading_checks_every_key_and_shape_and_lists_at_most_five():
    source = tiny()
    randomise_bn(source)
    state = source.state_dict()
    target = tiny()
    load_state_dict(target, state)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), state.values()))
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # PyTorch < 0.4.1
    load_state_dict(tiny(), old)
    norms = sorted(k for k in state if k.endswith(".running_mean"))
    with pytest.raises(WeightsError) as raised:
        load_state_dict(tiny(), {k: v for k, v in state.items() if k not in norms})
    message = str(raised.value)
    assert message.count("running_mean") == 5 and f"({len(norms)} in all)" in message and len(norms) > 5
    assert "unexpected" not in message and "shape mismatch" not in message
    with pytest.raises(WeightsError) as raised:
        load_state_dict(tiny(), {k: v for k, v in state.items() if k not in norms[:5]})
    assert "in all" not in str(raised.value) and all(n in str(raised.value) for n in norms[:5])
    with pytest.raises(WeightsError) as raised:
        load_state_dict(tiny(), {k: v for k, v in state.items() if k != norms[0]})
    assert "in all" not in str(raised.value) and f"missing: {norms[0]}" in str(raised.value)
    with pytest.raises(WeightsError, match=r"unexpected: extra\.weight$"):
        load_state_dict(tiny(), {**state, "extra.weight": torch.ones(1)})
    with pytest.raises(WeightsError, match=r"shape mismatch: classifier\.weight: file \(5, \d+\) vs model \(7, \d+\)"):
        load_state_dict(tiny(num_classes=7), state)


def test_non_strict_loading_forgives_only_the_classifier():
    source = tiny()
    state = source.state_dict()
    target = tiny(num_classes=7)
    head = target.classifier.weight.clone()
    load_state_dict(target, state, strict=False)  # another class count: the head stays as initialised
    assert torch.equal(target.classifier.weight, head) and torch.equal(target.features.conv0.weight, source.features.conv0.weight)
    target = tiny()
    load_state_dict(target, state, strict=False)  # the same class count: the head is loaded too
    assert torch.equal(target.classifier.weight, source.classifier.weight)
    assert torch.equal(target.classifier.bias, source.classifier.bias)
    target = tiny()
    load_state_dict(target, {k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=False)
    with pytest.raises(WeightsError, match="missing: features.conv0.weight"):
        load_state_dict(tiny(), {k: v for k, v in state.items() if k != "features.conv0.weight"}, strict=False)
    with pytest.raises(WeightsError, match=r"unexpected: extra"):
        load_state_dict(tiny(), {**state, "extra": torch.ones(1)}, strict=False)
    with pytest.raises(WeightsError, match=r"shape mismatch: features\.conv0\.weight"):
        load_state_dict(tiny(stem="imagenet"), state, strict=False)


def test_only_the_safetensors_suffix_selects_safetensors(tmp_path):
    state = tiny().state_dict()
    for name in ["w.weights", "w.tv", "w.zip", "w.pth", "w"]:  # suffixes sorting before and after ".safetensors"
        torch.save(state, tmp_path / name)
        assert read_state_dict(tmp_path / name).keys() == state.keys(), name


def test_load_torchvision_weights_is_strict_unless_told(tmp_path):
    from densenet.models.weights import load_torchvision_weights

    source = tiny()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"shape mismatch: classifier\.weight"):
        load_torchvision_weights(tiny(num_classes=7), tmp_path / "w.pth")
    model = load_torchvision_weights(tiny(num_classes=7), tmp_path / "w.pth", strict=False)
    assert torch.equal(model.features.conv0.weight, source.features.conv0.weight)


def test_rgb_weights_load_into_a_greyscale_model_with_the_first_convolution_summed(tmp_path):
    torch.manual_seed(0)
    rgb = torchvision.models.densenet121(weights=None).eval()
    torch.save(rgb.state_dict(), tmp_path / "densenet121.pth")
    grey = create_model("densenet121", in_channels=1).eval()
    report = load_weight_file(grey, tmp_path / "densenet121.pth")
    assert any("summed over its 3 input channels" in r for r in report.renamed)
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():  # a grey image gives what the RGB model gives for it in all three channels (float32
        # weights summed in float32: equal to rounding)
        assert torch.allclose(grey.double()(x), rgb.double()(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-6)
    with pytest.raises(WeightsError, match="conv0"):  # two channels: no rule, still a mismatch naming the layer
        load_weight_file(create_model("densenet121", in_channels=2), tmp_path / "densenet121.pth")
