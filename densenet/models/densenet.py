"""DenseNet (Huang, Liu, van der Maaten, Weinberger, CVPR 2017) as PyTorch modules.

Parameter names follow torchvision's DenseNet (``features.denseblock1.denselayer1.conv1.weight``,
...), so that its state dicts load without renaming.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError, ArgumentTypeError, check_int
from .efficient import (
    bn_relu_pool,
    bn_relu_pool_eval,
    can_fuse_bn_relu_pool,
    can_use_fast_block,
    fast_block_forward,
    hooks_inside,
)

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet", "STEMS", "EXECUTION_MODES"]

STEMS = ("cifar", "imagenet")
#: how dense blocks and transitions compute (see :meth:`DenseNet.set_execution`)
EXECUTION_MODES = ("reference", "fast", "memory_efficient")


def execution_mode(fast: bool, memory_efficient: bool) -> str:
    """The mode of the two switches: memory-efficient wins, then fast, else the reference form."""
    return "memory_efficient" if memory_efficient else "fast" if fast else "reference"


def _check_fraction(name: str, value: object, low_open: bool) -> float:
    """A float in (0, 1] (``low_open``) or [0, 1)."""
    interval = "(0, 1]" if low_open else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a float in {interval}, got {type(value).__name__} {value!r}")
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value < 1.0):
        raise ArgumentError(f"{name} must be in {interval}, got {value}")
    return float(value)


class DenseLayer(nn.Module):
    """Composite function H_l: BN-ReLU-3x3 conv producing ``growth_rate`` maps.

    With ``bottleneck`` (DenseNet-B), BN-ReLU-1x1 conv producing ``bn_size * growth_rate`` maps
    comes first. Dropout (rate ``drop_rate``) follows each convolution.

    Input: a list of feature maps ``[x_0, ..., x_{l-1}]``, each (N, C_i, H, W), sum C_i = in_channels.
    Output: (N, growth_rate, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bottleneck: bool = True,
        bn_size: int = 4,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.bottleneck = bottleneck
        self.drop_rate = drop_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        if bottleneck:
            inter = bn_size * growth_rate
            self.conv1 = nn.Conv2d(in_channels, inter, kernel_size=1, bias=False)
            self.norm2 = nn.BatchNorm2d(inter)
            self.relu2 = nn.ReLU()
            self.conv2 = nn.Conv2d(inter, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1) if len(features) > 1 else features[0]
        x = self._dropout(self.conv1(self.relu1(self.norm1(x))))
        if self.bottleneck:
            x = self._dropout(self.conv2(self.relu2(self.norm2(x))))
        return x


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; layer l reads the concatenation of the block input and all
    earlier layers' outputs.

    Input (N, in_channels, H, W); output (N, in_channels + num_layers * growth_rate, H, W).
    """

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bottleneck: bool = True,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        fast: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels + num_layers * growth_rate
        self.execution = execution_mode(fast, memory_efficient)  # set by DenseNet.set_execution
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        if self.execution != "reference" and can_use_fast_block(self, x):
            return fast_block_forward(self, x, self.execution == "memory_efficient")
        return self._forward_reference(x)

    def _forward_reference(self, x: Tensor) -> Tensor:
        """The paper's formulation, layer by layer on lists of feature maps (what hooks see)."""
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-(dropout)-2x2 average pool between two dense blocks.

    Input (N, in_channels, H, W); output (N, out_channels, H // 2, W // 2).
    """

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.add_module("norm", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU())
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False))
        if drop_rate > 0:
            self.add_module("drop", nn.Dropout(drop_rate))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))
        self.execution = "fast"  # set by DenseNet.set_execution

    def forward(self, x: Tensor) -> Tensor:
        """The paper's order, BN-ReLU-conv-pool, or in the fast path BN-ReLU-pool-conv: a 1x1
        convolution and a 2x2 average commute, so pooling first gives the same maps with 4x fewer
        convolution multiply-adds; in training BN-ReLU-pool is one step that keeps only its input for
        backward (``densenet.models.efficient.bn_relu_pool``). Dropout in training and hooks on any
        part of the transition keep the paper's order, so that every hook sees what it expects."""
        if self.execution == "reference" or (self.training and "drop" in self._modules) or hooks_inside(self):
            return super().forward(x)
        if can_fuse_bn_relu_pool(self.norm, x):
            return self.conv(bn_relu_pool(self.norm, x))
        pooled = bn_relu_pool_eval(self.norm, x)
        if pooled is not None:
            return self.conv(pooled)
        return self.conv(self.pool(self.relu(self.norm(x))))


class DenseNet(nn.Module):
    """A DenseNet anywhere in the paper's design space.

    Args:
        growth_rate: k, maps added by each dense layer.
        block_config: number of layers of each dense block (any number of blocks).
        bottleneck: DenseNet-B, a 1x1 conv to ``bn_size * k`` maps before each 3x3 conv.
        compression: theta in (0, 1]; a transition keeps floor(theta * m) of its m input maps.
        stem: ``"cifar"`` (3x3 conv, stride 1) or ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max pool).
        stem_channels: maps of the stem conv; default 2k for bottleneck or compressed models
            and for the ImageNet stem, 16 for the basic CIFAR DenseNet (as in the paper).
        num_classes: outputs of the linear classifier (0: no classifier, ``forward`` gives pooled features).
        in_channels: channels of the input image.
        drop_rate: dropout after every convolution except the stem's.
        bn_size: bottleneck width factor (4 in the paper).
        memory_efficient: dense blocks keep only their output buffer for backward and recompute
            BN-ReLU-1x1 conv-BN-ReLU there: activation memory linear in depth, same results.
        fast: run dense blocks on one shared channels_last buffer with BN statistics computed once
            (same outputs, gradients and running statistics as the layer-by-layer form, which is
            used anyway for dropout in training, hooks inside a block, and eval mode with gradients).
            Both can be changed later with :meth:`set_execution`.

    Input (N, in_channels, H, W) float; output (N, num_classes) logits.
    """

    def __init__(
        self,
        growth_rate: int = 12,
        block_config: Sequence[int] = (16, 16, 16),
        bottleneck: bool = True,
        compression: float = 0.5,
        stem: str = "cifar",
        stem_channels: int | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        bn_size: int = 4,
        memory_efficient: bool = False,
        fast: bool = True,
    ) -> None:
        super().__init__()
        check_int("growth_rate", growth_rate)
        if isinstance(block_config, (str, bytes)) or not isinstance(block_config, Sequence) or not block_config:
            raise ArgumentTypeError(f"block_config must be a non-empty sequence of positive ints, got {block_config!r}")
        for n in block_config:
            check_int("every entry of block_config", n)
        compression = _check_fraction("compression", compression, low_open=True)
        if stem not in STEMS:
            raise ArgumentError(f"stem must be one of {STEMS}, got {stem!r}")
        if stem_channels is None:
            stem_channels = 2 * growth_rate if (bottleneck or compression < 1 or stem == "imagenet") else 16
        check_int("stem_channels", stem_channels)
        check_int("num_classes", num_classes, minimum=0)
        check_int("in_channels", in_channels)
        check_int("bn_size", bn_size)
        drop_rate = _check_fraction("drop_rate", drop_rate, low_open=False)

        self.growth_rate = growth_rate
        self.block_config = tuple(block_config)
        self.bottleneck = bool(bottleneck)
        self.compression = float(compression)
        self.stem = stem
        self.stem_channels = stem_channels
        self.in_channels = in_channels
        self.drop_rate = drop_rate
        self.bn_size = bn_size
        self.num_classes = num_classes

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if stem == "cifar":
            layers["conv0"] = nn.Conv2d(in_channels, stem_channels, kernel_size=3, padding=1, bias=False)
        else:
            layers["conv0"] = nn.Conv2d(in_channels, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
            layers["norm0"] = nn.BatchNorm2d(stem_channels)
            layers["relu0"] = nn.ReLU()
            layers["pool0"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        channels = stem_channels
        self.feature_info: list[dict] = []
        reduction = 1 if stem == "cifar" else 4
        for i, num_layers in enumerate(self.block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bottleneck, bn_size, drop_rate)
            layers[f"denseblock{i + 1}"] = block
            channels = block.out_channels
            self.feature_info.append(
                {"num_chs": channels, "reduction": reduction, "module": f"features.denseblock{i + 1}"}
            )
            if i != len(self.block_config) - 1:
                out = int(math.floor(compression * channels))
                if out < 1:
                    raise ArgumentError(f"compression {compression} leaves no feature maps after block {i + 1}")
                layers[f"transition{i + 1}"] = Transition(channels, out, drop_rate)
                channels = out
                reduction *= 2
        layers["norm5"] = nn.BatchNorm2d(channels)
        layers["relu5"] = nn.ReLU()
        self.features = nn.Sequential(layers)
        self.num_features = channels
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier: nn.Module = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self.fast, self.memory_efficient = True, False
        self.set_execution(fast=fast, memory_efficient=memory_efficient)
        self.reset_parameters()

    def set_execution(self, fast: bool | None = None, memory_efficient: bool | None = None) -> "DenseNet":
        """Choose how the dense blocks and transitions compute; None keeps a switch as it is.

        ``fast``: shared-buffer blocks with BN statistics computed once, pool-first transitions.
        ``memory_efficient``: the same, keeping only each block's buffer for backward (recomputing
        the rest); it implies the fast forms. Both off: the paper's layer-by-layer form. Every mode
        gives the same outputs, gradients and BN running statistics; parameters are untouched.
        Returns the model.
        """
        if fast is not None:
            self.fast = bool(fast)
        if memory_efficient is not None:
            self.memory_efficient = bool(memory_efficient)
        mode = execution_mode(self.fast, self.memory_efficient)
        for m in self.modules():
            if isinstance(m, DenseBlock):
                m.execution = mode
            elif isinstance(m, Transition):
                m.execution = "reference" if mode == "reference" else "fast"
        return self

    # ------------------------------------------------------------------ set-up
    def reset_parameters(self) -> None:
        """Initialise as the authors' code: He normal with fan_out for convolutions
        (std sqrt(2 / (k*k*out_channels))), BN weight 1 and bias 0, linear bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs
        (0: none, the model then returns pooled features)."""
        check_int("num_classes", num_classes, minimum=0)
        self.num_classes = num_classes
        ref = next(self.parameters())
        if num_classes > 0:
            self.classifier = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.classifier = nn.Identity()

    # ------------------------------------------------------------------ shapes
    @property
    def min_input_size(self) -> int:
        """Smallest height/width (pixels) that leaves at least one pixel in the last block."""
        size = 1
        while self.spatial_sizes(size)[-1] < 1:
            size += 1
        return size

    def spatial_sizes(self, size: int) -> list[int]:
        """Side length (pixels) of the feature maps in each dense block for an input of ``size``."""
        if self.stem == "imagenet":
            size = (size - 1) // 2 + 1  # 7x7 conv, stride 2, padding 3
            size = (size - 1) // 2 + 1  # 3x3 max pool, stride 2, padding 1
        sizes = [size]
        for _ in self.block_config[1:]:
            size = size // 2
            sizes.append(size)
        return sizes

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error if ``x`` is not a (N, in_channels, H, W) batch the stem accepts."""
        if not isinstance(x, Tensor):
            raise ArgumentTypeError(f"DenseNet expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""
            raise ArgumentError(
                f"DenseNet expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] != self.in_channels:
            raise ArgumentError(
                f"DenseNet expects {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}; set in_channels when creating the model)"
            )
        if not x.is_floating_point():
            raise ArgumentTypeError(f"DenseNet expects a floating-point input, got {x.dtype} (convert with x.float())")
        self.check_input_size(int(x.shape[2]), int(x.shape[3]))

    def check_input_size(self, height: int, width: int | None = None) -> None:
        """Raise a clear error if a ``height`` x ``width`` image is too small for the stem and blocks."""
        width = height if width is None else width
        if min(height, width) < self.min_input_size:
            raise ArgumentError(
                f"input of {height}x{width} pixels is too small for this DenseNet ({self.stem} stem, "
                f"{len(self.block_config)} blocks): height and width must be at least {self.min_input_size}"
            )

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> last feature map after the final BN-ReLU, (N, num_features, h, w)."""
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            self.check_input(x)
        if (self.fast or self.memory_efficient) and not (self.training and self.drop_rate > 0):
            # channels_last suits the shared-buffer blocks; with dropout in training the blocks run
            # layer by layer, kept in NCHW so that dropout masks match the reference bit for bit
            x = x.contiguous(memory_format=torch.channels_last)
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, num_features, h, w) -> (N, num_classes) logits, or (N, num_features) with ``pre_logits``."""
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """Output of every dense block, for use as a detection/segmentation backbone.

        Returns one (N, C_i, H_i, W_i) tensor per block, C_i and the stride in ``feature_info``;
        the last one is the raw block output, before the final BN-ReLU.
        """
        self.check_input(x)
        outputs = []
        for name, module in self.features.named_children():
            if name in ("norm5", "relu5"):
                break
            x = module(x)
            if name.startswith("denseblock"):
                outputs.append(x)
        return outputs

    def extra_repr(self) -> str:
        return (
            f"growth_rate={self.growth_rate}, block_config={self.block_config}, bottleneck={self.bottleneck}, "
            f"compression={self.compression}, stem={self.stem!r}, drop_rate={self.drop_rate}, "
            f"memory_efficient={self.memory_efficient}, fast={self.fast}"
        )

    def config(self) -> dict:
        """The constructor arguments that rebuild this architecture: ``DenseNet(**model.config())``."""
        return {
            "growth_rate": self.growth_rate,
            "block_config": list(self.block_config),
            "bottleneck": self.bottleneck,
            "compression": self.compression,
            "stem": self.stem,
            "stem_channels": self.stem_channels,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "drop_rate": self.drop_rate,
            "bn_size": self.bn_size,
            "memory_efficient": self.memory_efficient,
            "fast": self.fast,
        }
