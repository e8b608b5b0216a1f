"""Faults: kills during checkpoint writes, failing disks, corrupted checkpoints, two runs in one
folder, and the memory estimate against measured peaks (issue 8, points 1, 2, 3, 5 and 6)."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import densenet.io.atomic as atomic_mod
from densenet import create_model, read_state_dict
from densenet.io.checkpoint import (
    CheckpointError,
    content_digest,
    load_checkpoint,
    save_checkpoint,
    save_rotating,
)
from densenet.models.weights import WeightsError
from densenet.training.config import ConfigError
from densenet.training.loop import load_checkpoint_for_resume
from densenet.training.memory import (
    MemoryLimitError,
    available_memory,
    check_memory,
    estimate_memory,
)
from densenet.training.runlock import RunLock, RunLockError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def state_of(step: int, numel: int = 1000) -> dict:
    """A checkpoint-shaped state whose every number tells which step wrote it."""
    return {"format": "densenet-checkpoint-v1", "config": {"model": "test"}, "step": step, "epoch": 0,
            "model": {"w": torch.full((numel,), float(step)), "b": torch.arange(7) + step},
            "optimizer": {"state": {0: {"momentum_buffer": torch.full((numel // 2,), -float(step))}}, "param_groups": []},
            "history": [{"epoch": 1, "train_loss": 0.5}], "rng": torch.get_rng_state()}


def assert_state_is(state: dict, step: int) -> None:
    assert state["step"] == step
    assert torch.equal(state["model"]["w"], torch.full_like(state["model"]["w"], float(step)))
    assert torch.equal(state["optimizer"]["state"][0]["momentum_buffer"],
                       torch.full_like(state["optimizer"]["state"][0]["momentum_buffer"], -float(step)))


# ----------------------------------------------------------------------------------- 1: kill during writes
# A long-lived process that has imported torch forks one writer per round (so a round costs no
# interpreter start): the writer resumes from the run folder exactly as training does, then writes
# checkpoints in a loop through save_rotating, reporting each one it completed.
ZYGOTE = r"""
import os, sys
from pathlib import Path
import torch
from densenet.io.checkpoint import save_rotating
from densenet.training.config import ConfigError
from densenet.training.loop import load_checkpoint_for_resume
out, progress, numel = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
for command in sys.stdin:
    if command.startswith("kill"):
        pid = int(command.split()[1])
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("dead", flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        try:
            n = load_checkpoint_for_resume(out)["step"]
        except ConfigError:
            n = 0
        fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"start %d %d\n" % (os.getpid(), n))
        while True:
            n += 1
            save_rotating(out, {"format": "densenet-checkpoint-v1", "config": {"n": n}, "step": n,
                                "model": {"w": torch.full((numel,), float(n))},
                                "optimizer": {"state": {0: {"momentum_buffer": torch.full((numel // 2,), -float(n))}},
                                              "param_groups": []}})
            os.write(fd, b"saved %d\n" % n)
    print(pid, flush=True)
"""


def kill_writers(tmp_path: Path, rounds: int, seed: int, numel: int = 400_000) -> dict:
    """SIGKILL checkpoint writers at random moments ``rounds`` times; after each kill, resume's
    loader must find the newest complete checkpoint. Returns the counts."""
    out, progress = tmp_path / "run", tmp_path / "progress.txt"
    out.mkdir()
    rng = random.Random(seed)
    errors = (tmp_path / "writers.err").open("w")  # (resume's fallback warnings land here)
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(out), str(progress), str(numel)], cwd=ROOT, env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
    counts = {"tried": 0, "lost": 0, "resumed": 0, "mid_write": 0, "between_renames": 0, "checkpoints_written": 0}
    try:
        assert zygote.stdout.readline().strip() == "ready"
        newest_reported = resume_expected = 0
        for _ in range(rounds):
            assert zygote.poll() is None, (tmp_path / "writers.err").read_text()
            zygote.stdin.write("fork\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            deadline = time.time() + 60
            while f"start {pid} " not in (progress.read_text() if progress.exists() else ""):
                assert time.time() < deadline, "writer did not start"
                time.sleep(0.002)
            resumed_at = int(progress.read_text().split(f"start {pid} ")[1].split()[0])
            assert resumed_at == resume_expected, "the writer did not resume from the checkpoint found after the kill"
            counts["resumed"] += resumed_at > 0
            # the checkpoint resumed from is complete, though a kill may have cut off its "saved" line
            newest_reported = max(newest_reported, resumed_at)
            while counts["tried"] == 0 and "saved 1\n" not in progress.read_text():
                assert time.time() < deadline, "the first writer wrote no checkpoint"
                time.sleep(0.002)  # the first writer completes one checkpoint: every later one resumes
            time.sleep(rng.uniform(0, 0.25))  # a random moment of the write loop
            zygote.stdin.write(f"kill {pid}\n")
            zygote.stdin.flush()
            assert zygote.stdout.readline().strip() == "dead"
            counts["tried"] += 1
            lines = progress.read_text().splitlines()
            saved = [int(line.split()[1]) for line in lines if line.startswith("saved")]
            newest_reported = max([newest_reported, *saved])
            counts["mid_write"] += any(p.name.endswith(".tmp") for p in out.iterdir())
            counts["between_renames"] += not (out / "checkpoint.pt").exists() and (out / "checkpoint.prev.pt").exists()
            try:
                state = load_checkpoint_for_resume(out)
            except ConfigError:
                counts["lost"] += newest_reported > 0  # nothing loads although a checkpoint was completed
                continue
            step = state["step"]
            # the newest complete checkpoint, or the one whose "saved" line the kill cut off
            if step < newest_reported or step > newest_reported + 1:
                counts["lost"] += 1
            assert torch.equal(state["model"]["w"], torch.full((numel,), float(step)))
            assert torch.equal(state["optimizer"]["state"][0]["momentum_buffer"], torch.full((numel // 2,), -float(step)))
            resume_expected = step
        counts["checkpoints_written"] = newest_reported
    finally:
        zygote.kill()
        zygote.wait()
        errors.close()
    return counts


def test_sigkill_during_checkpoint_writes_loses_nothing(tmp_path):
    counts = kill_writers(tmp_path, rounds=30, seed=1)
    print(f"\nkill during checkpoint writes: {counts}")
    assert counts["tried"] == 30 and counts["lost"] == 0 and counts["resumed"] == 29
    assert counts["checkpoints_written"] > 30  # the kills did land while checkpoints were being written
    assert counts["mid_write"] > 0  # and some in the middle of a write


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_many_times(tmp_path):
    counts = kill_writers(tmp_path, rounds=300, seed=2)
    print(f"\nkill during checkpoint writes (slow): {counts}")
    assert counts["tried"] == 300 and counts["lost"] == 0 and counts["mid_write"] > 0


def test_save_rotating_keeps_two_and_removes_stale_temporaries(tmp_path):
    (tmp_path / ".checkpoint.pt.dead.tmp").write_bytes(b"left by a killed writer")
    for step in (1, 2, 3):
        save_rotating(tmp_path, state_of(step))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert_state_is(load_checkpoint(tmp_path / "checkpoint.pt"), 3)
    assert_state_is(load_checkpoint(tmp_path / "checkpoint.prev.pt"), 2)


@pytest.mark.slow
def test_sigkill_real_training_at_random_moments_then_resume(tmp_path):
    """End to end: `densenet train` killed three times at random moments, resumed each time, finishes."""
    out = tmp_path / "run"
    args = ["--model", "densenet_bc16_k8", "--dataset", "cifar10", "--batch-size", "16", "--train-subset", "160",
            "--test-subset", "32", "--epochs", "2", "--checkpoint-every", "1", "--threads", "1", "--quiet",
            "--workers", "0"]
    rng = random.Random(3)
    command = [sys.executable, "-m", "densenet", "train", *args, "--out", str(out)]
    for _ in range(3):
        proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint_for_resume(out)  # something always loads
        assert state["epoch"] * 10 + state["step"] >= 1
        command = [sys.executable, "-m", "densenet", "train", "--resume", str(out), "--quiet"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    final = load_checkpoint(out / "checkpoint.pt")
    assert (final["epoch"], final["step"]) == (2, 0) and len(final["history"]) == 2


# ----------------------------------------------------------------------------------- 2: failing disk
class FailingFile:
    """A file object whose writes fail with ``err`` once ``budget`` bytes went through (a disk filling up)."""

    def __init__(self, f, err: int, budget: int) -> None:
        self._f, self._err, self._budget = f, err, budget

    def write(self, data) -> int:
        if self._budget < len(data):
            n = max(self._budget, 0)
            self._f.write(bytes(memoryview(data)[:n]))
            self._budget = -1
            raise OSError(self._err, os.strerror(self._err))
        self._budget -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def inject(monkeypatch, where: str, err: int, times: int = 10**9) -> list[int]:
    """Make the ``where`` step of atomic writes fail with ``err`` (the first ``times`` times); returns a call counter."""
    calls = [0]

    def failing(real):
        def wrapper(*a, **kw):
            if where == "rename" and not str(a[0]).endswith(".tmp"):
                return real(*a, **kw)  # the rotation goes through; renaming the new file into place fails
            calls[0] += 1
            if calls[0] <= times:
                if where == "write":
                    return FailingFile(real(*a, **kw), err, budget=1000)
                raise OSError(err, os.strerror(err))
            return real(*a, **kw)
        return wrapper

    target = {"write": "fdopen", "fsync": "fsync", "create": "mkstemp", "rename": "replace"}[where]
    module = atomic_mod.tempfile if target == "mkstemp" else atomic_mod.os
    monkeypatch.setattr(module, target, failing(getattr(module, target)))
    return calls


@pytest.mark.parametrize("where, err, fix", [
    ("write", errno.ENOSPC, "free space on the disk of"),
    ("write", errno.EDQUOT, "disk quota"),
    ("create", errno.EACCES, "writable"),
    ("create", errno.EROFS, "read-only file system"),
    ("fsync", errno.EIO, "I/O error"),
    ("rename", errno.EIO, "I/O error"),
])
def test_failing_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where, err, fix):
    save_rotating(tmp_path, state_of(1))
    save_rotating(tmp_path, state_of(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = inject(monkeypatch, where, err)
    with pytest.raises(CheckpointError) as raised:
        save_rotating(tmp_path, state_of(3), retry_delay=0)
    message = str(raised.value)
    print(f"\n{errno.errorcode[err]} at {where}: {message}")
    assert str(tmp_path / "checkpoint.pt") in message and os.strerror(err) in message and fix in message
    assert f"--resume {tmp_path}" in message
    retried = err == errno.EIO
    assert calls[0] == (3 if retried else 1)  # I/O errors are tried 3 times, a full disk or permissions once
    assert ("tried 3 times" in message) == retried
    monkeypatch.undo()
    if where == "rename":  # the rename of the new file failed after the rotation: only the previous name holds it
        assert not (tmp_path / "checkpoint.pt").exists()
    else:
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, no temporary left
    assert_state_is(load_checkpoint_for_resume(tmp_path), 2)
    save_rotating(tmp_path, state_of(3))  # the disk is back: writing goes on
    assert_state_is(load_checkpoint(tmp_path / "checkpoint.pt"), 3)


def test_transient_io_error_is_retried(tmp_path, monkeypatch):
    calls = inject(monkeypatch, "fsync", errno.EIO, times=1)
    save_checkpoint(tmp_path / "c.pt", state_of(5), retry_delay=0)
    assert calls[0] >= 2
    assert_state_is(load_checkpoint(tmp_path / "c.pt"), 5)


FULL_DISK = r"""
import resource, signal, sys
from pathlib import Path
import torch
from densenet.io.checkpoint import CheckpointError, save_rotating
out = Path(sys.argv[1])
state = lambda n: {"config": {}, "model": {"w": torch.full((200_000,), float(n))}, "step": n}
save_rotating(out, state(1))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # the kernel refuses bigger files
try:
    save_rotating(out, state(2))
except CheckpointError as e:
    print(e)
"""


def test_real_write_failure_from_the_kernel(tmp_path):
    """Not injected: the kernel refuses the write (file size limit, EFBIG) in a real process."""
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert f"cannot write checkpoint {tmp_path / 'checkpoint.pt'}: File too large [EFBIG]" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


# ----------------------------------------------------------------------------------- 3: corrupted checkpoints
def test_checkpoint_carries_a_digest_and_loads_without_code(tmp_path):
    save_checkpoint(tmp_path / "c.pt", state_of(4))
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # a plain torch file
    assert raw["checksum"] == "sha256:" + content_digest({k: v for k, v in raw.items() if k != "checksum"})
    state = load_checkpoint(tmp_path / "c.pt")
    assert "checksum" not in state
    assert_state_is(state, 4)


def test_old_checkpoints_without_digest_still_load(tmp_path):
    torch.save(state_of(6), tmp_path / "old.pt")
    assert_state_is(load_checkpoint(tmp_path / "old.pt"), 6)


def test_truncated_checkpoints_are_named(tmp_path):
    save_checkpoint(tmp_path / "c.pt", state_of(1))
    data = (tmp_path / "c.pt").read_bytes()
    for cut in [0, 1, 100, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1]:
        (tmp_path / "t.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 't.pt'} is truncated or corrupted"):
            load_checkpoint(tmp_path / "t.pt")


def same(a, b) -> bool:
    """Equal structure, types and values (tensors: dtype, shape and every element), judged without the digest."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(b) is type(a) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(b) is type(a) and a == b


def flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x10]) + data[position + 1:]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bit_flips_are_detected_or_harmless(tmp_path):
    """Every flipped byte either makes loading fail with a CheckpointError or leaves the content
    exactly as written (bytes the reader never uses); inside tensor data it is always detected."""
    state = state_of(9, numel=256)
    save_checkpoint(tmp_path / "c.pt", state)
    data = (tmp_path / "c.pt").read_bytes()
    tensor = state["model"]["w"].numpy().tobytes()
    start = data.find(tensor)
    assert start > 0
    detected = harmless = 0
    in_data = range(start, start + len(tensor))
    for position in range(len(data)):  # every byte
        (tmp_path / "f.pt").write_bytes(flip(data, position))
        try:
            loaded = load_checkpoint(tmp_path / "f.pt")
        except CheckpointError as e:
            assert str(tmp_path / "f.pt") in str(e)
            detected += 1
            continue
        assert position not in in_data, f"a flip in tensor data at byte {position} went unnoticed"
        assert same(loaded, state), f"flip at byte {position} changed the content unnoticed"
        harmless += 1
    print(f"\nbit flips in a {len(data)}-byte checkpoint: {detected + harmless} tried, {detected} detected, "
          f"{harmless} in bytes the reader ignores (content intact), 0 silently wrong")
    assert detected > harmless


def test_digest_mismatch_message_and_resume_falls_back(tmp_path, capsys):
    save_rotating(tmp_path, state_of(1))
    save_rotating(tmp_path, state_of(2))
    data = (tmp_path / "checkpoint.pt").read_bytes()
    start = data.find(state_of(2)["model"]["w"].numpy().tobytes())
    (tmp_path / "checkpoint.pt").write_bytes(flip(data, start + 5))
    with pytest.raises(CheckpointError, match="does not match the SHA-256 digest written with it"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(WeightsError, match="does not match the SHA-256 digest"):  # --init and export check it too
        read_state_dict(tmp_path / "checkpoint.pt")
    assert_state_is(load_checkpoint_for_resume(tmp_path), 1)
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'checkpoint.pt'} is corrupted" in err and "resuming from the previous" in err
    (tmp_path / "checkpoint.prev.pt").write_bytes(data[:1000])
    with pytest.raises(ConfigError, match="cannot resume .*is corrupted.*truncated or corrupted"):
        load_checkpoint_for_resume(tmp_path)


# ----------------------------------------------------------------------------------- 5: run-folder lock
HOLDER = r"""
import os, sys, time
from densenet.training.runlock import RunLock
RunLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # a forked worker (as data loaders have) must not keep the lock alive
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_second_training_in_a_run_folder_is_refused_until_the_holder_dies(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              text=True)
    worker = int(holder.stdout.readline())
    try:
        with pytest.raises(RunLockError) as refused:
            RunLock(out).acquire()
        message = str(refused.value)
        assert f"pid {holder.pid} on host" in message and "in use by another training" in message
        assert isinstance(refused.value, ConfigError)  # the CLI reports it as a usage error
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with RunLock(out) as lock:  # the dead process's lock is gone, though its forked worker lives
            assert lock.held and f"pid {os.getpid()}" in (out / ".lock").read_text()
            with pytest.raises(RunLockError, match="already in use by a training in this process"):
                RunLock(out).acquire()
            assert lock.held  # the refused attempt did not drop the lock
        again = RunLock(out)
        again.acquire()
        again.release()
    finally:
        holder.kill()
        os.kill(worker, signal.SIGKILL)
        holder.wait()


PROBE = r"""
import sys
from densenet.training.runlock import RunLock, RunLockError
try:
    RunLock(sys.argv[1]).acquire()
except RunLockError as e:
    print(e)
"""


def test_lock_is_released_on_exit_and_creates_the_folder(tmp_path):
    out = tmp_path / "new" / "run"
    with RunLock(out):
        assert out.is_dir()
        probe = subprocess.run([sys.executable, "-c", PROBE, str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                               check=False)
        assert f"pid {os.getpid()}" in probe.stdout
    lock = RunLock(out)
    lock.acquire()
    lock.release()
    lock.release()  # twice is fine


# ----------------------------------------------------------------------------------- 6: memory estimate
MEASURE = r"""
import ctypes, gc, json, sys
import torch, torch.nn.functional as F
from densenet import create_model
from densenet.training.memory import estimate_memory
name, batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
efficient, drop, training = sys.argv[4] == "1", float(sys.argv[5]), sys.argv[6] == "1"
torch.set_num_threads(1)
def kib(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
model = create_model(name, num_classes=10, memory_efficient=efficient, drop_rate=drop).train(training)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
params = sum(p.numel() for p in model.parameters()) * 4
def step():
    if not training:
        with torch.no_grad():
            model(x)
        return
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
base = kib("VmRSS:")  # the process with the model and the batch: the weights are part of it
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
step()
peak = kib("VmHWM:")
estimate = estimate_memory(model, batch, size, training=training)
print(json.dumps({"measured": peak - base + params + x.numel() * 4, "estimate": estimate.total}))
"""

CASES = [  # model, batch, image size, memory_efficient, drop rate, training
    ("densenet_bc40_k12", 32, 32, False, 0.0, True),  # fast shared-buffer blocks
    ("densenet_bc40_k12", 32, 32, True, 0.0, True),  # memory-efficient blocks
    ("densenet_bc40_k12", 16, 32, False, 0.1, True),  # dropout: layer-by-layer blocks
    ("densenet40_k12", 16, 32, False, 0.0, True),  # basic (no bottleneck)
    ("densenet_bc40_k12", 128, 32, False, 0.0, False),  # an evaluation batch
]
SLOW_CASES = [
    ("densenet_bc100_k12", 64, 32, False, 0.0, True),
    ("densenet_bc100_k12", 64, 32, True, 0.0, True),
    ("densenet_bc100_k12", 16, 32, False, 0.2, True),
    ("densenet121", 8, 64, False, 0.0, True),
    ("densenet121", 8, 64, True, 0.0, True),
    ("densenet_bc100_k12", 256, 32, False, 0.0, False),
]


def measure(case: tuple) -> dict:
    args = [str(int(a)) if isinstance(a, bool) else str(a) for a in case]
    done = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_estimates(cases: list[tuple]) -> None:
    with ThreadPoolExecutor(2) as pool:  # each in a fresh process; two at a time
        results = list(pool.map(measure, cases))
    rows = ["model               batch  size  mode                 measured   estimate  estimate/measured"]
    for (name, batch, size, efficient, drop, training), r in zip(cases, results):
        mode = "eval" if not training else "memory-efficient" if efficient else "dropout (layered)" if drop else "fast"
        ratio = r["estimate"] / r["measured"]
        rows.append(f"{name:19s} {batch:5d} {size:5d}  {mode:18s} {r['measured'] / 2**20:8.0f} MiB "
                    f"{r['estimate'] / 2**20:6.0f} MiB"
                    f"  {ratio:5.2f}")
        r["ratio"] = ratio
    print("\npeak memory of one step (fresh process, 1 thread), measured as VmHWM above the RSS before it:\n"
          + "\n".join(rows))
    assert all(0.67 <= r["ratio"] <= 1.5 for r in results), rows


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_memory_estimate_against_measured_peak():
    check_estimates(CASES)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_memory_estimate_against_measured_peak_larger_models():
    check_estimates(SLOW_CASES)


def test_memory_check_stops_with_a_useful_message():
    model = create_model("densenet_bc100_k12")
    estimate = estimate_memory(model, 64, 32, name="densenet_bc100_k12")
    assert estimate.efficient_total < estimate.total
    check_memory(estimate, (estimate.total * 2, "test"))  # fits: nothing happens
    check_memory(estimate, None if available_memory() else 0)
    with pytest.raises(MemoryLimitError) as stopped:
        check_memory(estimate, (estimate.total // 2, "MemAvailable in /proc/meminfo"))
    message = str(stopped.value)
    print(f"\n{message}")
    assert "densenet_bc100_k12, batch 64 at 32x32" in message and "MemAvailable" in message
    assert "--memory-efficient" in message and "--batch-size of at most" in message
    batch = int(message.split("--batch-size of at most ")[1].split()[0])
    assert estimate_memory(model, batch, 32).total <= estimate.total // 2 * 0.9 < estimate_memory(model, batch + 1, 32).total
    with pytest.raises(MemoryLimitError, match="x 4 processes"):
        check_memory(estimate, (estimate.total * 2, "test"), processes=4)
    lean = estimate_memory(create_model("densenet_bc100_k12", memory_efficient=True), 64, 32)
    assert lean.total == estimate.efficient_total and lean.efficient_total is None
    with pytest.raises(MemoryLimitError, match="even one image does not fit"):
        check_memory(estimate, (10 << 20, "test"))


def test_available_memory_reads_this_machine():
    found = available_memory("cpu")
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo")
    assert found is not None and found[0] > 0
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    assert found[0] <= meminfo["MemTotal"]


def test_estimate_tracks_the_structure():
    small, big = create_model("densenet_bc40_k12"), create_model("densenet_bc100_k12")
    assert estimate_memory(small, 32, 32).total < estimate_memory(big, 32, 32).total
    a, b = estimate_memory(big, 32, 32), estimate_memory(big, 64, 32)
    assert b.total - a.total == 32 * a.per_image  # activations are proportional to the batch
    frozen = create_model("densenet_bc100_k12")
    frozen.features.requires_grad_(False)
    assert estimate_memory(frozen, 64, 32).total < estimate_memory(big, 64, 32, training=False).total * 1.5
    with pytest.raises(TypeError):
        estimate_memory(torch.nn.Linear(2, 2), 1, 32)
