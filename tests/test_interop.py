"""At home in timm and torchvision: the timm model contract (through timm's own builder), torch.fx
feature extraction, TorchScript, and a detection backbone."""
from __future__ import annotations

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
    """torch.fx records dense blocks and transitions as calls of those modules (their fast kernels run
    inside), TorchScript the layer-by-layer form; outputs and gradients equal eager."""
    torch.manual_seed(0)
    model = create_model(name).double().eval()
    s = size_of(name)
    x = torch.randn(2, 3, s, s, dtype=torch.float64)
    graph = torch.fx.symbolic_trace(model)
    scripted = torch.jit.script(model)  # deprecated in torch 2.14: its FutureWarning is filtered in pyproject.toml
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


def small(stem: str = "cifar", spatial_dims: int = 2) -> DenseNet:
    """A small model with random BN statistics and a dropout-free transition."""
    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(2, 3, 2), num_classes=5, stem=stem, spatial_dims=spatial_dims)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def spy_on_kernels(monkeypatch) -> list[str]:
    """Record each call of the fast block kernel and of the transitions' fused BN-ReLU-pool."""
    import densenet.models.densenet as dn

    calls: list[str] = []
    for name in ("fast_block_forward", "bn_relu_pool", "bn_relu_pool_eval"):
        real = getattr(dn, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(dn, name, spy)
    return calls


@pytest.mark.parametrize("spatial_dims", [2, 1, 3])
def test_fx_calls_the_fast_kernels_bit_identical_to_eager(spatial_dims, monkeypatch):
    """A model traced by torch.fx calls its dense blocks and transitions as modules, so the fast
    kernels run as in eager mode (the spy sees them): outputs, gradients and BN running statistics
    are bit-identical to eager in training and in eval mode."""
    import copy

    eager = small(spatial_dims=spatial_dims)
    graph = torch.fx.symbolic_trace(copy.deepcopy(eager))
    targets = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    assert targets == ["features.conv0", "features.denseblock1", "features.transition1", "features.denseblock2",
                       "features.transition2", "features.denseblock3", "features.norm5", "features.relu5", "classifier"]
    calls = spy_on_kernels(monkeypatch)
    x = torch.randn(4, 3, *(12,) * spatial_dims)
    for mode in ("eval", "train"):
        outputs = []
        for model in (eager, graph):
            getattr(model, mode)()
            calls.clear()
            xi = x.clone().requires_grad_(mode == "train")
            with torch.set_grad_enabled(mode == "train"):
                out = model(xi)
            if mode == "train":
                out.square().sum().backward()
            outputs.append((out.detach(), xi.grad, calls.copy()))
        (want, want_grad, want_calls), (got, got_grad, got_calls) = outputs
        assert torch.equal(got, want), mode
        fused = "bn_relu_pool" if mode == "train" else "bn_relu_pool_eval"
        assert got_calls == want_calls == ["fast_block_forward", fused] * 2 + ["fast_block_forward"], mode
        if mode == "train":
            assert torch.equal(got_grad, want_grad)
            for (name, p), q in zip(eager.named_parameters(), graph.parameters()):
                assert torch.equal(p.grad, q.grad), name
            for (name, b), c in zip(eager.named_buffers(), graph.buffers()):
                assert torch.equal(b, c), name


def test_fx_of_the_imagenet_stem_and_of_the_reference_form(monkeypatch):
    """The ImageNet stem stays module by module under torch.fx (``features.relu0`` is a feature level
    that extractors return): bit-identical to eager in eval mode and in training without gradients;
    in training with gradients eager fuses the stem (to keep less for backward), which rounds
    differently in the last bits. A model in the reference form traces layer by layer, every dense
    layer a node, for who wants to tap inside a block."""
    import copy

    eager = small("imagenet")
    graph = torch.fx.symbolic_trace(copy.deepcopy(eager))
    assert [n.target for n in graph.graph.nodes if n.op == "call_module"][:5] == [
        "features.conv0", "features.norm0", "features.relu0", "features.pool0", "features.denseblock1"]
    calls = spy_on_kernels(monkeypatch)
    x = torch.randn(4, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(graph.eval()(x), eager.eval()(x)) and calls.count("fast_block_forward") == 6
        assert torch.equal(graph.train()(x), eager.train()(x))
    torch.testing.assert_close(graph(x), eager(x), rtol=1e-5, atol=1e-5)
    reference = torch.fx.symbolic_trace(copy.deepcopy(eager).set_execution(fast=False))
    layers = [n.target for n in reference.graph.nodes if n.op == "call_module" and ".denselayer" in n.target]
    assert "features.denseblock1.denselayer2.conv2" in layers
    with torch.no_grad():
        want = eager.eval()(x)
        calls.clear()
        torch.testing.assert_close(reference.eval()(x), want, rtol=1e-5, atol=1e-5)
    assert calls == []


@pytest.mark.parametrize("name", NAMES)
def test_timms_fx_forward_test(name):
    """timm's test_model_forward_fx, step by step (its FX feature extraction of the last node, in eval
    mode, under inference_mode): the graph's outputs equal eager's exactly."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import get_graph_node_names

    torch.manual_seed(0)
    model = built_by_timm(name).eval()
    s = size_of(name)
    tracer_kwargs = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions(),
                     "param_shapes_constant": True}
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    with torch.inference_mode():
        inputs = torch.randn(1, 3, s, s)
        outputs = model(inputs)
        fx_model = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                            eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
        fx_outputs = torch.cat(tuple(fx_model(inputs).values()))
    assert torch.all(fx_outputs == outputs)


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
