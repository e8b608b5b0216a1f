"""Hostile files (issue 8, point 7): nothing a user is handed runs code, writes outside its folder or
exhausts memory. Each case is a crafted file in the real format.

Covered elsewhere (not repeated here): a raw pickle weight file that would create a file
(tests/test_weights.py::test_a_pickle_that_runs_code_is_refused), CIFAR python batches with code
(tests/test_data.py::test_pickle_that_would_create_a_file_is_refused and
::test_safe_loads_admits_plain_data_only), tar/zip members with ``../`` or absolute names
(tests/test_data.py::test_unsafe_member_names_refused), a tar symlink out of the target
(tests/test_data.py::test_links_in_archives_refused), the image pixel limit on a real image
(tests/test_data.py::test_decompression_bomb_limit).
"""
from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from data_helpers import image_bytes, write_image_tree

from densenet import WeightsError, read_state_dict
from densenet.cli import main
from densenet.data import DataError, build_data, decode_image, safe_extract
from densenet.data.archive import DEFAULT_MAX_EXPANSION, EXPANSION_ENV
from densenet.io.checkpoint import CheckpointError, load_checkpoint


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------- checkpoints and weights
class OpensAFile:
    """Unpickling this would create ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsAShellCommand:
    """Unpickling this would run ``touch path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [OpensAFile, RunsAShellCommand])
def test_checkpoint_with_code_is_refused_and_never_runs(tmp_path, capsys, payload):
    """torch.save's own zip format with a __reduce__ payload where the weights should be."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"config": {"model": "densenet_bc16_k8"}, "model": {"features.conv0.weight": payload(str(marker))}}, evil)
    with pytest.raises(CheckpointError, match="refused for safety: loading it could run code"):
        load_checkpoint(evil)
    with pytest.raises(WeightsError, match="refused for safety"):  # --init, export
        read_state_dict(evil)
    assert main(["eval", str(evil)]) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "refused for safety" in err and "Traceback" not in err
    assert not marker.exists()


# ----------------------------------------------------------------------------------- archives: names and links
def zip_with(path: Path, name: str, data: bytes = b"x", mode: int | None = None) -> Path:
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.external_attr = mode << 16  # how Info-ZIP stores a symlink (the data is the link target)
        info.create_system = 3
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(info, data)
    return path


def test_zip_symlink_out_of_the_target_is_refused(tmp_path):
    arch = zip_with(tmp_path / "a.zip", "train/a/link.png", b"/etc/passwd", mode=0o120777)
    with pytest.raises(DataError, match="refused member 'train/a/link.png': links are not allowed"):
        safe_extract(arch, tmp_path / "out")
    assert not (tmp_path / "out" / "train" / "a" / "link.png").exists()


@pytest.mark.parametrize("name", ["..\\evil.txt", "C:/evil.txt", "C:\\evil.txt", "\\evil.txt", "a/../../evil.txt"])
def test_windows_style_and_nested_escapes_are_refused(tmp_path, name):
    arch = zip_with(tmp_path / "a.zip", name)
    with pytest.raises(DataError, match="refused member .*unsafe archive"):
        safe_extract(arch, tmp_path / "out")
    with pytest.raises(DataError, match="refused member"):
        build_data("folder", arch)
    assert not list(tmp_path.rglob("evil*"))


@pytest.mark.parametrize("kind", ["hardlink", "fifo", "device"])
def test_tar_hard_links_and_special_files_are_refused(tmp_path, kind):
    member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    member.type = {"hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "device": tarfile.CHRTYPE}[kind]
    member.linkname = "../../../etc/passwd" if kind == "hardlink" else ""
    arch = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(arch, "w:gz") as t:
        t.addfile(member)
    with pytest.raises(DataError, match="links and special files are not allowed"):
        safe_extract(arch, tmp_path / "out")
    with pytest.raises(DataError, match="links and special files are not allowed"):
        build_data("cifar10", arch)
    assert not (tmp_path / "out" / "cifar-10-batches-py" / "data_batch_1").exists()


# ----------------------------------------------------------------------------------- decompression bombs
def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one tiny data chunk: 67 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_image_claiming_huge_dimensions_is_refused_before_decoding(tmp_path):
    bomb = png_header(100_000, 100_000)  # 10^10 pixels (30 GB decoded) in 67 bytes
    with pytest.raises(DataError, match="10,000,000,000-pixel image exceeds the limit of 89,478,485 pixels .*raise max_image"):
        decode_image(bomb, "bomb.png")
    root = tmp_path / "f"
    write_image_tree(root, {"train": {"a": 2}, "val": {"a": 1}})
    (root / "val" / "a" / "bomb.png").write_bytes(bomb)
    data = build_data("folder", root, image_size=32, batch_size=2, workers=0)
    with pytest.raises(DataError, match="bomb.png: 10,000,000,000-pixel image exceeds the limit"):
        list(data.test.batches(0))
    # a limit the user raised lets the image through to the decoder (which then finds it truncated)
    with pytest.raises(DataError, match="bomb.png: cannot decode image"):
        decode_image(png_header(3000, 3000), "bomb.png", max_pixels=10_000_000)


class _PillowSpy:
    """Stands in for the PIL.Image module inside densenet.data.folder: records every change of
    ``MAX_IMAGE_PIXELS`` and whether the project's lock was held at that moment."""

    def __init__(self, image_module, lock) -> None:
        object.__setattr__(self, "_module", image_module)
        object.__setattr__(self, "_lock", lock)
        object.__setattr__(self, "changes", [])

    def __getattr__(self, name):
        return getattr(self._module, name)

    def __setattr__(self, name, value):
        self.changes.append((name, value, self._lock.locked()))
        setattr(self._module, name, value)


def test_pillow_global_limit_untouched_unless_raised_and_then_only_under_the_lock(monkeypatch):
    """Decoding with the default limit (and any limit up to Pillow's own) changes no global state that
    other threads read; a limit raised above Pillow's turns its check off only under the lock."""
    from PIL import Image

    import densenet.data.folder as folder

    spy = _PillowSpy(Image, folder._PILLOW_LIMIT)
    monkeypatch.setattr(folder, "Image", spy)
    decode_image(image_bytes("PNG", (8, 8), "RGB"), "ok.png")
    decode_image(image_bytes("PNG", (8, 8), "RGB"), "ok.png", max_pixels=1000)
    decode_image(image_bytes("PNG", (8, 8), "RGB"), "ok.png", max_pixels=None)
    assert spy.changes == []
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match="bomb.png: cannot decode image"):
        decode_image(png_header(20_000, 20_000), "bomb.png", max_pixels=10**9)  # above Pillow's 2x89M
    assert [(name, locked) for name, _, locked in spy.changes] == [("MAX_IMAGE_PIXELS", True)] * 2
    assert [value for _, value, _ in spy.changes] == [None, before] and Image.MAX_IMAGE_PIXELS == before


ZEROS = 80 << 20  # 80 MiB of zeros deflate to ~80 KB (1000x)


def zip_bomb(path: Path, member: str) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open(member, "w") as f:
            block = bytes(1 << 20)
            for _ in range(ZEROS >> 20):
                f.write(block)
        for split in ("train", "val"):
            z.writestr(f"{split}/a/ok.png", image_bytes("PNG"))
    return path


def test_zip_bomb_is_refused_with_a_limit_the_user_can_raise(tmp_path, monkeypatch):
    bomb = zip_bomb(tmp_path / "bomb.zip", "train/a/bomb.png")
    assert bomb.stat().st_size < ZEROS / 500
    with pytest.raises(DataError, match=f"refused member 'train/a/bomb.png': {ZEROS:,} bytes from .* more than the limit "
                                        f"of {DEFAULT_MAX_EXPANSION}x \\(a possible zip bomb\\).*{EXPANSION_ENV}="):
        safe_extract(bomb, tmp_path / "out")
    assert not (tmp_path / "out" / "train" / "a" / "bomb.png").exists()
    data = build_data("folder", bomb, image_size=32, batch_size=2, workers=0)
    with pytest.raises(DataError, match="bomb.zip: refused member 'train/a/bomb.png'.*zip bomb"):
        list(data.train.batches(0))
    monkeypatch.setenv(EXPANSION_ENV, "5000")  # the user trusts this archive: it is read, and found not an image
    with pytest.raises(DataError, match="bomb.zip:train/a/bomb.png: cannot decode image"):
        list(data.train.batches(0))


def test_zip_lying_about_its_sizes_is_refused_before_decompressing(tmp_path):
    """A member whose headers declare 3 GB: refused from the declaration alone."""
    path = zip_with(tmp_path / "liar.zip", "train/a/x.png", image_bytes("PNG"))
    raw = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        at = raw.find(signature)
        raw[at + offset:at + offset + 4] = struct.pack("<I", 3 << 30)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="refused member 'train/a/x.png': 3,221,225,472 bytes .*zip bomb"):
        safe_extract(path, tmp_path / "out")


def test_tar_gz_bomb_is_refused(tmp_path):
    arch = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(arch, "w:gz", compresslevel=1) as t:
        member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        member.size = ZEROS
        t.addfile(member, io.BytesIO(bytes(ZEROS)))
    assert arch.stat().st_size < ZEROS / 200
    with pytest.raises(DataError, match="refused member 'cifar-10-batches-py/data_batch_1'.*zip bomb"):
        build_data("cifar10", arch)
    with pytest.raises(DataError, match="zip bomb"):
        safe_extract(arch, tmp_path / "out")
    assert not (tmp_path / "out" / "cifar-10-batches-py" / "data_batch_1").exists()


def test_bomb_check_boundaries_and_message():
    """check_expansion directly: sizes up to 64 MiB pass at any ratio; above, the ratio to the compressed size
    (at least one byte) is compared with the limit, and the message gives the ratio and the setting that admits it."""
    from densenet.data.archive import EXPANSION_FREE_BYTES, check_expansion
    from densenet.data.errors import ExpansionRefused

    assert EXPANSION_FREE_BYTES == 64 << 20
    check_expansion("a.zip", "m", 64 << 20, 1)  # up to 64 MiB: any ratio
    check_expansion("a.zip", "m", 1000, 1)
    check_expansion("a.zip", "m", 80_000_000, 400_000)  # exactly the default limit of 200x
    with pytest.raises(ExpansionRefused, match="more than the limit of 200x"):
        check_expansion("a.zip", "m", 80_000_001, 400_000)
    with pytest.raises(ExpansionRefused):
        check_expansion("a.zip", "m", (64 << 20) + 1, 1)
    check_expansion("a.zip", "m", 150_000_000, 0, limit=1e9)  # nothing compressed counts as one byte
    check_expansion("a.zip", "m", 150_000_000, 1, limit=150_000_000)  # at the limit
    with pytest.raises(ExpansionRefused) as raised:
        check_expansion("a.zip", "member 'm'", 150_000_000, 1, limit=1e8)
    assert str(raised.value) == ("a.zip: refused member 'm': 150,000,000 bytes from 1 compressed (150,000,000x), more than "
                                 f"the limit of 1e+08x (a possible zip bomb); if you trust this archive, raise the limit "
                                 f"with {EXPANSION_ENV}=150000001")
    with pytest.raises(ExpansionRefused, match=r"from 0 compressed \(150,000,000x\).*=150000001$"):
        check_expansion("a.zip", "m", 150_000_000, 0, limit=1e8)
    with pytest.raises(ExpansionRefused, match=r"from 3 compressed \(50,000,000x\).*=50000001$"):
        check_expansion("a.zip", "m", 150_000_000, 3)
    with pytest.raises(ExpansionRefused, match=r"from 1 compressed \(150,000,001x\).*=150000002$"):  # an odd ratio
        check_expansion("a.zip", "m", 150_000_001, 1, limit=1e8)


def test_zip_extraction_writes_files_and_folders_where_they_belong(tmp_path):
    """A zip with folder entries (first), nested files without folder entries, and two files in one
    folder: every file is written under the destination with its content."""
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("top/", "")
        z.writestr("top/empty/", "")
        z.writestr("top/a.txt", b"a")
        z.writestr("top/deep/er/b.bin", b"b" * 1000)
        z.writestr("top/deep/er/c.bin", b"c")
        z.writestr("d.txt", b"d")
    out = safe_extract(archive, tmp_path / "out" / "here")
    assert out == tmp_path / "out" / "here"
    files = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert files == {"top/a.txt": b"a", "top/deep/er/b.bin": b"b" * 1000, "top/deep/er/c.bin": b"c", "d.txt": b"d"}
    assert (out / "top" / "empty").is_dir()
    safe_extract(archive, out)  # again over what is there


def test_member_names_with_a_drive_or_one_character():
    from densenet.data.archive import check_member_name

    for name in ["C:", "C:x", "c:/x"]:
        with pytest.raises(DataError, match="absolute path or '..'"):
            check_member_name("a.zip", name)
    assert [check_member_name("a.zip", n) for n in ["a", "ab:c", "x/./y", "..a/b"]] == ["a", "ab:c", "x/y", "..a/b"]
