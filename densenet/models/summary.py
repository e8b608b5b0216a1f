"""Counting a model: parameters, multiply-adds (by torch's FLOP counter) and per-stage shapes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .densenet import DenseNet

__all__ = ["count_parameters", "count_macs", "StageInfo", "stage_summary"]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable and frozen parameters (BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: DenseNet, input_size: int) -> int:
    """Multiply-adds of one forward pass of one ``input_size`` x ``input_size`` image (a signal of
    that length, a volume of that side, for 1-D and 3-D models).

    Counted by ``torch.utils.flop_counter`` (which reports 2 FLOPs per multiply-add) on a copy of
    the architecture on the meta device: no memory, no arithmetic, any model size. The count is
    that of the paper's formulation (as torchvision's): transitions convolve, then pool. The fast
    path pools first and does fewer multiply-adds than counted here.
    """
    with torch.device("meta"):
        meta = DenseNet(**{**model.config(), "fast": False, "memory_efficient": False}).eval()
        x = torch.empty(1, model.in_channels, *(input_size,) * model.spatial_dims)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(x)
    return counter.get_total_flops() // 2


@dataclass
class StageInfo:
    name: str
    in_channels: int
    out_channels: int
    size: int  # side of the output feature map, pixels
    params: int


def stage_summary(model: DenseNet, input_size: int) -> list[StageInfo]:
    """One row per stage (stem, each dense block and transition, head) for an ``input_size`` input."""
    rows = []
    stem = [m for n, m in model.features.named_children() if n.endswith("0")]
    sizes = model.spatial_sizes(input_size)
    rows.append(StageInfo("stem", model.in_channels, model.stem_channels, sizes[0],
                          sum(count_parameters(m) for m in stem)))
    for i, _ in enumerate(model.block_config):
        block = model.features.get_submodule(f"denseblock{i + 1}")
        rows.append(StageInfo(f"denseblock{i + 1} ({len(block)} layers)", block.in_channels,
                              block.out_channels, sizes[i], count_parameters(block)))
        if i + 1 < len(model.block_config):
            t = model.features.get_submodule(f"transition{i + 1}")
            rows.append(StageInfo(f"transition{i + 1}", t.in_channels, t.out_channels, sizes[i + 1],
                                  count_parameters(t)))
    head_params = count_parameters(model.features.norm5) + count_parameters(model.classifier)
    rows.append(StageInfo("head (BN-ReLU, pool, linear)", model.num_features, model.num_classes, 1, head_params))
    return rows
