"""Serving trained models: loading checkpoints and exports, exporting (ONNX, torch.export,
TorchScript, safetensors), fast inference, predictions on image files."""
from .explain import Explained, explain_images, resolve_class
from .export import FORMATS, export_checkpoint, export_model, export_onnx, export_program, standard_model
from .inference import FastInference, load_onnx, prepare_for_inference
from .int8 import Int8DenseNet, is_int8_file, load_int8, quantize_densenet, save_int8
from .loading import (
    ExportError,
    model_from_checkpoint,
    model_from_exported_program,
    model_from_safetensors,
    model_from_weights,
)
from .predict import expand_image_paths, folder_truth, load_image, load_predictor, predict_images, predict_images_tta
from .tta import TTA_MODES, check_tta, flip_average

__all__ = ["Explained", "explain_images", "resolve_class",
           "FORMATS", "ExportError", "FastInference", "expand_image_paths", "export_checkpoint", "export_model",
           "export_onnx", "export_program", "folder_truth", "load_image", "load_onnx", "load_predictor",
           "model_from_checkpoint", "model_from_exported_program", "model_from_safetensors",
           "model_from_weights", "predict_images", "predict_images_tta", "prepare_for_inference", "standard_model",
           "TTA_MODES", "check_tta", "flip_average",
           "Int8DenseNet", "is_int8_file", "load_int8", "quantize_densenet", "save_int8"]
