"""At home in timm and torchvision: the timm model contract (through timm's own builder), torch.fx
feature extraction, TorchScript, and a detection backbone."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.models import build_model_with_cfg
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from densenet import DenseNet, create_model, model_spec
from densenet.models.densenet import default_pretrained_cfg

torch.set_num_threads(2)
NAMES = ["densenet_bc40_k12", "densenet16_k8", "densenet121"]


def size_of(name: str) -> int:
    return 64 if model_spec(name).input_size == 224 else 32


def built_by_timm(name: str, **kwargs) -> torch.nn.Module:
    """One of our named models made by timm's builder, as a timm user's registered model would be."""
    spec = model_spec(name)
    cfg = default_pretrained_cfg(spec.kwargs["stem"], 3, spec.kwargs["num_classes"])
    # timm's default out_indices are five levels (0..4), as ImageNet DenseNets have; a three-block CIFAR
    # model has four, registered the way timm registers its own four-level models
    levels = len(spec.kwargs["block_config"]) + 1
    feature_cfg = {"flatten_sequential": True, **({} if levels == 5 else {"out_indices": tuple(range(levels))})}
    return build_model_with_cfg(DenseNet, name, pretrained=False, pretrained_cfg=cfg, feature_cfg=feature_cfg,
                                **{**spec.kwargs, **kwargs})


@pytest.mark.parametrize("name", NAMES)
def test_built_by_timm_forward_backward_and_data_config(name):
    torch.manual_seed(0)
    model = built_by_timm(name)
    s = size_of(name)
    out = model(torch.randn(2, 3, s, s))
    out.mean().backward()
    assert out.shape == (2, model.num_classes) and all(p.grad is not None for p in model.parameters())
    config = timm.data.resolve_model_data_config(model)
    native = model_spec(name).input_size
    assert config["input_size"] == (3, native, native)
    assert config["mean"] == ((0.485, 0.456, 0.406) if native == 224 else (0.4914, 0.4822, 0.4465))
    assert model.pretrained_cfg["first_conv"] == "features.conv0" and model.get_classifier() is model.classifier
    assert model.head_hidden_size == model.num_features == model.feature_info[-1]["num_chs"]


@pytest.mark.parametrize("name", NAMES)
def test_features_only_with_timms_default_levels(name):
    torch.manual_seed(0)
    model = built_by_timm(name).double().eval()
    torch.manual_seed(0)  # the same initial weights
    features = built_by_timm(name, features_only=True).double().eval()
    s = size_of(name)
    x = torch.randn(2, 3, s, s, dtype=torch.float64)
    maps = features(x)
    levels = model.feature_info
    assert len(maps) == len(levels) == len(model.block_config) + 1  # the stem, blocks 1..n-1, the final BN-ReLU
    assert [m.shape[1] for m in maps] == [i["num_chs"] for i in levels]
    assert [s // m.shape[-1] for m in maps] == [i["reduction"] for i in levels]
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(intermediates[-1], model.forward_features(x))
        torch.testing.assert_close(final, intermediates[-1])
        for a, b in zip(maps, intermediates):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_forward_intermediates_follows_timms_arguments():
    torch.manual_seed(0)
    model = create_model("densenet121").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        assert [m.shape[1] for m in every] == [64, 256, 512, 1024, 1024]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape for m in last_two] == [m.shape for m in every[-2:]]
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert [m.shape[1] for m in picked] == [64, 1024]
        early, maps = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert early.shape == maps[0].shape == (1, 256, 16, 16)
        nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], maps[0].permute(0, 2, 3, 1))
    for bad in ([5], [-6], 0, 6):
        with pytest.raises(ValueError, match="feature"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_prune_intermediate_layers_keeps_what_is_asked():
    model = create_model("densenet121").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)[:3]
        assert model.prune_intermediate_layers([0, 2]) == [0, 2]
        assert list(model.features.named_children())[-1][0] == "denseblock2" and model.num_features == 512
        assert [m.shape for m in model.forward_intermediates(x, intermediates_only=True)] == [m.shape for m in expected]
        assert model(x).shape == (1, 512, 8, 8)  # the head went too: the last level's maps


def test_heads_pooling_and_timm_keywords():
    torch.manual_seed(0)
    model = create_model("densenet_bc40_k12").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_features(x)
        for pool, expected in [("avg", maps.mean((2, 3))), ("max", maps.amax((2, 3))),
                               ("avgmax", 0.5 * (maps.mean((2, 3)) + maps.amax((2, 3))))]:
            model.reset_classifier(5, global_pool=pool)
            torch.testing.assert_close(model.forward_head(maps, pre_logits=True), expected)
            assert model(x).shape == (2, 5)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, model.num_features, 8, 8)
    with pytest.raises(ValueError, match="no linear classifier takes"):
        model.reset_classifier(3, "")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(3, "mean")
    unpooled = create_model("densenet_bc40_k12", num_classes=0, global_pool="", in_chans=1)
    assert unpooled(torch.randn(2, 1, 32, 32)).shape == (2, 132, 8, 8) and unpooled.in_channels == 1
    assert DenseNet(**unpooled.config()).config() == unpooled.config()
    with pytest.raises(ValueError, match="no residual paths"):
        create_model("densenet_bc40_k12", drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    assert model.memory_efficient and model.features.denseblock1.execution == "memory_efficient"
    model.set_grad_checkpointing(False)
    assert not model.memory_efficient


def test_group_matcher_groups_every_parameter_by_depth():
    from timm.models import group_parameters

    model = create_model("densenet_bc40_k12")
    groups = group_parameters(model, model.group_matcher())
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    first, *_, last = groups.values()
    assert first == ["features.conv0.weight"] and "classifier.weight" in last
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == len(model.block_config) + 2  # stem, one group per block (with its transition), the rest


@pytest.mark.parametrize("name", NAMES)
def test_fx_and_torchscript_give_the_eager_outputs(name):
    """torch.fx and TorchScript record the layer-by-layer form; outputs and gradients equal eager."""
    torch.manual_seed(0)
    model = create_model(name).double().eval()
    s = size_of(name)
    x = torch.randn(2, 3, s, s, dtype=torch.float64)
    graph = torch.fx.symbolic_trace(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream, still used
        scripted = torch.jit.script(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(graph(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-10, atol=1e-10)
    graph.train()(x).sum().backward()  # FX backward, in training mode
    assert all(p.grad is not None for p in graph.parameters())
    extractor = create_feature_extractor(model, {info["module"]: str(i) for i, info in enumerate(model.feature_info)})
    with torch.no_grad():
        maps = extractor(x)
        for (_, got), want in zip(sorted(maps.items()), model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


class FPNBackbone(torch.nn.Module):
    """DenseNet-121's feature levels (by torchvision's FX feature extractor) under a feature pyramid."""

    def __init__(self, levels: dict[str, str], channels: list[int], out_channels: int = 64) -> None:
        super().__init__()
        self.body = create_feature_extractor(create_model("densenet121", num_classes=0), levels)
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def test_densenet121_as_a_faster_rcnn_backbone_trains_a_step():
    torch.manual_seed(0)
    backbone = FPNBackbone({"features.denseblock2": "0", "features.denseblock3": "1", "features.relu5": "2"},
                           [512, 1024, 1024])
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)  # three levels + the pooled one
    pooler = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128, rpn_anchor_generator=anchors,
                          box_roi_pool=pooler)
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0]]), "labels": torch.tensor([2])}]
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    detector.train()
    losses = detector(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    stem = backbone.body.get_submodule("features.conv0").weight
    assert torch.isfinite(total) and set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness"}
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    optimizer.step()
    detector.eval()
    with torch.no_grad():
        (found,) = detector([images[0]])
    assert set(found) == {"boxes", "labels", "scores"}
