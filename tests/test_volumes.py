"""1-D signals and 3-D volumes (``spatial_dims``): the fast and memory-efficient paths against the
layer-by-layer reference in float64 (outputs, gradients, BN running statistics), the kernels that
run, input checks, scripting and tracing, parameter counts and MONAI interoperation both ways."""
import copy

import pytest
import torch
from torch import nn

import densenet.models.densenet as dn
from densenet import DenseNet, create_model
from densenet.errors import ArgumentError
from densenet.models.weights import WeightsError, load_state_dict, monai_arguments, to_monai_state_dict

torch.set_num_threads(2)

MODES = {"fast": dict(fast=True), "memory_efficient": dict(memory_efficient=True)}


def randomise_bn(model: nn.Module) -> nn.Module:
    """BN affine weights of both signs and non-trivial running statistics (every BN term matters)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def pair(mode: str, spatial_dims: int, **kw):
    ref = DenseNet(**{"growth_rate": 4, "block_config": (2, 3, 2), "num_classes": 5, **kw},
                   spatial_dims=spatial_dims, fast=False).double()
    randomise_bn(ref)
    return ref, copy.deepcopy(ref).set_execution(**MODES[mode])


def compare(ref, other, x, rtol=1e-10):
    """One forward/backward on both: outputs, input and parameter gradients, buffers."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = ref(x1), other(x2)
    torch.testing.assert_close(out2, out1, rtol=rtol, atol=rtol)
    g = torch.randn_like(out1)
    out1.backward(g)
    out2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=rtol, atol=rtol * x1.grad.abs().max().item())
    for (name, p1), (_, p2) in zip(ref.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=rtol, atol=rtol * p1.grad.abs().max().item(), msg=name)
    for (name, b1), (_, b2) in zip(ref.named_buffers(), other.named_buffers()):
        torch.testing.assert_close(b2, b1, rtol=rtol, atol=rtol, msg=name)


def batch(spatial_dims: int, stem: str, n: int = 3, side: int | None = None) -> torch.Tensor:
    side = side or (32 if stem == "imagenet" else 12)
    if spatial_dims == 3:
        side, n = (7, 2) if stem == "cifar" else (19, n)  # odd sides: the pools' floor is exercised
    return torch.randn(n, 3, *(side,) * spatial_dims, dtype=torch.float64)


@pytest.mark.parametrize("spatial_dims", [1, 3])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_same_outputs_gradients_and_statistics_float64(spatial_dims, mode, bottleneck, stem):
    torch.manual_seed(0)
    ref, other = pair(mode, spatial_dims, bottleneck=bottleneck, stem=stem)
    x = batch(spatial_dims, stem)
    compare(ref.train(), other.train(), x)
    compare(ref, other, x)  # a second step: running statistics keep agreeing
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), ref.eval()(x), rtol=1e-10, atol=1e-10)
    compare(ref.eval(), other.eval(), x)  # eval with gradients (saliency maps)


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_memory_efficient_backward_in_many_row_chunks(spatial_dims, monkeypatch):
    import densenet.models.efficient as efficient

    monkeypatch.setattr(efficient, "ROW_CHUNK_BYTES", 1000)
    torch.manual_seed(3)
    ref, other = pair("memory_efficient", spatial_dims)
    compare(ref.train(), other.train(), batch(spatial_dims, "cifar"))
    with torch.no_grad():  # eval transitions a few images at a time
        x = batch(spatial_dims, "cifar", n=5)
        torch.testing.assert_close(other.eval()(x), ref.eval()(x), rtol=1e-10, atol=1e-10)


def counting(monkeypatch, module, name: str) -> list:
    calls, real = [], getattr(module, name)

    def wrapper(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("spatial_dims", [1, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_the_fast_kernels_run(spatial_dims, mode, monkeypatch):
    """Spies: the shared-buffer blocks and fused transitions run in 1-D and 3-D (no silent fall-back)."""
    torch.manual_seed(4)
    _, model = pair(mode, spatial_dims)
    blocks = counting(monkeypatch, dn, "fast_block_forward")
    fused = counting(monkeypatch, dn, "bn_relu_pool")
    pooled = counting(monkeypatch, dn, "bn_relu_pool_eval")
    x = batch(spatial_dims, "cifar", n=2)
    model.train()(x).sum().backward()
    with torch.no_grad():
        model.eval()(x)
    assert len(blocks) == 6 and fused == [True, True] and pooled == [True, True]


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_stem_in_chunks_of_one_image(spatial_dims, mode, monkeypatch):
    """The ImageNet stem's fused BN-ReLU-max pool (fast: keeps the convolution's output; memory-efficient:
    keeps only the input, two passes over chunks of images in backward) runs, and with one image per
    chunk still equals the layer-by-layer stem in float64 (outputs, every gradient, running statistics)."""
    import densenet.models.efficient as efficient

    monkeypatch.setattr(efficient, "STEM_CHUNK_BYTES", 1)
    torch.manual_seed(9)
    ref, other = pair(mode, spatial_dims, stem="imagenet")
    stems = counting(monkeypatch, dn, "fused_stem")
    # 4 images, not 3: with one image per chunk a loop over the images must not stop at the channel count
    x = batch(spatial_dims, "imagenet", n=4) if spatial_dims != 2 else torch.randn(4, 3, 20, 18, dtype=torch.float64)
    compare(ref.train(), other.train(), x)
    compare(ref, other, x)
    assert stems == [True, True]
    with torch.no_grad():  # eval and no-grad training: the module-by-module stem
        other.eval()(x)
        other.train()(x)
    assert stems == [True, True]


def test_a_hook_on_the_stem_keeps_the_module_by_module_form(monkeypatch):
    torch.manual_seed(10)
    ref, other = pair("memory_efficient", 3, stem="imagenet")
    seen = []
    other.features.relu0.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    stems = counting(monkeypatch, dn, "fused_stem")
    compare(ref.train(), other.train(), batch(3, "imagenet"))
    assert stems == [] and seen == [(3, 8, 10, 10, 10)]


def test_float32_3d_within_1e5_of_the_reference():
    torch.manual_seed(5)
    ref = DenseNet(growth_rate=6, block_config=(3, 3), num_classes=4, spatial_dims=3, fast=False)
    fast = copy.deepcopy(ref).set_execution(fast=True)
    lean = copy.deepcopy(ref).set_execution(memory_efficient=True)
    x = torch.randn(2, 3, 10, 12, 8)
    results = []
    for model in (ref, fast, lean):
        xx = x.clone().requires_grad_()
        out = model.train()(xx)
        out.backward(torch.ones_like(out))
        results.append([out, xx.grad, torch.cat([p.grad.flatten() for p in model.parameters()])])
    for r, f, m in zip(*results):
        for t in (f, m):
            assert ((t.double() - r.double()).norm() / r.double().norm()).item() < 1e-5


@pytest.mark.parametrize("spatial_dims", [1, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_bfloat16_training_step_as_close_as_the_reference(spatial_dims, mode):
    """Under bf16 autocast (the CLI's default on CPUs with bf16 instructions) a 1-D or 3-D training
    step runs in the fast modes (PyTorch has no bf16 kernel for the 3-D pool's backward: ours stands
    in) and lands as close to float64 as the layer-by-layer form under the same autocast."""
    torch.manual_seed(6)
    exact = DenseNet(growth_rate=6, block_config=(3, 3), num_classes=4, spatial_dims=spatial_dims, fast=False).double()
    ref = copy.deepcopy(exact).float()
    fast = copy.deepcopy(ref).set_execution(**MODES[mode])
    x = torch.randn(2, 3, *(9, 7, 10)[:spatial_dims] if spatial_dims == 3 else (33,), dtype=torch.float64)
    results = []
    for model, dtype in ((exact, None), (ref, torch.bfloat16), (fast, torch.bfloat16)):
        xx = x.to(next(model.parameters()).dtype).detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = model.train()(xx)
        out.float().sum().backward()
        results.append([t.detach().double() for t in (out, xx.grad, torch.cat([p.grad.flatten() for p in model.parameters()]))])
    for name, t, e, r in zip(["output", "input gradient", "parameter gradients"], *results):
        ref_err = ((e - t).norm() / t.norm()).item()
        our_err = ((r - t).norm() / t.norm()).item()
        assert our_err <= 2 * ref_err + 1e-3, f"{name}: fast {our_err:.2e}, layer by layer {ref_err:.2e}"
        if name != "input gradient":  # bf16's input gradient is ~20% off for both forms on a model this small
            assert our_err < 0.1, name


def test_channels_last_3d_inside_the_fast_path():
    model = DenseNet(growth_rate=4, block_config=(2, 2), spatial_dims=3).train()
    seen = []
    model.features.transition1.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    model(torch.randn(2, 3, 8, 8, 8))
    assert seen[0].is_contiguous(memory_format=torch.channels_last_3d)


def test_input_checks_name_the_dimension():
    model = create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2)
    with pytest.raises(ArgumentError, match=r"expects a 5-D input \(N, C, D, H, W\), got shape \(1, 64, 64, 64\) "
                                            r"\(add a batch dimension"):
        model(torch.randn(1, 64, 64, 64))
    with pytest.raises(ArgumentError, match=r"a 2-D input needs a model with spatial_dims=2, this one has spatial_dims=3"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ArgumentError, match=r"input of 64x64x20 voxels is too small .*depth, height and width must "
                                            r"be at least 29"):
        model(torch.randn(2, 1, 64, 64, 20))
    signal = create_model("densenet_bc40_k12", spatial_dims=1, in_channels=12, num_classes=5)
    with pytest.raises(ArgumentError, match=r"expects a 3-D input \(N, C, L\)"):
        signal(torch.randn(2, 12, 32, 32))
    with pytest.raises(ArgumentError, match="spatial_dims must be 1 .*got 4"):
        DenseNet(spatial_dims=4)


def test_state_dict_names_and_config():
    flat = create_model("densenet121")
    volume = create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2)
    assert list(flat.state_dict()) == list(volume.state_dict())  # torchvision's names in every dimension
    assert "spatial_dims" not in flat.config()  # 2-D configurations read as before
    assert volume.config()["spatial_dims"] == 3
    again = DenseNet(**volume.config())
    again.load_state_dict(volume.state_dict())
    assert again.config() == volume.config() and "spatial_dims=3" in repr(again)
    assert volume.pretrained_cfg["input_size"] == (1, 224, 224, 224)


def test_parameter_counts_equal_monais():
    """The issue's reference counts, measured with MONAI 1.6.1 (the test with MONAI itself is below)."""
    def count(**kw):
        return sum(p.numel() for p in create_model("densenet121", **kw).parameters())

    assert count(spatial_dims=3, in_channels=1, num_classes=2) == 11_244_674
    assert count(spatial_dims=1, in_channels=12, num_classes=5) == 5_529_541
    assert count(spatial_dims=2, in_channels=3, num_classes=1000) == 7_978_856


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_script_fx_and_intermediates(spatial_dims):
    torch.manual_seed(6)
    model = randomise_bn(DenseNet(growth_rate=4, block_config=(2, 2), num_classes=3, spatial_dims=spatial_dims,
                                  stem="imagenet")).eval()
    x = torch.randn(2, 3, *(24,) * spatial_dims)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), expected)
        final, maps = model.forward_intermediates(x, output_fmt="NHWC")
    assert [m.shape[-1] for m in maps] == [info["num_chs"] for info in model.feature_info]
    assert [m.shape[1] for m in maps] == [24 // info["reduction"] for info in model.feature_info]
    assert final.dim() == 2 + spatial_dims


def test_monai_arguments_refuse_what_monai_cannot_build():
    with pytest.raises(WeightsError, match="bottleneck=False.*stem='cifar'.*compression=1.0"):
        monai_arguments(create_model("densenet40_k12"))
    assert monai_arguments(create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2)) == {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_features": 64, "growth_rate": 32,
        "block_config": (6, 12, 24, 16), "bn_size": 4}


# ---------------------------------------------------------------------------- with MONAI installed
@pytest.mark.parametrize("name,spatial_dims,in_channels,classes", [
    ("densenet121", 3, 1, 2), ("densenet121", 1, 12, 5), ("densenet121", 2, 3, 1000), ("densenet169", 3, 2, 3),
    ("densenet201", 1, 1, 4), ("densenet264", 2, 1, 7)])
def test_parameter_counts_equal_monais_for_the_same_arguments(name, spatial_dims, in_channels, classes):
    nets = pytest.importorskip("monai.networks.nets")
    ours = create_model(name, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=classes)
    theirs = nets.DenseNet(**monai_arguments(ours))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    cls = {"densenet121": nets.DenseNet121, "densenet169": nets.DenseNet169, "densenet201": nets.DenseNet201,
           "densenet264": nets.DenseNet264}[name]
    named = cls(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=classes)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in named.parameters())


def scaled_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|: float32 sums in another order (another convolution
    algorithm, thread count) differ by a few ulp of the outputs' scale, not of each element."""
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("spatial_dims,in_channels,classes,side", [(3, 1, 2, 32), (1, 12, 5, 256), (2, 3, 10, 64)])
def test_monai_state_dicts_load_both_ways_with_equal_outputs(spatial_dims, in_channels, classes, side):
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(7)
    theirs = randomise_bn(nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=classes))
    ours = create_model("densenet121", spatial_dims=spatial_dims, in_channels=in_channels, num_classes=classes)
    report = load_state_dict(ours, theirs.state_dict())
    assert report.loaded == len(theirs.state_dict()) and "MONAI names" in str(report)
    x = torch.randn(2, in_channels, *(side,) * spatial_dims)
    with torch.no_grad():
        expected = theirs.eval()(x)
        for mode in ({"fast": False}, {"fast": True}, {"memory_efficient": True}):
            assert scaled_error(ours.set_execution(**mode).eval()(x), expected) <= 1e-5, mode
    # ours -> MONAI: a fresh model of ours, exported under MONAI's names, loads strictly
    source = randomise_bn(create_model("densenet121", spatial_dims=spatial_dims, in_channels=in_channels,
                                       num_classes=classes))
    back = nets.DenseNet(**monai_arguments(source))
    back.load_state_dict(to_monai_state_dict(source), strict=True)
    with torch.no_grad():
        assert scaled_error(back.eval()(x), source.eval()(x)) <= 1e-5


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_a_training_step_equals_monais_float64(spatial_dims):
    """Same weights, one SGD step on both: outputs, every parameter gradient and the BN running
    statistics agree (float64; a small DenseNet of MONAI's layout)."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(8)
    ours = randomise_bn(DenseNet(growth_rate=4, block_config=(2, 3, 2), stem="imagenet", num_classes=3, in_channels=2,
                                 spatial_dims=spatial_dims)).double()
    theirs = nets.DenseNet(**monai_arguments(ours)).double()
    theirs.load_state_dict(to_monai_state_dict(ours), strict=True)
    x = torch.randn(3, 2, *(24,) * spatial_dims, dtype=torch.float64)
    g = torch.randn(3, 3, dtype=torch.float64)
    for mode in ({"fast": False}, {"fast": True}, {"memory_efficient": True}):
        model = copy.deepcopy(ours).set_execution(**mode).train()
        reference = copy.deepcopy(theirs).train()
        out, expected = model(x), reference(x)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        out.backward(g)
        expected.backward(g)
        grads = {k: p.grad for k, p in reference.named_parameters()}
        exported = to_monai_state_dict(model)
        for name, p in model.named_parameters():
            key = name.replace("classifier.", "class_layers.out.")
            key = key if key in grads else next(k for k in exported if k.replace(".layers.", ".") == name)
            torch.testing.assert_close(p.grad, grads[key], rtol=1e-9, atol=1e-9 * grads[key].abs().max().item(), msg=name)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(exported[key], value, rtol=1e-10, atol=1e-10, msg=key)


def test_memory_estimate_and_info_for_1d_and_3d(capsys):
    from densenet.cli import main
    from densenet.training.memory import estimate_memory

    volume = create_model("densenet121", spatial_dims=3, in_channels=1, num_classes=2)
    fast = estimate_memory(volume, 2, 160, name="densenet121")
    lean = estimate_memory(volume.set_execution(memory_efficient=True), 2, (160, 160, 160))
    assert "batch 2 at 160x160x160" in str(fast) and lean.total < fast.total / 2
    assert fast.efficient_total == lean.total  # what --memory-efficient would need, in the advice
    # measured on this project's machine (bench/RESULTS_volumes.md): 1.12 GiB above the baseline in the
    # memory-efficient mode at 160^3, 2.4 GiB in the default mode
    assert 0.9 * 2**30 < lean.total < 1.5 * 2**30 and 2.2 * 2**30 < fast.total < 3.6 * 2**30
    signal = create_model("densenet121", spatial_dims=1, in_channels=12, num_classes=5)
    assert "at 5000 (" in str(estimate_memory(signal, 64, 5000))
    assert main(["info", "densenet121", "--spatial-dims", "3", "--in-channels", "1", "--num-classes", "2",
                 "--input-size", "96"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 11,244,674; multiply-adds at 96x96x96" in out
    assert "| denseblock1 (6 layers)       | 64   | 256  | 24x24x24" in out


def test_onnx_export_of_a_3d_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from densenet.serving.export import export_model

    model = randomise_bn(DenseNet(growth_rate=4, block_config=(2, 2), num_classes=3, in_channels=1, spatial_dims=3,
                                  stem="imagenet")).eval()
    result = export_model(model, tmp_path / "v.onnx", "onnx", image_size=(20, 24, 16), data={"class_names": list("abc")})
    assert result["max_abs_diff"] < 1e-4
    import onnx

    shape = [d.dim_value or d.dim_param for d in onnx.load(tmp_path / "v.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert shape == ["batch", 1, 20, 24, 16]
