"""Shared-buffer dense blocks (fast and memory-efficient modes) against the layer-by-layer reference:
outputs, gradients, running statistics, fall-backs (dropout, hooks, eval with gradients) and
activation memory linear in depth."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densenet import DenseBlock, DenseNet, create_model
from densenet.models.efficient import can_use_fast_block

torch.set_num_threads(2)

MODES = {"fast": dict(fast=True), "memory_efficient": dict(memory_efficient=True), "both": dict(fast=True, memory_efficient=True)}


def set_mode(model: DenseNet, fast: bool = False, memory_efficient: bool = False) -> DenseNet:
    return model.set_execution(fast=fast, memory_efficient=memory_efficient)


def pair(mode: str, dtype=torch.float64, **kw):
    """A reference model (fast=False) with random BN affine/statistics and a copy in ``mode``."""
    args = dict(growth_rate=4, block_config=(2, 3, 2), num_classes=5)
    ref = DenseNet(**{**args, **kw}, fast=False).to(dtype)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()  # some negative weights: exercises every sign in BN backward
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return ref, set_mode(copy.deepcopy(ref), **MODES[mode])


def compare(ref, other, x, rtol):
    """Run one forward/backward on both; compare outputs, input and parameter gradients, buffers."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = ref(x1), other(x2)
    torch.testing.assert_close(out2, out1, rtol=rtol, atol=rtol)
    g = torch.randn_like(out1)
    out1.backward(g)
    out2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=rtol, atol=rtol * x1.grad.abs().max().item())
    for (name, p1), (_, p2) in zip(ref.named_parameters(), other.named_parameters()):
        scale = p1.grad.abs().max().item()
        torch.testing.assert_close(p2.grad, p1.grad, rtol=rtol, atol=rtol * scale, msg=name)
    for (name, b1), (_, b2) in zip(ref.named_buffers(), other.named_buffers()):
        torch.testing.assert_close(b2, b1, rtol=rtol, atol=rtol, msg=name)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_same_outputs_gradients_and_statistics_float64(mode, bottleneck, stem):
    torch.manual_seed(0)
    ref, other = pair(mode, bottleneck=bottleneck, stem=stem)
    x = torch.randn(3, 3, 32 if stem == "imagenet" else 12, 32 if stem == "imagenet" else 12, dtype=torch.float64)
    compare(ref.train(), other.train(), x, rtol=1e-10)
    compare(ref, other, x, rtol=1e-10)  # a second step: running statistics keep agreeing
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), ref.eval()(x), rtol=1e-10, atol=1e-10)


def test_memory_efficient_backward_in_many_row_chunks(monkeypatch):
    """The memory-efficient backward walks each layer's BN1-ReLU gradient in row chunks; with tiny
    chunks (many per layer, a ragged last one) it still matches the reference exactly (fp64)."""
    import densenet.models.efficient as efficient

    monkeypatch.setattr(efficient, "ROW_CHUNK_BYTES", 1000)
    torch.manual_seed(3)
    ref, other = pair("memory_efficient")
    compare(ref.train(), other.train(), torch.randn(3, 3, 12, 12, dtype=torch.float64), rtol=1e-10)


@pytest.mark.parametrize("chunk_bytes", [1, 10_000, 1 << 22])
def test_eval_transitions_pool_a_few_images_at_a_time(monkeypatch, chunk_bytes):
    """In eval without gradients, transitions run BN-ReLU-pool a few images at a time (one image, a
    ragged last chunk, all at once): same outputs as the reference, odd spatial sizes included."""
    import densenet.models.efficient as efficient

    monkeypatch.setattr(efficient, "ROW_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(4)
    ref, other = pair("fast")
    x = torch.randn(5, 3, 13, 13, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), ref.eval()(x), rtol=1e-10, atol=1e-10)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("mode", list(MODES))
def test_float32_relative_difference_below_1e5(mode):
    """fp32, the paper's initialisation: every output and gradient within 1e-5 (relative, in norm; all parameter
    gradients as one vector)
    of the layer-by-layer reference; memory-efficient and standard fast modes agree to 5e-6 (their
    BN2 arithmetic differs: the memory-efficient mode computes it by hand, into workspaces).
    (With random BN affine weights, PyTorch's own channels_last kernels alone move the reference's
    fp32 gradients by up to ~5e-5 from fp64, so that case is checked in fp64 above.)"""
    torch.manual_seed(1)
    ref = DenseNet(growth_rate=6, block_config=(4, 4), num_classes=5, fast=False)
    fast, lean = set_mode(copy.deepcopy(ref), fast=True), set_mode(copy.deepcopy(ref), **MODES[mode])
    x = torch.randn(4, 3, 16, 16)
    results = []
    for model in (ref, fast, lean):
        xx = x.clone().requires_grad_()
        out = model.train()(xx)
        out.backward(torch.ones_like(out))
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append([out, xx.grad, grads] + list(model.buffers()))
    for r, f, m in zip(*results):
        assert rel(f, r) < 1e-5 and rel(m, r) < 1e-5 and rel(m, f) < 5e-6


def side(stem: str) -> int:
    """An input side every stage of a ``pair(..., stem=stem)`` model sees more than one value at."""
    return 32 if stem == "imagenet" else 8


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("mode", list(MODES))
def test_batch_size_one(mode, stem):
    torch.manual_seed(2)
    ref, other = pair(mode, stem=stem)
    compare(ref.train(), other.train(), torch.randn(1, 3, side(stem), side(stem), dtype=torch.float64), rtol=1e-10)


@pytest.mark.parametrize("mode", list(MODES))
def test_running_statistics_updated_exactly_once_per_step(mode):
    torch.manual_seed(3)
    ref, other = pair(mode)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    other.train()(x).sum().backward()
    ref.train()(x).sum().backward()
    for (name, b), (_, b_ref) in zip(other.named_buffers(), ref.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert b.item() == 1, name
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12, msg=name)


def test_cumulative_average_momentum_none():
    torch.manual_seed(4)
    ref, other = pair("memory_efficient")
    for model in (ref, other):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    for _ in range(3):
        compare(ref.train(), other.train(), torch.randn(2, 3, 8, 8, dtype=torch.float64), rtol=1e-10)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("mode", list(MODES))
def test_no_grad_in_training_and_eval(mode, stem):
    torch.manual_seed(5)
    ref, other = pair(mode, stem=stem)
    x = torch.randn(2, 3, side(stem), side(stem), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(other.train()(x), ref.train()(x), rtol=1e-10, atol=1e-10)
        for b, b_ref in zip(other.buffers(), ref.buffers()):
            torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other.eval()(x), ref.eval()(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("mode", list(MODES))
def test_eval_mode_with_gradients(mode, stem):
    """Eval mode with gradients (e.g. saliency maps) uses running statistics and gives the same gradients."""
    torch.manual_seed(6)
    ref, other = pair(mode, stem=stem)
    compare(ref.eval(), other.eval(), torch.randn(2, 3, side(stem), side(stem), dtype=torch.float64), rtol=1e-10)


@pytest.mark.parametrize("mode", list(MODES))
def test_dropout_falls_back_to_the_reference_path(mode, monkeypatch):
    torch.manual_seed(7)
    ref, other = pair(mode, drop_rate=0.3)
    block = other.features.denseblock1
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert not can_use_fast_block(block.train(), torch.randn(2, 8, 8, 8))
    with torch.no_grad():
        assert can_use_fast_block(block.eval(), torch.randn(2, 8, 8, 8))  # dropout is the identity in eval
    torch.manual_seed(8)
    out_ref = ref.train()(x)
    torch.manual_seed(8)
    out = other.train()(x)
    torch.testing.assert_close(out, out_ref)
    calls = []
    real = F.dropout
    monkeypatch.setattr(F, "dropout", lambda *a, **k: calls.append(1) or real(*a, **k))
    other(x)
    assert len(calls) == 7 * 2 + 2


@pytest.mark.parametrize("mode", list(MODES))
def test_hooks(mode):
    """Hooks on the model, blocks and transitions see the fast path; a hook inside a block makes
    that block run layer by layer so the hook sees what it expects."""
    torch.manual_seed(9)
    ref, other = pair(mode)
    seen = []
    other.features.denseblock2.register_forward_hook(lambda m, i, o: seen.append(("block", o.shape)))
    other.features.relu5.register_full_backward_hook(lambda m, gi, go: seen.append(("relu5", go[0].shape)))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert can_use_fast_block(other.features.denseblock2, torch.randn(2, 8, 4, 4))
    compare(ref.train(), other.train(), x, rtol=1e-10)
    assert [s[0] for s in seen] == ["block", "relu5"]
    inner = []
    handle = other.features.denseblock1.denselayer2.norm1.register_forward_hook(lambda m, i, o: inner.append(o.shape))
    assert not can_use_fast_block(other.features.denseblock1, torch.randn(2, 8, 8, 8))
    compare(ref, other, x, rtol=1e-10)
    assert inner == [(2, 12, 8, 8)]
    handle.remove()
    assert can_use_fast_block(other.features.denseblock1, torch.randn(2, 8, 8, 8))


def test_modes_keep_state_dict_keys_and_config():
    plain = create_model("densenet_bc100_k12")
    lean = create_model("densenet_bc100_k12", memory_efficient=True)
    ref = create_model("densenet_bc100_k12", fast=False)
    assert list(plain.state_dict()) == list(lean.state_dict()) == list(ref.state_dict())
    lean.load_state_dict(ref.state_dict())
    assert lean.config()["memory_efficient"] is True and plain.config()["memory_efficient"] is False
    assert ref.config()["fast"] is False and plain.config()["fast"] is True
    again = DenseNet(**lean.config())
    assert again.config() == lean.config()
    assert all(b.execution == "memory_efficient" for b in again.modules() if isinstance(b, DenseBlock))


def test_channels_last_and_non_contiguous_input():
    torch.manual_seed(10)
    ref, other = pair("fast")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    compare(ref.train(), other.train(), x.contiguous(memory_format=torch.channels_last), rtol=1e-10)
    compare(ref, other, torch.randn(2, 3, 8, 16, dtype=torch.float64)[..., ::2], rtol=1e-10)


def test_frozen_parameters():
    torch.manual_seed(11)
    ref, other = pair("memory_efficient")
    for model in (ref, other):
        for name, p in model.named_parameters():
            p.requires_grad_("denseblock2" not in name)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    other.train()(x).sum().backward()
    ref.train()(x).sum().backward()
    for (name, p), (_, p_ref) in zip(other.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (p_ref.grad is None) == ("denseblock2" in name)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10)


def saved_bytes(block: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct tensors autograd keeps for backward of ``block(x)`` (parameters excluded)."""
    params = {p.data_ptr() for p in block.parameters()}
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.untyped_storage().data_ptr() not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(seen.values())


@pytest.mark.parametrize("bottleneck", [True, False])
def test_memory_efficient_saved_activations_grow_linearly_with_depth(bottleneck):
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    depths = [4, 8, 16, 32]

    def sizes(**mode):
        return [saved_bytes(DenseBlock(L, 8, 4, bottleneck, **mode).train(), x) for L in depths]

    lean, fast, ref = sizes(memory_efficient=True), sizes(fast=True), sizes(fast=False)
    # exactly linear: equal increments per added layer when depth doubles
    per_layer = [(b - a) / (d2 - d1) for a, b, d1, d2 in zip(lean, lean[1:], depths, depths[1:])]
    assert max(per_layer) == pytest.approx(min(per_layer), rel=1e-6), lean
    per_layer_fast = [(b - a) / (d2 - d1) for a, b, d1, d2 in zip(fast, fast[1:], depths, depths[1:])]
    assert max(per_layer_fast) == pytest.approx(min(per_layer_fast), rel=1e-6), fast
    # the reference keeps the concatenated input of every layer: quadratic growth
    ref_per_layer = [(b - a) / (d2 - d1) for a, b, d1, d2 in zip(ref, ref[1:], depths, depths[1:])]
    assert ref_per_layer == sorted(ref_per_layer) and ref_per_layer[-1] > 2 * ref_per_layer[0]
    assert lean[-1] * 4 < fast[-1] or not bottleneck
    assert lean[-1] * 8 < ref[-1]


def counting(monkeypatch, module, name: str) -> list:
    """Count the calls of ``module.name`` (results passed through)."""
    calls, real = [], getattr(module, name)

    def wrapper(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("mode", ["reference", *MODES])
def test_the_intended_path_is_taken(mode, monkeypatch):
    """Spies on the fast kernels: the shared-buffer blocks and the fused transitions run in every
    mode but the reference one, in training and in eval, so that a silent fall-back fails here."""
    import densenet.models.densenet as dn

    torch.manual_seed(12)
    ref, other = pair("fast")
    model = ref if mode == "reference" else set_mode(other, **MODES[mode])
    blocks = counting(monkeypatch, dn, "fast_block_forward")
    fused = counting(monkeypatch, dn, "bn_relu_pool")
    pooled = counting(monkeypatch, dn, "bn_relu_pool_eval")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model.train()(x).sum().backward()
    with torch.no_grad():
        model.eval()(x)
    if mode == "reference":
        assert blocks == fused == pooled == []
    else:
        assert len(blocks) == 6 and fused == [True, True] and pooled == [True, True]


def test_one_value_per_channel_in_training_raises_as_the_reference_does():
    """BN cannot train on one value per channel: every mode raises there (none runs silently)."""
    for fast, memory_efficient in [(False, False), (True, False), (True, True)]:
        block = DenseBlock(2, 8, 4, fast=fast, memory_efficient=memory_efficient).train()
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            block(torch.randn(1, 8, 1, 1))
    torch.manual_seed(13)
    _, model = pair("fast")
    transition = model.features.transition1.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        transition(torch.randn(1, transition.in_channels, 1, 1))
    for mode in MODES:  # the ImageNet stem alone: its 7x7/2 convolution makes one value per channel of a 1x1 image
        _, model = pair(mode, stem="imagenet")
        stem = model.features[:4].train()  # conv0, norm0, relu0, pool0: the fused stem's modules
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            stem(torch.randn(1, 3, 1, 1, dtype=torch.float64))
        stem(torch.randn(1, 3, 3, 3, dtype=torch.float64)).sum().backward()  # 2x2 values per channel: trains


@pytest.mark.parametrize("mode", list(MODES))
def test_a_stem_with_another_pool_runs_module_by_module(mode):
    """The fused stem is a 3x3/2 max pool with padding 1: a stem given another pool (here 2x2/2) runs
    its modules one by one and equals the reference."""
    torch.manual_seed(15)
    ref, other = pair(mode, stem="imagenet")
    for model in (ref, other):
        model.features.pool0 = nn.MaxPool2d(2)
    compare(ref.train(), other.train(), torch.randn(2, 3, 32, 32, dtype=torch.float64), rtol=1e-10)


@pytest.mark.parametrize("mode", list(MODES))
def test_imagenet_stem_under_autocast_computes_as_autocast_does(mode):
    """The fused stem is for float32/64 without autocast; under autocast the stem runs as PyTorch's
    modules do (the convolution in bfloat16), giving the layer-by-layer form's output."""
    torch.manual_seed(14)
    ref, other = pair(mode, dtype=torch.float32, stem="imagenet")
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = ref.features[:4].train()(x), other.features[:4].train()(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------- mixed precision
def run_step(model: DenseNet, x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype | None):
    """Output, input gradient, parameter gradients and buffers of one training forward/backward
    (under CPU autocast in ``dtype`` when given), all as float64."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model.train()(x)
    out.float().backward(g)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return [t.detach().double() for t in (out, x.grad, grads, *model.buffers())]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", list(MODES))
def test_fast_path_under_autocast_is_as_accurate_as_the_reference(mode, dtype, monkeypatch):
    """Under autocast the shared-buffer blocks and fused transitions run (not the layer-by-layer
    form), and land as close to the float64 result as the layer-by-layer form under the same
    autocast does: outputs, input and parameter gradients, BN running statistics."""
    import densenet.models.densenet as dn

    torch.manual_seed(14)
    exact = DenseNet(growth_rate=6, block_config=(3, 3), num_classes=5, fast=False).double()
    ref = copy.deepcopy(exact).float()
    fast = set_mode(copy.deepcopy(ref), **MODES[mode])
    x, g = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    truth = run_step(exact, x, g, None)
    expected = run_step(ref, x.float(), g.float(), dtype)
    blocks, fused = counting(monkeypatch, dn, "fast_block_forward"), counting(monkeypatch, dn, "bn_relu_pool")
    got = run_step(fast, x.float(), g.float(), dtype)
    assert len(blocks) == 2 and fused == [True]  # the fast kernels ran under autocast
    names = ["output", "input gradient", "parameter gradients"] + [n for n, _ in fast.named_buffers()]
    for name, t, e, r in zip(names, truth, expected, got):
        if name.endswith("num_batches_tracked"):
            assert r.item() == e.item() == 1, name
            continue
        ref_err, our_err = rel(e, t), rel(r, t)
        assert our_err <= 2 * ref_err + 1e-3, f"{name}: fast {our_err:.2e}, layer by layer {ref_err:.2e}"
    assert rel(got[0], truth[0]) < 0.05 and rel(got[2], truth[2]) < 0.1  # both close in the first place


def test_eval_under_autocast_uses_the_fast_path(monkeypatch):
    import densenet.models.densenet as dn

    torch.manual_seed(15)
    ref, other = pair("fast", dtype=torch.float32)
    blocks, pooled = counting(monkeypatch, dn, "fast_block_forward"), counting(monkeypatch, dn, "bn_relu_pool_eval")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = other.eval()(x), ref.eval()(x)
    assert out.dtype == expected.dtype == torch.bfloat16 and len(blocks) == 3 and pooled == [True, True]
    assert rel(out, ref.eval()(x)) < 0.03 and rel(expected, ref.eval()(x)) < 0.03


HOOKS = ["forward", "forward_pre", "full_backward", "full_backward_pre"]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("kind", HOOKS)
def test_any_hook_inside_a_block_or_global_makes_it_run_layer_by_layer(kind):
    """A hook of any kind, on a module inside the block or registered globally, sees every layer's
    modules (the block falls back to the reference path); removed, the fast path is back."""
    torch.manual_seed(14)
    block = DenseBlock(2, 8, 4).train()
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    seen = []
    inner = getattr(block.denselayer2.conv1, f"register_{kind}_hook")(lambda m, *a: seen.append("inner"))
    assert not can_use_fast_block(block, x)
    block(x).sum().backward()
    inner.remove()
    assert seen == ["inner"] and can_use_fast_block(block, x)
    register = getattr(torch.nn.modules.module, f"register_module_{kind}_hook")
    handle = register(lambda m, *a: seen.append(type(m).__name__))
    try:
        assert not can_use_fast_block(block, x)
        block(x).sum().backward()
    finally:
        handle.remove()
    assert seen.count("BatchNorm2d") >= 2 and seen.count("Conv2d") >= 2, seen
    assert can_use_fast_block(block, x)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bottleneck", [True, False])
def test_growth_rate_one_and_single_layer_blocks(mode, bottleneck):
    """Edge sizes of the shared buffer: one new map per layer, a block of one layer."""
    torch.manual_seed(15)
    for layers, k in [(3, 1), (1, 3)]:
        ref = DenseBlock(layers, 3, k, bottleneck, fast=False).double()
        with torch.no_grad():
            for m in ref.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.normal_()
                    m.bias.normal_()
        other = copy.deepcopy(ref)
        other.execution = "memory_efficient" if MODES[mode].get("memory_efficient") else "fast"
        compare(ref.train(), other.train(), torch.randn(2, 3, 4, 4, dtype=torch.float64), rtol=1e-10)
