"""int8 DenseNets on PyTorch's oneDNN int8 convolutions, with each map quantized once when it is stored.

A dense block keeps one uint8 buffer (N, C_out, H, W), channels_last. Every map in it is stored once,
as it comes out of its convolution, before any BN, with a scale and zero point per channel (from the
calibration images' ranges). A layer's BN1-ReLU over the whole prefix is then not a float pass: with
a = gamma / sqrt(var + eps) and b = beta - mean * a per channel, and x = s * (q - z) the stored value,

    ReLU(a x + b) = A * (clamp(q) - lo) + B,   A = a s,   B = b - A z + A lo,

where clamp is max(q, t) for a > 0 and min(q, t) for a < 0, t = -b / a in q units, and lo its lower
bound (round(t) for a > 0, 0 for a < 0). So BN1-ReLU is a per-channel clamp and shift of uint8 (bytes
read and written per value), whose result h = clamp(q) - lo is small where the ReLU is 0; A is
folded into the 1x1 convolution's weights (quantized per output channel after folding), B into its
bias, and the bias is corrected for the mean error of the rounded weights on the calibration images
(without that, the folded weights lose 1-2 points of top-1 agreement). BN2 is folded into the same
convolution, whose ReLU and requantization oneDNN fuses; the per-channel output scales are folded
into each convolution's weights and bias, so oneDNN requantizes with scale 1. The 3x3 convolution writes the
layer's new maps into the buffer. A transition's BN-ReLU and 2x2 average run in float on the clamped
maps, requantized with one scale for its 1x1 convolution (folding A into that wider convolution cost
5 points of agreement). The head's BN-ReLU, global average and classifier are one float linear map
of the clamped maps' means. A 3x3 convolution straight on a prefix (no bottleneck) pads with h = 0,
where the folded shift B is missing: it runs with a float output to which the shift of the taps
inside the image is added per position, then is quantized.

CPUs without VNNI or AMX (AVX2) multiply uint8 by int8 with vpmaddubsw, which adds the products of two
neighbouring input channels into int16 and saturates. Each convolution's weight scales are raised
where a pair could pass that bound, given the largest input value of each channel (h stays below
hi - lo; 255 elsewhere), so that every CPU computes the same exact result; the shift keeps that bound
loose. (Format 1 had neither: on a Zen 3 the shipped BC-40 scored 20.78% top-1 error in int8 against
18.64% now and 18.52% in float32; bench/logs/2026-12-07-int8-accuracy-zen3.txt.)

``quantize_densenet(model, calibration)`` calibrates and builds an :class:`Int8DenseNet`;
``save_int8`` / ``load_int8`` write and read it as one safetensors file (int8 weights, scales, the
plan and the data description as JSON metadata); ``write_int8`` does both and checks the result on
the calibration images. Shapes: images (N, C, H, W) float, normalised as the float model's; logits
(N, classes) float32.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from ..errors import ArgumentError, MissingFile
from ..io.atomic import atomic_write_bytes
from ..models import DenseNet
from .loading import ExportError

__all__ = ["AGREEMENT_WARNING", "FORMAT", "Int8DenseNet", "int8_available", "is_int8_file", "load_int8",
           "quantize_densenet", "save_int8", "write_int8"]

AGREEMENT_WARNING = 0.9  # top-1 agreement with float32 on the calibration images below which a file is called broken

FORMAT = "densenet-int8"
VERSION = 2  # 2: the clamp is shifted (h = clamp(q) - lo) and no input pair can saturate
_CL = torch.channels_last


def int8_available() -> bool:
    """True where PyTorch has its oneDNN int8 convolutions (an x86 build with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def _int8_dot_products() -> bool:
    """True on CPUs with int8 dot products that do not saturate (AVX512_VNNI, AVX_VNNI, AMX)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True  # not Linux: assume so, and warn about nothing
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _require_int8() -> None:
    if not int8_available():
        raise ExportError("int8 inference needs PyTorch's oneDNN int8 convolutions (an x86 build of torch with mkldnn); "
                          "this torch has none: use --format onnx --int8 (ONNX Runtime) instead")


def _bn(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval BN as y = a x + b per channel: (a, b), float64."""
    a = norm.weight.detach().double() / torch.sqrt(norm.running_var.double() + norm.eps)
    return a, norm.bias.detach().double() - norm.running_mean.double() * a


def _qparams(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 scales and zero points (float64, per entry) that cover [low, high] and 0."""
    low, high = low.double().clamp(max=0), high.double().clamp(min=0)
    scale = ((high - low) / 255).clamp(min=1e-6)
    return scale, (-low / scale).round().clamp(0, 255)


def _fold_bn_relu(a: Tensor, b: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BN-ReLU over stored maps x = scale (q - zero), per channel (C,) each, as A clamp(q) + B:
    returns A, B (float64) and the clamp's bounds lo, hi (uint8)."""
    A, B = a * scale, b - a * scale * zero
    lo, hi = torch.zeros_like(a), torch.full_like(a, 255.0)
    t = torch.where(a != 0, -b / torch.where(a != 0, a, 1.0) / scale + zero, torch.zeros_like(a))
    up, down = a > 0, a < 0
    lo = torch.where(up, t.round().clamp(0, 255), lo)
    hi = torch.where(down, t.round().clamp(0, 255), hi)
    dead = (up & (t > 255)) | (down & (t < 0))  # ReLU gives 0 on every storable value
    flat = a == 0  # ReLU(b), whatever x
    A = torch.where(dead | flat, torch.zeros_like(A), A)
    B = torch.where(dead, torch.zeros_like(B), torch.where(flat, b.clamp(min=0), B))
    return A, B, lo.to(torch.uint8), hi.to(torch.uint8)


class _Range:
    """Running per-channel min and max of the (N, C, H, W) float tensors seen under each name."""

    def __init__(self) -> None:
        self.low: dict[str, Tensor] = {}
        self.high: dict[str, Tensor] = {}
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add_mean(self, name: str, x: Tensor) -> None:
        """Also keep the running per-channel mean of ``x`` under ``name`` (:meth:`mean`)."""
        total = x.detach().double().sum((0, 2, 3)).cpu()
        self.sums[name] = self.sums.get(name, 0) + total
        self.counts[name] = self.counts.get(name, 0) + x.numel() // x.shape[1]

    def mean(self, name: str) -> Tensor:
        return self.sums[name] / self.counts[name]

    def __call__(self, name: str, x: Tensor) -> Tensor:
        lo, hi = x.detach().amin((0, 2, 3)).double().cpu(), x.detach().amax((0, 2, 3)).double().cpu()
        self.low[name] = torch.minimum(lo, self.low.get(name, lo))
        self.high[name] = torch.maximum(hi, self.high.get(name, hi))
        return x

    def qparams(self, name: str, per_channel: bool = True) -> tuple[Tensor, Tensor]:
        """Scales and zero points (C,) (one of each with ``per_channel=False``)."""
        if per_channel:
            return _qparams(self.low[name], self.high[name])
        return _qparams(self.low[name].min(), self.high[name].max())


def _blocks(model: DenseNet) -> list[tuple[nn.Module, nn.Module | None]]:
    """[(dense block, the transition after it or None)] in order."""
    mods = model.features._modules
    return [(mods[f"denseblock{i + 1}"], mods.get(f"transition{i + 1}")) for i in range(len(model.block_config))]


@torch.no_grad()
def _observe(model: DenseNet, x: Tensor, see: _Range) -> None:
    """The float model's eval forward, layer by layer, showing ``see`` every tensor int8 stores."""
    f = model.features
    see("input", x)
    if model.stem == "cifar":
        y = see("stem", f.conv0(x))
    else:
        y = f.pool0(see("stem", f.relu0(f.norm0(f.conv0(x)))))
    for b, (block, transition) in enumerate(_blocks(model)):
        maps = [y]
        for l, layer in enumerate(block.values()):
            h = layer.relu1(layer.norm1(torch.cat(maps, 1)))
            see.add_mean(f"block{b}.layer{l}.input", h)
            if layer.bottleneck:
                h = see(f"block{b}.layer{l}.mid", layer.relu2(layer.norm2(layer.conv1(h))))
                maps.append(see(f"block{b}.layer{l}.new", layer.conv2(h)))
            else:
                maps.append(see(f"block{b}.layer{l}.new", layer.conv1(h)))
        y = torch.cat(maps, 1)
        if transition is not None:
            pooled = see(f"transition{b}.pooled", transition.pool(transition.relu(transition.norm(y))))
            y = see(f"transition{b}", transition.conv(pooled))


def _check_model(model: DenseNet) -> None:
    if not isinstance(model, DenseNet) or model.spatial_dims != 2:
        raise ExportError("int8 quantization takes 2-D DenseNet image classifiers; this model is not one")
    if model.num_classes <= 0 or model.global_pool.pool_type != "avg":
        raise ExportError("int8 quantization needs a classifier after global average pooling "
                          f"(num_classes > 0, global_pool 'avg'); this model has num_classes={model.num_classes}, "
                          f"global_pool={model.global_pool.pool_type!r}")
    _require_int8()


#: vpmaddubsw, the int8 dot product of CPUs without VNNI or AMX (AVX2, AVX-512 without VNNI), adds the
#: products of two neighbouring input channels (2i, 2i + 1) into int16, saturated at this bound
_PAIR_LIMIT = 32767


def _weight_int8(w: Tensor, x_max: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: (int8 weight, float32 scales (O,)). With ``x_max``, the largest
    uint8 input value of a convolution ``w`` (O, C, kh, kw) per input channel (C,) or for all (a float),
    the scales are raised where needed so that no pair of neighbouring input channels' products exceeds
    :data:`_PAIR_LIMIT`: the same results with and without VNNI."""
    scale = (w.abs().amax(dim=tuple(range(1, w.dim()))) / 127).clamp(min=1e-12)
    if x_max is not None:
        products = w.abs() * torch.as_tensor(x_max, dtype=w.dtype).reshape(1, -1, 1, 1)
        if products.shape[1] % 2:
            products = F.pad(products, (0, 0, 0, 0, 0, 1))
        pairs = products.view(len(w), -1, 2, *w.shape[2:]).sum(2).flatten(1).amax(1)
        scale = torch.maximum(scale, pairs / (_PAIR_LIMIT - 255))  # - 255: the rounding of both weights
    q = (w / scale.view(-1, *[1] * (w.dim() - 1))).round().clamp(-127, 127)
    return q.to(torch.int8), scale.float()


class _Builder:
    """Collects the int8 model's tensors and plan while the float model is folded."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.convs: dict[str, dict[str, Any]] = {}

    def conv(self, name: str, w: Tensor, bias: Tensor | None, out: tuple[Tensor, Tensor], *, stride: int,
             padding: int, x: tuple[float, int] = (1.0, 0), relu: bool = False, float_out: bool = False,
             x_mean: Tensor | None = None, x_max: Tensor | float = 255.0) -> None:
        """An int8 convolution of weights ``w`` (O, C, kh, kw) and ``bias`` (O,) (real units) whose output
        is stored with per-channel scales and zero points ``out`` ((O,) each): both are folded into the
        weights and bias, so that oneDNN requantizes with scale 1 and zero point 0. ``x``: the input's
        scale and zero point (1, 0 where the input's scales are folded into ``w``). ``x_mean``: the
        input's per-channel mean (C,) in real units on the calibration images, to correct the bias for
        the mean error of the rounded weights."""
        scale, zero = out
        w = w / scale.view(-1, 1, 1, 1)
        bias = (torch.zeros(len(w), dtype=torch.float64) if bias is None else bias) / scale + zero
        q, s = _weight_int8(w, x_max)
        if x_mean is not None:
            error = (q.double() * s.double().view(-1, 1, 1, 1) - w).sum((2, 3))
            bias = bias - error @ x_mean
        self.tensors[f"{name}.weight"], self.tensors[f"{name}.w_scale"] = q.contiguous(), s
        self.tensors[f"{name}.bias"] = bias.float().contiguous()
        self.convs[name] = {"stride": stride, "padding": padding, "x_scale": float(x[0]), "x_zero_point": int(x[1]),
                            "relu": relu, "float_out": float_out}


@torch.no_grad()
def quantize_densenet(model: DenseNet, calibration: Tensor | Iterable[Tensor], batch: int = 64) -> "Int8DenseNet":
    """An :class:`Int8DenseNet` of ``model`` (eval BN statistics), calibrated on ``calibration``:
    normalised images (N, C, H, W) float, or an iterable of such batches."""
    _check_model(model)
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    batches = calibration.split(batch) if isinstance(calibration, Tensor) else calibration
    see = _Range()
    for x in batches:
        _observe(model, x.cpu().float(), see)
    if "input" not in see.low:
        raise ArgumentError("int8 calibration got no images")
    f, build = model.features, _Builder()
    x_in = [float(v) for v in see.qparams("input", per_channel=False)]
    plan: dict[str, Any] = {"input": x_in, "stem_kind": model.stem, "blocks": [], "clamp_shift": True}
    # stem: conv0 (CIFAR) or conv0-BN-ReLU (ImageNet: BN folded, ReLU fused; max pool on uint8 after it)
    w = f.conv0.weight.detach().double()
    storage = [_block_storage(see, b, len(block)) for b, (block, _) in enumerate(_blocks(model))]
    stored = tuple(t[: model.stem_channels] for t in storage[0])
    if model.stem == "cifar":
        build.conv("stem", w, None, stored, stride=1, padding=1, x=x_in)
    else:
        a, b = _bn(f.norm0)
        build.conv("stem", w * a.view(-1, 1, 1, 1), b, stored, stride=2, padding=3, x=x_in, relu=True)
    for bi, (block, transition) in enumerate(_blocks(model)):
        layers = list(block.values())
        plan["blocks"].append({"in_channels": block.in_channels, "out_channels": block.out_channels,
                               "growth_rate": layers[0].growth_rate if layers else 0,
                               "bottleneck": bool(layers[0].bottleneck) if layers else True, "layers": len(layers),
                               "transition": transition is not None})
        for li, layer in enumerate(layers):
            name = f"block{bi}.layer{li}"
            A, B = _stored(build, name, layer.norm1, stored)
            new = tuple(t[layer.in_channels : layer.in_channels + layer.growth_rate] for t in storage[bi])
            w1 = layer.conv1.weight.detach().double()
            h_max = (build.tensors[f"{name}.hi"].double() - build.tensors[f"{name}.lo"].double()).flatten()
            h_mean = see.mean(f"{name}.input")  # = A h + B on average: h's mean in q units
            q_mean = torch.where(A != 0, (h_mean - B) / torch.where(A != 0, A, 1.0), torch.zeros_like(A))
            if layer.bottleneck:  # BN1-ReLU clamp, 1x1 conv + BN2 + ReLU, 3x3 conv on the middle maps
                a2, b2 = _bn(layer.norm2)
                mid = see.qparams(f"{name}.mid")
                w1 = w1[:, :, 0, 0]
                build.conv(f"{name}.conv1", (a2.view(-1, 1) * w1 * A.view(1, -1))[:, :, None, None],
                           a2 * (w1 @ B) + b2, mid, stride=1, padding=0, relu=True, x_mean=q_mean,
                           x_max=h_max)
                w2 = layer.conv2.weight.detach().double() * mid[0].view(1, -1, 1, 1)
                build.conv(f"{name}.conv2", w2, None, new, stride=1, padding=1)
            else:  # a 3x3 convolution on the prefix: the shift's bias per tap, added where the tap is inside
                build.conv(f"{name}.conv1", w1 * A.view(1, -1, 1, 1), None, new, stride=1, padding=1, float_out=True,
                           x_mean=q_mean, x_max=h_max)
                taps = torch.einsum("ocij,c->oij", w1, B) / new[0].view(-1, 1, 1)
                build.tensors[f"{name}.conv1.tap_bias"] = taps.float().contiguous()
            stored = tuple(torch.cat([s, n]) for s, n in zip(stored, new))
        if transition is not None:  # BN-ReLU clamp, 2x2 average in float, requantized, 1x1 conv
            name = f"transition{bi}"
            A, B = _stored(build, name, transition.norm, stored)
            build.tensors[f"{name}.A"] = A.float().view(1, -1, 1, 1)
            build.tensors[f"{name}.B"] = B.float().view(1, -1, 1, 1)
            pooled = [float(v) for v in see.qparams(f"{name}.pooled", per_channel=False)]
            stored = tuple(t[: transition.out_channels] for t in storage[bi + 1])
            build.conv(name, transition.conv.weight.detach().double(), None, stored, stride=1, padding=0, x=pooled)
    # head: BN-ReLU (clamp, A q + B), global average, classifier: int8 weights per class, A folded in at load
    A, B = _stored(build, "head", f.norm5, stored)
    wq, ws = _weight_int8(model.classifier.weight.detach().double())
    build.tensors["head.weight"], build.tensors["head.w_scale"] = wq, ws
    build.tensors["head.A"] = A.float()
    bias = (wq.double() * ws.double().view(-1, 1)) @ B + model.classifier.bias.detach().double()
    build.tensors["head.bias"] = bias.float().contiguous()
    plan["convs"] = build.convs
    plan["in_channels"], plan["num_classes"] = model.in_channels, model.num_classes
    return Int8DenseNet(plan, build.tensors)


def _block_storage(see: _Range, bi: int, layers: int) -> tuple[Tensor, Tensor]:
    """Per-channel scales and zero points (C_out,) of block ``bi``'s stored maps, from their ranges."""
    names = ["stem" if bi == 0 else f"transition{bi - 1}"] + [f"block{bi}.layer{i}.new" for i in range(layers)]
    return _qparams(torch.cat([see.low[n] for n in names]), torch.cat([see.high[n] for n in names]))


def _stored(build: _Builder, name: str, norm: nn.BatchNorm2d, stored: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """BN-ReLU of the stored maps (per-channel scales and zero points ``stored``) as A h + B, h = clamp(q, lo,
    hi) - lo: the bounds go into the model as ``name.lo`` / ``name.hi``; returns A, B (C,) float64 to
    fold into what follows."""
    a, b = _bn(norm)
    A, B, lo, hi = _fold_bn_relu(a, b, *stored)
    build.tensors[f"{name}.lo"], build.tensors[f"{name}.hi"] = lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)
    return A, A * lo.double() + B


class Int8DenseNet(nn.Module):
    """An int8 DenseNet for CPU inference: (N, C, H, W) normalised float images -> (N, classes) float32
    logits. Built by :func:`quantize_densenet` or :func:`load_int8`; holds no gradients."""

    def __init__(self, plan: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        super().__init__()
        _require_int8()
        self.plan, self.tensors = plan, tensors
        self.num_classes = plan["num_classes"]
        self.in_channels = plan["in_channels"]
        self.spatial_dims = 2
        self._shift = plan.get("clamp_shift", False)  # False in version 1 files
        self.data: dict[str, Any] = {}  # the data description (class names, mean, std, image size), when known
        self._packed: dict[str, Tensor] = {}
        self._w_zero: dict[str, Tensor] = {}  # the weights' zero points: 0 (symmetric int8)
        self._tap_bias: dict[tuple[str, int, int], Tensor] = {}
        head = tensors["head.weight"].float() * tensors["head.w_scale"].view(-1, 1) * tensors["head.A"].view(1, -1)
        self._head = head.contiguous()  # float32 (classes, C): the classifier with BN's scale per channel
        for name, c in plan["convs"].items():
            p = [c["padding"]] * 2
            self._packed[name] = torch.ops.onednn.qconv_prepack(
                tensors[f"{name}.weight"], tensors[f"{name}.w_scale"], c["x_scale"], c["x_zero_point"],
                [c["stride"]] * 2, p, [1, 1], 1, None)
            self._w_zero[name] = torch.zeros(len(tensors[f"{name}.w_scale"]), dtype=torch.long)

    def _conv(self, name: str, x: Tensor) -> Tensor:
        """oneDNN's int8 convolution: uint8 (N, C, H, W) -> uint8 (N, O, H', W') (requantized with
        scale 1 and zero point 0: the stored scales are folded into the weights and bias)."""
        c = self.plan["convs"][name]
        stride, padding = [c["stride"]] * 2, [c["padding"]] * 2
        relu = c["relu"]
        out = torch.ops.onednn.qconv2d_pointwise(
            x, c["x_scale"], c["x_zero_point"], self._packed[name], self.tensors[f"{name}.w_scale"],
            self._w_zero[name], self.tensors[f"{name}.bias"], stride, padding, [1, 1], 1, 1.0, 0,
            torch.float32 if c["float_out"] else None, "relu" if relu else "none", [None] if relu else [], "")
        if c["float_out"]:  # add the folded shift of the taps inside the image, then store as uint8
            out = _quantize(out + self._bias_map(name, out.shape[-2], out.shape[-1]), 1.0, 0)
        return out

    def _bias_map(self, name: str, h: int, w: int) -> Tensor:
        """(1, O, h, w): the sum of the tap biases whose 3x3 tap falls inside an h x w image."""
        key = (name, h, w)
        if key not in self._tap_bias:
            ones = torch.ones(1, 1, h, w, dtype=torch.float32)
            self._tap_bias[key] = F.conv2d(ones, self.tensors[f"{name}.tap_bias"].unsqueeze(1), padding=1)
        return self._tap_bias[key]

    def _clamp(self, name: str, x: Tensor) -> Tensor:
        """h = clamp(q, lo, hi) - lo per channel (version 1 files: no shift), uint8 (N, C, H, W)."""
        h = torch.clamp(x, self.tensors[f"{name}.lo"], self.tensors[f"{name}.hi"])
        return h.sub_(self.tensors[f"{name}.lo"]) if self._shift else h

    def _transition(self, name: str, buf: Tensor) -> Tensor:
        """BN-ReLU (h, then A h + B) and the 2x2 average in float, requantized for the 1x1 convolution."""
        pooled = F.avg_pool2d(self._clamp(name, buf).float(), 2) * self.tensors[f"{name}.A"] + self.tensors[f"{name}.B"]
        c = self.plan["convs"][name]
        return self._conv(name, _quantize(pooled, c["x_scale"], c["x_zero_point"]))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ArgumentError(f"the int8 model takes (N, {self.in_channels}, H, W) images, got {list(x.shape)}")
        if x.device.type != "cpu":  # oneDNN's int8 kernels run on the CPU
            return self.forward(x.cpu()).to(x.device)
        plan = self.plan
        q = _quantize(x.float().contiguous(memory_format=_CL), *plan["input"])
        y = self._conv("stem", q)
        if plan["stem_kind"] != "cifar":
            y = _max_pool_3x3_s2(y)
        for bi, block in enumerate(plan["blocks"]):
            n, _, h, w = y.shape
            buf = torch.empty(n, block["out_channels"], h, w, dtype=torch.uint8, memory_format=_CL)
            c, k = block["in_channels"], block["growth_rate"]
            buf[:, :c] = y
            for li in range(block["layers"]):
                name = f"block{bi}.layer{li}"
                h_ = self._clamp(name, buf[:, :c])
                if block["bottleneck"]:
                    new = self._conv(f"{name}.conv2", self._conv(f"{name}.conv1", h_))
                else:
                    new = self._conv(f"{name}.conv1", h_)
                buf[:, c : c + k] = new
                c += k
            if block["transition"]:
                y = self._transition(f"transition{bi}", buf)
        pooled = self._clamp("head", buf).float().mean((2, 3))
        return F.linear(pooled, self._head, self.tensors["head.bias"])


def _max_pool_3x3_s2(x: Tensor) -> Tensor:
    """3x3 stride-2 max pooling, padding 1, of non-negative uint8 maps (N, C, H, W) channels_last, as the
    maximum of nine strided views (torch 2.14's uint8 max pooling fails on channels_last and is slow
    on NCHW; zero padding is right because every value is >= 0)."""
    h, w = (x.shape[-2] - 1) // 2 + 1, (x.shape[-1] - 1) // 2 + 1
    padded = F.pad(x, (1, 1, 1, 1))
    out = padded[:, :, 0 : 2 * h : 2, 0 : 2 * w : 2].contiguous(memory_format=_CL)
    for i in range(3):
        for j in range(3):
            if i or j:
                torch.maximum(out, padded[:, :, i : i + 2 * h : 2, j : j + 2 * w : 2], out=out)
    return out


def _quantize(x: Tensor, scale: float, zero: int) -> Tensor:
    """float -> uint8, round to nearest, saturated; keeps channels_last."""
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero, 0, 255).to(torch.uint8)


def save_int8(model: Int8DenseNet, path: str | os.PathLike, data: dict[str, Any] | None = None) -> int:
    """Write ``model`` (and its data description) as one safetensors file, atomically; returns its size
    in bytes. The plan and ``data`` are JSON in the file's metadata."""
    tensors = {k: v.contiguous() for k, v in model.tensors.items()}
    meta = {"format": FORMAT, "version": str(VERSION), "plan": json.dumps(model.plan),
            "data": json.dumps(data if data is not None else model.data)}
    blob = safetensors_bytes(tensors, metadata=meta)
    atomic_write_bytes(path, blob)
    return len(blob)


def _metadata(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None


def is_int8_file(path: str | os.PathLike) -> bool:
    """True for a file :func:`save_int8` wrote (a .safetensors file whose metadata says so)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    meta = _metadata(path)
    return bool(meta) and meta.get("format") == FORMAT


def load_int8(path: str | os.PathLike, image_size: int | None = None) -> tuple[Int8DenseNet, dict[str, Any]]:
    """The int8 model of a file :func:`save_int8` wrote, and its data description. ``image_size``
    overrides the recorded size (the convolutions take any size the float model takes)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"no int8 model file at {path}")
    meta = _metadata(path)
    if not meta or meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not an int8 DenseNet file (format {FORMAT!r}); write one with "
                          "`densenet export CHECKPOINT --int8 --calibration DATA`")
    if int(meta.get("version", 0)) > VERSION:
        raise ExportError(f"{path} is an int8 file of version {meta['version']}; this densenet reads up to "
                          f"{VERSION}: upgrade densenet")
    if int(meta.get("version", 0)) < 2 and not _int8_dot_products():
        warnings.warn(f"{path} was written by an older densenet whose int8 convolutions can saturate on a CPU "
                      "without VNNI or AMX, like this one (up to 4 points of top-1 lost); write it again with "
                      "`densenet export CHECKPOINT --int8`", stacklevel=2)
    model = Int8DenseNet(json.loads(meta["plan"]), load_file(str(path)))
    data = json.loads(meta.get("data") or "{}")
    if image_size is not None:
        data = {**data, "image_size": image_size}
    model.data = data
    return model, data


@torch.no_grad()
def write_int8(model: DenseNet, data: dict[str, Any], calibration: Tensor, labels: Tensor | None,
               path: str | os.PathLike, batch: int = 64) -> dict[str, Any]:
    """Quantize ``model`` on ``calibration`` (N, C, S, S) normalised images and write it to ``path``
    (:func:`save_int8`) with ``data`` plus ``precision: int8`` and the calibration's figures. Returns
    those figures: images, top-1 agreement with float32 there, both accuracies with ``labels`` (N,)
    (fractions), the file sizes in bytes (int8 and float32 weights)."""
    int8 = quantize_densenet(model, calibration, batch)
    model = copy.deepcopy(model).cpu().eval()
    expected = torch.cat([model(x).argmax(1) for x in calibration.split(batch)])
    got = torch.cat([int8(x).argmax(1) for x in calibration.split(batch)])
    report: dict[str, Any] = {"calibration_images": len(calibration),
                              "agreement": float((expected == got).float().mean()),
                              "float32_bytes": 4 * sum(p.numel() for p in model.parameters())}
    if labels is not None:
        report.update(float32_accuracy=float((expected == labels).float().mean()),
                      int8_accuracy=float((got == labels).float().mean()))
    info = {**data, "precision": "int8", "calibration": report}
    size = save_int8(int8, path, info)
    return {**report, "files": [Path(path)], "int8_bytes": size}
