"""Safe reading of tar and zip archives: member names are checked before anything is read or written.

A member is refused when its name is absolute, contains ``..``, or it is a link, device or FIFO
(links could point outside the destination), and before it is decompressed when it would expand more
than :func:`max_expansion` times over its compressed size (a zip bomb: 1 GB of zeros deflates to
1 MB). Truncated or corrupt archives raise :class:`DataError` naming the archive.
"""
from __future__ import annotations

import math
import os
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .errors import DataError, ExpansionRefused

__all__ = ["ARCHIVE_ERRORS", "DEFAULT_MAX_EXPANSION", "check_expansion", "check_member_name", "is_tar", "is_zip",
           "iter_tar_files", "max_expansion", "safe_extract"]

#: what the standard library raises on a truncated or corrupt archive
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError)
#: refuse archive content that expands more than this many times over its compressed size
#: (deflate reaches ~1000x on zeros; real images and datasets stay far below 10x)
DEFAULT_MAX_EXPANSION = 200
#: content up to this size is accepted at any ratio (small, very compressible files are common)
EXPANSION_FREE_BYTES = 64 << 20
EXPANSION_ENV = "DENSENET_MAX_EXPANSION"


def max_expansion() -> float:
    """The expansion limit: ``$DENSENET_MAX_EXPANSION`` when set (for an archive one trusts), else
    :data:`DEFAULT_MAX_EXPANSION`."""
    text = os.environ.get(EXPANSION_ENV, "")
    try:
        return float(text) if text else DEFAULT_MAX_EXPANSION
    except ValueError:
        raise DataError(f"{EXPANSION_ENV}={text!r} is not a number (the largest uncompressed/compressed size ratio "
                        f"of archive content to accept; default {DEFAULT_MAX_EXPANSION})") from None


def check_expansion(archive: str | os.PathLike, what: str, size: int, compressed: int,
                    limit: float | None = None) -> None:
    """:class:`ExpansionRefused` if ``size`` uncompressed bytes from ``compressed`` bytes exceed the limit."""
    limit = max_expansion() if limit is None else limit
    if size > EXPANSION_FREE_BYTES and size > limit * max(compressed, 1):
        ratio = size / max(compressed, 1)
        raise ExpansionRefused(f"{archive}: refused {what}: {size:,} bytes from {compressed:,} compressed ({ratio:,.0f}x), "
                        f"more than the limit of {limit:g}x (a possible zip bomb); if you trust this archive, raise "
                        f"the limit with {EXPANSION_ENV}={math.ceil(ratio) + 1}")


def check_member_name(archive: str | os.PathLike, name: str) -> str:
    """``name`` normalised to a relative POSIX path; :class:`DataError` if it is absolute or climbs out."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in p.parts:
        raise DataError(f"{archive}: refused member {name!r}: absolute path or '..' (unsafe archive)")
    return str(p)


def is_tar(path: str | os.PathLike) -> bool:
    p = Path(path)
    try:
        return p.is_file() and tarfile.is_tarfile(p)
    except ARCHIVE_ERRORS:
        return False


def is_zip(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and zipfile.is_zipfile(p)


def iter_tar_files(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """(member name, content) of every regular file of a tar archive (any compression), in order.

    Links and special members are refused unless they are directories; names are checked.
    """
    total, compressed = 0, Path(path).stat().st_size
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                name = check_member_name(path, m.name)
                if m.isdir():
                    continue
                if not m.isfile():
                    raise DataError(f"{path}: refused member {m.name!r}: links and special files are not allowed")
                total += m.size
                check_expansion(path, f"member {m.name!r} (the archive's content up to it)", total, compressed)
                f = tar.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    raise DataError(f"{path}: member {m.name!r} is truncated ({len(data)} of {m.size} bytes)")
                yield name, data
    except DataError:
        raise
    except ARCHIVE_ERRORS as e:
        raise DataError(f"{path}: truncated or corrupt archive ({type(e).__name__}: {e})") from None


def safe_extract(path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a tar or zip archive into ``dest`` (created), refusing unsafe members; returns ``dest``.

    Only directories and regular files are written; a link member makes the whole call fail.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if is_zip(path):
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    name = check_member_name(path, info.filename)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink stored by Info-ZIP
                        raise DataError(f"{path}: refused member {info.filename!r}: links are not allowed")
                    check_expansion(path, f"member {info.filename!r}", info.file_size, info.compress_size)
                    target = dest / name
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
        except DataError:
            raise
        except ARCHIVE_ERRORS as e:
            raise DataError(f"{path}: truncated or corrupt archive ({type(e).__name__}: {e})") from None
        return dest
    if not is_tar(path):
        raise DataError(f"{path}: not a tar or zip archive")
    for name, data in iter_tar_files(path):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dest
