"""int8 export (issue 26), both kinds: `densenet export --int8 --calibration` (PyTorch's int8
convolutions, .int8.safetensors) and `--format onnx --int8` (ONNX Runtime, QDQ); eval and predict on
the files they write, prepare_for_inference(backend="int8" / "int8-onnx"), and the refusals. The
arithmetic of densenet.serving.int8 (the BN-ReLU clamp, every architecture against float32, save and
load) is tested in test_int8_torch.py."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from densenet import create_model
from densenet.cli import main
from densenet.serving import prepare_for_inference

SAMPLE = Path(__file__).resolve().parents[1] / "densenet" / "assets" / "cifar10-sample.zip"
SHIPPED = ["--model", "densenet_bc40_k12", "--weights", "cifar10"]


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "bc40.int8.onnx"
    assert main(["export", *SHIPPED, "--format", "onnx", "--int8", "--calibration", "sample",
                 "--calibration-images", "256", "--out", str(out)]) == 0
    return out


def _errors(capsys) -> str:
    return capsys.readouterr().err


def test_the_int8_file_is_quantized_smaller_and_describes_its_calibration(int8_file, capsys):
    proto = onnx.load(str(int8_file))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) >= 39  # every convolution's weights (39 in BC-40)
    # 7 bits: 8-bit weights saturate ONNX Runtime's int16 pair sums on CPUs without VNNI
    assert max(int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()) for t in int8_weights) <= 64
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["densenet"])
    data = meta["data"]
    assert data["precision"] == "int8" and data["class_names"][0] == "airplane" and data["image_size"] == 32
    cal = data["calibration"]
    assert cal["calibration_images"] == 256 and cal["agreement"] >= 0.9
    assert abs(cal["int8_accuracy"] - cal["float32_accuracy"]) < 0.05
    assert int8_file.stat().st_size < 0.6 * cal["float32_bytes"]


def test_eval_takes_int8_and_float32_onnx_files_like_a_checkpoint(int8_file, tmp_path, capsys):
    float_file = tmp_path / "bc40.onnx"
    assert main(["export", *SHIPPED, "--format", "onnx", "--out", str(float_file)]) == 0
    errors = {}
    for name, f in (("int8", int8_file), ("float32", float_file)):
        out = tmp_path / f"eval-{name}"
        assert main(["eval", str(f), "--dataset", "cifar10", "--out", str(out)]) == 0
        errors[name] = json.loads((out / "eval.json").read_text())["top1_error"]
    assert main(["eval", *SHIPPED, "--dataset", "cifar10", "--out", str(tmp_path / "eval-torch")]) == 0
    torch_error = json.loads((tmp_path / "eval-torch" / "eval.json").read_text())["top1_error"]
    assert errors["float32"] == pytest.approx(torch_error)  # the same 200 sample test images
    assert abs(errors["int8"] - torch_error) <= 2.0  # 4 of 200 images


def test_predict_reads_the_int8_file(int8_file, tmp_path, capsys):
    with zipfile.ZipFile(SAMPLE) as z:
        name = next(n for n in z.namelist() if n.startswith("test/") and n.endswith(".jpg"))
        (tmp_path / "one.jpg").write_bytes(z.read(name))
    capsys.readouterr()
    assert main(["predict", str(int8_file), str(tmp_path / "one.jpg"), "--csv", str(tmp_path / "p.csv")]) == 0
    assert "%" in capsys.readouterr().out and (tmp_path / "p.csv").is_file()


def test_prepare_for_inference_int8_agrees_with_float32():
    torch.manual_seed(0)
    model = create_model("densenet_bc40_k12", weights="cifar10").eval()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    for backend in ("int8", "int8-onnx"):
        got = prepare_for_inference(model, backend, calibration=x)(x)
        assert got.shape == expected.shape
        assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.85, backend
        with pytest.raises(ValueError, match="calibration"):
            prepare_for_inference(model, backend)


def test_bad_int8_requests_are_refused_clearly(int8_file, tmp_path, capsys):
    assert main(["export", *SHIPPED, "--format", "onnx", "--int8"]) == 2
    assert "--calibration DATA" in _errors(capsys)
    assert main(["export", *SHIPPED, "--format", "export", "--int8", "--calibration", "sample"]) == 2
    assert "drop --format" in _errors(capsys)
    assert main(["export", *SHIPPED, "--format", "onnx", "--calibration", "sample"]) == 2
    assert "--calibration is for --int8" in _errors(capsys)
    assert main(["export", *SHIPPED, "--format", "onnx", "--int8", "--calibration", "sample",
                 "--calibration-images", "8", "--out", str(tmp_path / "x.onnx")]) != 0
    assert "at least 32" in _errors(capsys) and not (tmp_path / "x.onnx").exists()
    # calibration images with other classes than the model's
    folder = tmp_path / "other"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (32, 32), (i * 10, 0, 0)).save(folder / c / f"{i}.png")
    assert main(["export", *SHIPPED, "--format", "onnx", "--int8", "--calibration", str(folder),
                 "--calibration-dataset", "folder", "--out", str(tmp_path / "y.onnx")]) != 0
    assert "2 classes but the model has 10" in _errors(capsys)
    assert main(["explain", str(int8_file), str(tmp_path), "--out", str(tmp_path / "ex")]) != 0
    assert "need gradients" in _errors(capsys)
    assert main(["train", "--resume", str(int8_file)]) != 0
    assert "export for serving" in _errors(capsys)
    assert main(["eval", str(int8_file), "--ema", "yes", "--dataset", "cifar10"]) != 0
    assert "drop --ema" in _errors(capsys)


@pytest.fixture(scope="module")
def torch_int8_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "bc40.int8.safetensors"
    assert main(["export", *SHIPPED, "--int8", "--calibration", "sample", "--calibration-images", "256",
                 "--out", str(out)]) == 0
    return out


def test_export_int8_writes_a_pytorch_int8_file_a_third_of_float32_that_eval_and_predict_take(torch_int8_file, tmp_path,
                                                                                              capsys):
    from safetensors import safe_open
    with safe_open(str(torch_int8_file), framework="pt") as f:
        meta = f.metadata()
        weights = [f.get_tensor(k) for k in f.keys() if k.endswith(".weight") and f.get_tensor(k).dim() == 4]
    assert meta["format"] == "densenet-int8" and len(weights) == 39  # every convolution of BC-40
    assert all(w.dtype == torch.int8 for w in weights)
    data = json.loads(meta["data"])
    assert data["precision"] == "int8" and data["class_names"][0] == "airplane" and data["image_size"] == 32
    cal = data["calibration"]
    assert cal["calibration_images"] == 256 and cal["agreement"] >= 0.95
    assert torch_int8_file.stat().st_size < 0.35 * cal["float32_bytes"]
    out = tmp_path / "eval-int8"
    assert main(["eval", str(torch_int8_file), "--dataset", "cifar10", "--out", str(out)]) == 0
    int8_error = json.loads((out / "eval.json").read_text())["top1_error"]
    assert main(["eval", *SHIPPED, "--dataset", "cifar10", "--out", str(tmp_path / "eval-torch")]) == 0
    torch_error = json.loads((tmp_path / "eval-torch" / "eval.json").read_text())["top1_error"]
    assert abs(int8_error - torch_error) <= 2.0  # 4 of 200 images
    with zipfile.ZipFile(SAMPLE) as z:
        name = next(n for n in z.namelist() if n.startswith("test/") and n.endswith(".jpg"))
        (tmp_path / "one.jpg").write_bytes(z.read(name))
    capsys.readouterr()
    assert main(["predict", str(torch_int8_file), str(tmp_path / "one.jpg")]) == 0
    assert "%" in capsys.readouterr().out


def test_the_pytorch_int8_file_is_refused_where_it_cannot_serve(torch_int8_file, tmp_path, capsys):
    assert main(["explain", str(torch_int8_file), str(tmp_path), "--out", str(tmp_path / "ex")]) != 0
    assert "no gradients" in _errors(capsys)
    assert main(["train", "--resume", str(torch_int8_file)]) != 0
    assert "export for serving" in _errors(capsys)
    assert main(["eval", str(torch_int8_file), "--ema", "yes", "--dataset", "cifar10"]) != 0
    assert "drop --ema" in _errors(capsys)
    assert main(["export", *SHIPPED, "--int8", "--calibration", "sample", "--out", str(tmp_path / "m.onnx")]) != 0
    assert ".int8.safetensors" in _errors(capsys) and not (tmp_path / "m.onnx").exists()
    assert main(["export", *SHIPPED]) != 0
    assert "give --format" in _errors(capsys)
