"""`densenet export` (ONNX, torch.export, TorchScript, safetensors) and `densenet predict` on exports, on a run
trained on the bundled sample; bad checkpoints, images and ONNX files give clear errors."""
import collections
import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from densenet import DenseNet, create_model
from densenet.cli import main
from densenet.serving import export_model, export_program, model_from_checkpoint, model_from_safetensors
from densenet.training import evaluate

TINY = ["--model", "densenet_bc16_k8", "--dataset", "cifar10+", "--batch-size", "32", "--train-subset", "128",
        "--test-subset", "64", "--eval-batch-size", "64", "--threads", "1", "--quiet", "--seed", "3"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of real image files in several formats, one in a subfolder."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.new("RGB", (48, 40), (30, 120, 220)).save(folder / "blue.jpg")
    (folder / "sub").mkdir()
    Image.new("L", (32, 32), 90).save(folder / "sub" / "grey.bmp")
    return folder


def trained_like(**kw) -> DenseNet:
    """A small model with non-trivial BN statistics, as after training."""
    torch.manual_seed(0)
    model = DenseNet(**{"growth_rate": 4, "block_config": (2, 3), "num_classes": 5, **kw})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def ort_run(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_onnx_export_of_a_trained_cifar_model(run, capsys):
    out = run / "model.onnx"
    assert main(["export", str(run / "checkpoint.pt"), "--format", "onnx", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]  # dynamic batch, fixed image
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["densenet"])
    assert meta["data"]["class_names"] == CLASSES and meta["name"] == "densenet_bc16_k8"
    model, _ = model_from_checkpoint(run / "checkpoint.pt")
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(ort_run(out, x), model(x), rtol=1e-4, atol=1e-4)


def test_onnx_export_of_an_imagenet_model_memory_efficient_as_standard_graph(tmp_path):
    plain = trained_like(stem="imagenet", block_config=(2, 2, 2, 2))
    lean = DenseNet(**{**plain.config(), "memory_efficient": True})
    lean.load_state_dict(plain.state_dict())
    lean.eval()
    export_model(plain, tmp_path / "plain.onnx", "onnx", image_size=64)
    result = export_model(lean, tmp_path / "lean.onnx", "onnx", image_size=64, data={"class_names": list("abcde")})
    assert result["max_abs_diff"] <= 1e-4
    def ops(p):
        return collections.Counter(n.op_type for n in onnx.load(str(p)).graph.node)
    assert ops(tmp_path / "lean.onnx") == ops(tmp_path / "plain.onnx")
    assert {"Conv", "Concat", "MaxPool", "AveragePool", "Gemm"} <= set(ops(tmp_path / "lean.onnx"))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ort_run(tmp_path / "lean.onnx", x), plain(x), rtol=1e-4, atol=1e-4)
    assert lean.memory_efficient and lean.features.denseblock1.execution == "memory_efficient"  # the model itself is untouched


def test_torchscript_export_loads_without_this_package(run, tmp_path):
    out = tmp_path / "model.pt"
    assert main(["export", str(run / "checkpoint.pt"), "--format", "torchscript", "--out", str(out)]) == 0
    model, _ = model_from_checkpoint(run / "checkpoint.pt")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["densenet"] = None  # any import of this package now fails
        import torch
        extra = {{"densenet.json": ""}}
        m = torch.jit.load({str(out)!r}, _extra_files=extra)
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(m(io["x"]), io["y"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m(io["x"][:1]), io["y"][:1], rtol=1e-4, atol=1e-4)
        print(json.loads(extra["densenet.json"])["data"]["class_names"][3],
              "densenet" in sys.modules and sys.modules["densenet"] is None)
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cat", "True"]


@pytest.mark.parametrize("spatial_dims, side", [(2, 20), (1, 40), (3, 12)])
def test_torch_export_with_a_dynamic_batch_gives_eagers_outputs(spatial_dims, side, tmp_path):
    """torch.export.export of a model (the layer-by-layer form, eval mode) with a dynamic batch
    dimension: after torch.export.save and load, any batch size gives eager's float64 outputs (eager
    runs the fast kernels) to rounding; the CLI's format writes the same program with its description."""
    model = trained_like(spatial_dims=spatial_dims, stem="imagenet" if spatial_dims != 2 else "cifar").double()
    shape = (3, *(side,) * spatial_dims)
    program = export_program(model, torch.randn(2, *shape, dtype=torch.float64))
    path = tmp_path / "m.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    for n in (1, 2, 5):
        x = torch.randn(n, *shape, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(Exception, match=r"size\(\)\[2\]"):  # the spatial sides are fixed
        loaded(torch.randn(1, 3, *(side + 8,) * spatial_dims, dtype=torch.float64))
    assert model.training is False and model.fast  # the model itself is untouched
    if spatial_dims == 2:
        result = export_model(model.float(), tmp_path / "cli.pt2", "export", image_size=side, data={"class_names": list("abcde")})
        extra = {"densenet.json": ""}
        torch.export.load(tmp_path / "cli.pt2", extra_files=extra)
        assert result["files"] == [tmp_path / "cli.pt2"] and result["max_abs_diff"] < 1e-4
        assert json.loads(extra["densenet.json"])["data"]["class_names"] == list("abcde")


def test_predict_with_a_torch_export_program(run, images, tmp_path, capsys):
    """`densenet export --format export` writes checkpoint.pt2 beside the checkpoint; `densenet predict`
    reads it (the same classes and probabilities as the checkpoint), refuses another image size,
    and refuses archives that would need unpickling; explain and eval ask for the checkpoint."""
    import zipfile

    assert main(["export", str(run / "checkpoint.pt"), "--format", "export"]) == 0
    program = run / "checkpoint.pt2"
    assert f"wrote {program} (export;" in capsys.readouterr().out
    printed = []
    for source in (run / "checkpoint.pt", program):
        assert main(["predict", str(source), str(images)]) == 0
        printed.append(capsys.readouterr().out.splitlines())
    for a, b in zip(*printed):
        assert a.split()[0] == b.split()[0] and a.split()[1::2] == b.split()[1::2]  # the image, the classes
        np.testing.assert_allclose([float(v.strip("%,")) for v in a.split()[2::2]],
                                   [float(v.strip("%,")) for v in b.split()[2::2]], atol=0.11)
    assert main(["predict", str(program), str(images), "--image-size", "40"]) == 2
    assert "takes 32x32 images, not the 40x40 asked for" in capsys.readouterr().err
    assert main(["explain", str(program), str(images), "--out", str(tmp_path / "maps")]) == 2
    assert "is a torch.export program: explanations need gradients" in capsys.readouterr().err
    assert main(["eval", str(program)]) == 2
    assert "is a torch.export program, not a `densenet train` checkpoint" in capsys.readouterr().err
    # an archive that stores a tensor pickled (torch.export.load would unpickle it) is refused unread
    bad = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(program) as z, zipfile.ZipFile(bad, "w") as out:
        for item in z.infolist():
            data = z.read(item)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            out.writestr(item, data)
    assert main(["predict", str(bad), str(images)]) == 2
    assert "stores features.conv0.weight pickled; only plain tensors are read" in capsys.readouterr().err
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    assert main(["predict", str(tmp_path / "junk.pt2"), str(images)]) == 2
    assert "is not a readable torch.export program" in capsys.readouterr().err


def test_safetensors_export_rebuilds_with_create_model(run, tmp_path):
    out = tmp_path / "weights.safetensors"
    assert main(["export", str(run / "checkpoint.pt"), "--format", "safetensors", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    from safetensors.torch import load_file

    rebuilt = create_model(meta["name"], **meta["model_config"])
    rebuilt.load_state_dict(load_file(str(out)))  # strict: every tensor and no other
    model, _ = model_from_checkpoint(run / "checkpoint.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=1e-5, atol=1e-5)
    loaded, data = model_from_safetensors(out)
    assert data["class_names"] == CLASSES and data["image_size"] == 32 and not loaded.memory_efficient


def test_predict_with_onnx_matches_the_checkpoint_and_writes_csv(run, images, tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(run / "checkpoint.pt"), "--format", "onnx", "--out", str(onnx_path)]) == 0
    capsys.readouterr()
    results = {}
    for name, source in (("ckpt", run / "checkpoint.pt"), ("onnx", onnx_path)):
        assert main(["predict", str(source), str(images), "--csv", str(tmp_path / f"{name}.csv")]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 3 and lines[-1].startswith(str(images / "sub" / "grey.bmp"))
        assert all(sum(c in line for c in CLASSES) == 5 for line in lines)  # top-5 with class names
        results[name] = list(csv.reader((tmp_path / f"{name}.csv").open()))
    ck, ox = results["ckpt"], results["onnx"]
    assert ck[0] == ox[0] == ["image"] + [f"{c}{i}" for i in range(1, 6) for c in ("class", "prob")]
    for a, b in zip(ck[1:], ox[1:]):
        assert a[0] == b[0] and a[1::2] == b[1::2]
        np.testing.assert_allclose([float(v) for v in a[2::2]], [float(v) for v in b[2::2]], atol=1e-4)


def test_onnx_whose_input_shape_does_not_fit_the_image_size(run, images, tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(run / "checkpoint.pt"), "--format", "onnx", "--out", str(onnx_path)]) == 0
    assert main(["predict", str(onnx_path), str(images), "--image-size", "40"]) == 2
    err = capsys.readouterr().err
    assert "takes input of shape ['batch', 3, 32, 32]" in err and "40x40" in err and "Traceback" not in err
    # exported for 40x40 it fits
    assert main(["export", str(run / "checkpoint.pt"), "--format", "onnx", "--out", str(onnx_path), "--image-size", "40"]) == 0
    assert main(["predict", str(onnx_path), str(images), "--image-size", "40"]) == 0


def test_onnx_files_that_are_not_exports_are_refused(tmp_path, images, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage")
    assert main(["predict", str(tmp_path / "junk.onnx"), str(images)]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    model = trained_like(num_classes=3)
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(tmp_path / "bare.onnx"), dynamo=False)
    assert main(["predict", str(tmp_path / "bare.onnx"), str(images)]) == 2
    assert "no densenet data description" in capsys.readouterr().err


def corrupt(run: Path, tmp_path: Path, kind: str) -> Path:
    """A checkpoint truncated, or one whose weights are of another architecture than it names."""
    data = (run / "checkpoint.pt").read_bytes()
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        from densenet.io.checkpoint import load_checkpoint, save_checkpoint

        state = load_checkpoint(run / "checkpoint.pt")
        state["model_config"]["growth_rate"] = 12
        save_checkpoint(path, state)  # a consistent file (valid checksum) naming the wrong architecture
    return path


@pytest.mark.parametrize("kind, message", [("truncated", "truncated or corrupted"),
                                           ("other-architecture", "conv1.weight: file (32, 16, 1, 1) vs model (48, 16, 1, 1)")])
@pytest.mark.parametrize("command", [["export", "--format", "onnx"], ["export", "--format", "torchscript"],
                                     ["reuse", "--out", "{tmp}/r.png"], ["predict", "{images}"], ["eval"]])
def test_bad_checkpoints_are_named(run, images, tmp_path, capsys, kind, message, command):
    path = corrupt(run, tmp_path, kind)
    argv = [command[0], str(path)] + [a.format(tmp=tmp_path, images=images) for a in command[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.onnx")) and not (tmp_path / "r.png").exists()


def test_export_to_a_missing_folder(run, tmp_path, capsys):
    assert main(["export", str(run / "checkpoint.pt"), "--format", "onnx", "--out", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_undecodable_image_is_named_and_stops_or_is_skipped(run, images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "b_good.png").write_bytes((images / "noise.png").read_bytes())
    assert main(["predict", str(run / "checkpoint.pt"), str(folder)]) == 2
    err = capsys.readouterr().err
    assert "a_broken.jpg" in err and "cannot decode image" in err and "Traceback" not in err
    assert main(["predict", str(run / "checkpoint.pt"), str(folder), "--skip-bad", "--csv", str(tmp_path / "p.csv")]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "a_broken.jpg" in captured.err
    assert captured.out.startswith(str(folder / "b_good.png")) and "a_broken" not in captured.out
    assert len(list(csv.reader((tmp_path / "p.csv").open()))) == 2
    (folder / "b_good.png").unlink()
    assert main(["predict", str(run / "checkpoint.pt"), str(folder), "--skip-bad"]) == 2
    assert "no image could be scored" in capsys.readouterr().err


def test_nan_or_infinite_inputs_are_refused(run, images, tmp_path, capsys):
    pixels = np.full((32, 32), 100.0, dtype=np.float32)
    pixels[3, 4] = np.nan
    pixels[5, 6] = np.inf
    Image.fromarray(pixels, mode="F").save(tmp_path / "nan.tif")
    assert main(["predict", str(run / "checkpoint.pt"), str(tmp_path / "nan.tif")]) == 2
    err = capsys.readouterr().err
    assert "nan.tif" in err and "2 NaN or infinite" in err
    assert main(["predict", str(run / "checkpoint.pt"), str(tmp_path / "nan.tif"), str(images / "noise.png"), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "nan.tif" in captured.err and captured.out.count("\n") == 1
    model, _ = model_from_checkpoint(run / "checkpoint.pt")
    x = torch.zeros(4, 3, 32, 32)
    x[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 2 of the evaluation data holds 1 NaN"):
        evaluate(model, [(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)), (x, torch.zeros(4, dtype=torch.long))],
                 torch.device("cpu"))


def test_an_export_given_where_a_checkpoint_is_needed(run, images, tmp_path, capsys):
    ts, ox = tmp_path / "m.pt", tmp_path / "m.onnx"
    assert main(["export", str(run / "checkpoint.pt"), "--format", "torchscript", "--out", str(ts)]) == 0
    assert main(["export", str(run / "checkpoint.pt"), "--format", "onnx", "--out", str(ox)]) == 0
    capsys.readouterr()
    assert main(["predict", str(ts), str(images)]) == 2
    assert f"{ts} is a TorchScript export, not a `densenet train` checkpoint" in capsys.readouterr().err
    assert main(["reuse", str(ox), "--out", str(tmp_path / "r.png")]) == 2
    assert f"{ox} is an ONNX export, not a `densenet train` checkpoint" in capsys.readouterr().err
