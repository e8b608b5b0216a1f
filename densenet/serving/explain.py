"""Explanations of image files: for each image an overlay PNG (the image, its heat map, the top
classes with probabilities) and the raw map as ``.npy``; what ``densenet explain`` writes."""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.explain import ExplainError, explain, save_overlay
from ..data import DataError, eval_view, match_channels
from ..data.transforms import normalize
from ..errors import ArgumentError
from ..io.atomic import atomic_write_bytes
from .predict import expand_image_paths, image_options

__all__ = ["Explained", "explain_images", "resolve_class"]


@dataclass
class Explained:
    """One explained image: where its files went, the class explained, the top classes."""

    image: Path
    overlay: Path
    raw: Path
    explained: str
    top: list[tuple[str, float]]


def resolve_class(value: str | int | None, class_names: list[str]) -> int | None:
    """``--class``: an index or a class name (None: each image's top prediction)."""
    if value is None:
        return None
    if isinstance(value, int) or str(value).lstrip("-").isdigit():
        index = int(value)
        if not 0 <= index < len(class_names):
            raise ArgumentError(f"class {index} is out of range: the model has {len(class_names)} classes "
                                f"(0..{len(class_names) - 1})")
        return index
    if value not in class_names:
        shown = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
        raise ArgumentError(f"no class {value!r}; the model's classes: {shown}")
    return class_names.index(value)


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in used:
        k += 1
        stem = f"{path.stem}-{k}"
    used.add(stem)
    return stem


def explain_images(model: nn.Module, data: dict, paths: Iterable[str | os.PathLike], out: str | os.PathLike, *,
                   method: str = "cam", target: int | None = None, layer: str | None = None, top: int = 3,
                   batch_size: int = 16, on_error: Callable[[Path, Exception], None] | None = None) -> list[Explained]:
    """Explain every image of ``paths`` (folders searched) with ``model`` and its data description
    (class names, mean, std, image size); write ``OUT/<image>.png`` and ``OUT/<image>.npy`` (the map,
    (H, W) float32 in [0, 1] at the model's input size). An image that cannot be read raises
    :class:`DataError` naming it, or with ``on_error`` is passed there and skipped."""
    if not isinstance(model, nn.Module):
        raise ExplainError("explanations need gradients: an ONNX export has none; explain the checkpoint "
                           "(checkpoint.pt) or the trained weights instead")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names, size = list(data["class_names"]), int(data["image_size"])
    files = list(expand_image_paths(paths))
    done: list[Explained] = []
    used: set[str] = set()
    options = image_options(data)  # a label-file model: its channels, fit and full-depth reading
    for start in range(0, len(files), batch_size):
        batch, pixels, tensors = [], [], []
        for path in files[start : start + batch_size]:
            try:
                view = eval_view(Path(path).read_bytes(), str(path), size, options)  # uint8 (3, S, S), or float32 (C, S, S)
            except (DataError, OSError) as e:
                error = e if isinstance(e, DataError) else DataError(f"cannot read image {path}: {e.strerror or e}")
                if on_error is None:
                    raise error from None
                on_error(Path(path), error)
                continue
            batch.append(Path(path))
            shown = np.clip(np.rint(match_channels(view, 3)), 0, 255).astype(np.uint8) if options else view
            pixels.append(shown.transpose(1, 2, 0))
            tensors.append(normalize(view, tuple(data["mean"]), tuple(data["std"])))
        if not batch:
            continue
        x = torch.stack(tensors)
        maps = explain(model, x, method=method, target=target, layer=layer)
        with torch.no_grad():
            logits = model.eval()(x).float()
            probs = torch.sigmoid(logits) if data.get("multilabel") else F.softmax(logits, dim=1)  # one per label
        chosen = probs.argmax(1).tolist() if target is None else [target] * len(batch)
        for i, path in enumerate(batch):
            values, indices = probs[i].topk(min(top, probs.shape[1]))
            best = [(names[j], float(p)) for j, p in zip(indices.tolist(), values.tolist())]
            stem = _unique_stem(path, used)
            overlay, raw = out / f"{stem}.png", out / f"{stem}.npy"
            title = (f"{path.name}: " + ", ".join(f"{n} {p:.1%}" for n, p in best)
                     + f"\nmap ({method}) for: {names[chosen[i]]}")
            save_overlay(overlay, pixels[i], maps[i], title)
            buffer = io.BytesIO()
            np.save(buffer, maps[i].numpy().astype(np.float32))
            atomic_write_bytes(raw, buffer.getvalue())
            done.append(Explained(path, overlay, raw, names[chosen[i]], best))
    return done
