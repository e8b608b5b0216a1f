"""Feature reuse, the paper's Figure 5: how strongly each layer weighs the feature maps of each
earlier layer of its dense block.

Within dense block b of L layers, source s = 0 is the block's input and s = 1..L are its layers'
outputs; target l = 1..L are its layers, and target l = L + 1 is the layer that reads the block's
full output (sources 0..L): the next transition, or for the last block the classifier. This is one
extra column per block; across the three blocks of a CIFAR DenseNet these are the paper's "three
columns highlighted by black rectangles", two transition layers and the classification layer.

Entry (s, l) is the average absolute weight of the target's first convolution (the 1x1 of a
bottleneck layer, the 3x3 of a basic layer, the transition's 1x1, the classifier's weight matrix)
over the input maps that come from source s: the L1 norm of those weights divided by their number.
Pairs with s >= l inside the block do not exist (layer l reads sources 0..l-1) and are NaN.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor, nn

from ..io.atomic import atomic_write_bytes, atomic_write_text
from ..models import DenseBlock, DenseNet, Transition
from .plots import plt

__all__ = ["BlockReuse", "feature_reuse", "plot_reuse", "source_slices", "write_reuse_csv"]


@dataclass
class BlockReuse:
    """Feature reuse in one dense block.

    ``matrix`` has shape (L + 1, L + 1): row s = 0..L is the source, column l - 1 the target l = 1..L + 1
    (column L: ``reader``, the transition or classifier). Values are raw average |weight|; NaN where
    the pair does not exist.
    """

    block: int  # 1-based
    num_layers: int  # L
    target_names: list[str]  # module of each target, e.g. "features.denseblock1.denselayer1.conv1"
    matrix: np.ndarray

    def __repr__(self) -> str:
        return f"BlockReuse(block {self.block}: {self.num_layers} layers, then {self.reader}; matrix {self.matrix.shape})"

    @property
    def reader(self) -> str:
        return self.target_names[-1]

    def scaled(self) -> np.ndarray:
        """Each column divided by its maximum (the paper's figure); NaN stays NaN."""
        m = self.matrix.copy()
        for j in range(m.shape[1]):
            col = m[:, j]
            top = np.nanmax(col) if np.isfinite(col).any() else math.nan
            if top > 0:
                m[:, j] = col / top
        return m


def source_slices(in_channels: int, growth_rate: int, num_sources: int) -> list[slice]:
    """Input-channel ranges of sources 0..num_sources-1 in a concatenated input: the block input
    (``in_channels`` maps), then ``growth_rate`` maps per layer."""
    slices = [slice(0, in_channels)]
    for s in range(1, num_sources):
        start = in_channels + (s - 1) * growth_rate
        slices.append(slice(start, start + growth_rate))
    return slices


def _mean_abs(weight: Tensor, slices: Sequence[slice]) -> list[float]:
    """Average |w| over input channels ``sl`` (dim 1 of a conv or linear weight), for each slice."""
    w = weight.detach().float().abs()
    return [float(w[:, sl].mean()) for sl in slices]


def feature_reuse(model: DenseNet) -> list[BlockReuse]:
    """One :class:`BlockReuse` per dense block of ``model``."""
    if not isinstance(model, DenseNet):
        raise TypeError(f"feature_reuse needs a densenet.DenseNet, got {type(model).__name__}")
    children = list(model.features.named_children())
    out = []
    for i, (name, block) in enumerate(children):
        if not isinstance(block, DenseBlock):
            continue
        layers = list(block.values())
        n, k = len(layers), model.growth_rate
        matrix = np.full((n + 1, n + 1), np.nan)
        names = []
        for l, layer in enumerate(layers, start=1):
            matrix[:l, l - 1] = _mean_abs(layer.conv1.weight, source_slices(block.in_channels, k, l))
            names.append(f"features.{name}.denselayer{l}.conv1")
        next_name, reader = children[i + 1] if i + 1 < len(children) else ("", None)
        slices = source_slices(block.in_channels, k, n + 1)
        if isinstance(reader, Transition):
            matrix[:, n] = _mean_abs(reader.conv.weight, slices)
            names.append(f"features.{next_name}.conv")
        elif isinstance(model.classifier, nn.Linear):
            matrix[:, n] = _mean_abs(model.classifier.weight, slices)
            names.append("classifier")
        else:  # num_classes=0: no classifier reads the last block
            names.append("(no classifier)")
        out.append(BlockReuse(int(name.removeprefix("denseblock")), n, names, matrix))
    return out


def write_reuse_csv(path: str | os.PathLike, blocks: Sequence[BlockReuse]) -> None:
    """One row per existing (block, source, target) pair: raw average |weight| and its column-scaled value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["block", "source", "target", "target_layer", "mean_abs_weight", "scaled_to_column_max"])
    for b in blocks:
        scaled = b.scaled()
        for l in range(1, b.num_layers + 2):
            for s in range(b.num_layers + 1):
                value = b.matrix[s, l - 1]
                if np.isfinite(value):
                    writer.writerow([b.block, s, l, b.target_names[l - 1], f"{value:.8g}", f"{scaled[s, l - 1]:.6f}"])
    atomic_write_text(path, buffer.getvalue())


def plot_reuse(path: str | os.PathLike, blocks: Sequence[BlockReuse], title: str = "") -> None:
    """PNG with one heat map per block: rows source s, columns target l, colour the column-scaled
    average |weight|; the last column (transition or classifier) is outlined, as in the paper."""
    fig, axes = plt.subplots(1, len(blocks), figsize=(0.5 + 4.4 * len(blocks), 4.6), squeeze=False)
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("white")
    image = None
    for ax, b in zip(axes[0], blocks):
        n = b.num_layers
        image = ax.imshow(np.ma.masked_invalid(b.scaled()), cmap=cmap, vmin=0, vmax=1, interpolation="nearest",
                          aspect="auto")
        reader = "classifier" if b.reader == "classifier" else "transition" if "transition" in b.reader else "none"
        step = max(1, math.ceil((n + 1) / 12))
        xt = list(range(0, n, step)) + [n]
        ax.set_xticks(xt, [str(i + 1) for i in xt[:-1]] + ["C" if reader == "classifier" else "T"])
        ax.set_yticks(list(range(0, n + 1, step)))
        ax.add_patch(plt.Rectangle((n - 0.5, -0.5), 1, n + 1, fill=False, ec="black", lw=2))
        ax.set(xlabel=f"target layer l (last column: {reader})", title=f"dense block {b.block} ({n} layers)")
    axes[0][0].set_ylabel("source layer s (0: block input)")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.85, label="average |weight|, relative to the column's maximum")
    fig.suptitle(title or "Feature reuse: average absolute weight from source s to target l (each column scaled to its max)",
                 fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
