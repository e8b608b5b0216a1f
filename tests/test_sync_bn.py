"""Synchronised BN (densenet/models/sync_bn.py) without torchrun: its formulas in one process, and two
real gloo processes with unequal batches against one process with the whole batch (SyncBatchNorm2d,
and the dense blocks' shared-buffer path with synchronised statistics, spied on so that a silent
fall-back to local statistics or to the reference path fails)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densenet.models.sync_bn import SyncBatchNorm2d, bn_backward, bn_factor, convert_sync_batchnorm, sync_active, update_running

ROOT = Path(__file__).resolve().parents[1]


def test_outside_distributed_training_it_is_batchnorm():
    assert not sync_active()
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4, momentum=None).double()
    with torch.no_grad():
        plain.weight.normal_()
        plain.bias.normal_()
    synced = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)).double())[0]
    synced.load_state_dict(plain.state_dict())
    synced.momentum = None
    assert type(synced) is SyncBatchNorm2d
    for _ in range(2):
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 2 + 1
        torch.testing.assert_close(synced.train()(x), plain.train()(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.eval()(x), plain.eval()(x), rtol=0, atol=0)
    for a, b in zip(synced.buffers(), plain.buffers()):
        assert torch.equal(a, b)


def test_convert_changes_only_plain_batchnorm2d_and_keeps_its_tensors():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)), nn.BatchNorm1d(4), MyBN(4))
    params, buffers = list(model.parameters()), list(model.buffers())
    group = object()
    assert convert_sync_batchnorm(model, group) is model
    assert [type(m) for m in model.modules()][1:] == [nn.Conv2d, SyncBatchNorm2d, nn.Sequential, SyncBatchNorm2d,
                                                      nn.BatchNorm1d, MyBN]
    assert model[1].process_group is group and model[2][0].process_group is group
    assert all(a is b for a, b in zip(model.parameters(), params)) and all(a is b for a, b in zip(model.buffers(), buffers))


@pytest.mark.parametrize("affine_weight", [True, False])
@pytest.mark.parametrize("shape", [(40, 3), (2, 4, 5, 3)])
def test_bn_backward_of_one_process_matches_autograd(affine_weight, shape):
    """Training-mode BN backward on channel-last data: input, weight and bias gradients as autograd's."""
    torch.manual_seed(1)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    weight = (torch.randn(3, dtype=torch.float64) if affine_weight else torch.ones(3, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rows = x.reshape(-1, 3)
    y = F.batch_norm(rows, None, None, weight, bias, training=True, eps=1e-5).reshape(shape)
    gy = torch.randn(shape, dtype=torch.float64)
    y.backward(gy)
    var, mean = torch.var_mean(rows.detach(), 0, correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    xhat = (x.detach() - mean) * invstd
    gx, gw, gb = bn_backward(gy, xhat, invstd, weight.detach() if affine_weight else None, rows.shape[0], sync=False)
    torch.testing.assert_close(gx, x.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_statistics_update_as_batchnorm2d(momentum):
    torch.manual_seed(2)
    ref, ours = nn.BatchNorm2d(3, momentum=momentum).double(), nn.BatchNorm2d(3, momentum=momentum).double()
    for n in [4, 1, 2]:  # a batch with one value per channel too: the unbiased variance divides by max(n - 1, 1)
        x = torch.randn(n, 3, 1, 1, dtype=torch.float64) * 2 + 1
        if n > 1:
            ref.train()(x)
        else:  # BatchNorm2d refuses one value per channel; its formula: running var += f * var * 1 / 1
            f = bn_factor(ref)
            with torch.no_grad():
                ref.running_mean.mul_(1 - f).add_(x.flatten(), alpha=f)
                ref.running_var.mul_(1 - f)
        var, mean = torch.var_mean(x.flatten(1), 0, correction=0)
        update_running(ours, mean, var, n)
        for a, b in zip(ours.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert ours.num_batches_tracked.item() == 3


# ----------------------------------------------------------------------------------- two real processes
WORKER = r"""
import sys
import torch, torch.distributed as dist
from torch import nn
import densenet.models.efficient as efficient
from densenet import DenseBlock
from densenet.errors import ArgumentError
from densenet.models.sync_bn import SyncBatchNorm2d, convert_sync_batchnorm, sync_active, sync_moments, sync_sum

rank, init = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
torch.set_num_threads(1)
parts = [slice(0, 3), slice(3, 5)]  # unequal batches: 3 images on rank 0, 2 on rank 1
mine = parts[rank]
close = lambda a, b, what: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=what)


def summed(t):
    return sync_sum(t.detach())


assert sync_active() and sync_active(None)
g = torch.Generator().manual_seed(0)
x = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64) * 2 + 1
rows = x[mine].permute(0, 2, 3, 1).reshape(-1, 6)
var, mean = torch.var_mean(rows, 0, correction=0)
g_mean, g_var, total = sync_moments(mean, var, rows.shape[0])
full_var, full_mean = torch.var_mean(x.permute(0, 2, 3, 1).reshape(-1, 6), 0, correction=0)
close(g_mean, full_mean, "mean")
close(g_var, full_var, "var")
assert total == 45, total
assert torch.equal(sync_sum(torch.tensor([rank + 1.0])), torch.tensor([3.0]))


def compare(ref, ours, steps=2):
    # a step of ours on this rank's images against ref on all of them: outputs, input gradients,
    # summed parameter gradients, running statistics
    for step in range(steps):
        xs = torch.randn(5, *x.shape[1:], generator=g, dtype=torch.float64) * 2 + 1
        gy = None
        x1, x2 = xs.clone().requires_grad_(), xs[mine].clone().requires_grad_()
        out1, out2 = ref(x1), ours(x2)
        gy = torch.randn(out1.shape, generator=g, dtype=torch.float64)
        close(out2, out1[mine], f"output, step {step}")
        out1.backward(gy)
        out2.backward(gy[mine])
        close(x2.grad, x1.grad[mine], f"input gradient, step {step}")
        for (name, p1), p2 in zip(ref.named_parameters(), ours.parameters()):
            close(summed(p2.grad), p1.grad, name)
            p1.grad = p2.grad = None
        for (name, b1), b2 in zip(ref.named_buffers(), ours.buffers()):
            close(b2, b1, name)


for momentum in [0.3, None]:
    ref = nn.BatchNorm2d(6, momentum=momentum, eps=1e-3).double()
    with torch.no_grad():
        ref.weight.normal_(generator=g)
        ref.bias.normal_(generator=g)
    ours = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(6, momentum=momentum, eps=1e-3).double()))[0]
    ours.load_state_dict(ref.state_dict())
    compare(ref.train(), ours.train())
    with torch.no_grad():
        close(ours.eval()(x[mine]), ref.eval()(x)[mine], "eval")

for kind in ["affine", "track_running_stats"]:  # not synchronised: BatchNorm2d on this process's batch alone
    local = nn.BatchNorm2d(6, **{kind: False}).double()
    ours = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(6, **{kind: False}).double()))[0]
    close(ours.train()(x[mine]), local.train()(x[mine]), kind)

try:
    SyncBatchNorm2d(6).double().train()(x[mine].flatten(2))
    raise AssertionError("3-d input accepted")
except ArgumentError as e:
    assert "expects (N, C, H, W) input" in str(e)

calls = []
real = efficient.sync_moments
efficient.sync_moments = lambda *a, **k: calls.append(1) or real(*a, **k)
for bottleneck in [True, False]:
    for memory_efficient in [False, True]:
        torch.manual_seed(3)
        ref = DenseBlock(3, 6, 4, bottleneck, fast=False).double()
        with torch.no_grad():
            for m in ref.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.normal_(generator=g)
                    m.bias.normal_(generator=g)
        ours = DenseBlock(3, 6, 4, bottleneck, fast=True, memory_efficient=memory_efficient).double()
        ours.load_state_dict(ref.state_dict())
        convert_sync_batchnorm(ours)
        calls.clear()
        compare(ref.train(), ours.train())
        # the shared-buffer path with synchronised statistics ran: the block input and each layer's
        # k new maps (and each bottleneck's BN2), per step
        assert len(calls) == 2 * (1 + 3 + (3 if bottleneck else 0)), (bottleneck, memory_efficient, len(calls))
dist.barrier()
dist.destroy_process_group()
print(f"rank {rank} ok", flush=True)
"""


def test_two_processes_with_unequal_batches_compute_what_one_process_computes(tmp_path):
    """Two gloo processes (3 and 2 images) against one process with all 5 images, float64: the
    synchronised statistics, outputs, input gradients, summed parameter gradients and running
    statistics of SyncBatchNorm2d and of the shared-buffer dense blocks (fast and memory-efficient)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(rank), init], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"rank {rank} ok" in out, out[-3000:]
