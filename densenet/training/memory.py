"""How much memory a training step (or an evaluation batch) needs, and whether this machine has it.

:func:`estimate_memory` counts, from the model's structure, the bytes of the weights, their gradients
and momentum, the activations autograd keeps for backward (per path: the shared-buffer fast blocks,
their memory-efficient form, the layer-by-layer form used with dropout) and the largest temporaries
of backward. :func:`check_memory` compares that with :func:`available_memory` (``MemAvailable`` and
the cgroup limit on Linux, free GPU memory on CUDA) and stops with a :class:`MemoryLimitError`
suggesting the memory-efficient mode or a batch size that fits, instead of the operating system
killing the run minutes later.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .config import ConfigError

__all__ = ["ALLOCATOR_FACTOR", "BASE_OVERHEAD", "EFFICIENT_ALLOCATOR_FACTOR", "FAST_EVAL_ALLOCATOR_FACTOR",
           "MemoryEstimate", "MemoryLimitError",
           "available_memory", "check_memory", "estimate_memory"]

#: measured peak RSS over counted tensor bytes on CPU (glibc malloc keeps freed blocks, the
#: convolution library its scratch space); see tests/test_reliability.py for the measurements
ALLOCATOR_FACTOR = 1.6
#: the same for an evaluation forward of the fast blocks, which reuse a few workspaces per block
#: instead of allocating per layer (little for the allocator to keep)
FAST_EVAL_ALLOCATOR_FACTOR = 1.1
#: the same for a training step of the memory-efficient blocks: each layer's concatenation is freed
#: after the forward and allocated again in the backward, and how much of that glibc's heap keeps
#: varies from run to run and from CPU to CPU (DenseNet-BC-100, batch 64: 323 MiB on a Zen 4,
#: 414-551 MiB over runs on a Zen 3, of which 281 MiB tensors and kernel scratch)
EFFICIENT_ALLOCATOR_FACTOR = 2.0
#: bytes a first training step adds besides tensors (kernel caches, thread pools)
BASE_OVERHEAD = 32 << 20


class MemoryLimitError(ConfigError):
    """A step clearly needs more memory than this machine has available."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one step needs: ``fixed`` (weights, gradients, optimizer state, overhead) plus
    ``per_image`` times the batch (activations and temporaries, all proportional to the batch)."""

    what: str  # e.g. "a training step of densenet_bc100_k12, batch 64 at 32x32 (fast blocks)"
    batch_size: int
    fixed: int
    per_image: int
    efficient_total: int | None = None  # the same step with memory_efficient=True, where that helps

    @property
    def total(self) -> int:
        return self.fixed + self.per_image * self.batch_size

    def largest_batch(self, budget: int) -> int:
        """The largest batch whose step fits in ``budget`` bytes (0: none does)."""
        return max(0, (budget - self.fixed) // max(self.per_image, 1))

    def __str__(self) -> str:
        return f"{self.what}: about {gib(self.total)}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------- counting
@dataclass
class _Count:
    """Activation elements of one image, walked in forward order: ``kept`` stays until the backward of
    its stage; ``peak`` is the most alive at any moment (kept so far + the stage's temporaries)."""

    kept: float = 0.0
    peak: float = 0.0
    extra_bytes: float = 0.0  # byte-sized tensors (dropout masks, max-pool indices)

    def stage(self, kept: float, temporary: float, extra_bytes: float = 0.0) -> None:
        self.kept += kept
        self.extra_bytes += extra_bytes
        self.peak = max(self.peak, self.kept + temporary)


def _sides(model: nn.Module, image_size: int | Sequence[int]) -> list[int]:
    """One side per spatial axis of the model (1-D signals, 2-D images, 3-D volumes)."""
    dims = getattr(model, "spatial_dims", 2)
    sides = [image_size] if isinstance(image_size, int) else list(image_size)
    return sides * dims if len(sides) == 1 else sides


def _layer_widths(model: nn.Module, image_size: int | Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(positions per image: pixels, samples or voxels; input channels, layers, output channels) of each dense block."""
    per_axis = [model.spatial_sizes(s) for s in _sides(model, image_size)]
    sizes = [math.prod(block) for block in zip(*per_axis)]
    blocks = [m for name, m in model.features.named_children() if name.startswith("denseblock")]
    return [(s, b.in_channels, len(b), b.out_channels) for s, b in zip(sizes, blocks)]


def _training_count(model: nn.Module, image_size: int | Sequence[int], fast: bool, efficient: bool) -> _Count:
    """Activation elements per image kept for backward in a training step, and its peak."""
    k, bottleneck, drop = model.growth_rate, model.bottleneck, model.drop_rate
    inter = model.bn_size * k if bottleneck else 0
    blocks = _layer_widths(model, image_size)
    count = _Count()
    sides = _sides(model, image_size)
    pixels = math.prod(sides)
    shrink = 2 ** len(sides)  # a transition's pool: 4 pixels, 8 voxels, 2 samples to one
    count.stage(model.in_channels * pixels * (2 if fast else 1), 0)  # the batch (+ its channels_last copy)
    if model.stem == "imagenet":
        half = math.prod((s - 1) // 2 + 1 for s in sides)
        if efficient:  # the fused stem keeps only its input; its output exists while the stem runs
            count.stage(0, 2 * half * model.stem_channels)
        elif fast:  # the fused stem keeps the conv0 output; BN-ReLU and the pool's indices are recomputed
            count.stage(half * model.stem_channels, half * model.stem_channels)
        else:  # conv0 output (kept by norm0), ReLU output (kept by ReLU and the max pool), pool indices (int64)
            count.stage(2 * half * model.stem_channels, half * model.stem_channels, 8 * blocks[0][0] * model.stem_channels)
    else:
        count.stage(0, 2 * pixels * model.stem_channels)
    grad_peak = 0.0  # the most any stage's backward adds on top of what is kept up to it
    for i, (m, c0, layers, c) in enumerate(blocks):
        widths = [c0 + j * k for j in range(layers)]
        if fast:
            # the shared (M, C) buffer; standard mode adds each bottleneck layer's BN2 input and ReLU output
            kept = m * c + (0 if efficient else 2 * layers * m * inter)
            count.stage(kept, m * c0 + (0 if efficient else 2 * m * c) + m * inter * 2)
            if efficient:
                # backward: incoming gradient and summed BN1 gradients (each M x C), the two
                # bottleneck workspaces and one bottleneck gradient (M x 4k); BN1-ReLU in row chunks
                grad = 2 * m * c + 3 * m * inter
            else:
                # backward: incoming gradient, x_hat, summed BN1 gradients (each M x C), a layer's
                # BN1-ReLU output and its gradient (M x c), bottleneck gradients
                grad = 3 * m * c + 2 * m * widths[-1] + 3 * m * inter
        else:
            # layer by layer: each layer's concatenated input (kept by BN1), its ReLU output,
            # the bottleneck's two 4k-map tensors, the k new maps; the block's concatenated output
            kept = sum(2 * m * w for w in widths) + layers * m * (2 * inter + k) + m * c
            masks = layers * m * (inter + k) if drop > 0 else 0
            count.stage(kept - m * c0, m * c, masks)  # the block input is counted by what produced it
            # backward: the gradients of every map of the block (summed over its readers), one
            # layer's concatenation gradient, BN1 and ReLU gradients
            grad = m * c + 3 * m * widths[-1] + 2 * m * inter
        grad_peak = max(grad_peak, count.kept + grad)
        if i < len(blocks) - 1:
            c_out = math.floor(model.compression * c)
            if fast:  # BN-ReLU-pool in one step keeping only its input; the conv keeps the pooled maps
                count.stage((m // shrink) * c, m * c)
                grad_peak = max(grad_peak, count.kept + 2 * m * c + (m // shrink) * c)
            else:  # ReLU output (kept by ReLU and the conv), conv output (kept by the pool), pooled output
                count.stage(m * c + m * c_out + (m // shrink) * c_out, m * c, m * c_out if drop > 0 else 0)
                grad_peak = max(grad_peak, count.kept + 2 * m * c + m * c_out)
    m, _, _, c = blocks[-1]
    count.stage(m * c, m * c)  # final BN-ReLU output (kept by ReLU and the global pool)
    count.peak = max(count.peak, grad_peak)
    return count


def _inference_count(model: nn.Module, image_size: int | Sequence[int], fast: bool) -> _Count:
    """Activation elements per image alive at the peak of an evaluation forward (no gradients)."""
    k = model.growth_rate
    inter = model.bn_size * k if model.bottleneck else k
    count = _Count()
    pixels = math.prod(_sides(model, image_size))
    for m, c0, _layers, c in _layer_widths(model, image_size):
        if fast:  # the shared buffer, one layer's BN1-ReLU output, bottleneck output and new maps
            live = m * c + m * c + m * inter + m * k
        else:  # the list of maps, a layer's concatenation and its BN-ReLU output, the block's output
            live = 2 * m * c + 2 * m * c + 2 * m * inter
        count.peak = max(count.peak, model.in_channels * pixels * 2 + m * c0 + live)
    return count


def _trainable(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.features.parameters())


def estimate_memory(model: nn.Module, batch_size: int, image_size: int | Sequence[int], *, training: bool = True,
                    momentum: bool = True, amp: bool = False, name: str | None = None) -> MemoryEstimate:
    """Peak bytes of one training step (``training``: forward, backward, SGD update) or of one
    evaluation forward of ``batch_size`` images of ``image_size`` pixels, on CPU (``image_size``: one
    side, or one per axis: a 1-D model's length, a 3-D model's depth, height and width).

    ``model``: a :class:`densenet.DenseNet` as it will train (its ``memory_efficient``, ``fast``,
    ``drop_rate`` and frozen parameters decide the path); ``name`` names it in messages. ``amp``:
    mixed precision, 16-bit activations (batch statistics stay in float32; a rougher estimate). Tensor bytes are counted from the
    structure, then :data:`ALLOCATOR_FACTOR` (or its variants) and :data:`BASE_OVERHEAD` account for what the memory
    allocator and the kernels hold on top (measured on CPU).
    """
    if not hasattr(model, "block_config") or not hasattr(model, "spatial_sizes"):
        raise TypeError(f"estimate_memory takes a densenet DenseNet, got {type(model).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    params = [p for p in model.parameters()]
    itemsize = params[0].element_size() if params else 4
    weights = sum(p.numel() for p in params) * itemsize
    trainable = sum(p.numel() for p in params if p.requires_grad) * itemsize
    dropout_in_training = training and model.drop_rate > 0
    fast = (model.fast or model.memory_efficient) and not dropout_in_training
    efficient = model.memory_efficient and fast
    act_bytes = 2 if amp else itemsize
    mode = "memory-efficient blocks" if efficient else "fast blocks" if fast else "layer-by-layer blocks"
    name = name or f"DenseNet(k={model.growth_rate}, blocks={list(model.block_config)})"
    what = (f"{'a training step' if training else 'an evaluation batch'} of {name}, batch {batch_size} at "
            f"{'x'.join(map(str, _sides(model, image_size)))} ({mode})")
    def per_image(count: _Count, factor: float = ALLOCATOR_FACTOR) -> int:
        return math.ceil((count.peak * act_bytes + count.extra_bytes) * factor)

    momentum_copies = 2 if momentum else 1
    if training and _trainable(model):
        fixed = weights + trainable * momentum_copies + BASE_OVERHEAD
        lean = None
        if fast and not efficient:  # what memory_efficient=True would need
            lean = fixed + per_image(_training_count(model, image_size, True, True), EFFICIENT_ALLOCATOR_FACTOR) * batch_size
        factor = EFFICIENT_ALLOCATOR_FACTOR if efficient else ALLOCATOR_FACTOR
        return MemoryEstimate(what, batch_size, fixed, per_image(_training_count(model, image_size, fast, efficient), factor),
                              lean)
    fixed = weights + (trainable * momentum_copies if training else 0) + BASE_OVERHEAD
    factor = FAST_EVAL_ALLOCATOR_FACTOR if fast and not training else ALLOCATOR_FACTOR
    return MemoryEstimate(what, batch_size, fixed, per_image(_inference_count(model, image_size, fast), factor))


# ---------------------------------------------------------------------------- what is available
def _cgroup_free() -> int | None:
    """Bytes the cgroup of this process may still use (v2 or v1), None when unlimited or unknown."""
    candidates = [(Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
                  (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"))]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if rel not in ("", "/"):
                base = Path("/sys/fs/cgroup") / ("memory" if "memory" in controllers.split(",") else "") / rel.lstrip("/")
                candidates.insert(0, (base / "memory.max", base / "memory.current"))
                candidates.insert(1, (base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"))
    except (OSError, ValueError):
        pass
    for limit_path, usage_path in candidates:
        try:
            limit, usage = limit_path.read_text().strip(), usage_path.read_text().strip()
        except OSError:
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - int(usage))
    return None


def available_memory(device: str | torch.device = "cpu") -> tuple[int, str] | None:
    """(bytes a new allocation can use, where the number comes from), None when unknown.

    CPU: ``MemAvailable`` of ``/proc/meminfo``, lowered to the cgroup's remaining limit (containers).
    CUDA: the device's free memory (``torch.cuda.mem_get_info``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    found: tuple[int, str] | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_free()
    if cgroup is not None and (found is None or cgroup < found[0]):
        found = cgroup, "the memory limit of this container (cgroup)"
    return found


def check_memory(estimate: MemoryEstimate, available: tuple[int, str] | int | None = None, *,
                 device: str | torch.device = "cpu", processes: int = 1, limit: float = 0.9) -> None:
    """Raise :class:`MemoryLimitError` when ``processes`` such steps clearly (more than ``limit`` of it)
    exceed the available memory (default: :func:`available_memory` of ``device``); nothing when it
    fits or the available memory is unknown. The message suggests the memory-efficient mode (when
    it would fit) and the largest batch that fits."""
    if available is None:
        available = available_memory(device)
    if available is None:
        return
    free, source = (available, "available memory") if isinstance(available, int) else available
    need = estimate.total * processes
    budget = int(free * limit)
    if need <= budget:
        return
    hints = []
    if estimate.efficient_total is not None:
        fits = estimate.efficient_total * processes <= budget
        hints.append(f"--memory-efficient (memory_efficient=True: about {gib(estimate.efficient_total * processes)}"
                     f"{'' if fits else ', not enough alone'})")
    batch = estimate.largest_batch(budget // processes)
    if batch >= 1:
        hints.append(f"a --batch-size of at most {batch}{' per process' if processes > 1 else ''}")
    else:
        hints.append("a smaller model or a machine with more memory (even one image does not fit)")
    raise MemoryLimitError(
        f"not enough memory: {estimate}{f' x {processes} processes' if processes > 1 else ''} (estimate), "
        f"but only {gib(free)} is available ({source}). Use {' or '.join(hints)}")
