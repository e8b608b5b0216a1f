"""The hand-written AVX-512 kernels (densenet.models.cpu_kernels): each against the same arithmetic in
PyTorch (float32 inside, one rounding to bfloat16), on strided matrices whose widths leave a tail of a
vector; a bfloat16 training step through them against the eager kernels; and the fallbacks."""
from __future__ import annotations

import warnings

import pytest
import torch

from densenet import create_model
from densenet.models import cpu_kernels, fused

pytestmark = pytest.mark.skipif(not (fused._compiler_found() and torch.cpu._is_avx512_bf16_supported()),
                                reason="the kernels need a C++ compiler and a CPU with AVX512_BF16")


@pytest.fixture
def hand():
    cpu_kernels.set_enabled(True)
    yield
    cpu_kernels.set_enabled(None)


def _strided(m: int, c: int, seed: int, width: int = 70) -> torch.Tensor:
    """An (m, c) bfloat16 slice of a wider buffer: rows ``width`` apart, as a block's prefix."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, width, generator=g).bfloat16()[:, 3:3 + c]


@pytest.mark.parametrize("c", [12, 16, 33])
def test_bn_relu_rounds_once_like_pytorch(hand, c):
    x = _strided(301, c, 0)
    scale, shift = torch.randn(c).bfloat16(), torch.randn(c).bfloat16()
    out = torch.full((301, c), 7.0, dtype=torch.bfloat16)
    assert cpu_kernels.bn_relu(x, scale, shift, out) is out
    expected = torch.relu(x.float() * scale.float() + shift.float()).bfloat16()
    assert torch.equal(out, expected)


def test_normalise_rounds_once_like_pytorch(hand):
    x = _strided(300, 33, 8)
    offset, invstd = torch.randn(33) * 0.1, torch.rand(33) + 0.5
    out = torch.empty(300, 33, dtype=torch.bfloat16)
    assert cpu_kernels.normalise(x, offset, invstd, out) is out
    assert torch.equal(out, ((x.float() - offset) * invstd).bfloat16())


@pytest.mark.parametrize("with_xhat", [False, True])
@pytest.mark.parametrize("c", [12, 33])
def test_bn_relu_backward_against_pytorch(hand, c, with_xhat):
    m = 257
    g_t, t, prefix = _strided(m, c, 1), _strided(m, c, 2), _strided(m, c, 3)
    offset, invstd, weight = torch.randn(c) * 0.1, torch.rand(c) + 0.5, torch.randn(c)
    xhat = ((prefix.float() - offset) * invstd).bfloat16() if with_xhat else None
    gw = _strided(m, c, 4, width=50)
    before = gw.clone()
    g_bias, g_weight = cpu_kernels.bn_relu_backward(g_t, t, xhat, prefix, offset, invstd, gw, weight, torch.float32)
    g_a = torch.where(t > 0, g_t.float(), 0.0)
    x = xhat.float() if with_xhat else (prefix.float() - offset) * invstd
    assert torch.equal(gw, (before.float() + g_a * weight.bfloat16().float()).bfloat16())
    torch.testing.assert_close(g_bias, g_a.double().sum(0).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_weight, (g_a.double() * x.double()).sum(0).float(), rtol=1e-5, atol=1e-4)


def test_bn_input_backward_against_pytorch(hand):
    m, c = 1000, 12
    gy, xhat, direct = _strided(m, c, 5), _strided(m, c, 6), _strided(m, c, 7)
    invstd = torch.rand(c) + 0.5
    got = cpu_kernels.bn_input_backward(gy, xhat, invstd, direct, m)
    g, x = gy.double(), xhat.double()
    exact = (g - g.mean(0) - x * (g * x).mean(0)) * invstd.double() + direct.double()
    assert got.shape == (m, c) and got.is_contiguous() and got.dtype == torch.bfloat16
    # one rounding to bfloat16 (8 bits): within half a unit in the last place, plus float32 sums
    assert ((got.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-5).all()


def test_bn_relu_train_backward_against_pytorch(hand):
    m, c = 999, 20
    g_r, r, z = (_strided(m, c, s).contiguous() for s in (9, 10, 11))  # (M, C) rows of channels_last maps
    mean, invstd, weight = torch.randn(c) * 0.1, torch.rand(c) + 0.5, torch.randn(c)
    g_z, g_w, g_b = cpu_kernels.bn_relu_train_backward(g_r, r, z, mean, invstd, weight)
    g_u = torch.where(r > 0, g_r.double(), 0.0)
    zhat = (z.double() - mean.double()) * invstd.double()
    exact_b, exact_w = g_u.sum(0), (g_u * zhat).sum(0)
    torch.testing.assert_close(g_b, exact_b.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_w, exact_w.float(), rtol=1e-5, atol=1e-4)
    exact = (g_u - exact_b / m - zhat * exact_w / m) * (invstd.double() * weight.double())
    assert g_z.shape == (m, c) and g_z.dtype == torch.bfloat16
    assert ((g_z.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-5).all()


def test_they_decline_what_they_do_not_handle(hand):
    x = torch.randn(64, 12)
    out = torch.empty_like(x)
    assert cpu_kernels.bn_relu(x, torch.ones(12), torch.zeros(12), out) is None  # float32
    xb = x.bfloat16()
    assert cpu_kernels.bn_relu(xb.t(), torch.ones(64), torch.zeros(64), xb.t().clone()) is None  # channel stride
    cpu_kernels.set_enabled(False)
    assert cpu_kernels.bn_relu(xb, torch.ones(12), torch.zeros(12), xb.clone()) is None


def test_a_failed_build_warns_once_and_leaves_inductor_in_charge(hand, monkeypatch):
    monkeypatch.setitem(cpu_kernels._SIGNATURES, "bn_relu", ("this is not C++", ["int64_t"]))
    monkeypatch.setitem(cpu_kernels._state, "kernels", {})
    monkeypatch.setitem(cpu_kernels._state, "broken", False)
    xb = torch.randn(64, 12).bfloat16()
    with pytest.warns(RuntimeWarning, match="DENSENET_CPU_KERNELS=0"):
        assert cpu_kernels.bn_relu(xb, torch.ones(12), torch.zeros(12), xb.clone()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.bn_relu(xb, torch.ones(12), torch.zeros(12), xb.clone()) is None


@pytest.mark.slow  # compiles Inductor's kernels for the comparison (about a minute on 2 cores)
def test_a_bf16_training_step_through_them_matches_inductors_kernels(monkeypatch):
    """bfloat16 gradients of a small batch are far from float32's either way (tens of percent on some
    parameters, eager or compiled), so the reference is the same step through Inductor's kernels."""
    monkeypatch.setattr(fused, "MIN_NUMEL", 0)
    torch.manual_seed(0)
    model = create_model("densenet_bc40_k12", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1, 4, 7, 2])
    grads = []
    for hand in (False, True):
        fused.set_enabled(True)
        cpu_kernels.set_enabled(hand)
        calls = []
        monkeypatch.setattr(cpu_kernels, "_kernel", _counting(cpu_kernels._kernel, calls))
        try:
            model.zero_grad()
            with torch.autocast("cpu", torch.bfloat16):
                torch.nn.functional.cross_entropy(model(x), y).backward()
        finally:
            fused.set_enabled(None)
            cpu_kernels.set_enabled(None)
        assert bool(calls) == hand
        grads.append([p.grad.clone() for p in model.parameters()])
    for e, g in zip(*grads):  # measured: 0.2% at most (2026-12-06)
        assert (g - e).norm() <= 0.02 * e.norm() + 1e-6


def _counting(fn, calls):
    def wrapped(name):
        calls.append(name)
        return fn(name)
    return wrapped
