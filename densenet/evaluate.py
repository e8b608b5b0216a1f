"""Evaluation (top-1/top-5 error) and prediction on image files."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "check_finite",
    "evaluate",
    "expand_image_paths",
    "load_image",
    "load_predictor",
    "model_from_checkpoint",
    "predict_images",
    "topk_correct",
]


def check_finite(x: Tensor, what: str) -> None:
    """ValueError naming ``what`` if ``x`` holds NaN or infinite values (a model would turn them into
    meaningless scores)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} holds {bad} NaN or infinite value(s); refusing to score it")


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, :k].any(1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> dict[str, float]:
    """Mean loss and top-1/top-5 error (%) of ``model`` over ``batches``.

    A batch of images shaped (N, C, H, W) is scored directly; one shaped (N, crops, C, H, W)
    (the ImageNet 10-crop evaluation) is scored by averaging the softmax over the crops. A batch
    holding NaN or infinite values is refused (ValueError) rather than scored.
    """
    was_training = model.training
    model.eval()
    loss_sum, n, top1, top5 = 0.0, 0, 0, 0
    try:
        for index, (images, labels) in enumerate(batches):
            check_finite(images, f"batch {index + 1} of the evaluation data")
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
    _check_float_pixels(data, path)
    im = decode_image(data, str(path))  # RGB; DataError naming the file if it cannot be decoded
    x = TF.pil_to_tensor(im)
    if image_size <= 64:
        x = TF.resize(x, [image_size, image_size], antialias=True)
    else:
        x = TF.center_crop(TF.resize(x, round(image_size * 256 / 224), antialias=True), [image_size, image_size])
    x = x.float().div_(255)
    x = TF.normalize(x, list(mean), list(std))
    check_finite(x, f"image {path} (after normalisation with mean {list(mean)}, std {list(std)})")
    return x


def _check_float_pixels(data: bytes, path: str | os.PathLike) -> None:
    """ValueError if ``data`` is a floating-point image (e.g. a 32-bit TIFF) with NaN or infinite
    pixels, which decoding to 8 bits would silently turn into numbers."""
    import io

    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "F":
                return
            pixels = np.asarray(im)
    except Exception:  # noqa: BLE001 - not decodable: decode_image names the file and the problem
        return
    bad = int((~np.isfinite(pixels)).sum())
    if bad:
        raise ValueError(f"image {path} holds {bad} NaN or infinite pixel value(s); refusing to score it")


def model_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The trained model of a ``densenet train`` checkpoint (in eval mode) and its data description
    (``class_names``, ``mean``, ``std``, ``image_size``, ``dataset``, and ``model``: the model's name)."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .model import DenseNet
    from .weights import WeightsError, load_state_dict

    kind = _export_kind(Path(path))
    if kind:
        raise CheckpointError(f"{path} is {kind}, not a `densenet train` checkpoint (checkpoint.pt)")
    state = load_checkpoint(path)
    try:
        model = DenseNet(**state["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} does not describe a DenseNet this version can build: {e}") from None
    try:
        load_state_dict(model, state["model"])
    except WeightsError as e:
        raise CheckpointError(f"{path}: its weights do not fit the architecture it names: {e}") from None
    data = state.get("data")
    if not isinstance(data, dict) or not {"class_names", "mean", "std", "image_size"} <= set(data):
        raise CheckpointError(f"{path} has no data description (class names, mean, std, image size)")
    return model.eval(), {**data, "model": state["config"].get("model")}


def _export_kind(path: Path) -> str | None:
    """What an export or other non-checkpoint file is, by its suffix or content (None: maybe a checkpoint)."""
    import zipfile

    kind = {".onnx": "an ONNX export", ".safetensors": "a safetensors export", ".json": "a JSON file"}.get(path.suffix.lower())
    if kind or not path.is_file() or not zipfile.is_zipfile(path):
        return kind
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    return "a TorchScript export" if any(n.endswith("constants.pkl") or "/code/" in n for n in names) else None


def load_predictor(path: str | os.PathLike, image_size: int | None = None
                   ) -> tuple[Callable[[Tensor], Tensor], dict]:
    """A callable (N, 3, H, W) normalised images -> (N, classes) logits and its data description, from
    a ``densenet train`` checkpoint, an ONNX export (``.onnx``, run by ONNX Runtime on the CPU) or a
    safetensors export (``.safetensors`` with its ``.json``). ``image_size`` overrides the recorded
    size (an ONNX file must have been exported for it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    if path.suffix.lower() == ".onnx":
        from .inference import load_onnx

        return load_onnx(path, image_size)
    if path.suffix.lower() == ".safetensors":
        from .export import model_from_safetensors

        model, data = model_from_safetensors(path)
    else:
        model, data = model_from_checkpoint(path)
    if image_size is not None:
        model.check_input_size(image_size)
        data = {**data, "image_size": image_size}
    return model, data


@torch.no_grad()
def predict_images(model: Callable[[Tensor], Tensor], paths: Iterable[str | os.PathLike], data: dict, *, top: int = 5,
                   batch_size: int = 64, device: torch.device | None = None,
                   on_error: Callable[[Path, Exception], None] | None = None
                   ) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
    """For each image (folders expanded), the ``top`` classes with their probabilities, best first.

    An image that cannot be read or decoded, or holds NaN/infinite values, raises ValueError naming
    it; with ``on_error`` it is passed there (path, error) and skipped instead.
    """
    device = device or torch.device("cpu")
    names = data["class_names"]
    files = list(expand_image_paths(paths))
    for i in range(0, len(files), batch_size):
        chunk, images = [], []
        for f in files[i : i + batch_size]:
            try:
                images.append(load_image(f, data["image_size"], data["mean"], data["std"]))
            except ValueError as e:  # DataError (undecodable) is a ValueError too
                if on_error is None:
                    raise
                on_error(f, e)
                continue
            chunk.append(f)
        if not chunk:
            continue
        probs = F.softmax(model(torch.stack(images).to(device)).float(), dim=1)
        values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
        for f, v, idx in zip(chunk, values.tolist(), indices.tolist()):
            yield f, [(names[j] if j < len(names) else str(j), p) for j, p in zip(idx, v)]
