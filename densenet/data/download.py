"""Official download locations with their MD5 sums; downloads are verified and written atomically.

Offline (or when ``download`` is not asked for), :func:`missing_message` says which file to put where.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import DataError

__all__ = ["RESOURCES", "md5sum", "download", "missing_message"]

#: dataset -> [(file name, url, md5)]
RESOURCES: dict[str, list[tuple[str, str, str]]] = {
    "cifar10": [("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                 "c58f30108f718f92721af3b95e74349a")],
    "cifar10-binary": [("cifar-10-binary.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                        "c32a1d4ab5d03f1284b67883e8d87530")],
    "cifar100": [("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                  "eb9058c3a382ffc7106e4002c42a8d85")],
    "cifar100-binary": [("cifar-100-binary.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                         "03b5dce01913d631647c71ecec9e9cb8")],
    "svhn": [
        ("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
        ("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
        ("extra_32x32.mat", "http://ufldl.stanford.edu/housenumbers/extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7"),
    ],
}


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def missing_message(name: str, root: str | os.PathLike) -> str:
    """What to download and where to put it, for dataset ``name`` (e.g. ``"cifar10"``)."""
    base = name.rstrip("+")
    if base not in RESOURCES:
        return (f"Put the ImageNet (ILSVRC 2012) train/ and val/ folders, one subfolder per class, in {root} "
                "(it cannot be downloaded automatically)")
    files = "; ".join(f"{f} from {u} (md5 {m})" for f, u, m in RESOURCES[base])
    return f"Put {files} in {root}, or pass download=True on a machine that is online"


def download(name: str, root: str | os.PathLike, timeout: float = 60.0) -> list[Path]:
    """Fetch the official files of ``name`` into ``root`` (skipping those present with the right MD5).

    Each file is checked against its MD5 before it is moved into place; a mismatch or a network
    failure raises :class:`DataError` saying which file to put where instead.
    """
    base = name.rstrip("+")
    if base not in RESOURCES:
        raise DataError(f"{name} cannot be downloaded: {missing_message(name, root)}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, url, md5 in RESOURCES[base]:
        target = root / fname
        paths.append(target)
        if target.is_file() and md5sum(target) == md5:
            continue
        fd, tmp = tempfile.mkstemp(dir=root, prefix=fname + ".", suffix=".part")
        try:
            h = hashlib.md5()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while block := resp.read(1 << 20):
                    h.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != md5:
                raise DataError(f"{url}: downloaded file has MD5 {h.hexdigest()}, expected {md5}; "
                                f"{missing_message(name, root)}")
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DataError(f"cannot download {url} ({e}); offline? {missing_message(name, root)}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
    return paths
