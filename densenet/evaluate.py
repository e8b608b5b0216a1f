"""Evaluation (top-1/top-5 error) and prediction on image files."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["evaluate", "topk_correct", "load_image", "model_from_checkpoint", "predict_images"]


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, :k].any(1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> dict[str, float]:
    """Mean loss and top-1/top-5 error (%) of ``model`` over ``batches``.

    A batch of images shaped (N, C, H, W) is scored directly; one shaped (N, crops, C, H, W)
    (the ImageNet 10-crop evaluation) is scored by averaging the softmax over the crops.
    """
    was_training = model.training
    model.eval()
    loss_sum, n, top1, top5 = 0.0, 0, 0, 0
    try:
        for images, labels in batches:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if images.dim() == 5:
                b, crops = images.shape[:2]
                probs = F.softmax(model(images.flatten(0, 1)), dim=1).view(b, crops, -1).mean(1)
                logits = probs.clamp_min(1e-12).log()
            else:
                logits = model(images)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            c1, c5 = topk_correct(logits, labels)
            top1, top5, n = top1 + c1, top5 + c5, n + labels.numel()
    finally:
        model.train(was_training)
    if n == 0:
        return {"loss": math.nan, "top1_error": math.nan, "top5_error": math.nan, "images": 0}
    return {"loss": loss_sum / n, "top1_error": 100.0 * (1 - top1 / n), "top5_error": 100.0 * (1 - top5 / n), "images": n}




def expand_image_paths(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files as given, folders expanded to the images inside them (recursively, sorted)."""
    for p in map(Path, paths):
        if p.is_dir():
            from .data.folder import IMAGE_SUFFIXES

            yield from sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        else:
            yield p


def load_image(path: str | os.PathLike, image_size: int, mean: tuple, std: tuple) -> Tensor:
    """An image file as a normalised (3, image_size, image_size) float tensor.

    Small models (image_size <= 64, CIFAR/SVHN) see the whole image resized; larger ones the
    ImageNet evaluation crop (resize the short side to image_size * 256/224, centre crop).
    """
    from torchvision.transforms.v2 import functional as TF

    from .data.folder import decode_image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e.strerror}") from None
    im = decode_image(data, str(path))  # RGB; DataError naming the file if it cannot be decoded
    x = TF.pil_to_tensor(im)
    if image_size <= 64:
        x = TF.resize(x, [image_size, image_size], antialias=True)
    else:
        x = TF.center_crop(TF.resize(x, round(image_size * 256 / 224), antialias=True), [image_size, image_size])
    x = x.float().div_(255)
    return TF.normalize(x, list(mean), list(std))


def model_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The trained model of a ``densenet train`` checkpoint (in eval mode) and its data description
    (``class_names``, ``mean``, ``std``, ``image_size``, ``dataset``)."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .model import DenseNet
    from .weights import load_state_dict

    state = load_checkpoint(path)
    try:
        model = DenseNet(**state["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} does not describe a DenseNet this version can build: {e}") from None
    load_state_dict(model, state["model"])
    return model.eval(), state["data"]


@torch.no_grad()
def predict_images(model: nn.Module, paths: Iterable[str | os.PathLike], data: dict, *, top: int = 5,
                   batch_size: int = 64, device: torch.device | None = None) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
    """For each image (folders expanded), the ``top`` classes with their probabilities, best first."""
    device = device or torch.device("cpu")
    names = data["class_names"]
    files = list(expand_image_paths(paths))
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        x = torch.stack([load_image(f, data["image_size"], data["mean"], data["std"]) for f in chunk]).to(device)
        probs = F.softmax(model(x), dim=1)
        values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
        for f, v, idx in zip(chunk, values.tolist(), indices.tolist()):
            yield f, [(names[j] if j < len(names) else str(j), p) for j, p in zip(idx, v)]
