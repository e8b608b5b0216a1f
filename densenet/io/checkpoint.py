"""Checkpoints written atomically with a SHA-256 digest of their content, read safely.

A checkpoint is one ``torch.save`` file holding a dict of tensors and plain data, so that
``torch.load(path, weights_only=True)`` reads it. :func:`save_checkpoint` adds an entry
``"checksum": "sha256:<hex>"``: the digest of everything else in the dict (keys, values, tensor
dtypes, shapes and bytes). :func:`load_checkpoint` recomputes it and refuses a file whose content
changed after it was written (a flipped bit, a damaged copy); a truncated file does not parse at
all. The entry is found by its key or by its value, so that a flip in either still leaves it
recognised. Files without it (earlier versions of this project, or edited by hand) load unchecked.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import DenseNetError
from .atomic import atomic_open, temp_prefix

__all__ = ["CHECKSUM_KEY", "CheckpointError", "content_digest", "load_checkpoint", "read_torch_file", "save_checkpoint",
           "save_rotating", "verify_digest"]

CHECKSUM_KEY = "checksum"
_DIGEST_VALUE = re.compile(r"sha256:[0-9a-f]{64}")
#: errors worth a second try (a network file system's hiccup); a full disk or a read-only folder are not
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT})


class CheckpointError(DenseNetError, ValueError):
    """A checkpoint that is missing, damaged, not one of this project's, or cannot be written."""


# ---------------------------------------------------------------------------- digest
def content_digest(state: Any) -> str:
    """SHA-256 (hex) of a structure of dicts, lists, tuples, tensors and plain values: the same for
    the structure saved and the one ``torch.load`` gives back, different if any byte of it differs."""
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(b"D%d:" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"%s%d:" % (b"L" if isinstance(obj, list) else b"U", len(obj)))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, bool) or obj is None:
        h.update(repr(obj).encode())
    elif isinstance(obj, int):
        h.update(b"I%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d:" % len(data) + data)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"Y%d:" % len(obj) + bytes(obj))
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(f"O{obj}".encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__} in a checkpoint (tensors and plain data only)")


# ---------------------------------------------------------------------------- writing
def _disk_message(path: Path, e: OSError, attempts: int) -> str:
    folder = path.parent
    code = errno.errorcode.get(e.errno or 0, "?")
    fixes = {
        errno.ENOSPC: f"free space on the disk of {folder} (or move the run to another disk)",
        errno.EDQUOT: f"free space within your disk quota for {folder} (or move the run to another disk)",
        errno.EFBIG: "the file size limit (ulimit -f) or the file system's limit was reached; raise it or move the run",
        errno.EACCES: f"make {folder} writable for this user (or choose another --out)",
        errno.EPERM: f"make {folder} writable for this user (or choose another --out)",
        errno.EROFS: f"{folder} is on a read-only file system; choose another --out",
        errno.EIO: "the disk reported an I/O error: check it, copy the run folder to a healthy disk",
    }
    fix = fixes.get(e.errno or 0, "fix the cause")
    tries = f" (tried {attempts} times)" if attempts > 1 else ""
    return (f"cannot write checkpoint {path}: {e.strerror or e} [{code}]{tries}; the last complete checkpoint in "
            f"{folder} is kept; {fix}, then continue the run with --resume {folder}")


def _write(path: Path, data: memoryview, retries: int, retry_delay: float, before_replace=None) -> None:
    for attempt in range(1, retries + 2):
        try:
            with atomic_open(path, before_replace) as f:
                f.write(data)
            return
        except OSError as e:
            if e.errno in TRANSIENT_ERRNOS and attempt <= retries:
                time.sleep(retry_delay * attempt)
                continue
            raise CheckpointError(_disk_message(path, e, attempt)) from None


def _serialise(state: dict[str, Any]) -> memoryview:
    """``torch.save`` bytes of ``state`` with its digest (in memory, so that a failing disk shows
    up as the OSError it is rather than inside the serialiser)."""
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    buffer = io.BytesIO()
    torch.save({**state, CHECKSUM_KEY: "sha256:" + content_digest(state)}, buffer)
    return buffer.getbuffer()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], *, retries: int = 2,
                    retry_delay: float = 1.0) -> None:
    """Write ``state`` (tensors and plain data only) with its digest to ``path`` atomically.

    An I/O error (``EIO``, ``EAGAIN``, ...) is retried ``retries`` times; a full disk, a quota or a
    permission problem is not. Failures raise :class:`CheckpointError` naming the path, the reason
    and the fix; ``path`` is then unchanged.
    """
    _write(Path(path), _serialise(state), retries, retry_delay)


def save_rotating(out_dir: str | os.PathLike, state: dict[str, Any], *, name: str = "checkpoint.pt",
                  previous: str = "checkpoint.prev.pt", retries: int = 2, retry_delay: float = 1.0) -> Path:
    """Write ``state`` to ``out_dir/name``, keeping the checkpoint it replaces as ``out_dir/previous``.

    The new checkpoint goes to a temporary file, fsynced; only then is the current one renamed to
    ``previous`` and the new one renamed into place. A kill at any moment leaves the newest complete
    checkpoint under one of the two names (``previous`` alone between the two renames); a failed
    write leaves both as they were. Temporary files of earlier, killed writers are removed first
    (one writer per run folder: see :mod:`densenet.runlock`). Returns the checkpoint's path.
    """
    out = Path(out_dir)
    target, keep = out / name, out / previous
    for stale in out.glob(temp_prefix(target) + "*.tmp"):
        stale.unlink(missing_ok=True)

    def rotate() -> None:
        if target.exists():
            os.replace(target, keep)

    _write(target, _serialise(state), retries, retry_delay, rotate)
    return target


# ---------------------------------------------------------------------------- reading
def _refused_global(message: str) -> str | None:
    """The global a ``weights_only`` load refused, if that is why it failed (None: damaged stream)."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def _unpickler_reason(message: str) -> str:
    """The reason in a ``weights_only`` load's error, without torch's advice to load unsafely."""
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    if match:
        return match.group(1)[:200]
    advice = ("Weights only load failed", "Check the documentation", "(1)", "(2)", "WeightsUnpickler")
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(advice)]
    return lines[0][:200] if lines else "unreadable pickle"


def read_torch_file(path: Path, what: str, error: type[DenseNetError] = None) -> Any:  # type: ignore[assignment]
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain data, never code. Every
    failure becomes ``error`` (default :class:`CheckpointError`) naming ``what`` (e.g. "checkpoint
    runs/x/checkpoint.pt") and the reason: objects that could run code, a truncated or corrupted
    file, not enough memory."""
    error = error or CheckpointError
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = _refused_global(str(e))
        if name:
            raise error(f"{what} holds objects other than tensors and plain data ({name}); refused for safety: "
                        "loading it could run code") from None
        raise error(f"{what} is truncated or corrupted and cannot be read: {_unpickler_reason(str(e))}") from None
    except MemoryError:
        raise error(f"not enough memory to read {what}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file makes the zip and pickle readers raise nearly anything
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise error(f"{what} is truncated or corrupted and cannot be read ({type(e).__name__}: {first})") from None


def verify_digest(state: Mapping[Any, Any], source: str) -> dict[Any, Any]:
    """``state`` without its digest entry, after checking that its content matches the digest (if it
    has one); :class:`CheckpointError` if not."""
    entries = [k for k, v in state.items()
               if k == CHECKSUM_KEY or (isinstance(v, str) and _DIGEST_VALUE.fullmatch(v))]
    rest = {k: v for k, v in state.items() if k not in entries}
    if not entries:
        return rest
    try:
        actual = "sha256:" + content_digest(rest)
    except TypeError as e:  # damaged bytes that unpickled to something this project never writes
        raise CheckpointError(f"checkpoint {source} is corrupted: {e}") from None
    for key in entries:
        if state[key] != actual:
            raise CheckpointError(
                f"checkpoint {source} is corrupted: its content does not match the SHA-256 digest written with it "
                f"(stored {str(state[key])[:19]}..., computed {actual[:19]}...); the file changed after it was "
                f"written (disk or copy error). Use the previous checkpoint (--resume falls back to "
                f"checkpoint.prev.pt); if you edited it on purpose, delete its '{CHECKSUM_KEY}' entry")
    return rest


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain data, no code) and check its
    digest; :class:`CheckpointError` naming the file when it is missing, damaged or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    state = read_torch_file(path, f"checkpoint {path}")
    if isinstance(state, dict):
        state = verify_digest(state, str(path))
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a densenet training checkpoint (no 'model' and 'config' entries)")
    return state
