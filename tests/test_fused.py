"""The fused CPU kernels (densenet.models.fused): compiled and eager forms agree, a model trained
through them matches the layer-by-layer reference, and a missing toolchain falls back with one warning."""
from __future__ import annotations

import warnings

import pytest
import torch

from densenet import create_model
from densenet.models import cpu_kernels, fused

pytestmark = pytest.mark.skipif(not fused._compiler_found(), reason="no C++ compiler: the fused kernels are off")


@pytest.fixture
def compiled(monkeypatch):
    """Compiled forms on for every size (the default keeps small matrices eager)."""
    monkeypatch.setattr(fused, "MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "COMPILED_DTYPES", (torch.bfloat16, torch.float16, torch.float32, torch.float64))
    fused.set_enabled(True)
    yield
    fused.set_enabled(None)


def _inputs(dtype: torch.dtype, m: int = 600, c_total: int = 40, c: int = 28, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    stat = torch.float64 if dtype == torch.float64 else torch.float32

    def r(*shape, d=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(d)

    buf = r(m, c_total)
    return dict(buf=buf, prefix=buf[:, :c], scale=r(c), shift=r(c), offset=r(c, d=stat) * 0.1,
                invstd=r(c, d=stat).abs() + 0.5, weight=r(c, d=stat), g=r(m, c), gw=r(m, c_total),
                z4=r(4, 12, 10, 15).contiguous(memory_format=torch.channels_last), stat=stat)


def _run_all(x: dict) -> list[torch.Tensor]:
    """Every kernel once on copies of ``x``; the outputs, and every tensor a kernel writes into."""
    out = []
    t = torch.empty_like(x["g"])
    out.append(fused.bn_relu(x["prefix"], x["scale"], x["shift"], out=t).clone())
    xhat = fused.normalise(x["prefix"], x["offset"], x["invstd"])
    for given in (xhat, None):
        gw = x["gw"].clone()
        out += list(fused.bn_relu_backward(x["g"].clone(), t.clone(), given, x["prefix"], x["offset"], x["invstd"],
                                           gw[:, :t.shape[1]], x["weight"], x["stat"]))
        out.append(gw)
    out.append(fused.bn_input_backward(x["gw"][:, :12], xhat[:, :12], x["invstd"][:12], x["g"][:, :12], 600))
    norm = torch.nn.BatchNorm2d(12).to(x["stat"])
    r, mean, invstd = fused.bn_relu_train(x["z4"], norm.weight + 0.5, norm.bias + 0.1, norm)
    out += [r, mean, invstd, norm.running_mean.clone(), norm.running_var.clone()]
    out += list(fused.bn_relu_train_backward(x["z4"] * 0.3, r, x["z4"], mean, invstd, norm.weight + 0.5, norm.eps))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16,
                                   pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_compiled_kernels_agree_with_the_eager_ones(dtype, monkeypatch):
    x = _inputs(dtype)
    fused.set_enabled(False)
    expected = _run_all(x)
    monkeypatch.setattr(fused, "MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "COMPILED_DTYPES", (dtype,))
    monkeypatch.setattr(cpu_kernels, "_enabled", lambda: False)  # Inductor's forms (cpu_kernels has its own tests)
    fused.set_enabled(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a compile failure would warn and run eagerly
            got = _run_all(x)
    finally:
        fused.set_enabled(None)
    # float64: the same arithmetic; bfloat16: the compiled forms round once instead of at every pass
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    for i, (e, g) in enumerate(zip(expected, got)):
        assert g.shape == e.shape and g.dtype == e.dtype, i
        err = (g.double() - e.double()).abs().max().item() / max(e.double().abs().max().item(), 1e-12)
        assert err < tol, (i, err)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_training_through_compiled_kernels_matches_the_layer_by_layer_model(compiled, memory_efficient):
    torch.manual_seed(0)
    fast = create_model("densenet_bc40_k12", num_classes=10, memory_efficient=memory_efficient).double()
    ref = create_model("densenet_bc40_k12", num_classes=10, fast=False).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1, 4, 7])
    for model in (fast, ref):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-10), name
    for (name, b), c in zip(fast.named_buffers(), ref.buffers()):
        assert torch.allclose(b.double(), c.double(), rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_recompute_repeats_the_training_forward_bit_for_bit(compiled, dtype):
    z4 = _inputs(dtype)["z4"]
    norm = torch.nn.BatchNorm2d(12).to(_inputs(dtype)["stat"])
    weight, bias = norm.weight + 0.5, norm.bias - 0.2
    r, mean, invstd = fused.bn_relu_train(z4, weight, bias, norm)
    out = torch.full(r.shape, float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
    again = fused.bn_relu_recompute(fused.as_rows(z4), mean, invstd, weight, bias, fused.as_rows(out))
    assert torch.equal(again, fused.as_rows(r)) and torch.equal(out, r)
    fused.set_enabled(False)
    assert fused.bn_relu_recompute(fused.as_rows(z4), mean, invstd, weight, bias, fused.as_rows(out)) is None


@pytest.mark.parametrize("rows", [600, 512, 100])  # blocks of 256 rows and a rest, blocks only, no block
def test_compiled_statistics_keep_their_precision_far_from_zero(compiled, rows):
    z = (torch.randn(rows, 12, dtype=torch.float64) * 0.01 + 1000.0).float()  # mean 1e5 standard deviations out
    z4 = z.view(rows // 4, 4, 1, 12).permute(0, 3, 1, 2)
    norm = torch.nn.BatchNorm2d(12)
    _, mean, invstd = fused.bn_relu_train(z4, norm.weight, norm.bias, norm)
    var = z.double().var(0, unbiased=False)
    assert torch.allclose(mean.double(), z.double().mean(0), rtol=1e-7)
    assert torch.allclose(invstd.double(), torch.rsqrt(var + norm.eps), rtol=1e-3)


def test_the_compiled_transition_takes_even_channels_last_maps_only(compiled):
    norm = torch.nn.BatchNorm2d(5)
    even = torch.randn(2, 5, 6, 4).contiguous(memory_format=torch.channels_last)
    out, mean, _ = fused.bn_relu_pool_train(even, norm.weight, norm.bias, norm)
    assert out.shape == (2, 5, 3, 2) and torch.allclose(mean, even.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(norm.running_mean, 0.1 * mean)
    for other in (torch.randn(2, 5, 7, 4).contiguous(memory_format=torch.channels_last), torch.randn(2, 5, 6, 4)):
        assert fused.bn_relu_pool_train(other, norm.weight, norm.bias, norm) is None


def test_a_broken_toolchain_warns_once_and_runs_eagerly(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("C++ compile error: g++ not found")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setitem(fused._state, "compiled", {})
    monkeypatch.setitem(fused._state, "ok", set())
    monkeypatch.setattr(fused, "MIN_NUMEL", 0)
    monkeypatch.setattr(cpu_kernels, "_enabled", lambda: False)  # Inductor's path (cpu_kernels has its own test)
    fused.set_enabled(True)
    x = _inputs(torch.bfloat16)
    try:
        with pytest.warns(RuntimeWarning, match="could not be compiled.*apt install g\\+\\+") as record:
            got = fused.bn_relu(x["prefix"], x["scale"], x["shift"], out=torch.empty_like(x["g"]))
            fused.bn_relu(x["prefix"], x["scale"], x["shift"], out=torch.empty_like(x["g"]))
        assert len(record) == 1 and not fused.enabled()
        assert "unfused" in fused.status()
    finally:
        fused.set_enabled(None)
    assert torch.equal(got, torch.addcmul(x["shift"], x["prefix"], x["scale"]).relu_())


def test_the_environment_turns_them_off(monkeypatch):
    monkeypatch.setenv("DENSENET_FUSED", "0")
    fused.set_enabled(None)
    try:
        assert not fused.enabled()
        assert fused.status() == "unfused CPU kernels (DENSENET_FUSED=0)"
    finally:
        monkeypatch.delenv("DENSENET_FUSED")
        fused.set_enabled(None)
    assert fused.enabled()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_new_maps_are_stored_with_their_statistics(dtype, compiled):
    rows = (torch.randn(600, 12, dtype=torch.float64) * 3 + 5).to(dtype)
    buf = torch.zeros(600, 40, dtype=dtype)
    centred = dtype == torch.bfloat16
    stat = torch.float32 if centred else torch.float64
    mean, var = fused.store_maps(rows, buf[:, 20:32], centred, stat)
    ref = rows.double()
    assert mean.dtype == var.dtype == stat
    assert torch.allclose(mean.double(), ref.mean(0), rtol=1e-6)
    assert torch.allclose(var.double(), ref.var(0, correction=0), rtol=1e-5)
    expected = rows - mean.to(dtype) if centred else rows
    assert torch.equal(buf[:, 20:32], expected)
    assert not buf[:, :20].any() and not buf[:, 32:].any()  # nothing outside the slice
    fused.set_enabled(False)
    assert fused.store_maps(rows, buf[:, 20:32], centred, stat) is None
