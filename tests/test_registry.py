"""Named models: exact parameter counts of the paper, generic depth names, bad names."""
import pytest
import torch

from densenet import count_parameters, create_model, list_models, model_spec
from densenet.models.registry import cifar_densenet

PAPER = {
    "densenet40_k12": 1_019_722,
    "densenet100_k12": 6_979_642,
    "densenet100_k24": 27_249_082,
    "densenet_bc100_k12": 769_162,
    "densenet_bc250_k24": 15_324_406,
    "densenet_bc190_k40": 25_624_430,
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet264": 33_337_704,
    "densenet161": 28_681_000,
}


def test_every_paper_model_is_registered_in_order():
    assert list_models() == list(PAPER)


@pytest.mark.parametrize("name", list(PAPER))
def test_exact_parameter_count(name):
    model = create_model(name)  # real tensors: counts what a user gets
    assert count_parameters(model) == PAPER[name]
    assert model.num_classes == (10 if "_k" in name else 1000)


def test_imagenet_models_match_torchvision_parameter_counts():
    import torchvision

    for name in ("densenet121", "densenet161", "densenet169", "densenet201"):
        tv = getattr(torchvision.models, name)(weights=None)
        assert count_parameters(create_model(name)) == count_parameters(tv)


def test_overrides():
    model = create_model("densenet_bc100_k12", num_classes=100, drop_rate=0.2)
    assert model.num_classes == 100 and model.drop_rate == 0.2
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    with pytest.raises(TypeError, match="unknown argument.*num_clases.*valid"):
        create_model("densenet_bc100_k12", num_clases=100)


@pytest.mark.parametrize(
    "name, params, blocks",
    [("densenet_bc40_k12", 176_122, (6, 6, 6)), ("densenet_bc100_k12", 769_162, (16, 16, 16)),
     ("densenet40_k12", 1_019_722, (12, 12, 12)), ("densenet_bc52_k16", None, (8, 8, 8)), ("densenet22_k8", None, (6, 6, 6))],
)
def test_generic_depth_names(name, params, blocks):
    model = create_model(name)
    assert model.block_config == blocks
    if params is not None:
        assert count_parameters(model) == params
    assert model_spec(name).input_size == 32


def test_cifar_densenet_function():
    assert count_parameters(cifar_densenet(100, 12, bc=True)) == 769_162
    assert count_parameters(cifar_densenet(40, 12, bc=False)) == 1_019_722


@pytest.mark.parametrize("name, match", [("densenet_bc101_k12", "L - 4 must be a positive multiple of 6"),
                                         ("densenet41_k12", "L - 4 must be a positive multiple of 3"),
                                         ("densenet_bc4_k12", "depth 4"),
                                         ("densenet_bc100_k0", "growth_rate must be a positive")])
def test_depth_no_layout_fits(name, match):
    with pytest.raises(ValueError, match=match):
        create_model(name)


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown model 'densenet12'.*did you mean 'densenet121'"):
        create_model("densenet12")
    with pytest.raises(ValueError, match=r"did you mean 'densenet_bc100_k12'"):
        create_model("densenet-bc100-k12")
    with pytest.raises(TypeError, match="model name must be a string"):
        create_model(121)
