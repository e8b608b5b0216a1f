"""DenseNet (Huang et al., CVPR 2017): every architecture of the paper, in PyTorch."""
from .analysis.explain import explain
from .errors import DenseNetError
from .models import (
    STEMS,
    DenseBlock,
    DenseLayer,
    DenseNet,
    Transition,
    Weights,
    WeightsError,
    cifar_densenet,
    count_macs,
    count_parameters,
    create_model,
    get_weights,
    list_models,
    list_weights,
    load_state_dict,
    load_torchvision_weights,
    model_spec,
    read_state_dict,
    to_torchvision_state_dict,
)

__version__ = "0.1.0"
__all__ = [
    "DenseLayer", "DenseBlock", "Transition", "DenseNet", "STEMS",
    "create_model", "list_models", "model_spec", "cifar_densenet",
    "count_parameters", "count_macs", "DenseNetError", "explain", "Weights", "get_weights", "list_weights",
    "WeightsError", "read_state_dict", "load_state_dict", "load_torchvision_weights", "to_torchvision_state_dict",
]
