"""The checkpoint writer and reader, piece by piece (issue #20: tests that kill the mutants that
survived test_reliability.py): the content digest sees every kind of value, reading failures become
CheckpointError, retries back off, failing writes leave nothing behind, atomic writes fsync and
rename in the order that survives a crash."""
from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch

import densenet.io.atomic as atomic
import densenet.io.checkpoint as checkpoint
from densenet.io.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from densenet.io.checkpoint import (
    CheckpointError,
    content_digest,
    load_checkpoint,
    read_torch_file,
    save_checkpoint,
    save_rotating,
    verify_digest,
)
from densenet.models.weights import WeightsError, read_state_dict


def state(**changes) -> dict:
    base = {"config": {"model": "densenet_bc100_k12", "lr": 0.1, "nesterov": True, "tag": None},
            "model": {"w": torch.arange(6, dtype=torch.float32).view(2, 3)}, "step": 7, "epoch": 2,
            "history": [{"epoch": 1, "train_loss": 0.5}], "name": "run", "blob": b"\x00\x01",
            "dtype": torch.float16, "device": torch.device("cpu"), "pair": (1, 2)}
    return {**base, **changes}


# ----------------------------------------------------------------------------------- the digest
@pytest.mark.parametrize("change", [
    {"step": 8}, {"step": -7}, {"epoch": 3},
    {"config": {"model": "densenet_bc100_k12", "lr": 0.01, "nesterov": True, "tag": None}},
    {"config": {"model": "densenet_bc100_k12", "lr": 0.1, "nesterov": False, "tag": None}},
    {"config": {"model": "densenet_bc100_k12", "lr": 0.1, "nesterov": True, "tag": 0}},
    {"name": "rum"}, {"name": "run "}, {"blob": b"\x00\x02"}, {"blob": bytearray(b"\x00\x01\x00")},
    {"dtype": torch.float32}, {"device": torch.device("meta")}, {"pair": [1, 2]}, {"pair": (1, 2, 3)},
    {"history": [{"epoch": 1, "train_loss": 0.25}]}, {"model": {"w": torch.arange(6, dtype=torch.float32).view(3, 2)}},
    {"model": {"w": torch.arange(6, dtype=torch.float64).view(2, 3)}},
])
def test_the_digest_sees_every_value(change):
    """A step count, a learning rate, a flag, a name, bytes, a dtype, a shape: changing any changes the digest."""
    assert content_digest(state(**change)) != content_digest(state())


def test_the_digest_tells_types_and_boundaries_apart():
    values = [1, 1.0, True, "1", b"1", None, "None", "True", [1], (1,), {1: 1}, torch.tensor(1), torch.tensor([1]),
              torch.tensor(1.0), torch.float32, "torch.float32", torch.tensor([], dtype=torch.int32),
              torch.tensor([], dtype=torch.float32)]
    digests = [content_digest(v) for v in values]
    assert len(set(digests)) == len(values)
    assert content_digest(["ab", "c"]) != content_digest(["a", "bc"])
    assert content_digest([b"ab", b"c"]) != content_digest([b"a", b"bc"])
    assert content_digest({"a": [1, 2], "b": 3}) != content_digest({"a": [1], "b": [2, 3]})
    assert content_digest([[1], [2]]) != content_digest([[1, 2]])
    assert content_digest(2**70) != content_digest(2**70 + 1)


def test_the_digest_of_a_structure_and_of_what_loading_gives_back_agree(tmp_path):
    s = state(model={"w": torch.arange(12.0).view(3, 4).t()})  # not contiguous
    torch.save(s, tmp_path / "s.pt")
    assert content_digest(torch.load(tmp_path / "s.pt", weights_only=True)) == content_digest(s)
    assert content_digest(state()) == content_digest(state())
    assert content_digest("é\ud800") == content_digest("é\ud800")  # lone surrogates from a damaged str still hash


@pytest.mark.parametrize("foreign", [{1, 2}, object(), 1j, range(3)])
def test_the_digest_refuses_what_a_checkpoint_never_holds(foreign):
    with pytest.raises(TypeError, match="cannot checksum a"):
        content_digest({"x": [foreign]})


def test_a_changed_step_or_learning_rate_is_detected_on_loading(tmp_path):
    """The digest written with the file covers plain numbers: a step count or learning rate changed
    after writing (a flipped bit that still unpickles) is refused."""
    save_checkpoint(tmp_path / "c.pt", state())
    for key, value in [("step", 9), ("epoch", 0), ("name", "runs")]:
        raw = torch.load(tmp_path / "c.pt", weights_only=True)
        raw[key] = value
        torch.save(raw, tmp_path / "changed.pt")
        with pytest.raises(CheckpointError, match="does not match the SHA-256 digest"):
            load_checkpoint(tmp_path / "changed.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    raw["config"]["lr"] = 0.2
    torch.save(raw, tmp_path / "changed.pt")
    with pytest.raises(CheckpointError, match="does not match the SHA-256 digest"):
        load_checkpoint(tmp_path / "changed.pt")


def test_the_digest_entry_is_found_by_its_key_or_its_value(tmp_path):
    good = "sha256:" + content_digest(state())
    keys = list(state())
    assert list(verify_digest({**state(), "checksum": good}, "x")) == keys
    assert list(verify_digest({**state(), "chucksum": good}, "x")) == keys  # a flip in the key
    assert list(verify_digest({**state(), "unchecked": "sha256:" + "0" * 63}, "x")) == [*keys, "unchecked"]  # not a digest
    with pytest.raises(CheckpointError, match="x is corrupted: its content does not match"):
        verify_digest({**state(), "checksum": "sha256:" + "0" * 64}, "x")
    with pytest.raises(CheckpointError, match="x is corrupted: its content does not match"):
        verify_digest({**state(), "checksum": "sha256:" + "0" * 64, "chucksum": good}, "x")
    with pytest.raises(CheckpointError, match="x is corrupted: its content does not match"):
        verify_digest({**state(), "checksum": good[:-1] + "x"}, "x")  # not a digest any more, still under its key
    with pytest.raises(CheckpointError, match="x is corrupted: cannot checksum a set"):
        verify_digest({**state(), "odd": {1}, "checksum": good}, "x")


def test_save_checkpoint_replaces_a_digest_in_the_state(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {**state(), "checksum": "sha256:" + "0" * 64})
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert sorted(loaded) == sorted(state()) and loaded["step"] == 7


# ----------------------------------------------------------------------------------- reading
def test_reading_failures_become_the_callers_error(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, state())

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(CheckpointError, match=f"^not enough memory to read checkpoint {path}$"):
        load_checkpoint(path)
    with pytest.raises(WeightsError, match=f"^not enough memory to read weight file {path}$"):
        read_state_dict(path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("\n  bad zip\nmore")))
    with pytest.raises(CheckpointError, match=r"x is truncated or corrupted and cannot be read \(RuntimeError: bad zip\)$"):
        read_torch_file(path, "x")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(KeyError()))
    with pytest.raises(CheckpointError, match=r"x is truncated or corrupted and cannot be read \(KeyError: \)$"):
        read_torch_file(path, "x")
    monkeypatch.undo()
    assert read_torch_file(path, "x")["step"] == 7


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unpickling_errors_name_the_refused_global_or_the_damage(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match=r"^x holds objects other than tensors and plain data \(posix.getcwd\); refused"):
        read_torch_file(tmp_path / "code.pt", "x")
    (tmp_path / "bad.pt").write_bytes(pickle.dumps({"model": Payload()}, protocol=4))  # an opcode torch does not read
    with pytest.raises(CheckpointError, match=r"^x is truncated or corrupted and cannot be read: Unsupported operand 149$"):
        read_torch_file(tmp_path / "bad.pt", "x")
    assert checkpoint._unpickler_reason("Weights only load failed.\n(1) advice\nWeightsUnpickler error: bad opcode\n") == \
        "bad opcode"
    assert checkpoint._unpickler_reason("Weights only load failed.\nCheck the documentation\n  the reason  \ndetails\n") == \
        "the reason"
    assert checkpoint._unpickler_reason("\n(1) x\n(2) y\n") == "unreadable pickle"
    assert checkpoint._unpickler_reason("WeightsUnpickler error: " + "y" * 300) == "y" * 200


def test_load_checkpoint_wants_a_training_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=f"^no checkpoint at {tmp_path / 'none.pt'}$"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path)  # a folder
    for content in [[1, 2], {"model": {}}, {"config": {}}]:
        torch.save(content, tmp_path / "c.pt")
        with pytest.raises(CheckpointError, match="is not a densenet training checkpoint"):
            load_checkpoint(tmp_path / "c.pt")
    torch.save({"model": {}, "config": {}}, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt") == {"model": {}, "config": {}}


# ----------------------------------------------------------------------------------- writing
def flaky_fsync(monkeypatch, errors: list[int]) -> list[int]:
    """Make the next ``len(errors)`` fsyncs of files fail with those errnos; returns the fsync count."""
    calls, real = [], os.fsync

    def fsync(fd):
        calls.append(fd)
        if errors:
            err = errors.pop(0)
            raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    return calls


def test_transient_errors_are_retried_with_growing_pauses(tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(checkpoint.time, "sleep", sleeps.append)
    flaky_fsync(monkeypatch, [errno.EIO, errno.EAGAIN])
    save_checkpoint(tmp_path / "c.pt", state(), retries=2, retry_delay=0.5)
    assert sleeps == [0.5, 1.0]
    assert load_checkpoint(tmp_path / "c.pt")["step"] == 7
    sleeps.clear()
    flaky_fsync(monkeypatch, [errno.ETIMEDOUT, errno.EINTR, errno.EIO, errno.EIO])
    with pytest.raises(CheckpointError, match=r"\[EIO\] \(tried 4 times\);.* the disk reported an I/O error"):
        save_checkpoint(tmp_path / "d.pt", state(), retries=3, retry_delay=2.0)
    assert sleeps == [2.0, 4.0, 6.0]
    assert not (tmp_path / "d.pt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_retries_zero_or_one_still_write_once(tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(checkpoint.time, "sleep", sleeps.append)
    for retries in [0, 1]:
        save_checkpoint(tmp_path / f"c{retries}.pt", state(step=retries), retries=retries, retry_delay=0.5)
        assert load_checkpoint(tmp_path / f"c{retries}.pt")["step"] == retries
    flaky_fsync(monkeypatch, [errno.EIO])
    save_checkpoint(tmp_path / "again.pt", state(), retries=1, retry_delay=0.5)  # one retry
    assert sleeps == [0.5] and load_checkpoint(tmp_path / "again.pt")["step"] == 7
    flaky_fsync(monkeypatch, [errno.EIO])
    with pytest.raises(CheckpointError, match=r"\[EIO\]; the last complete"):  # no retry
        save_checkpoint(tmp_path / "never.pt", state(), retries=0, retry_delay=0.5)
    assert sleeps == [0.5] and not (tmp_path / "never.pt").exists()


@pytest.mark.parametrize("err, fix", [
    (errno.ENOSPC, "free space on the disk of {folder} (or move the run to another disk)"),
    (errno.EDQUOT, "free space within your disk quota for {folder}"),
    (errno.EFBIG, "the file size limit (ulimit -f)"),
    (errno.EACCES, "make {folder} writable for this user"),
    (errno.EPERM, "make {folder} writable for this user"),
    (errno.EROFS, "{folder} is on a read-only file system"),
    (errno.ENOENT, "fix the cause"),
])
def test_permanent_errors_are_not_retried_and_name_the_fix(tmp_path, monkeypatch, err, fix):
    sleeps = []
    monkeypatch.setattr(checkpoint.time, "sleep", sleeps.append)
    calls = flaky_fsync(monkeypatch, [err] * 5)
    with pytest.raises(CheckpointError) as raised:
        save_rotating(tmp_path, state())
    message = str(raised.value)
    assert len(calls) == 1 and sleeps == []
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'checkpoint.pt'}: {os.strerror(err)} "
                              f"[{errno.errorcode[err]}]; the last complete checkpoint in {tmp_path} is kept; ")
    assert fix.format(folder=tmp_path) in message and message.endswith(f", then continue the run with --resume {tmp_path}")
    assert "tried" not in message and list(tmp_path.iterdir()) == []


def test_save_rotating_keeps_the_previous_and_clears_only_its_own_temporaries(tmp_path):
    for name in [".checkpoint.pt.abc.tmp", ".checkpoint.pt.x.tmp"]:
        (tmp_path / name).write_bytes(b"left by a killed writer")
    for name in [".other.pt.abc.tmp", "checkpoint.pt.tmp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"not ours")
    assert save_rotating(tmp_path, state(step=1)) == tmp_path / "checkpoint.pt"
    assert not (tmp_path / "checkpoint.prev.pt").exists()
    save_rotating(tmp_path, state(step=2))
    save_rotating(tmp_path, state(step=3), name="last.pt", previous="before.pt")
    save_rotating(tmp_path, state(step=4), name="last.pt", previous="before.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".other.pt.abc.tmp", "checkpoint.pt.tmp", "notes.txt", "checkpoint.pt", "checkpoint.prev.pt", "last.pt",
         "before.pt"])
    steps = {name: load_checkpoint(tmp_path / name)["step"]
             for name in ["checkpoint.pt", "checkpoint.prev.pt", "last.pt", "before.pt"]}
    assert steps == {"checkpoint.pt": 2, "checkpoint.prev.pt": 1, "last.pt": 4, "before.pt": 3}


# ----------------------------------------------------------------------------------- atomic writes
def test_atomic_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old é")
    assert target.read_text() == "old é"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "full"), KeyboardInterrupt()])
def test_a_failed_atomic_write_keeps_the_old_file(tmp_path, error):
    target = tmp_path / "f.txt"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_open(target) as f:
        f.write(b"half of the new")
        raise error
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.txt"]
    rotated = []
    with pytest.raises(OSError), atomic_open(target, lambda: rotated.append(1)) as f:
        raise OSError(errno.EIO, "bad")
    assert rotated == [] and target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.txt"]


def test_atomic_open_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    events = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)

    def before():
        events.append(("before", target.read_bytes()))
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".f.bin.") and p.name.endswith(".tmp")]
        assert len(temps) == 1 and temps[0].read_bytes() == b"new"

    with atomic_open(target, before) as f:
        f.write(b"new")
    assert events[0][0] == "fsync" and events[0][1].startswith(".f.bin.")
    assert events[1:] == [("before", b"old"), ("replace", "f.bin"), ("fsync", tmp_path.name)]
    assert target.read_bytes() == b"new"

    def no_folder_open(path, flags, *a, **k):  # some file systems cannot open a folder for fsync
        if Path(path) == tmp_path:
            raise OSError(errno.EACCES, "no")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(atomic.os, "open", no_folder_open)
    events.clear()
    atomic_write_bytes(target, b"newer")
    assert target.read_bytes() == b"newer" and [e[0] for e in events] == ["fsync", "replace"]


def test_an_error_reported_after_the_rename_is_the_one_raised(tmp_path, monkeypatch):
    """A network file system may report a failure of a rename that happened: the temporary is gone
    then, and the caller sees the rename's error (not a FileNotFoundError from the clean-up)."""
    real = os.replace

    def replace_then_fail(src, dst):
        real(src, dst)
        raise OSError(errno.EIO, "reply lost")

    monkeypatch.setattr(atomic.os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="reply lost"), atomic_open(tmp_path / "f.bin") as f:
        f.write(b"new")
    assert os.listdir(tmp_path) == ["f.bin"]
