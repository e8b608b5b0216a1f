"""The DenseNet modules: structure, paper details, interface, hooks and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import densenet
from densenet import DenseBlock, DenseLayer, DenseNet, Transition, create_model

torch.set_num_threads(2)


def small(**kw) -> DenseNet:
    args = dict(growth_rate=4, block_config=(2, 3, 2), bottleneck=True, compression=0.5, num_classes=5)
    return DenseNet(**{**args, **kw})


def test_dense_layer_shapes_and_convs():
    bottleneck = DenseLayer(20, growth_rate=6, bottleneck=True)
    assert bottleneck.conv1.kernel_size == (1, 1) and bottleneck.conv1.out_channels == 24
    assert bottleneck.conv2.kernel_size == (3, 3) and bottleneck.conv2.out_channels == 6
    basic = DenseLayer(20, growth_rate=6, bottleneck=False)
    assert basic.conv1.kernel_size == (3, 3) and basic.conv1.out_channels == 6
    assert not hasattr(basic, "conv2")
    x = [torch.randn(2, 8, 5, 7), torch.randn(2, 12, 5, 7)]
    assert bottleneck(x).shape == (2, 6, 5, 7) and basic(x).shape == (2, 6, 5, 7)


def test_dense_layer_is_bn_relu_conv_on_the_concatenation():
    layer = DenseLayer(10, growth_rate=3, bottleneck=False).eval()
    nn.init.normal_(layer.norm1.running_mean)
    parts = [torch.randn(2, 4, 6, 6), torch.randn(2, 6, 6, 6)]
    cat = torch.cat(parts, 1)
    expected = layer.conv1(F.relu(layer.norm1(cat)))
    torch.testing.assert_close(layer(parts), expected)


def test_dense_block_concatenates_input_and_every_layer_output():
    block = DenseBlock(num_layers=3, in_channels=5, growth_rate=4).eval()
    x = torch.randn(2, 5, 6, 6)
    out = block(x)
    assert out.shape == (2, 5 + 3 * 4, 6, 6) and block.out_channels == 17
    torch.testing.assert_close(out[:, :5], x)
    feats = [x]
    for i, layer in enumerate(block.values()):
        assert layer.in_channels == 5 + 4 * i
        new = layer(feats)
        torch.testing.assert_close(out[:, 5 + 4 * i : 9 + 4 * i], new)
        feats.append(new)


@pytest.mark.parametrize("theta, m, kept", [(0.5, 216, 108), (0.5, 301, 150), (1.0, 160, 160), (0.3, 50, 15), (0.33, 100, 33)])
def test_transition_compression_keeps_floor_theta_m(theta, m, kept):
    model = DenseNet(growth_rate=1, block_config=(m - 4, 1), bottleneck=False, compression=theta, stem_channels=4)
    t = model.features.transition1
    assert isinstance(t, Transition)
    assert (t.in_channels, t.out_channels) == (m, kept) == (m, math.floor(theta * m))
    assert isinstance(t.pool, nn.AvgPool2d) and t.pool.kernel_size == 2 and t.conv.kernel_size == (1, 1)


def test_stems():
    cifar = small()
    assert cifar.features.conv0.kernel_size == (3, 3) and cifar.features.conv0.stride == (1, 1)
    assert cifar.features.conv0.out_channels == 8  # 2k
    assert not hasattr(cifar.features, "pool0")
    basic = DenseNet(growth_rate=12, block_config=(2, 2, 2), bottleneck=False, compression=1.0)
    assert basic.features.conv0.out_channels == 16
    assert small(stem_channels=7).features.conv0.out_channels == 7
    imnet = small(stem="imagenet")
    f = imnet.features
    assert f.conv0.kernel_size == (7, 7) and f.conv0.stride == (2, 2) and f.conv0.out_channels == 8
    assert isinstance(f.norm0, nn.BatchNorm2d) and isinstance(f.pool0, nn.MaxPool2d)
    assert f.pool0.kernel_size == 3 and f.pool0.stride == 2
    assert imnet(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_paper_layouts():
    bc100 = create_model("densenet_bc100_k12")
    assert bc100.block_config == (16, 16, 16) and bc100.bottleneck and bc100.compression == 0.5
    basic40 = create_model("densenet40_k12")
    assert basic40.block_config == (12, 12, 12) and not basic40.bottleneck and basic40.compression == 1.0
    assert basic40.stem_channels == 16
    assert create_model("densenet161").growth_rate == 48


def test_convolutions_have_no_bias_and_he_fan_out_init():
    torch.manual_seed(0)
    model = create_model("densenet_bc100_k12")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)
    # the widest conv has enough weights for a tight estimate of the std
    conv = max(convs, key=lambda c: c.weight.numel())
    k = conv.kernel_size[0]
    expected = math.sqrt(2.0 / (k * k * conv.out_channels))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(conv.weight.mean().item()) < 0.1 * expected
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(model.classifier.bias == 0)


def count_dropout_calls(model, x, monkeypatch):
    calls = []
    real = F.dropout

    def spy(input, p=0.5, training=True, inplace=False):
        calls.append((p, training, inplace))
        return real(input, p, training, inplace)

    monkeypatch.setattr(F, "dropout", spy)
    model(x)
    return calls


@pytest.mark.parametrize("bottleneck", [True, False])
def test_dropout_after_every_conv_but_the_first(monkeypatch, bottleneck):
    model = small(bottleneck=bottleneck, drop_rate=0.2).train()
    layers = sum(model.block_config)
    expected = layers * (2 if bottleneck else 1) + (len(model.block_config) - 1)
    calls = count_dropout_calls(model, torch.randn(2, 3, 16, 16), monkeypatch)
    assert len(calls) == expected
    assert all(p == 0.2 and training and not inplace for p, training, inplace in calls)
    assert count_dropout_calls(small(bottleneck=bottleneck), torch.randn(2, 3, 16, 16), monkeypatch) == []


def test_dropout_is_active_in_training_only():
    model = small(drop_rate=0.5)
    x = torch.randn(2, 3, 16, 16)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("stem, size", [("cifar", (32, 32)), ("cifar", (17, 45)), ("cifar", (4, 4)), ("imagenet", (224, 224)),
                                        ("imagenet", (97, 130)), ("imagenet", (29, 29))])
def test_any_input_size_the_stem_allows(stem, size):
    model = small(stem=stem).eval()
    assert model(torch.randn(2, 3, *size)).shape == (2, 5)


def test_batch_size_one_trains_and_evaluates():
    model = small()
    x = torch.randn(1, 3, 32, 32)
    out = model.train()(x)
    out.sum().backward()
    assert out.shape == (1, 5) and model.features.conv0.weight.grad is not None
    assert model.eval()(x).shape == (1, 5)


def test_input_channels_and_classes():
    model = small(in_channels=1, num_classes=3)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_forward_hooks_and_backward_hooks_on_every_submodule():
    model = small(drop_rate=0.1).train()
    seen_fwd, seen_bwd = set(), set()
    for name, module in model.named_modules():
        if name and not isinstance(module, (DenseLayer,)):  # DenseLayer takes a list: forward hook only
            module.register_full_backward_hook(lambda m, gi, go, name=name: seen_bwd.add(name))
        module.register_forward_hook(lambda m, i, o, name=name: seen_fwd.add(name))
    out = model(torch.randn(2, 3, 16, 16, requires_grad=True))
    out.sum().backward()
    called = {n for n, m in model.named_modules() if n and not isinstance(m, (nn.Sequential, nn.ModuleDict))}
    assert called - {"global_pool", "classifier"} <= seen_fwd
    assert "features.denseblock2.denselayer3.relu2" in seen_bwd and "classifier" in seen_bwd
    assert "features.transition1.relu" in seen_bwd and "features.relu5" in seen_bwd


def test_grad_cam_on_last_block_with_hooks():
    """A class-activation-map tool's pattern: keep activations and gradients of a block via hooks."""
    model = create_model("densenet_bc40_k12").eval()
    store = {}
    target = model.features.relu5
    target.register_forward_hook(lambda m, i, o: store.update(act=o))
    target.register_full_backward_hook(lambda m, gi, go: store.update(grad=go[0]))
    x = torch.randn(1, 3, 32, 32)
    logits = model(x)
    logits[0, 3].backward()
    assert store["act"].shape == store["grad"].shape == (1, model.num_features, 8, 8)
    cam = F.relu((store["grad"].mean((2, 3), keepdim=True) * store["act"]).sum(1))
    assert cam.shape == (1, 8, 8) and torch.isfinite(cam).all()


def test_no_inplace_relu():
    model = create_model("densenet121")
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_timm_style_interface():
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 8, 8)
    assert (feats >= 0).all()  # after the final BN-ReLU
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    torch.testing.assert_close(model.forward_head(feats), model.classifier(pooled))
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7 and torch.all(model.classifier.bias == 0)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_block_outputs_for_backbones():
    model = create_model("densenet121").eval()
    final, outs = model.forward_intermediates(torch.randn(1, 3, 224, 224))
    assert [o.shape[1] for o in outs] == [i["num_chs"] for i in model.feature_info] == [64, 256, 512, 1024, 1024]
    assert [224 // o.shape[-1] for o in outs] == [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
    cifar = small().eval()
    outs = cifar.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)
    assert [o.shape[-1] for o in outs] == [32, 32, 16, 8]


def test_config_rebuilds_the_architecture():
    model = create_model("densenet_bc100_k12", num_classes=100, drop_rate=0.2)
    again = DenseNet(**model.config())
    assert again.config() == model.config()
    assert [k for k in again.state_dict()] == [k for k in model.state_dict()]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(growth_rate=0), ValueError, "growth_rate must be a positive integer"),
        (dict(growth_rate=-3), ValueError, "growth_rate"),
        (dict(growth_rate=1.5), TypeError, "growth_rate must be an int"),
        (dict(block_config=(6, 0, 6)), ValueError, "block_config"),
        (dict(block_config=()), TypeError, "block_config must be a non-empty"),
        (dict(block_config=12), TypeError, "block_config"),
        (dict(compression=0.0), ValueError, r"compression must be in \(0, 1\]"),
        (dict(compression=1.5), ValueError, r"compression must be in \(0, 1\]"),
        (dict(stem="tiny"), ValueError, "stem must be one of"),
        (dict(drop_rate=1.0), ValueError, r"drop_rate must be in \[0, 1\)"),
        (dict(in_channels=0), ValueError, "in_channels"),
        (dict(num_classes=-1), ValueError, "num_classes"),
        (dict(compression=0.01), ValueError, "leaves no feature maps"),
    ],
)
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        small(**kwargs)


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((3, 32, 32), torch.float32, r"4-D input \(N, C, H, W\).*unsqueeze"),
        ((2, 1, 32, 32), torch.float32, "expects 3 input channels, got 1"),
        ((2, 3, 3, 32), torch.float32, "too small .* at least 4"),
        ((2, 3, 32, 32), torch.uint8, "floating-point"),
    ],
)
def test_bad_input_tensor(shape, dtype, match):
    model = small()
    with pytest.raises((ValueError, TypeError), match=match):
        model(torch.zeros(shape, dtype=dtype))


def test_imagenet_stem_minimum_size():
    model = create_model("densenet121")
    assert model.min_input_size == 29
    with pytest.raises(ValueError, match="28x28 pixels is too small"):
        model(torch.randn(1, 3, 28, 28))


def test_public_parts_are_exported():
    for name in ("DenseNet", "DenseLayer", "DenseBlock", "Transition", "create_model", "list_models"):
        assert hasattr(densenet, name)
