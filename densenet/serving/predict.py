"""Predictions on image files: a trained model (checkpoint, ONNX, torch.export or safetensors export) and the top
classes of each image with their probabilities."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import IMAGE_SUFFIXES, DataError, ImageOptions, check_finite, eval_view
from ..data.dicom import DICOM_SUFFIXES
from ..data.folder import list_entries
from ..data.transforms import normalize
from ..errors import ArgumentError, MissingFile
from .inference import load_onnx
from .int8 import is_int8_file, load_int8
from .loading import model_from_checkpoint, model_from_exported_program, model_from_safetensors
from .tta import check_tta, flip_average

__all__ = ["expand_image_paths", "folder_truth", "image_options", "load_image", "load_predictor", "predict_images",
           "predict_images_tta"]


def expand_image_paths(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files as given, folders expanded to the images inside them (recursively, sorted; links to
    folders followed, as when training on an image folder)."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(p / name for name, is_dir in list_entries(p) if not is_dir and (p / name).is_file()
                              and Path(name).suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES)
        else:
            yield p


def folder_truth(files: Iterable[Path], class_names: list[str]) -> list[int]:
    """The true class of each image file from the folder it is in (``<class>/<image>``, as in the
    training data): its index in ``class_names``. :class:`DataError` naming the folders that are not
    classes of the model."""
    index = {name: i for i, name in enumerate(class_names)}
    labels, strangers = [], {}
    for f in files:
        folder = Path(f).parent.name
        if folder in index:
            labels.append(index[folder])
        else:
            strangers.setdefault(folder, []).append(f)
    if strangers:
        named = "; ".join(f"{name or '(no folder)'}/ ({len(fs)} image{'s' * (len(fs) != 1)}, e.g. {fs[0]})"
                          for name, fs in list(strangers.items())[:5])
        raise DataError(f"--truth-from-folders: the images must sit in folders named after the model's classes "
                        f"(<class>/<image>, as in the training data); these folders are not classes: {named}"
                        f"{' ...' if len(strangers) > 5 else ''}. The classes: {', '.join(class_names[:20])}"
                        f"{' ...' if len(class_names) > 20 else ''}")
    return labels


def load_image(path: str | os.PathLike, image_size: int, mean: tuple, std: tuple, options: ImageOptions | None = None
               ) -> Tensor:
    """An image file as a normalised (3, image_size, image_size) float tensor, with the evaluation
    view of the data loaders (:func:`densenet.data.eval_image`): small models (image_size <= 64,
    CIFAR/SVHN) see the whole image resized, larger ones the ImageNet centre crop. ``options``: a
    label-file model's reading (full depth, DICOM, channels, fit), the image then (C, S, S)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror}") from None
    x = normalize(eval_view(data, str(path), image_size, options), tuple(mean), tuple(std))
    check_finite(x, f"image {path} (after normalisation with mean {list(mean)}, std {list(std)})")
    return x


def load_predictor(path: str | os.PathLike, image_size: int | None = None, ema: bool | None = None
                   ) -> tuple[Callable[[Tensor], Tensor], dict]:
    """A callable (N, 3, H, W) normalised images -> (N, classes) logits and its data description, from
    a ``densenet train`` checkpoint, an ONNX export (``.onnx``, run by ONNX Runtime on the CPU), a
    torch.export program (``.pt2``), a safetensors export (``.safetensors`` with its ``.json``) or an
    int8 model (``.int8.safetensors``, :mod:`densenet.serving.int8`).
    ``image_size`` overrides the recorded size (an ONNX file or a program must have been exported for it).
    ``ema``: for a checkpoint, its weight average (True), its raw weights (False) or the one its run
    serves (None, see :func:`model_from_checkpoint`); an export holds one set of weights, so only None
    is accepted for it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"no model file at {path}")
    export = path.suffix.lower() in (".onnx", ".pt2", ".safetensors")
    if export and ema is not None:
        raise ArgumentError(f"--ema {'yes' if ema else 'no'} chooses between the weights of a checkpoint; {path} is an "
                            "export, which holds one set of weights (the ones chosen when it was exported): drop --ema")
    if path.suffix.lower() == ".onnx":
        return load_onnx(path, image_size)
    if is_int8_file(path):
        return load_int8(path, image_size)
    if path.suffix.lower() == ".pt2":
        return model_from_exported_program(path, image_size)
    if path.suffix.lower() == ".safetensors":
        model, data = model_from_safetensors(path)
    else:
        model, data = model_from_checkpoint(path, ema=ema)
    if image_size is not None:
        model.check_input_size(image_size)
        data = {**data, "image_size": image_size}
    return model, data


def image_options(data: dict) -> ImageOptions | None:
    """How a label-file model reads images (from its checkpoint's data description); None for the others."""
    if not data.get("multilabel"):
        return None
    return ImageOptions(int(data.get("in_channels", 3)), data.get("fit", "crop"), bool(data.get("dicom_window", False)))


@torch.no_grad()
def predict_images(model: Callable[[Tensor], Tensor], paths: Iterable[str | os.PathLike], data: dict, *, top: int = 5,
                   batch_size: int = 64, device: torch.device | None = None,
                   on_error: Callable[[Path, Exception], None] | None = None
                   ) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
    """For each image (folders expanded), the ``top`` classes with their probabilities, best first.

    An image that cannot be read or decoded, or holds NaN/infinite values, raises :class:`DataError`
    naming it; with ``on_error`` it is passed there (path, error) and skipped instead.
    """
    for f, tops in _predict(model, paths, data, top, batch_size, device, on_error, flip=False):
        yield f, tops[0]


@torch.no_grad()
def predict_images_tta(model: Callable[[Tensor], Tensor], paths: Iterable[str | os.PathLike], data: dict, *,
                       tta: str = "flip", top: int = 5, batch_size: int = 64, device: torch.device | None = None,
                       on_error: Callable[[Path, Exception], None] | None = None
                       ) -> Iterator[tuple[Path, list[tuple[str, float]], list[tuple[str, float]]]]:
    """As :func:`predict_images`, with beside each image's single-crop top classes those of the
    test-time augmentation ``tta`` (``flip``: the softmax averaged with the horizontal mirror's,
    :mod:`densenet.serving.tta`). ArgumentError for a model whose input is not an image."""
    check_tta(tta, getattr(model, "spatial_dims", None))
    for f, (single, averaged) in _predict(model, paths, data, top, batch_size, device, on_error, flip=True):
        yield f, single, averaged


@torch.no_grad()
def _predict(model: Callable[[Tensor], Tensor], paths: Iterable[str | os.PathLike], data: dict, top: int,
             batch_size: int, device: torch.device | None, on_error: Callable[[Path, Exception], None] | None, *,
             flip: bool) -> Iterator[tuple[Path, list[list[tuple[str, float]]]]]:
    """Each image with its top classes: of the image alone, and with ``flip`` of the flip average too."""
    device = device or torch.device("cpu")
    names = data["class_names"]
    files = list(expand_image_paths(paths))
    options = image_options(data)
    for i in range(0, len(files), batch_size):
        chunk, images = [], []
        for f in files[i : i + batch_size]:
            try:
                images.append(load_image(f, data["image_size"], data["mean"], data["std"], options))
            except DataError as e:
                if on_error is None:
                    raise
                on_error(f, e)
                continue
            chunk.append(f)
        if not chunk:
            continue
        batch = torch.stack(images).to(device)
        logits = model(batch).float()
        if data.get("multilabel"):  # one sigmoid per label; all of them, in the label order
            views = [torch.sigmoid(logits)]
            if flip:
                views.append((views[0] + torch.sigmoid(model(batch.flip(-1)).float())) / 2)
            for n, f in enumerate(chunk):
                yield f, [[(names[j], p) for j, p in enumerate(v[n].tolist())] for v in views]
            continue
        views = [F.softmax(logits, dim=1)]
        if flip:  # the mirror: the width axis, the last one
            views.append(flip_average(logits, model(batch.flip(-1)).float()).exp())
        ranked = [probs.topk(min(top, probs.shape[1]), dim=1) for probs in views]
        for n, f in enumerate(chunk):
            yield f, [[(names[j] if j < len(names) else str(j), p) for j, p in zip(idx[n].tolist(), v[n].tolist())]
                      for v, idx in ranked]
