"""Trained models from files: ``densenet train`` checkpoints and safetensors exports, with the data
description that serving needs (class names, normalisation mean/std, image size)."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from ..errors import DenseNetError, MissingFile
from ..io.checkpoint import CheckpointError, load_checkpoint
from ..models import DenseNet, WeightsError, create_model, get_weights, load_state_dict, read_state_dict

__all__ = ["METADATA_FORMAT", "ExportError", "build_from_metadata", "export_kind", "model_from_checkpoint",
           "model_from_safetensors", "model_from_weights"]

METADATA_FORMAT = "densenet-export-v1"


class ExportError(DenseNetError, ValueError):
    """An export that cannot be written, read, or does not reproduce the model's outputs."""


def export_kind(path: Path) -> str | None:
    """What an export or other non-checkpoint file is, by its suffix or content (None: maybe a checkpoint)."""
    kind = {".onnx": "an ONNX export", ".safetensors": "a safetensors export", ".json": "a JSON file"}.get(path.suffix.lower())
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


def model_from_weights(weights: str, model: str | None = None) -> tuple[DenseNet, dict]:
    """A model with trained weights by name (``"densenet121.imagenet"``, or ``weights="imagenet"`` with
    ``model="densenet121"``; see ``densenet weights``) in eval mode, and its data description."""
    if model is None:
        if "." not in weights:
            raise WeightsError(f"weights {weights!r} need a model: give --model NAME, or the full name "
                               "MODEL.TAG (e.g. densenet121.imagenet; `densenet weights` lists them)")
        model, weights = weights.split(".", 1)
    w = get_weights(model, weights)
    return create_model(model, weights=w).eval(), w.data()
