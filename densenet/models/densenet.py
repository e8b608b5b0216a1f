"""DenseNet (Huang, Liu, van der Maaten, Weinberger, CVPR 2017) as PyTorch modules, for 1-D signals,
2-D images and 3-D volumes (``spatial_dims``).

Parameter names follow torchvision's DenseNet (``features.denseblock1.denselayer1.conv1.weight``,
...), so that its state dicts load without renaming; with ``spatial_dims`` 1 or 3 the same names hold
1-D or 3-D convolutions and batch norms (MONAI's ``DenseNet`` of the same arguments has the same
parameters, under its own names: ``densenet.models.weights.to_monai_state_dict``).
"""

import math
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError, ArgumentTypeError, check_int
from .efficient import (
    bn_relu_pool,
    bn_relu_pool_eval,
    can_fuse_bn_relu_pool,
    can_fuse_stem,
    can_use_fast_block,
    fast_block_forward,
    fused_stem,
    hooks_inside,
)

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet", "Features", "GlobalPool", "STEMS", "EXECUTION_MODES",
           "POOL_TYPES", "SPATIAL_DIMS", "feature_take_indices", "channels_last_format"]

STEMS = ("cifar", "imagenet")
POOL_TYPES = ("", "avg", "max", "avgmax")  # timm's names: "" keeps the (N, C, h, w) maps
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10 training images
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: how dense blocks and transitions compute (see :meth:`DenseNet.set_execution`)
EXECUTION_MODES = ("reference", "fast", "memory_efficient")
#: 1: signals (N, C, L); 2: images (N, C, H, W); 3: volumes (N, C, D, H, W)
SPATIAL_DIMS = (1, 2, 3)
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_SHAPES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def check_spatial_dims(spatial_dims: object) -> int:
    """``spatial_dims`` if it is 1, 2 or 3; else ArgumentTypeError / ArgumentError."""
    check_int("spatial_dims", spatial_dims)
    if spatial_dims not in SPATIAL_DIMS:
        raise ArgumentError(f"spatial_dims must be 1 (signals), 2 (images) or 3 (volumes), got {spatial_dims}")
    return int(spatial_dims)


def channels_last_format(spatial_dims: int) -> torch.memory_format | None:
    """The channels-last memory format of a ``spatial_dims`` input (None for 1-D: (N, C, L) has none)."""
    return {2: torch.channels_last, 3: torch.channels_last_3d}.get(spatial_dims)


def execution_mode(fast: bool, memory_efficient: bool) -> str:
    """The mode of the two switches: memory-efficient wins, then fast, else the reference form."""
    return "memory_efficient" if memory_efficient else "fast" if fast else "reference"


def traced(x: Any) -> bool:
    """Whether ``x`` is being scripted, traced or symbolically traced (torch.jit, torch.fx): input
    checks must not branch on traced values; torch.jit records the layer-by-layer form (torch.fx
    records dense blocks and transitions as calls of their modules instead: :func:`fx_leaf_path`)."""
    return torch.jit.is_scripting() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)


def fx_leaf_path(module: nn.Module, x: Any) -> str | None:
    """While torch.fx traces ``x`` (a ``torch.fx.Proxy``) through ``module``: the module's path under the
    module being traced, so that the graph can call ``module`` itself (a leaf, as torch.fx calls a
    ``nn.Conv2d``) and so run its forward, fast kernels included, exactly as eager mode runs them.
    None when nothing is being traced, or when ``module`` is itself the module being traced (or not
    under it): the layer-by-layer form is recorded then."""
    if not isinstance(x, torch.fx.Proxy):
        return None
    try:
        path = x.tracer.path_of_module(module)
    except (NameError, AttributeError):  # not a submodule of the traced module / a tracer without paths
        return None
    return path or None


def fx_leaf_call(module: nn.Module, x: Any) -> Any:
    """The graph node that calls ``module`` on ``x`` (see :func:`fx_leaf_path`); torchvision's and timm's
    feature extractors name it by the module's path (``features.denseblock1``), as their feature levels."""
    return x.tracer.create_proxy("call_module", fx_leaf_path(module, x), (x,), {})


def feature_take_indices(levels: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's selection of feature levels: None -> all, int n -> the last n, a sequence -> those
    (negative from the end). Returns (the levels in order, the highest)."""
    if indices is None:
        indices = levels
    if isinstance(indices, int):
        if not 0 < indices <= levels:
            raise ArgumentError(f"indices={indices} asks for the last {indices} of {levels} feature levels")
        take = list(range(levels - indices, levels))
    else:
        take = [i + levels if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, take) if not 0 <= t < levels]
        if bad or not take:
            raise ArgumentError(f"feature indices {list(indices)} are not in 0..{levels - 1} (or -{levels}..-1)")
    return take, max(take)


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

    Input: a list of feature maps ``[x_0, ..., x_{l-1}]``, each (N, C_i, H, W), sum C_i = in_channels
    ((N, C_i, L) with ``spatial_dims=1``, (N, C_i, D, H, W) with 3). Output: (N, growth_rate, H, W).
    """

    __constants__ = ["bottleneck"]  # a constant for TorchScript: basic layers have no norm2/conv2

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bottleneck: bool = True,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.bottleneck = bottleneck
        self.drop_rate = drop_rate
        self.spatial_dims = spatial_dims = check_spatial_dims(spatial_dims)
        conv, norm = _CONV[spatial_dims], _NORM[spatial_dims]
        self.norm1 = norm(in_channels)
        self.relu1 = nn.ReLU()
        if bottleneck:
            inter = bn_size * growth_rate
            self.conv1 = conv(in_channels, inter, kernel_size=1, bias=False)
            self.norm2 = norm(inter)
            self.relu2 = nn.ReLU()
            self.conv2 = conv(inter, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = conv(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)

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
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels + num_layers * growth_rate
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.execution = execution_mode(fast, memory_efficient)  # set by DenseNet.set_execution
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck, bn_size, drop_rate, spatial_dims)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self._fx_leaf_applies(x):
            return self._fx_leaf(x)
        if not torch.jit.is_scripting() and self._fast_applies(x):
            return self._forward_fast(x)
        return self._forward_reference(x)

    @torch.jit.unused
    def _fx_leaf_applies(self, x: torch.Tensor) -> bool:
        """torch.fx is tracing: in the fast modes the graph calls this block (decided when it runs)."""
        return self.execution != "reference" and fx_leaf_path(self, x) is not None

    @torch.jit.unused
    def _fx_leaf(self, x: torch.Tensor) -> torch.Tensor:
        return fx_leaf_call(self, x)

    @torch.jit.unused
    def _fast_applies(self, x: torch.Tensor) -> bool:
        return self.execution != "reference" and not traced(x) and can_use_fast_block(self, x)

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        return fast_block_forward(self, x, self.execution == "memory_efficient")

    def _forward_reference(self, x: Tensor) -> Tensor:
        """The paper's formulation, layer by layer on lists of feature maps (what hooks see)."""
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-(dropout)-2x2 average pool between two dense blocks.

    Input (N, in_channels, H, W); output (N, out_channels, H // 2, W // 2) (every spatial side halved
    with ``spatial_dims`` 1 or 3: a 2-wide or 2x2x2 average).
    """

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0, spatial_dims: int = 2) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_dims = spatial_dims = check_spatial_dims(spatial_dims)
        self.add_module("norm", _NORM[spatial_dims](in_channels))
        self.add_module("relu", nn.ReLU())
        self.add_module("conv", _CONV[spatial_dims](in_channels, out_channels, kernel_size=1, bias=False))
        if drop_rate > 0:
            self.add_module("drop", nn.Dropout(drop_rate))
        self.add_module("pool", _AVG_POOL[spatial_dims](kernel_size=2, stride=2))
        self.execution = "fast"  # set by DenseNet.set_execution

    def forward(self, x: Tensor) -> Tensor:
        """The paper's order, BN-ReLU-conv-pool, or in the fast path BN-ReLU-pool-conv: a 1x1
        convolution and a 2x2 average commute, so pooling first gives the same maps with 4x fewer
        convolution multiply-adds (8x in 3-D, 2x in 1-D); in training BN-ReLU-pool is one step that keeps only its input for
        backward (``densenet.models.efficient.bn_relu_pool``). Dropout in training and hooks on any
        part of the transition keep the paper's order, so that every hook sees what it expects."""
        if not torch.jit.is_scripting() and self._fx_leaf_applies(x):
            return self._fx_leaf(x)
        if not torch.jit.is_scripting() and self._fast_applies(x):
            return self._forward_fast(x)
        return self._forward_reference(x)

    def _forward_reference(self, x: Tensor) -> Tensor:
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _fx_leaf_applies(self, x: torch.Tensor) -> bool:
        """torch.fx is tracing: in the fast modes the graph calls this transition (decided when it runs)."""
        return self.execution != "reference" and fx_leaf_path(self, x) is not None

    @torch.jit.unused
    def _fx_leaf(self, x: torch.Tensor) -> torch.Tensor:
        return fx_leaf_call(self, x)

    @torch.jit.unused
    def _fast_applies(self, x: torch.Tensor) -> bool:
        return (self.execution != "reference" and not traced(x) and not (self.training and "drop" in self._modules)
                and not hooks_inside(self))

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if can_fuse_bn_relu_pool(self.norm, x):
            return self.conv(bn_relu_pool(self.norm, x))
        pooled = bn_relu_pool_eval(self.norm, x)
        if pooled is not None:
            return self.conv(pooled)
        return self.conv(self.pool(self.relu(self.norm(x))))


class Features(nn.Sequential):
    """The feature extractor (``model.features``, torchvision's names): its modules in order. In the
    fast modes, training with gradients, the ImageNet stem's BN-ReLU-max pool runs as one step that
    keeps only the stem convolution's output for backward (``densenet.models.efficient.fused_stem``:
    the ReLU output and the pool's indices are recomputed there); the memory-efficient mode keeps only
    the stem's input (the convolution runs again in backward). Hooks on the stem's modules, tracing
    and scripting keep the module-by-module form."""

    _STEM = ["conv0", "norm0", "relu0", "pool0"]

    def __init__(self, layers: "OrderedDict[str, nn.Module]") -> None:
        super().__init__(layers)
        self.execution = "fast"  # set by DenseNet.set_execution

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self._stem_fuses(x):
            return self._forward_fused_stem(x)
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _stem_fuses(self, x: torch.Tensor) -> bool:
        return (self.execution != "reference" and self.training and torch.is_grad_enabled() and not traced(x)
                and list(self._modules)[:4] == self._STEM)

    @torch.jit.unused
    def _forward_fused_stem(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self._modules.values())
        conv, norm, relu, pool = modules[:4]
        if _plain_conv(conv) and can_fuse_stem(norm, relu, pool, x, conv):
            x = fused_stem(conv, norm, x, keep_output=self.execution != "memory_efficient")
        else:
            x = pool(relu(norm(conv(x))))
        for module in modules[4:]:
            x = module(x)
        return x


def _plain_conv(conv: nn.Module) -> bool:
    """A bias-free, zero-padded nn.Conv1d/2d/3d without hooks (what the fused stem recomputes)."""
    return (type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and conv.bias is None and conv.padding_mode == "zeros"
            and not (conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks or conv._backward_pre_hooks))


class GlobalPool(nn.Module):
    """Global pooling of (N, C, H, W) maps ((N, C, L), (N, C, D, H, W) with ``spatial_dims`` 1, 3):
    ``"avg"``, ``"max"`` or ``"avgmax"`` (their mean) give (N, C); ``""`` keeps the maps (no
    classifier can follow)."""

    def __init__(self, pool_type: str = "avg", spatial_dims: int = 2) -> None:
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ArgumentError(f"global_pool must be one of {POOL_TYPES}, got {pool_type!r}")
        self.pool_type = pool_type
        self.dims: list[int] = list(range(2, 2 + check_spatial_dims(spatial_dims)))  # static: fx and TorchScript

    def forward(self, x: Tensor) -> Tensor:
        if self.pool_type == "":
            return x
        if self.pool_type == "avg":
            return x.mean(self.dims)
        if self.pool_type == "max":
            return x.amax(self.dims)
        return 0.5 * (x.mean(self.dims) + x.amax(self.dims))

    def extra_repr(self) -> str:
        return repr(self.pool_type)


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
        in_channels: channels of the input image (``in_chans``, timm's name, is the same).
        drop_rate: dropout after every convolution except the stem's.
        bn_size: bottleneck width factor (4 in the paper).
        memory_efficient: dense blocks keep only their output buffer for backward and recompute
            BN-ReLU-1x1 conv-BN-ReLU there: activation memory linear in depth, same results.
        fast: run dense blocks on one shared channels_last buffer with BN statistics computed once
            (same outputs, gradients and running statistics as the layer-by-layer form, which is
            used anyway for dropout in training, hooks inside a block, and eval mode with gradients).
            Both can be changed later with :meth:`set_execution`.
        global_pool: ``"avg"`` (the paper's), ``"max"``, ``"avgmax"``, or ``""`` for unpooled maps
            (with ``num_classes=0``: ``forward`` then gives (N, num_features, h, w)).
        drop_path_rate: timm's stochastic depth; DenseNets have no residual paths, so only 0 or None.
        spatial_dims: 2 (images, the default), 1 (signals, input (N, C, L)) or 3 (volumes, input
            (N, C, D, H, W)): every convolution, batch norm and pooling of that dimension, with the
            same kernel sizes along each axis (MONAI's ``DenseNet(spatial_dims=...)`` has the same
            architecture and parameters with the ImageNet stem).

    Input (N, in_channels, H, W) float; output (N, num_classes) logits.

    The timm model interface: ``forward_features``, ``forward_head``, ``forward_intermediates``,
    ``prune_intermediate_layers``, ``feature_info`` (the stem, each block but the last, and the final
    BN-ReLU, as timm's DenseNets), ``num_features``, ``head_hidden_size``, ``get_classifier``,
    ``reset_classifier``, ``set_grad_checkpointing`` (the memory-efficient mode), ``group_matcher`` and
    ``pretrained_cfg``.
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
        global_pool: str = "avg",
        in_chans: int | None = None,
        drop_path_rate: float | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        if in_chans is not None:
            if in_channels not in (3, in_chans):
                raise ArgumentError(f"in_chans={in_chans} and in_channels={in_channels} disagree; give one")
            in_channels = in_chans
        if drop_path_rate:
            raise ArgumentError(f"drop_path_rate={drop_path_rate}: a DenseNet has no residual paths to drop; "
                                "use drop_rate (dropout after each convolution)")
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
        self.spatial_dims = spatial_dims
        d = spatial_dims

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if stem == "cifar":
            layers["conv0"] = _CONV[d](in_channels, stem_channels, kernel_size=3, padding=1, bias=False)
        else:
            layers["conv0"] = _CONV[d](in_channels, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
            layers["norm0"] = _NORM[d](stem_channels)
            layers["relu0"] = nn.ReLU()
            layers["pool0"] = _MAX_POOL[d](kernel_size=3, stride=2, padding=1)

        channels = stem_channels
        # feature levels, as timm's DenseNets: the activated stem, each block but the last, the final BN-ReLU
        self.feature_info = [
            {"num_chs": stem_channels, "reduction": 1 if stem == "cifar" else 2,
             "module": "features.conv0" if stem == "cifar" else "features.relu0"}]
        reduction = 1 if stem == "cifar" else 4
        for i, num_layers in enumerate(self.block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bottleneck, bn_size, drop_rate, spatial_dims=d)
            layers[f"denseblock{i + 1}"] = block
            channels = block.out_channels
            if i != len(self.block_config) - 1:
                self.feature_info.append(
                    {"num_chs": channels, "reduction": reduction, "module": f"features.denseblock{i + 1}"})
                out = int(math.floor(compression * channels))
                if out < 1:
                    raise ArgumentError(f"compression {compression} leaves no feature maps after block {i + 1}")
                layers[f"transition{i + 1}"] = Transition(channels, out, drop_rate, d)
                channels = out
                reduction *= 2
        layers["norm5"] = _NORM[d](channels)
        layers["relu5"] = nn.ReLU()
        self.feature_info.append({"num_chs": channels, "reduction": reduction, "module": "features.relu5"})
        self.features = Features(layers)
        self.num_features = self.head_hidden_size = channels
        self.global_pool = GlobalPool(global_pool, d)
        if num_classes > 0 and global_pool == "":
            raise ArgumentError("global_pool='' keeps unpooled maps, which no linear classifier takes: "
                                "use num_classes=0 with it")
        self.classifier: nn.Module = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = default_pretrained_cfg(stem, in_channels, num_classes, d)
        self.fast, self.memory_efficient = True, False
        self.set_execution(fast=fast, memory_efficient=memory_efficient)
        if d == 3:
            # 3-D convolution weights in the layout of the activations (channels_last_3d): oneDNN would
            # otherwise reorder every weight and its gradient at every call (the state dict is the same)
            for m in self.modules():
                if isinstance(m, nn.Conv3d):
                    m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
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
            elif isinstance(m, Features):
                m.execution = mode
        return self

    # ------------------------------------------------------------------ set-up
    def reset_parameters(self) -> None:
        """Initialise as the authors' code: He normal with fan_out for convolutions
        (std sqrt(2 / (k*k*out_channels))), BN weight 1 and bias 0, linear bias 0."""
        for m in self.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs
        (0: none, the model then returns pooled features), and the pooling with ``global_pool``
        (one of :data:`POOL_TYPES`; None keeps it; ``""`` keeps the maps, only without a classifier)."""
        check_int("num_classes", num_classes, minimum=0)
        pool = self.global_pool.pool_type if global_pool is None else global_pool
        if num_classes > 0 and pool == "":
            raise ArgumentError("global_pool='' keeps unpooled maps, which no linear classifier takes: "
                                "use num_classes=0 with it")
        self.global_pool = GlobalPool(pool, self.spatial_dims)
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        ref = next(self.parameters())
        if num_classes > 0:
            self.classifier = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.classifier = nn.Identity()

    # ------------------------------------------------------------------ shapes
    @property
    def min_input_size(self) -> int:
        """Smallest side (pixels, or samples / voxels) that leaves at least one pixel in the last block."""
        size = 1
        while self.spatial_sizes(size)[-1] < 1:
            size += 1
        return size

    def spatial_sizes(self, size: int) -> list[int]:
        """Side length (pixels) of the feature maps in each dense block for an input of ``size`` (along
        each spatial axis: every axis is reduced alike)."""
        if self.stem == "imagenet":
            size = (size - 1) // 2 + 1  # 7x7 conv, stride 2, padding 3
            size = (size - 1) // 2 + 1  # 3x3 max pool, stride 2, padding 1
        sizes = [size]
        for _ in self.block_config[1:]:
            size = size // 2
            sizes.append(size)
        return sizes

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error if ``x`` is not a (N, in_channels, H, W) batch the stem accepts
        ((N, in_channels, L) for ``spatial_dims=1``, (N, in_channels, D, H, W) for 3)."""
        if not isinstance(x, Tensor):
            raise ArgumentTypeError(f"DenseNet expects a torch.Tensor, got {type(x).__name__}")
        want = 2 + self.spatial_dims
        if x.dim() != want:
            hints = ["add a batch dimension with x.unsqueeze(0)"] if x.dim() == want - 1 else []
            if x.dim() in (3, 4, 5):
                hints.append(f"a {x.dim() - 2}-D input needs a model with spatial_dims={x.dim() - 2}, this one has "
                             f"spatial_dims={self.spatial_dims}")
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise ArgumentError(
                f"DenseNet expects a {want}-D input {_SHAPES[self.spatial_dims]}, got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] != self.in_channels:
            raise ArgumentError(
                f"DenseNet expects {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}; set in_channels when creating the model)"
            )
        if not x.is_floating_point():
            raise ArgumentTypeError(f"DenseNet expects a floating-point input, got {x.dtype} (convert with x.float())")
        self.check_input_size(*(int(s) for s in x.shape[2:]))

    def check_input_size(self, *sizes: int) -> None:
        """Raise a clear error if an input of ``sizes`` (height, width; or length; or depth, height,
        width; one value: the same along every axis) is too small for the stem and blocks."""
        if len(sizes) == 1:
            sizes = sizes * self.spatial_dims
        if min(sizes) < self.min_input_size:
            unit = {1: "samples", 2: "pixels", 3: "voxels"}[self.spatial_dims]
            axes = {1: "the length", 2: "height and width", 3: "depth, height and width"}[self.spatial_dims]
            raise ArgumentError(
                f"input of {'x'.join(map(str, sizes))} {unit} is too small for this DenseNet ({self.stem} stem, "
                f"{len(self.block_config)} blocks): {axes} must be at least {self.min_input_size}"
            )

    # ------------------------------------------------------------------ forward
    def _prepare(self, x: Tensor) -> Tensor:
        """Check the input (not while tracing or compiling) and give it the blocks' memory layout."""
        if not torch.jit.is_scripting():
            self._check_untraced(x)
        if self.spatial_dims > 1 and (self.fast or self.memory_efficient) and not (self.training and self.drop_rate > 0):
            # channels_last suits the shared-buffer blocks; with dropout in training the blocks run
            # layer by layer, kept in NCHW so that dropout masks match the reference bit for bit
            # (1-D input (N, C, L) has no channels-last format: the blocks read it as it is)
            x = x.contiguous(memory_format=torch.channels_last_3d if self.spatial_dims == 3 else torch.channels_last)
        return x

    @torch.jit.unused
    def _check_untraced(self, x: torch.Tensor) -> None:
        if not traced(x) and not torch.compiler.is_compiling():
            self.check_input(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> last feature map after the final BN-ReLU, (N, num_features, h, w)
        (1-D and 3-D alike: (N, C, L), (N, C, D, H, W))."""
        return self.features(self._prepare(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, num_features, h, w) -> (N, num_classes) logits, or the pooled (N, num_features) with
        ``pre_logits`` (unpooled (N, num_features, h, w) with ``global_pool=""``)."""
        x = self.global_pool(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The feature maps of the levels in ``feature_info``, for detection and segmentation backbones
        (timm's semantics).

        ``indices``: None (every level), n (the last n) or a list (negative from the end); the levels
        are the activated stem, the output of each dense block but the last (before its transition),
        and the final BN-ReLU (= ``forward_features``). ``norm``: accepted for timm; the last level is
        already normalised. ``stop_early``: stop after the last level asked for (the first return value
        is then that level). ``output_fmt``: ``"NCHW"`` or ``"NHWC"`` (channels last: (N, L, C) and
        (N, D, H, W, C) for 1-D and 3-D models). Returns ``(final features,
        [maps])``, or only the maps with ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ArgumentError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.feature_info), indices)
        taps = [info["module"].removeprefix("features.") for info in self.feature_info]
        x = self._prepare(x)
        maps: list[Tensor] = []
        for name, module in self.features.named_children():
            x = module(x)
            if name in taps:
                level = taps.index(name)
                if level in take:
                    maps.append(x.movedim(1, -1) if output_fmt == "NHWC" else x)
                if stop_early and level >= last:
                    break
        return maps if intermediates_only else (x, maps)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last feature level ``indices`` asks for (timm's semantics); with
        ``prune_head`` the classifier and pooling go too (``forward`` then gives that level's maps).
        ``prune_norm`` is accepted for timm (the final BN-ReLU is a level of its own). Returns the
        levels kept."""
        take, last = feature_take_indices(len(self.feature_info), indices)
        tap = self.feature_info[last]["module"].removeprefix("features.")
        kept: OrderedDict[str, nn.Module] = OrderedDict()
        for name, module in self.features.named_children():
            kept[name] = module
            if name == tap:
                break
        self.features = nn.Sequential(kept)
        self.feature_info = self.feature_info[: last + 1]
        self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for trading compute for memory: here the memory-efficient mode (block
        buffers kept for backward, the rest recomputed; same results)."""
        self.set_execution(memory_efficient=enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regular expressions grouping parameter names by depth (timm's layer-wise learning-rate
        decay): the stem, then each dense block (each dense layer unless ``coarse``) with its
        transition."""
        blocks: Any = r"^features\.(?:denseblock|transition)(\d+)" if coarse else [
            (r"^features\.denseblock(\d+)\.denselayer(\d+)", None),
            (r"^features\.transition(\d+)", (99999,)),  # with the layers of its block
        ]
        return {"stem": r"^features\.(?:conv0|norm0)", "blocks": blocks}

    def extra_repr(self) -> str:
        return (
            f"growth_rate={self.growth_rate}, block_config={self.block_config}, bottleneck={self.bottleneck}, "
            f"compression={self.compression}, stem={self.stem!r}, drop_rate={self.drop_rate}, "
            f"memory_efficient={self.memory_efficient}, fast={self.fast}"
            + (f", spatial_dims={self.spatial_dims}" if self.spatial_dims != 2 else "")
        )

    def config(self) -> dict:
        """The constructor arguments that rebuild this architecture: ``DenseNet(**model.config())``
        (``spatial_dims`` only for 1-D and 3-D models, so that 2-D configurations read as before)."""
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
            "global_pool": self.global_pool.pool_type,
        } | ({"spatial_dims": self.spatial_dims} if self.spatial_dims != 2 else {})


def default_pretrained_cfg(stem: str, in_channels: int, num_classes: int, spatial_dims: int = 2) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of an untrained model: the native input size and the usual data
    statistics of its family (CIFAR-10 for the CIFAR stem, ImageNet otherwise); trained weights
    replace it with their own (``densenet.get_weights``). 1-D and 3-D models: the same side along
    every axis, and mean 0, std 1 (signals and volumes are normalised per sample by the loaders)."""
    cifar = stem == "cifar"
    mean, std = (CIFAR_MEAN, CIFAR_STD) if cifar else (IMAGENET_MEAN, IMAGENET_STD)
    size = 32 if cifar else 224
    if spatial_dims != 2:
        mean, std = (0.0,) * in_channels, (1.0,) * in_channels
    elif in_channels != 3:
        mean, std = (sum(mean) / 3,) * in_channels, (sum(std) / 3,) * in_channels
    pool = 8 if cifar else 7
    return {"input_size": (in_channels, *(size,) * spatial_dims), "mean": mean, "std": std, "interpolation": "bilinear",
            "crop_pct": 1.0 if cifar else 224 / 256, "crop_mode": "center", "first_conv": "features.conv0",
            "classifier": "classifier", "num_classes": num_classes, "pool_size": (pool,) * spatial_dims}
