"""The hand-written CPU kernels (densenet.models.cpu_kernels), each against the same arithmetic in PyTorch
on strided matrices whose widths leave a tail of a vector: the AVX-512 ones for bfloat16 (float32 inside,
one rounding to bfloat16), the AVX2 ones for float32 (PyTorch's eager chain); a training step through
them against the other kernels; and the fallbacks."""
from __future__ import annotations

import warnings

import pytest
import torch

from densenet import create_model
from densenet.models import cpu_kernels, fused

pytestmark = pytest.mark.skipif(not fused._compiler_found(), reason="the kernels need a C++ compiler")
bf16_cpu = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="the bfloat16 kernels need AVX512_BF16")
avx2_cpu = pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="the float32 kernels need AVX2")


@pytest.fixture
def hand():
    cpu_kernels.set_enabled(True)
    yield
    cpu_kernels.set_enabled(None)


def _strided(m: int, c: int, seed: int, width: int = 70) -> torch.Tensor:
    """An (m, c) bfloat16 slice of a wider buffer: rows ``width`` apart, as a block's prefix."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, width, generator=g).bfloat16()[:, 3:3 + c]


def _bn_input_exact(gy: torch.Tensor, xhat: torch.Tensor, invstd: torch.Tensor, direct: torch.Tensor) -> torch.Tensor:
    """The BatchNorm input gradient of bn_input_backward, in float64 (batch statistics over the rows)."""
    g, x = gy.double(), xhat.double()
    return (g - g.mean(0) - x * (g * x).mean(0)) * invstd.double() + direct.double()


def _bn2_backward_exact(g_r, r, z, mean, invstd, weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gradient of z, of the BN weight, of its bias) of r = relu(BN(z)), in float64."""
    m = z.shape[0]
    g_u = torch.where(r > 0, g_r.double(), 0.0)
    zhat = (z.double() - mean.double()) * invstd.double()
    g_b, g_w = g_u.sum(0), (g_u * zhat).sum(0)
    return (g_u - g_b / m - zhat * g_w / m) * (invstd.double() * weight.double()), g_w, g_b


@bf16_cpu
@pytest.mark.parametrize("c", [12, 16, 33])
def test_bn_relu_rounds_once_like_pytorch(hand, c):
    x = _strided(301, c, 0)
    scale, shift = torch.randn(c).bfloat16(), torch.randn(c).bfloat16()
    out = torch.full((301, c), 7.0, dtype=torch.bfloat16)
    assert cpu_kernels.bn_relu(x, scale, shift, out) is out
    expected = torch.relu(x.float() * scale.float() + shift.float()).bfloat16()
    assert torch.equal(out, expected)


@bf16_cpu
def test_normalise_rounds_once_like_pytorch(hand):
    x = _strided(300, 33, 8)
    offset, invstd = torch.randn(33) * 0.1, torch.rand(33) + 0.5
    out = torch.empty(300, 33, dtype=torch.bfloat16)
    assert cpu_kernels.normalise(x, offset, invstd, out) is out
    assert torch.equal(out, ((x.float() - offset) * invstd).bfloat16())


@bf16_cpu
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


@bf16_cpu
def test_bn_input_backward_against_pytorch(hand):
    m, c = 1000, 12
    gy, xhat, direct = _strided(m, c, 5), _strided(m, c, 6), _strided(m, c, 7)
    invstd = torch.rand(c) + 0.5
    got = cpu_kernels.bn_input_backward(gy, xhat, invstd, direct, m)
    exact = _bn_input_exact(gy, xhat, invstd, direct)
    assert got.shape == (m, c) and got.is_contiguous() and got.dtype == torch.bfloat16
    # one rounding to bfloat16 (8 bits): within half a unit in the last place, plus float32 sums
    assert ((got.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-5).all()


@bf16_cpu
def test_bn_relu_train_backward_against_pytorch(hand):
    m, c = 999, 20
    g_r, r, z = (_strided(m, c, s).contiguous() for s in (9, 10, 11))  # (M, C) rows of channels_last maps
    mean, invstd, weight = torch.randn(c) * 0.1, torch.rand(c) + 0.5, torch.randn(c)
    g_z, g_w, g_b = cpu_kernels.bn_relu_train_backward(g_r, r, z, mean, invstd, weight)
    exact, exact_w, exact_b = _bn2_backward_exact(g_r, r, z, mean, invstd, weight)
    torch.testing.assert_close(g_b, exact_b.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_w, exact_w.float(), rtol=1e-5, atol=1e-4)
    assert g_z.shape == (m, c) and g_z.dtype == torch.bfloat16
    assert ((g_z.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-5).all()


@avx2_cpu
def test_they_decline_what_they_do_not_handle(hand):
    x = torch.randn(64, 12)
    assert cpu_kernels.bn_relu(x.double(), torch.ones(12), torch.zeros(12), x.double()) is None  # float64
    assert cpu_kernels.bn_relu(x.half(), torch.ones(12), torch.zeros(12), x.half()) is None  # float16
    assert cpu_kernels.bn_relu(x, torch.ones(12), torch.zeros(12), x.double()) is None  # mixed dtypes
    assert cpu_kernels.bn_relu(x.t(), torch.ones(64), torch.zeros(64), x.t().clone()) is None  # channel stride
    assert cpu_kernels.bn_relu(x, torch.ones(12), torch.zeros(12), torch.empty(63, 12)) is None  # shapes
    if not torch.cpu._is_avx512_bf16_supported():
        assert cpu_kernels.bn_relu(x.bfloat16(), torch.ones(12), torch.zeros(12), x.bfloat16()) is None
    cpu_kernels.set_enabled(False)
    assert cpu_kernels.bn_relu(x, torch.ones(12), torch.zeros(12), torch.empty_like(x)) is None
    assert cpu_kernels.bn_relu(x, torch.ones(12), torch.zeros(12), torch.empty_like(x)) is None


@avx2_cpu
def test_a_failed_build_warns_once_and_leaves_the_other_kernels_in_charge(hand, monkeypatch):
    ctype, cpu, sources = cpu_kernels._SOURCES[torch.float32]
    monkeypatch.setitem(cpu_kernels._SOURCES, torch.float32, (ctype, cpu, {**sources, "bn_relu": "this is not C++"}))
    monkeypatch.setitem(cpu_kernels._state, "kernels", {})
    monkeypatch.setitem(cpu_kernels._state, "broken", set())
    monkeypatch.setattr(fused, "MIN_NUMEL", 0)
    fused.set_enabled(True)
    x, scale, shift = torch.randn(64, 12), torch.randn(12), torch.randn(12)
    try:
        with pytest.warns(RuntimeWarning, match="DENSENET_CPU_KERNELS=0"):
            assert cpu_kernels.bn_relu(x, scale, shift, torch.empty_like(x)) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpu_kernels.bn_relu(x, scale, shift, torch.empty_like(x)) is None
            assert torch.equal(fused.bn_relu(x, scale, shift), torch.addcmul(shift, x, scale).relu_())  # eagerly
    finally:
        fused.set_enabled(None)


def _strided32(m: int, c: int, seed: int, width: int = 70) -> torch.Tensor:
    """An (m, c) float32 slice of a wider buffer, as a block's prefix."""
    return torch.randn(m, width, generator=torch.Generator().manual_seed(seed))[:, 3:3 + c]


@avx2_cpu
@pytest.mark.parametrize("c", [5, 12, 16, 33])
def test_float32_bn_relu_and_normalise_are_pytorchs_bit_for_bit(hand, c):
    x = _strided32(301, c, 0)
    x[7, 0], x[8, -1] = float("nan"), float("-inf")
    scale, shift = torch.randn(c), torch.randn(c)
    out = torch.full((301, c), 7.0)
    assert cpu_kernels.bn_relu(x, scale, shift, out) is out
    torch.testing.assert_close(out, torch.addcmul(shift, x, scale).relu_(), rtol=0, atol=0, equal_nan=True)
    assert out[7, 0].isnan()  # a NaN goes on, as through torch.relu
    offset, invstd = torch.randn(c) * 0.1, torch.rand(c) + 0.5
    wide = torch.full((301, c + 9), 7.0)
    assert cpu_kernels.normalise(x, offset, invstd, wide[:, :c]) is not None
    torch.testing.assert_close(wide[:, :c], torch.sub(x, offset).mul_(invstd), rtol=0, atol=0, equal_nan=True)
    assert (wide[:, c:] == 7.0).all()  # nothing written past the slice


@avx2_cpu
@pytest.mark.parametrize("with_xhat", [False, True])
@pytest.mark.parametrize("c", [12, 33])
def test_float32_bn_relu_backward_against_pytorch(hand, c, with_xhat):
    m = 1001
    g_t, t, prefix = _strided32(m, c, 1), _strided32(m, c, 2), _strided32(m, c, 3)
    offset, invstd, weight = torch.randn(c) * 0.1, torch.rand(c) + 0.5, torch.randn(c)
    xhat = (prefix - offset) * invstd if with_xhat else None
    gw = _strided32(m, c, 4, width=50)
    before = gw.clone()
    g_bias, g_weight = cpu_kernels.bn_relu_backward(g_t, t, xhat, prefix, offset, invstd, gw, weight, torch.float32)
    g_a = torch.where(t > 0, g_t, 0.0)
    assert torch.equal(gw, before.addcmul(g_a, weight))  # the accumulated gradient: addcmul_'s one rounding
    x = ((prefix - offset) * invstd).double()
    torch.testing.assert_close(g_bias, g_a.double().sum(0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_weight, (g_a.double() * x).sum(0).float(), rtol=1e-5, atol=1e-5)


@avx2_cpu
def test_float32_bn_input_and_bn2_backward_against_float64(hand):
    m, c = 1000, 12
    gy, xhat, direct = _strided32(m, c, 5), _strided32(m, c, 6), _strided32(m, c, 7)
    invstd = torch.rand(c) + 0.5
    got = cpu_kernels.bn_input_backward(gy, xhat, invstd, direct, m)
    assert got.shape == (m, c) and got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _bn_input_exact(gy, xhat, invstd, direct), rtol=1e-5, atol=1e-5)
    g_r, r, z = (_strided32(999, 20, s).contiguous() for s in (9, 10, 11))
    mean, invstd, weight = torch.randn(20) * 0.1, torch.rand(20) + 0.5, torch.randn(20)
    got = cpu_kernels.bn_relu_train_backward(g_r, r, z, mean, invstd, weight)
    for g, e in zip(got, _bn2_backward_exact(g_r, r, z, mean, invstd, weight)):  # g_z, g_weight, g_bias
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)


@avx2_cpu
def test_float32_sums_of_a_whole_block_are_as_accurate_as_pytorchs_and_repeat_exactly(hand):
    """65,536 rows (BC-100's first block at batch 64) of values far from zero: a plain float32 running sum
    would be off by about 1e-4 relative; the blocks of 256 rows keep it near PyTorch's pairwise sum."""
    m, c = 65536, 24
    g = torch.randn(m, c, generator=torch.Generator().manual_seed(12)) + 3.0
    ones, xhat = torch.ones(m, c), torch.full((m, c), 2.0)
    sums = [cpu_kernels.bn_relu_backward(g, ones, xhat, xhat, torch.zeros(c), torch.ones(c), torch.zeros(m, c),
                                         torch.ones(c), torch.float32) for _ in range(2)]
    exact = g.double().sum(0)
    ours = ((sums[0][0].double() - exact).abs() / exact).max().item()
    pytorchs = ((g.sum(0).double() - exact).abs() / exact).max().item()
    assert ours <= max(4 * pytorchs, 1e-6), (ours, pytorchs)
    assert torch.equal(sums[0][0], sums[1][0]) and torch.equal(sums[0][1], sums[1][1])


@avx2_cpu
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_a_float32_training_step_through_them_matches_the_eager_step(monkeypatch, memory_efficient):
    monkeypatch.setattr(fused, "MIN_NUMEL", 0)
    torch.manual_seed(0)
    model = create_model("densenet_bc40_k12", num_classes=10, memory_efficient=memory_efficient)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1, 4, 7, 2])
    grads, calls = [], []
    monkeypatch.setattr(cpu_kernels, "_kernel", _counting(cpu_kernels._kernel, calls))
    for hand in (False, True):
        fused.set_enabled(True)
        cpu_kernels.set_enabled(hand)
        calls.clear()
        try:
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        finally:
            fused.set_enabled(None)
            cpu_kernels.set_enabled(None)
        assert bool(calls) == hand
        grads.append([p.grad.clone() for p in model.parameters()])
    for e, g in zip(*grads):  # the same arithmetic but for the order of the sums
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@bf16_cpu
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
    def wrapped(name, dtype):
        calls.append(name)
        return fn(name, dtype)
    return wrapped


@avx2_cpu
def test_the_plan_line_says_which_float32_kernels_run():
    fused.set_enabled(True)
    try:
        assert fused.float32_status() == "hand-written AVX2 CPU kernels"
        cpu_kernels.set_enabled(False)
        assert fused.float32_status().startswith("eager CPU kernels")
        fused.set_enabled(False)
        assert fused.float32_status().startswith("unfused CPU kernels")
    finally:
        fused.set_enabled(None)
        cpu_kernels.set_enabled(None)
