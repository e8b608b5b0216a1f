"""Hooks that never lie: whatever module a user hooks, with whatever kind of hook, it sees what the
layer-by-layer form gives it, in training, eval and memory-efficient modes; the fast path falls back
for that block or transition only."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from densenet import DenseNet

KINDS = ("forward_pre", "forward", "backward_pre", "backward")


def models(stem: str, mode: str) -> tuple[DenseNet, DenseNet]:
    """A reference model (layer by layer) with random BN statistics, and a copy in ``mode``."""
    torch.manual_seed(0)
    ref = DenseNet(growth_rate=2, block_config=(2, 1), num_classes=3, stem=stem, fast=False).double()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    other = copy.deepcopy(ref).set_execution(fast=True, memory_efficient=mode == "memory_efficient")
    return ref, other


def tensors(value) -> list[torch.Tensor]:
    """Every tensor in a hook argument (a tensor, a tuple of them, None)."""
    if isinstance(value, torch.Tensor):
        return [value.detach().clone()]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    return []


def hook(module: nn.Module, kind: str, record: list) -> torch.utils.hooks.RemovableHandle:
    if kind == "forward_pre":
        return module.register_forward_pre_hook(lambda m, args: record.append((kind, tensors(args))))
    if kind == "forward":
        return module.register_forward_hook(lambda m, args, out: record.append((kind, tensors(args) + tensors(out))))
    if kind == "backward_pre":
        return module.register_full_backward_pre_hook(lambda m, g_out: record.append((kind, tensors(g_out))))
    return module.register_full_backward_hook(lambda m, g_in, g_out: record.append((kind, tensors(g_in) + tensors(g_out))))


def run(model: DenseNet, phase: str, x: torch.Tensor) -> torch.Tensor:
    """One pass: training forward and backward, eval without gradients, or eval with gradients (saliency)."""
    if phase == "eval":
        with torch.no_grad():
            return model.eval()(x)
    x = x.clone().requires_grad_()
    out = (model.train() if phase == "train" else model.eval())(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return out


def assert_same(got: list, expected: list, where: str) -> None:
    assert [k for k, _ in got] == [k for k, _ in expected], where
    for (kind, a), (_, b) in zip(got, expected):
        assert len(a) == len(b), (where, kind)
        for ta, tb in zip(a, b):
            assert ta.shape == tb.shape, (where, kind, ta.shape, tb.shape)
            torch.testing.assert_close(ta, tb, rtol=1e-9, atol=1e-9, msg=f"{where} {kind}")


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("mode, phase", [("fast", "train"), ("fast", "eval"), ("fast", "eval_with_grad"),
                                         ("memory_efficient", "train")])
def test_every_hook_kind_on_every_module_sees_the_reference(stem, mode, phase):
    ref, other = models(stem, mode)
    x = torch.randn(2, 3, 16 if stem == "imagenet" else 4, 16 if stem == "imagenet" else 4, dtype=torch.float64)
    names = [n for n, _ in other.named_modules()]
    for name in names:
        kinds = KINDS if phase != "eval" else KINDS[:2]  # no backward in eval without gradients
        records = []
        for model in (ref, other):
            record, module = [], model.get_submodule(name)
            handles = [hook(module, kind, record) for kind in kinds]
            out = run(model, phase, x)
            for h in handles:
                h.remove()
            records.append((record, out.detach()))
        (expected, out_ref), (got, out) = records
        assert expected, name  # the hook fired in the reference
        assert_same(got, expected, name)
        torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["fast", "memory_efficient"])
def test_global_module_hooks_see_the_reference(mode):
    """torch.nn.modules.module.register_module_*_hook: every module's call, as the reference makes it."""
    from torch.nn.modules import module as m

    ref, other = models("imagenet", mode)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    records = []
    for model in (ref, other):
        record: list = []
        add = record.append
        handles = [
            m.register_module_forward_pre_hook(lambda mod, args, add=add: add(("forward_pre", tensors(args)))),
            m.register_module_forward_hook(lambda mod, args, out, add=add: add(("forward", tensors(args) + tensors(out)))),
            m.register_module_full_backward_hook(
                lambda mod, g_in, g_out, add=add: add(("backward", tensors(g_in) + tensors(g_out)))),
        ]
        try:
            run(model, "train", x)
        finally:
            for h in handles:
                h.remove()
        records.append(record)
    assert len(records[0]) > 100
    assert_same(records[1], records[0], "global hooks")


def test_hooks_on_the_transition_pool_fire_with_full_size_gradients():
    """The case of the issue: with the default fast path the transition's pool hooks never fired and
    its conv hook saw gradients of the pooled maps."""
    torch.manual_seed(1)
    model = DenseNet(growth_rate=12, block_config=(6, 6, 6), num_classes=10)
    seen = {}
    t = model.features.transition1
    t.pool.register_full_backward_hook(lambda m, g_in, g_out: seen.update(pool=g_in[0].shape))
    t.conv.register_full_backward_hook(lambda m, g_in, g_out: seen.update(conv=g_out[0].shape))
    model.train()(torch.randn(4, 3, 32, 32)).sum().backward()
    assert seen == {"pool": (4, 48, 32, 32), "conv": (4, 48, 32, 32)}


def test_a_hook_makes_only_its_own_block_fall_back(monkeypatch):
    import densenet.models.densenet as dn

    calls: list = []
    real = dn.fast_block_forward
    monkeypatch.setattr(dn, "fast_block_forward", lambda block, *a: calls.append(block) or real(block, *a))
    _, model = models("cifar", "fast")
    model.features.denseblock1.denselayer2.conv1.register_forward_hook(lambda *a: None)
    run(model, "train", torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert calls == [model.features.denseblock2]  # denseblock1 ran layer by layer, for its hooked conv
