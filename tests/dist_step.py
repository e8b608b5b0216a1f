"""Run under torchrun by tests/test_distributed.py: one SGD step of DenseNet-BC in float64, N
processes x batch 8/N with DistributedDataParallel and synchronised BN, against one process x
batch 8 computed on rank 0; prints the worst relative differences of gradients and BN buffers.

Usage: torchrun --standalone --nproc_per_node 2 tests/dist_step.py [--memory-efficient] [--reference-path]
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from densenet import create_model
from densenet.models.sync_bn import convert_sync_batchnorm


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    me = "--memory-efficient" in sys.argv
    torch.manual_seed(0)
    model = create_model("densenet_bc16_k12", num_classes=10, memory_efficient=me).double()
    if "--reference-path" in sys.argv:  # the paper's layer-by-layer path instead of the shared buffer
        model.set_execution(fast=False, memory_efficient=False)
    single = create_model("densenet_bc16_k12", num_classes=10).double()
    single.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64) * 3 + 1
    y = torch.randint(0, 10, (8,), generator=g)
    F.cross_entropy(single(x), y).backward()

    convert_sync_batchnorm(model)
    ddp = DDP(model, forward_sync_buffers=False)
    share = 8 // world
    F.cross_entropy(ddp(x[rank * share:(rank + 1) * share]), y[rank * share:(rank + 1) * share]).backward()
    grad = max(((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
               for p, q in zip(model.parameters(), single.parameters()))
    buffers = max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()
                  for a, b in zip(model.buffers(), single.buffers()))
    tracked = {int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}
    print(f"rank {rank}: grad {grad:.3e} buffers {buffers:.3e} tracked {sorted(tracked)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
