"""Trained weights by name, in the spirit of torchvision's weights enums.

Two sources:

- this project's own weights, trained by ``densenet train`` and shipped inside the package
  (``densenet/assets/weights/*.safetensors``, described by ``index.json`` beside them), so that they
  work offline right after install;
- torchvision's ImageNet weights for DenseNet-121/161/169/201: address, file hash, categories and
  accuracy are read from the ``torchvision.models.DenseNet*_Weights`` enums at run time, the file is
  downloaded with ``torch.hub`` (SHA-256 prefix checked, written to a temporary file and renamed, so
  the cache only ever holds complete, verified files) into ``$DENSENET_HOME/weights`` or the torch hub
  cache (``torch.hub.get_dir()/checkpoints``).

``$DENSENET_WEIGHTS_MIRROR`` (a base address, or a local folder holding the files) replaces the
download address for machines behind a proxy or offline.

    w = get_weights("densenet121", "imagenet")      # or True for the model's default entry
    print(w)        # Weights(densenet121.imagenet: imagenet, top-1 74.43%, top-5 91.97%, 1000 classes, 224x224, 30.8 MB)
    w.record        # the whole entry as a dict: class names, mean/std, recipe, source, file, SHA-256, ...
    model = create_model("densenet121", weights="imagenet")
    print(w.accuracy, w.class_names[:3], w.mean, w.input_size)
"""
from __future__ import annotations

import difflib
import enum
import functools
import hashlib
import http.client
import json
import os
import urllib.error
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .weights import WeightsError, load_state_dict, read_state_dict

__all__ = ["HOME_ENV", "MIRROR_ENV", "Weights", "find_weights", "get_weights", "list_weights", "load_weights",
           "torchvision_name", "weights_cache_dir", "weights_file"]

HOME_ENV = "DENSENET_HOME"
MIRROR_ENV = "DENSENET_WEIGHTS_MIRROR"
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "assets" / "weights"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION_MODELS = {"densenet121": "DenseNet121", "densenet161": "DenseNet161", "densenet169": "DenseNet169",
                      "densenet201": "DenseNet201"}


@dataclass(frozen=True)
class Weights:
    """One set of trained weights: what they are for, how good they are, where the file comes from.

    ``accuracy``: top-1 / top-5 accuracy (%) measured on ``dataset``'s test set, by ``measured``
    (the command, machine and date); ``recipe``: how they were trained; ``sha256``: the file's
    digest, or the prefix that torch.hub checks; ``url``: download address (None: in the package).

    Printed, one line: name, dataset, accuracy, classes, input size and file size (the class names
    alone would fill a terminal); ``record`` holds the whole entry as a dict.
    """

    model: str
    tag: str
    dataset: str
    class_names: tuple[str, ...]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    accuracy: dict[str, float]
    measured: str
    recipe: str
    file_name: str
    sha256: str
    file_size: int | None
    license: str
    source: str
    url: str | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def record(self) -> dict[str, Any]:
        """The whole entry, every field (and ``name``), as a dict."""
        return {"name": self.name, **asdict(self)}

    def __repr__(self) -> str:
        accuracy = [f"{k[:3]}-{k[3:]} {v:.2f}%" for k, v in self.accuracy.items() if k in ("top1", "top5") and v is not None]
        size = f"{self.file_size / 2**20:.1f} MB" if self.file_size else "size unknown"
        side = self.input_size
        return (f"Weights({self.name}: {', '.join([self.dataset, *accuracy])}, {self.num_classes} classes, "
                f"{side}x{side}, {size})")

    def data(self) -> dict[str, Any]:
        """The data description serving uses: class names, normalisation, input size, dataset."""
        return {"class_names": list(self.class_names), "mean": list(self.mean), "std": list(self.std),
                "image_size": self.input_size, "dataset": self.dataset, "num_classes": self.num_classes,
                "model": self.model, "weights": self.name}


# ---------------------------------------------------------------------------- the registry
def _bundled() -> list[Weights]:
    """This project's weights shipped in the package (``assets/weights/index.json``)."""
    index = BUNDLED_DIR / "index.json"
    if not index.is_file():
        return []
    entries = json.loads(index.read_text())
    return [Weights(**{**e, "class_names": tuple(e["class_names"]), "mean": tuple(e["mean"]), "std": tuple(e["std"])})
            for e in entries]


@functools.lru_cache(maxsize=1)
def _torchvision() -> tuple[Weights, ...]:
    """torchvision's ImageNet weights, described by its own enums (read now, not copied here)."""
    try:
        import torchvision.models as tvm  # optional at import time: only listing these entries needs it
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    out = []
    for model, stem in TORCHVISION_MODELS.items():
        enum = getattr(tvm, f"{stem}_Weights", None)
        if enum is None:
            continue
        for member in enum:
            meta = member.meta
            metrics = meta.get("_metrics", {}).get("ImageNet-1K", {})
            file_name = member.url.rsplit("/", 1)[-1]
            transforms = member.transforms()
            out.append(Weights(
                model=model, tag="imagenet" if member is enum.DEFAULT else member.name.lower(), dataset="imagenet",
                class_names=tuple(meta["categories"]), input_size=int(transforms.crop_size[0]),
                mean=tuple(transforms.mean), std=tuple(transforms.std),
                accuracy={"top1": metrics.get("acc@1"), "top5": metrics.get("acc@5")},
                measured="torchvision's figures (ImageNet-1K validation, single 224 crop after resize to 256)",
                recipe=str(meta.get("recipe", "")), file_name=file_name, sha256=file_name.split("-")[-1].split(".")[0],
                file_size=int(meta["_file_size"] * 2**20) if "_file_size" in meta else None,
                license="BSD-3-Clause (torchvision); ImageNet's terms of access apply",
                source=f"torchvision.models.{stem}_Weights.{member.name}", url=member.url,
                notes=str(meta.get("_docs", "")), extra={"enum": f"{stem}_Weights.{member.name}"},
            ))
    return tuple(out)


def find_weights(name: str) -> Weights:
    """The weights of a full name without a separate model: ``"densenet121.imagenet"``, or
    torchvision's ``"DenseNet121_Weights.IMAGENET1K_V1"``."""
    found = _by_torchvision_name(list_weights(), name) if name.split(".", 1)[0].endswith("_Weights") else None
    if found:
        return found
    if "." not in name:
        raise WeightsError(f"weights {name!r} need a model: give --model NAME, or the full name MODEL.TAG (e.g. "
                           "densenet121.imagenet; `densenet weights` lists them)")
    model, tag = name.split(".", 1)
    return get_weights(model, tag)


def list_weights(model: str | None = None) -> list[Weights]:
    """Every known set of weights (of ``model`` only, when given): this project's, then torchvision's."""
    entries = [*_bundled(), *_torchvision()]
    return [w for w in entries if model is None or w.model == model]


def torchvision_name(weights: object) -> str | None:
    """``"DenseNet121_Weights.IMAGENET1K_V1"`` for a member of a torchvision weights enum (any
    ``*_Weights`` enum, so that torchvision is not imported here), else None."""
    if isinstance(weights, enum.Enum) and type(weights).__name__.endswith("_Weights"):
        return f"{type(weights).__name__}.{weights.name}"
    return None


def _by_torchvision_name(entries: list[Weights], name: str) -> Weights | None:
    """The entry of ``entries`` that torchvision calls ``name``: its enum member (``IMAGENET1K_V1``) or
    the enum and the member (``DenseNet121_Weights.IMAGENET1K_V1``)."""
    for w in entries:
        full = w.extra.get("enum")
        if full and name in (full, full.split(".", 1)[1]):
            return w
    return None


def get_weights(model: str, weights: str | bool | Weights | enum.Enum) -> Weights:
    """The weights ``weights`` names for ``model``: a tag (``"cifar10"``, ``"imagenet"``), a full name
    (``"densenet121.imagenet"``), True or ``"DEFAULT"`` (the model's first entry), a :class:`Weights`,
    or torchvision's names for its own weights: the enum member
    (``torchvision.models.DenseNet121_Weights.IMAGENET1K_V1``), its name (``"IMAGENET1K_V1"``) or
    its full name (``"DenseNet121_Weights.IMAGENET1K_V1"``).
    :class:`WeightsError` naming the known ones (and the closest) otherwise."""
    if isinstance(weights, Weights):
        if weights.model != model:
            raise WeightsError(f"weights {weights.name} are for {weights.model}, not {model}")
        return weights
    weights = torchvision_name(weights) or weights
    mine = list_weights(model)
    if weights is True or weights == "DEFAULT":
        if not mine:
            raise WeightsError(f"no trained weights for {model}; models with weights: "
                               f"{', '.join(sorted({w.model for w in list_weights()}))}")
        return mine[0]
    if not isinstance(weights, str) or not weights:
        raise WeightsError(f"weights must be a tag such as 'cifar10' or 'imagenet', True or 'DEFAULT', or torchvision's "
                           f"name of them (e.g. 'IMAGENET1K_V1'); got {weights!r}")
    tag = weights.removeprefix(model + ".")
    for w in mine:
        if w.tag == tag:
            return w
    found = _by_torchvision_name(mine, tag)
    if found:
        return found
    other = _by_torchvision_name(list_weights(), tag) if "." in tag else None
    if other:
        raise WeightsError(f"weights {tag} are for {other.model}, not {model}")
    known = [w.name for w in list_weights()]
    close = difflib.get_close_matches(f"{model}.{tag}", known, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise WeightsError(f"no weights {tag!r} for {model}{hint} Known weights: {', '.join(known) or 'none'} "
                       "(`densenet weights` lists them)")


# ---------------------------------------------------------------------------- files
def weights_cache_dir() -> Path:
    """``$DENSENET_HOME/weights`` when set, else torch.hub's checkpoint cache."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() / "weights" if home else Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, w: Weights) -> bool:
    return path.is_file() and _sha256(path).startswith(w.sha256)


def weights_file(w: Weights, *, progress: bool = False) -> Path:
    """The verified local file of ``w``: in the package, in the cache, in the mirror folder, or
    downloaded (from the mirror address or ``w.url``) into the cache. :class:`WeightsError` with the fix
    when it cannot be had."""
    if w.url is None:
        path = BUNDLED_DIR / w.file_name
        if not _verified(path, w):
            raise WeightsError(f"{path} is missing or does not match its SHA-256 ({w.sha256[:12]}...): the package "
                               "is damaged; reinstall densenet")
        return path
    cache = weights_cache_dir()
    target = cache / w.file_name
    if target.is_file():
        if _verified(target, w):
            return target
        target.unlink()  # a file that does not verify is not kept
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror and "://" not in mirror:  # a local folder
        path = Path(mirror).expanduser() / w.file_name
        if not _verified(path, w):
            raise WeightsError(f"{MIRROR_ENV}={mirror}: {path} is missing or does not match the SHA-256 prefix "
                               f"{w.sha256} of {w.name}; put {w.file_name} from {w.url} there")
        return path
    url = f"{mirror.rstrip('/')}/{w.file_name}" if mirror else w.url
    cache.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=w.sha256, progress=progress)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise WeightsError(f"cannot download {w.name} from {url} ({reason}); on a machine without internet, fetch "
                           f"{w.url} elsewhere and put {w.file_name} in {cache}, or set {MIRROR_ENV} to a folder or "
                           "server that holds it") from None
    except RuntimeError as e:  # torch.hub's hash check
        raise WeightsError(f"the file downloaded from {url} is not {w.name}: {e}; nothing was kept in {cache}") from None
    return target


def load_weights(model: nn.Module, w: Weights, *, strict: bool = True) -> nn.Module:
    """Load ``w`` into ``model`` (legacy torchvision keys renamed); with ``strict=False`` a classifier of
    another class count is left freshly initialised (fine-tuning)."""
    load_state_dict(model, read_state_dict(weights_file(w)), strict=strict)
    return model
