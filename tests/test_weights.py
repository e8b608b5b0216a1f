"""Weight files: torchvision round trip (legacy keys included), safe reading, clear mismatches."""
import pickle
import re

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from densenet import (
    WeightsError,
    create_model,
    load_state_dict,
    load_torchvision_weights,
    read_state_dict,
    to_torchvision_state_dict,
)

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
