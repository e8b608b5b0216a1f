"""Trained models from files: ``densenet train`` checkpoints, safetensors exports and torch.export
programs, with the data description that serving needs (class names, normalisation mean/std, image size)."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import DenseNetError, MissingFile
from ..io.checkpoint import CheckpointError, load_checkpoint
from ..models import DenseNet, WeightsError, create_model, find_weights, get_weights, load_state_dict, read_state_dict

__all__ = ["EXPORT_EXTRA_FILE", "METADATA_FORMAT", "ExportError", "build_from_metadata", "export_kind",
           "model_from_checkpoint", "model_from_exported_program", "model_from_safetensors", "model_from_weights"]

METADATA_FORMAT = "densenet-export-v1"
#: the extra file of a TorchScript or torch.export archive that holds the export's description
EXPORT_EXTRA_FILE = "densenet.json"


class ExportError(DenseNetError, ValueError):
    """An export that cannot be written, read, or does not reproduce the model's outputs."""


def export_kind(path: Path) -> str | None:
    """What an export or other non-checkpoint file is, by its suffix or content (None: maybe a checkpoint)."""
    kind = {".onnx": "an ONNX export", ".safetensors": "a safetensors export", ".json": "a JSON file",
            ".pt2": "a torch.export program"}.get(path.suffix.lower())
    if kind or not path.is_file() or not zipfile.is_zipfile(path):
        return kind
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    return "a TorchScript export" if any(n.endswith("constants.pkl") or "/code/" in n for n in names) else None


def model_from_checkpoint(path: str | os.PathLike, ema: bool | None = None) -> tuple[DenseNet, dict]:
    """The trained model of a ``densenet train`` checkpoint (in eval mode) and its data description
    (``class_names``, ``mean``, ``std``, ``image_size``, ``dataset``, ``model``: the model's name, and
    ``ema``: True when the weights are the run's exponential moving average).

    ``ema``: None (the default) takes the weight average when the run was trained with ``--ema-eval``,
    else the raw weights; True the average (the run must have kept one, ``--ema-decay``); False the raw
    weights."""
    kind = export_kind(Path(path))
    if kind:
        raise CheckpointError(f"{path} is {kind}, not a `densenet train` checkpoint (checkpoint.pt)")
    state = load_checkpoint(path)
    if ema is None:
        ema = bool((state.get("config") or {}).get("ema_eval")) and "ema" in state
    if ema and not isinstance(state.get("ema"), dict):
        raise CheckpointError(f"{path} holds no weight average: its run was trained without --ema-decay; "
                              "use its raw weights (drop --ema yes)")
    try:
        model = DenseNet(**state["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} does not describe a DenseNet this version can build: {e}") from None
    try:
        load_state_dict(model, state["ema"]["model"] if ema else state["model"])
    except WeightsError as e:
        raise CheckpointError(f"{path}: its weights do not fit the architecture it names: {e}") from None
    data = state.get("data")
    if not isinstance(data, dict) or not {"class_names", "mean", "std", "image_size"} <= set(data):
        raise CheckpointError(f"{path} has no data description (class names, mean, std, image size)")
    return model.eval(), {**data, "model": state["config"].get("model"), **({"ema": True} if ema else {})}


def build_from_metadata(meta: dict[str, Any], source: str) -> DenseNet:
    """The architecture an export's metadata describes (``name`` and ``model_config``), freshly initialised."""
    config = meta.get("model_config")
    if not isinstance(config, dict):
        raise ExportError(f"{source} does not describe an architecture (no 'model_config' mapping)")
    try:
        return create_model(meta["name"], **config) if meta.get("name") else DenseNet(**config)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{source} describes an architecture this version cannot build: {e}") from None


def model_from_safetensors(path: str | os.PathLike) -> tuple[DenseNet, dict]:
    """The model of a safetensors export (weights in ``path``, architecture in the JSON file beside
    it) in eval mode, and its data description."""
    path = Path(path)
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        raise MissingFile(f"{json_path} is missing: a safetensors export keeps its architecture there")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise ExportError(f"{json_path} is not a densenet export description (format {METADATA_FORMAT!r})")
    model = build_from_metadata(meta, str(json_path))
    load_state_dict(model, read_state_dict(path))  # names missing / unexpected / mis-shaped tensors
    return model.eval(), meta.get("data") or {}


# what a .pt2 archive of plain tensors holds (paths inside its top folder); anything else is refused
_PT2_MEMBERS = re.compile(r"(archive_format|archive_version|byteorder|\.data/.*|models/[^/]+\.json|extra/[^/]+"
                          r"|data/weights/([^/]+_weights_config\.json|weight_\d+)"
                          r"|data/constants/([^/]+_constants_config\.json|tensor_\d+)|data/sample_inputs/[^/]+\.pt)")


def _check_pt2(path: Path) -> None:
    """Refuse a .pt2 archive that holds anything torch.export.load would unpickle (pickled weights or
    constants, custom objects, sample inputs that are not plain tensors): loading one runs code."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            for name in names:
                inner = name.split("/", 1)[1] if "/" in name else name
                if name.endswith("/") or not _PT2_MEMBERS.fullmatch(inner):
                    raise ExportError(f"{path} holds {name}, which a torch.export program of plain tensors has not; "
                                      "refused (export the model with `densenet export CHECKPOINT --format export`)")
                if inner.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(z.read(name)).get("config", {})
                    pickled = [fqn for fqn, entry in config.items() if entry.get("use_pickle")]
                    if pickled:
                        raise ExportError(f"{path} stores {pickled[0]} pickled; only plain tensors are read (refused)")
                elif inner.startswith("data/sample_inputs/"):
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, AttributeError, pickle.UnpicklingError,
            RuntimeError, OSError) as e:
        raise ExportError(f"{path} is not a readable torch.export program: {str(e).splitlines()[0][:300]}") from None


def model_from_exported_program(path: str | os.PathLike, image_size: int | None = None
                                ) -> tuple[torch.nn.Module, dict]:
    """A torch.export program written by ``densenet export --format export`` (``.pt2``) as a module (N, 3, H, W)
    -> (N, classes) logits, and its data description. The program fixes the image size; ``image_size``
    must agree with it. The archive is checked to hold plain tensors only before it is loaded."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"no torch.export program at {path}")
    _check_pt2(path)
    extra = {EXPORT_EXTRA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds of errors for bad archives
        raise ExportError(f"{path} is not a readable torch.export program: {str(e).splitlines()[0][:300]}") from None
    try:
        meta = json.loads(extra[EXPORT_EXTRA_FILE] or "null")
        data = meta["data"] if meta.get("format") == METADATA_FORMAT else None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        data = None
    if not isinstance(data, dict) or not {"class_names", "mean", "std"} <= set(data):
        raise ExportError(f"{path} carries no densenet data description (class names, mean, std); export the model "
                          "with `densenet export CHECKPOINT --format export`")
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    shape = list(inputs[0].meta["val"].shape) if len(inputs) == 1 else []
    if len(shape) != 4 or shape[1] != 3:
        raise ExportError(f"{path} takes input of shape {shape}; predicting on images needs (batch, 3, height, width)")
    sides = [int(s) for s in shape[2:]]
    if sides[0] != sides[1]:
        raise ExportError(f"{path} takes input of shape {shape}; only square images are supported")
    size = sides[0]
    if image_size is not None and image_size != size:
        raise ExportError(f"{path} takes {size}x{size} images, not the {image_size}x{image_size} asked for; export the "
                          f"model again with --image-size {image_size}")
    return program.module(), {**data, "image_size": size}


def model_from_weights(weights: str, model: str | None = None) -> tuple[DenseNet, dict]:
    """A model with trained weights by name (``"densenet121.imagenet"``, or ``weights="imagenet"`` with
    ``model="densenet121"``; torchvision's names too, ``"DenseNet121_Weights.IMAGENET1K_V1"``, or
    ``"IMAGENET1K_V1"`` with the model; see ``densenet weights``) in eval mode, and its data description."""
    w = find_weights(weights) if model is None else get_weights(model, weights)
    return create_model(w.model, weights=w).eval(), w.data()
