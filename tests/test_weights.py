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
