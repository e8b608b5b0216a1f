"""DenseNet (Huang et al., CVPR 2017): every architecture of the paper, in PyTorch."""
from .model import STEMS, DenseBlock, DenseLayer, DenseNet, Transition
from .registry import cifar_densenet, create_model, list_models, model_spec
from .summary import count_macs, count_parameters
from .weights import (
    WeightsError,
    load_state_dict,
    load_torchvision_weights,
    read_state_dict,
    to_torchvision_state_dict,
)

__version__ = "0.1.0"
__all__ = [
    "DenseLayer", "DenseBlock", "Transition", "DenseNet", "STEMS",
    "create_model", "list_models", "model_spec", "cifar_densenet",
    "count_parameters", "count_macs",
    "WeightsError", "read_state_dict", "load_state_dict", "load_torchvision_weights", "to_torchvision_state_dict",
]
