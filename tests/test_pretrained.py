"""Trained weights by name: the registry, torchvision's ImageNet entries read from its enums, and the
whole download path against a loopback HTTP server (good file, wrong hash, truncated body, server
gone, mirrors); the cache only ever holds complete, verified files."""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import densenet.models.pretrained as pretrained
from densenet import WeightsError, create_model, get_weights, list_weights
from densenet.cli import main
from densenet.models import Weights, load_weights, weights_file


class Server:
    """A loopback HTTP server: ``routes[path] = (body, declared_length)``; a declared length above
    the body's makes it close the connection part-way (a truncated download)."""

    def __init__(self) -> None:
        routes = self.routes = {}
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                hits.append(self.path)
                if self.path not in routes:
                    self.send_error(404)
                    return
                body, length = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(pretrained.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.delenv(pretrained.MIRROR_ENV, raising=False)
    return tmp_path / "home" / "weights"


def weight_file(tmp_path: Path, seed: int = 0) -> tuple[torch.nn.Module, bytes, str]:
    """A small trained-like model, its weights as a torch.save file's bytes, and their SHA-256."""
    torch.manual_seed(seed)
    model = create_model("densenet_bc16_k8", num_classes=3)
    path = tmp_path / f"w{seed}.pt"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    return model, data, hashlib.sha256(data).hexdigest()


def entry(url: str | None, sha: str, file_name: str = "densenet_bc16_k8-test.pt") -> Weights:
    return Weights(model="densenet_bc16_k8", tag="test", dataset="cifar10", class_names=("a", "b", "c"),
                   input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, accuracy={"top1": 50.0}, measured="a test",
                   recipe="none", file_name=file_name, sha256=sha, file_size=None, license="MIT", source="tests",
                   url=url)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_a_good_download_is_verified_cached_and_loaded(server, home, tmp_path):
    source, data, sha = weight_file(tmp_path)
    server.routes["/densenet_bc16_k8-test.pt"] = (data, len(data))
    w = entry(server.url("densenet_bc16_k8-test.pt"), sha[:8])
    path = weights_file(w)
    assert path == home / "densenet_bc16_k8-test.pt" and path.read_bytes() == data and leftovers(home) == [path.name]
    model = load_weights(create_model("densenet_bc16_k8", num_classes=3), w)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), source.eval()(x), rtol=0, atol=0)
    server.stop()  # the cached, verified file serves from now on
    assert weights_file(w) == path and server.hits == ["/densenet_bc16_k8-test.pt"]


def test_wrong_hash_and_truncated_body_leave_nothing_in_the_cache(server, home, tmp_path):
    _, data, sha = weight_file(tmp_path)
    _, other, _ = weight_file(tmp_path, seed=1)
    server.routes["/wrong.pt"] = (other, len(other))
    with pytest.raises(WeightsError, match=r"downloaded from .*/wrong.pt is not densenet_bc16_k8.test: invalid hash"):
        weights_file(entry(server.url("wrong.pt"), sha[:8], "wrong.pt"))
    assert leftovers(home) == []
    server.routes["/cut.pt"] = (data[: len(data) // 2], len(data))
    with pytest.raises(WeightsError, match="cut.pt"):
        weights_file(entry(server.url("cut.pt"), sha[:8], "cut.pt"))
    assert leftovers(home) == []
    # a damaged file already in the cache is not trusted: it is replaced by a verified download
    home.mkdir(parents=True, exist_ok=True)
    (home / "good.pt").write_bytes(data[:100])
    server.routes["/good.pt"] = (data, len(data))
    assert weights_file(entry(server.url("good.pt"), sha[:8], "good.pt")).read_bytes() == data


def test_offline_without_a_mirror_names_the_file_and_where_to_put_it(home, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/densenet_bc16_k8-test.pt"
    with pytest.raises(WeightsError) as e:
        weights_file(entry(dead, "abcd"))
    message = str(e.value)
    assert f"cannot download densenet_bc16_k8.test from {dead}" in message
    assert f"put densenet_bc16_k8-test.pt in {home}" in message and pretrained.MIRROR_ENV in message
    assert leftovers(home) == []


def test_mirrors_an_address_or_a_folder(server, home, tmp_path, monkeypatch):
    _, data, sha = weight_file(tmp_path)
    w = entry("https://unreachable.invalid/models/densenet_bc16_k8-test.pt", sha[:8])
    server.routes["/mirror/densenet_bc16_k8-test.pt"] = (data, len(data))
    monkeypatch.setenv(pretrained.MIRROR_ENV, server.url("mirror/"))
    assert weights_file(w).read_bytes() == data and server.hits == ["/mirror/densenet_bc16_k8-test.pt"]
    folder = tmp_path / "mirror"
    folder.mkdir()
    monkeypatch.setenv(pretrained.MIRROR_ENV, str(folder))
    with pytest.raises(WeightsError, match="densenet_bc16_k8-other.pt is missing or does not match"):
        weights_file(replace(w, file_name="densenet_bc16_k8-other.pt"))
    (folder / "densenet_bc16_k8-other.pt").write_bytes(data)
    assert weights_file(replace(w, file_name="densenet_bc16_k8-other.pt")) == folder / "densenet_bc16_k8-other.pt"


def test_torchvision_entries_come_from_its_enums():
    for model, stem in pretrained.TORCHVISION_MODELS.items():
        member = getattr(torchvision.models, f"{stem}_Weights").DEFAULT
        w = get_weights(model, "imagenet")
        assert w.url == member.url and w.class_names == tuple(member.meta["categories"]) and w.num_classes == 1000
        assert w.accuracy["top1"] == member.meta["_metrics"]["ImageNet-1K"]["acc@1"]
        assert w.url.endswith(w.file_name) and w.file_name.split("-")[1].startswith(w.sha256)
        assert (w.input_size, w.mean) == (224, (0.485, 0.456, 0.406))
    assert get_weights("densenet121", True).name == "densenet121.imagenet"


def test_create_model_with_weights_and_bad_names(server, home, tmp_path, monkeypatch):
    source, data, sha = weight_file(tmp_path)
    server.routes["/densenet_bc16_k8-test.pt"] = (data, len(data))
    w = entry(server.url("densenet_bc16_k8-test.pt"), sha)
    monkeypatch.setattr(pretrained, "_bundled", lambda: [w])
    model = create_model("densenet_bc16_k8", weights="test")
    assert model.num_classes == 3
    torch.testing.assert_close(model.state_dict()["features.conv0.weight"], source.state_dict()["features.conv0.weight"])
    finetune = create_model("densenet_bc16_k8", weights=True, num_classes=7)  # a fresh 7-way head
    assert finetune.num_classes == 7
    torch.testing.assert_close(finetune.features.conv0.weight, source.features.conv0.weight)
    with pytest.raises(WeightsError, match=r"no weights 'tset' for densenet_bc16_k8; did you mean densenet_bc16_k8.test"):
        create_model("densenet_bc16_k8", weights="tset")
    with pytest.raises(WeightsError, match="no trained weights for densenet40_k12"):
        create_model("densenet40_k12", weights=True)
    assert [x.name for x in list_weights("densenet_bc16_k8")] == ["densenet_bc16_k8.test"]


def test_weights_command_lists_the_registry(capsys):
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    assert "densenet121.imagenet" in out and "74.43" in out and "download.pytorch.org" in out
    flipped = [w for w in list_weights() if "top1_flip" in w.accuracy]
    assert flipped  # the shipped BC-100 entry has its flip-averaged accuracy beside the single crop
    for w in flipped:
        cells = [c.strip() for c in next(line for line in out.splitlines() if f"| {w.name} " in line).split("|")]
        assert cells[5:8] == [f"{w.accuracy['top1']:.2f}", f"{w.accuracy['top5']:.2f}", f"{w.accuracy['top1_flip']:.2f}"]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> tuple[Path, Path]:
    """A short training run on the bundled sample, packaged twice by tools/package_weights.py
    (float32, then --half) into its own assets folder: (run folder, assets folder)."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("packaged")
    run, assets = tmp / "run", tmp / "assets"
    assert main(["train", "--model", "densenet_bc16_k8", "--epochs", "1", "--train-subset", "128", "--batch-size", "32",
                 "--threads", "1", "--quiet", "--out", str(run)]) == 0
    root = Path(__file__).resolve().parents[1]
    for extra in ([], ["--half", "--tta", "flip"]):
        p = subprocess.run([sys.executable, str(root / "tools" / "package_weights.py"), str(run), "--tag", "sample",
                            "--data", "sample", "--note", "a test", "--out", str(assets), *extra],
                           capture_output=True, text=True, cwd=root)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "top-1 " in p.stdout and "on 200 test images" in p.stdout
    return run, assets


def test_a_finished_run_becomes_weights_by_name(packaged, monkeypatch):
    """tools/package_weights.py: a run's checkpoint becomes a safetensors file and an index entry with
    its measured accuracy; create_model(weights=...) then gives the run's model (float16 storage only
    when no test prediction changes)."""
    import json

    from densenet.serving import model_from_checkpoint

    run, assets = packaged
    (entry,) = json.loads((assets / "index.json").read_text())  # the second packaging replaced the first
    assert entry["file_name"] == "densenet_bc16_k8-sample.safetensors" and entry["accuracy"]["images"] == 200
    assert "tools/package_weights.py" in entry["measured"] and "densenet train --model densenet_bc16_k8" in entry["recipe"]
    assert {"top1_flip", "top5_flip"} <= set(entry["accuracy"]) and "--tta flip" in entry["measured"]
    assert entry["extra"]["epochs"] == 1 and entry["extra"]["weights"] == "raw" and entry["extra"]["hours"]["training"] > 0
    assert hashlib.sha256((assets / entry["file_name"]).read_bytes()).hexdigest() == entry["sha256"]
    monkeypatch.setattr(pretrained, "BUNDLED_DIR", assets)
    w = get_weights("densenet_bc16_k8", "sample")
    assert w.url is None and w.class_names[0] == "airplane" and w.notes == "a test"
    model = create_model("densenet_bc16_k8", weights="sample").eval()
    cfg = model.pretrained_cfg  # timm's data config, from the weights
    assert (cfg["input_size"], cfg["mean"], cfg["weights"]) == ((3, 32, 32), w.mean, "densenet_bc16_k8.sample")
    trained, _ = model_from_checkpoint(run / "checkpoint.pt")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), trained(x).argmax(1))


def test_commands_take_weights_by_name(packaged, monkeypatch, capsys, tmp_path):
    """eval, predict and export with --weights (a tag with --model, or MODEL.TAG) instead of a
    checkpoint; both at once, a tag without a model, and a damaged file are one-line errors."""
    import json
    import zipfile

    from densenet.data.build import SAMPLE_PATH

    run, assets = packaged
    monkeypatch.setattr(pretrained, "BUNDLED_DIR", assets)
    top1 = json.loads((assets / "index.json").read_text())[0]["accuracy"]["top1"]
    assert main(["eval", "--model", "densenet_bc16_k8", "--weights", "sample"]) == 0
    assert f"cifar10+ test set, 200 images: top-1 error {100 - top1:.2f}%" in capsys.readouterr().out
    with zipfile.ZipFile(SAMPLE_PATH) as z:  # two test images of the sample, as files
        cats = [tmp_path / f"cat{i}.jpg" for i in range(2)]
        for path, name in zip(cats, ["test/cat/0000.jpg", "test/cat/0001.jpg"]):
            path.write_bytes(z.read(name))
    assert main(["predict", "--weights", "densenet_bc16_k8.sample", *map(str, cats)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("%" in line for line in out) and out[0].startswith(str(cats[0]))
    assert main(["export", "--model", "densenet_bc16_k8", "--weights", "sample", "--format", "safetensors",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m.safetensors"), str(cats[0])]) == 0
    assert capsys.readouterr().out.strip() == out[0]  # the same classes and probabilities
    assert main(["eval", str(run / "checkpoint.pt"), "--weights", "sample"]) == 2
    assert "give either a checkpoint" in capsys.readouterr().err
    assert main(["eval", "--weights", "sample"]) == 2
    assert "need a model: give --model NAME, or the full name MODEL.TAG" in capsys.readouterr().err
    (assets / "densenet_bc16_k8-sample.safetensors").write_bytes(b"damaged")
    assert main(["eval", "--weights", "densenet_bc16_k8.sample"]) == 2
    assert "does not match its SHA-256" in capsys.readouterr().err


def test_the_shipped_cifar10_weights_are_intact_and_as_good_as_their_entry_says(capsys):
    """This project's own CIFAR-10 weights, in the package: the file's size and SHA-256 match the
    index, and `densenet eval --weights` on the bundled sample's 200 test images (part of the 10,000
    the entry was measured on) lands near the recorded accuracy (200 images: a standard error of
    about 3 points)."""
    import json

    entries = json.loads((pretrained.BUNDLED_DIR / "index.json").read_text())
    shipped = [e for e in entries if e["tag"] == "cifar10"]
    assert shipped, "no CIFAR-10 weights in densenet/assets/weights/index.json"
    for e in shipped:
        path = pretrained.BUNDLED_DIR / e["file_name"]
        assert path.stat().st_size == e["file_size"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"]
        assert e["accuracy"]["images"] == 10_000 and "JPEG" in e["notes"]
        assert main(["eval", "--model", e["model"], "--weights", "cifar10"]) == 0
        line = next(s for s in capsys.readouterr().out.splitlines() if "200 images: top-1 error" in s)
        error = float(line.split("top-1 error ")[1].split("%")[0])
        assert abs((100 - error) - e["accuracy"]["top1"]) < 10, (line, e["accuracy"])


def test_weights_print_as_one_line_with_the_whole_record_one_attribute_away():
    """print(densenet.list_weights()) used to fill the terminal with a thousand class names per entry."""
    w = get_weights("densenet121", "imagenet")
    assert repr(w) == str(w) == (f"Weights(densenet121.imagenet: imagenet, top-1 {w.accuracy['top1']:.2f}%, "
                                 f"top-5 {w.accuracy['top5']:.2f}%, 1000 classes, 224x224, "
                                 f"{w.file_size / 2**20:.1f} MB)")
    assert "tench" not in repr(list_weights()) and len(repr(list_weights())) < 200 * len(list_weights())
    record = w.record
    assert record["name"] == "densenet121.imagenet" and len(record["class_names"]) == 1000 and record["url"] == w.url
    assert set(record) == {f.name for f in fields(Weights)} | {"name"}
    # an entry without a file size or a top-5 figure says so briefly
    assert repr(entry(None, "ab")) == "Weights(densenet_bc16_k8.test: cifar10, top-1 50.00%, 3 classes, 32x32, size unknown)"


def test_torchvision_names_select_the_same_weights(tmp_path, monkeypatch, capsys):
    """torchvision's habits: weights="IMAGENET1K_V1", "DEFAULT", "DenseNet121_Weights.IMAGENET1K_V1" and
    the enum member itself pick the entry that "imagenet" picks, in get_weights, create_model (a local
    mirror folder stands in for the download) and on the command line."""
    from densenet.models.pretrained import find_weights

    for model, stem in pretrained.TORCHVISION_MODELS.items():
        enum = getattr(torchvision.models, f"{stem}_Weights")
        same = get_weights(model, "imagenet")
        for name in ["IMAGENET1K_V1", "DEFAULT", True, f"{stem}_Weights.IMAGENET1K_V1", f"{model}.IMAGENET1K_V1",
                     enum.IMAGENET1K_V1, enum.DEFAULT]:
            assert get_weights(model, name) is same, (model, name)
        assert find_weights(f"{stem}_Weights.IMAGENET1K_V1") is same and find_weights(f"{model}.IMAGENET1K_V1") is same
    with pytest.raises(WeightsError, match="weights DenseNet169_Weights.IMAGENET1K_V1 are for densenet169, not densenet121"):
        get_weights("densenet121", torchvision.models.DenseNet169_Weights.IMAGENET1K_V1)
    with pytest.raises(WeightsError, match="no weights 'ResNet50_Weights.IMAGENET1K_V1' for densenet121"):
        get_weights("densenet121", torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    with pytest.raises(WeightsError, match="no weights 'IMAGENET1K_V1' for densenet_bc40_k12"):
        get_weights("densenet_bc40_k12", "IMAGENET1K_V1")
    assert get_weights("densenet_bc40_k12", "DEFAULT").name == "densenet_bc40_k12.cifar10"

    # the whole path, without a network: a stand-in for DenseNet-121's file (4 classes) in a mirror folder
    torch.manual_seed(0)
    source = create_model("densenet121", num_classes=4).eval()
    folder = tmp_path / "mirror"
    folder.mkdir()
    path = folder / "densenet121-test.pt"
    torch.save(source.state_dict(), path)
    real = get_weights("densenet121", "imagenet")
    entries = (replace(real, class_names=tuple("abcd"), file_name=path.name,
                       sha256=hashlib.sha256(path.read_bytes()).hexdigest()[:8]),)
    monkeypatch.setattr(pretrained, "_torchvision", lambda: entries)
    monkeypatch.setenv(pretrained.MIRROR_ENV, str(folder))
    monkeypatch.setenv(pretrained.HOME_ENV, str(tmp_path / "home"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = source(x)
        for name in ["imagenet", "IMAGENET1K_V1", "DEFAULT", torchvision.models.DenseNet121_Weights.IMAGENET1K_V1]:
            model = create_model("densenet121", weights=name).eval()
            assert model.pretrained_cfg["weights"] == "densenet121.imagenet" and model.num_classes == 4
            torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    image = tmp_path / "a.png"
    Image.new("RGB", (80, 80), (120, 30, 200)).save(image)
    printed = []
    for argv in (["--model", "densenet121", "--weights", "imagenet"], ["--model", "densenet121", "--weights", "IMAGENET1K_V1"],
                 ["--weights", "DenseNet121_Weights.IMAGENET1K_V1"], ["--weights", "densenet121.DEFAULT"]):
        assert main(["predict", *argv, "--image-size", "64", str(image)]) == 0, capsys.readouterr().err
        printed.append(capsys.readouterr().out)
    assert printed[0].startswith(f"{image}: ") and printed.count(printed[0]) == 4
