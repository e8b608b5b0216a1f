"""Fast inference paths give the eager model's outputs (within 1e-4)."""
import pytest
import torch
from torch import nn

from densenet import DenseNet, create_model
from densenet.serving.inference import FastInference, prepare_for_inference

torch.set_num_threads(2)


def trained_like(**kw) -> DenseNet:
    """A small model with non-trivial BN statistics and affine parameters, as after training."""
    torch.manual_seed(0)
    model = DenseNet(**{"growth_rate": 4, "block_config": (2, 3, 2), "num_classes": 5, **kw}, fast=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("kw", [{}, {"bottleneck": False, "compression": 1.0}, {"stem": "imagenet"}, {"drop_rate": 0.2}])
@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_fast_inference_matches_eager(kw, backend):
    model = trained_like(**kw)
    size = 64 if kw.get("stem") == "imagenet" else 16
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    run = prepare_for_inference(model, backend, example=x[:1])
    torch.testing.assert_close(run(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(x[:1]), expected[:1], rtol=1e-4, atol=1e-4)  # other batch sizes
    assert model.training is False and not model.fast  # the served copy's mode is its own
    assert all(m.execution == "reference" for m in model.modules() if hasattr(m, "execution"))


def test_fast_inference_leaves_the_model_alone_and_needs_no_grad():
    model = trained_like()
    fast = FastInference(model)
    assert fast.model is not model and all(not p.requires_grad for p in fast.parameters())
    assert all(p.requires_grad for p in model.parameters())
    out = fast(torch.randn(2, 3, 16, 16))
    assert not out.requires_grad and out.shape == (2, 5)


def test_eval_mode_default_path_is_the_folded_inference_path():
    fast = create_model("densenet_bc40_k12", num_classes=5)
    ref = create_model("densenet_bc40_k12", num_classes=5, fast=False)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-4)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        prepare_for_inference(trained_like(), "tensorrt")
    with pytest.raises(ValueError, match="example"):
        prepare_for_inference(trained_like(), "onnx")
