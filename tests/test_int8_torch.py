"""densenet.serving.int8: BN-ReLU of stored uint8 maps as a clamp, every kind of DenseNet against its
float32 outputs, save and load, and the refusals."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from densenet import DenseNet, create_model
from densenet.errors import DenseNetError
from densenet.serving import int8 as int8_module
from densenet.serving.int8 import _fold_bn_relu, _weight_int8, is_int8_file, load_int8, quantize_densenet, save_int8

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def test_bn_relu_of_stored_maps_is_a_clamp_and_a_scale_within_half_a_step():
    torch.manual_seed(0)
    c = 64
    a = torch.randn(c, dtype=torch.float64)
    a[:4] = 0  # a flat channel: ReLU(b) whatever the map
    b = torch.randn(c, dtype=torch.float64) * 3
    scale = torch.rand(c, dtype=torch.float64) * 0.1 + 0.01
    zero = torch.randint(0, 256, (c,)).double()
    A, B, lo, hi = _fold_bn_relu(a, b, scale, zero)
    q = torch.arange(256, dtype=torch.float64).view(-1, 1).expand(-1, c)  # every storable value of every channel
    exact = torch.relu(a * scale * (q - zero) + b)
    folded = A * torch.clamp(q, lo.double(), hi.double()) + B
    assert torch.all((folded - exact).abs() <= (a * scale).abs() / 2 + 1e-9)
    assert torch.equal(folded[:, :4], exact[:, :4])


def _randomise_bn(model: DenseNet, seed: int = 0) -> DenseNet:
    """Trained-looking BN: scales of both signs, shifts, running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.randn(n, generator=g) * 0.5 + 0.3
            m.bias.data = torch.randn(n, generator=g) * 0.3
            m.running_mean = torch.randn(n, generator=g) * 0.5
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model.eval()


@pytest.mark.parametrize("name, kwargs, side", [
    ("densenet_bc40_k12", {}, 32),                       # CIFAR stem, bottleneck, compression
    ("densenet_bc40_k12", {}, 27),                       # odd sides: transitions drop the last row
    ("densenet40_k12", {}, 32),                          # no bottleneck: 3x3 convolutions on the prefix
    ("densenet121", {"num_classes": 7}, 64),             # ImageNet stem: conv-BN-ReLU, max pool on uint8
])
def test_int8_follows_float32_on_every_kind_of_densenet(name, kwargs, side):
    torch.manual_seed(0)
    model = _randomise_bn(create_model(name, num_classes=kwargs.get("num_classes", 10)))
    x = torch.randn(48, 3, side, side)
    int8 = quantize_densenet(model, x[:32])
    with torch.no_grad():
        expected = model(x[32:])
    got = int8(x[32:])
    assert got.shape == expected.shape and got.dtype == torch.float32
    error = (got - expected).norm() / expected.norm()
    assert error < 0.06, f"relative error {error:.3f}"  # 0.011-0.030 measured
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9


def test_no_two_neighbouring_input_channels_can_pass_the_int16_bound_of_cpus_without_vnni():
    torch.manual_seed(0)
    w = torch.randn(16, 37, 3, 3, dtype=torch.float64)  # an odd number of input channels: the last pairs with 0
    x_max = torch.randint(0, 256, (37,)).double()
    q, scale = _weight_int8(w, x_max)
    products = F.pad(q.double().abs() * x_max.view(1, -1, 1, 1), (0, 0, 0, 0, 0, 1))
    assert products.view(16, 19, 2, 3, 3).sum(2).max() <= 32767
    assert torch.allclose(q.double() * scale.double().view(-1, 1, 1, 1), w, atol=float(scale.max()) / 2 + 1e-6)
    small, plain = _weight_int8(w, torch.ones(37, dtype=torch.float64)), _weight_int8(w)
    assert torch.equal(small[0], plain[0])  # small inputs: the plain per-channel scales
    assert plain[0].abs().amax((1, 2, 3)).eq(127).all()


@pytest.mark.parametrize("name", ["densenet40_k12", "densenet_bc40_k12"])
def test_onednn_computes_every_int8_convolution_exactly_on_this_cpu(name, monkeypatch):
    """Each convolution's output against float64 arithmetic on the same integers: on a CPU without VNNI
    (AVX2) a saturated int16 pair shows as levels off (up to 255 before version 2)."""
    torch.manual_seed(0)
    model = _randomise_bn(create_model(name, num_classes=10))
    x = torch.randn(24, 3, 16, 16)
    int8 = quantize_densenet(model, x[:16])
    onednn, worst = type(int8)._conv, {}

    def checked(self, conv, q):
        out = onednn(self, conv, q)
        c, t = self.plan["convs"][conv], self.tensors
        w = t[f"{conv}.weight"].double() * t[f"{conv}.w_scale"].double().view(-1, 1, 1, 1)
        exact = F.conv2d((q.double() - c["x_zero_point"]) * c["x_scale"], w, t[f"{conv}.bias"].double(),
                         stride=c["stride"], padding=c["padding"])
        if c["relu"]:
            exact = exact.clamp(min=0)
        if c["float_out"]:  # float output plus the taps' shift, then stored
            exact = exact + self._bias_map(conv, exact.shape[-2], exact.shape[-1]).double()
        worst[conv] = float((out.double() - exact.round().clamp(0, 255)).abs().max())
        return out

    monkeypatch.setattr(type(int8), "_conv", checked)
    int8(x[16:])
    assert len(worst) == 39 and max(worst.values()) <= 1, {k: v for k, v in worst.items() if v > 1}


def test_version_1_files_still_load_and_follow_float32():
    """A file written by the first int8 format (no shift in the clamp), kept in tests/data with its
    images, the logits it gave then (Zen 3, 2026-12-07) and the float model's."""
    data = Path(__file__).parent / "data"
    expected = load_file(str(data / "int8-v1-tiny.expected.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = load_int8(data / "int8-v1-tiny.safetensors")
    assert not model.plan.get("clamp_shift") and info["class_names"] == ["a", "b", "c"]
    assert any("older densenet" in str(w.message) for w in caught) == (not int8_module._int8_dot_products())
    got, reference = model(expected["images"]), expected["float32_logits"]
    assert (got - reference).norm() / reference.norm() < 0.06
    assert (got - expected["logits"]).norm() / reference.norm() < 0.03


def test_save_and_load_give_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = _randomise_bn(create_model("densenet_bc40_k12", num_classes=10))
    x = torch.randn(16, 3, 32, 32)
    int8 = quantize_densenet(model, x)
    path = tmp_path / "m.int8.safetensors"
    data = {"class_names": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    size = save_int8(int8, path, data)
    assert size == path.stat().st_size and is_int8_file(path)
    loaded, info = load_int8(path)
    assert info == data
    assert torch.equal(loaded(x), int8(x))
    assert load_int8(path, image_size=40)[1]["image_size"] == 40


def test_refusals_name_the_problem(tmp_path):
    model = create_model("densenet_bc40_k12", num_classes=10).eval()
    int8 = quantize_densenet(model, torch.randn(8, 3, 32, 32))
    with pytest.raises(DenseNetError, match=r"\(N, 3, H, W\)"):
        int8(torch.randn(2, 1, 32, 32))
    with pytest.raises(DenseNetError, match="num_classes"):
        quantize_densenet(create_model("densenet_bc40_k12", num_classes=0), torch.randn(8, 3, 32, 32))
    with pytest.raises(DenseNetError, match="2-D"):
        quantize_densenet(create_model("densenet_bc40_k12", num_classes=10, spatial_dims=3), torch.randn(8, 3, 8, 8, 8))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(other))
    assert not is_int8_file(other)
    with pytest.raises(DenseNetError, match="not an int8 DenseNet file"):
        load_int8(other)
    with pytest.raises(DenseNetError, match="no int8 model file"):
        load_int8(tmp_path / "missing.int8.safetensors")


def test_quantizing_leaves_the_float_model_alone():
    model = create_model("densenet_bc40_k12", num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_densenet(model, torch.randn(8, 3, 32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
