"""The models: DenseNet and its parts, the fast and memory-efficient kernels, synchronised BN, the
registry of the paper's architectures, weight files, and counting (parameters, multiply-adds)."""
from .densenet import EXECUTION_MODES, SPATIAL_DIMS, STEMS, DenseBlock, DenseLayer, DenseNet, Transition
from .pretrained import Weights, find_weights, get_weights, list_weights, load_weights, weights_file
from .registry import ModelSpec, cifar_densenet, create_model, list_models, model_spec, register_model
from .summary import count_macs, count_parameters, stage_summary
from .sync_bn import SyncBatchNorm2d, convert_sync_batchnorm
from .weights import (
    LoadReport,
    WeightsError,
    from_torchvision_state_dict,
    load_state_dict,
    load_torchvision_weights,
    load_weight_file,
    monai_arguments,
    read_state_dict,
    to_monai_state_dict,
    to_torchvision_state_dict,
)

__all__ = [
    "DenseLayer", "DenseBlock", "Transition", "DenseNet", "STEMS", "EXECUTION_MODES", "SPATIAL_DIMS",
    "ModelSpec", "create_model", "list_models", "model_spec", "cifar_densenet", "register_model",
    "count_parameters", "count_macs", "stage_summary", "SyncBatchNorm2d", "convert_sync_batchnorm",
    "WeightsError", "read_state_dict", "load_state_dict", "load_torchvision_weights", "to_torchvision_state_dict",
    "from_torchvision_state_dict", "LoadReport", "load_weight_file", "to_monai_state_dict", "monai_arguments",
    "Weights", "find_weights", "get_weights", "list_weights", "load_weights", "weights_file",
]
