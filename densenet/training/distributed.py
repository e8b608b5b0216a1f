"""Multi-process training on torch.distributed, as launched by ``torchrun``.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process;
:func:`setup` reads them, picks the backend (NCCL for CUDA, gloo for CPUs) and joins the group
with a timeout, so a peer that is gone ends a collective with an error instead of a hang.
Without those variables (a plain ``densenet train``) everything here is a no-op for one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError

__all__ = ["Dist", "setup", "teardown", "is_peer_failure", "PEER_HINT"]

PEER_HINT = ("a peer process stopped answering or the rendezvous failed; when run under torchrun with "
             "--max-restarts, the job restarts from its last checkpoint, otherwise continue it with "
             "densenet train --resume OUT")


@dataclass
class Dist:
    """This process's place in the job: ``rank`` of ``world_size``; ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: 0 on the first attempt
    local_world_size: int = 1  # processes on this machine (they share its memory)
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes logs, curves, checkpoints and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Elementwise sum of ``values`` over all processes (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (pickled between this job's own processes)."""
        if not self.enabled:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device_name: str, backend: str = "auto", timeout_s: int = 600) -> tuple[Dist, str]:
    """Join the process group that torchrun describes in the environment, if any.

    Returns the :class:`Dist` and the device name this process should use (``cuda:LOCAL_RANK``
    for ``auto``/``cuda`` under torchrun with GPUs).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    d = Dist(rank=_env_int("RANK", 0), world_size=world_size, local_rank=_env_int("LOCAL_RANK", 0),
             restart=_env_int("TORCHELASTIC_RESTART_COUNT", 0), local_world_size=_env_int("LOCAL_WORLD_SIZE", 1))
    if world_size <= 1:
        return d, device_name
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not: no rendezvous to join. Launch "
            f"multi-process training with torchrun (torchrun --nproc_per_node N -m densenet train ...), "
            f"or unset WORLD_SIZE for one process")
    if not 0 <= d.rank < world_size:
        raise ConfigError(f"RANK={d.rank} is not in 0..WORLD_SIZE-1 ({world_size})")
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if cuda:
        if d.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={d.local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                              f"use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(d.local_rank)
        device_name = f"cuda:{d.local_rank}"
    if backend == "auto":
        backend = "nccl" if device_name.startswith("cuda") else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"dist_backend must be auto, nccl or gloo, got {backend!r}")
    if backend == "nccl" and not device_name.startswith("cuda"):
        raise ConfigError("dist_backend nccl needs CUDA devices; on CPUs use --dist-backend gloo (or auto)")
    try:
        # the store of torchrun's agent outlives a restart: keys of this attempt get their own prefix,
        # so that no rank reads a peer address left by a process of the failed attempt
        store, _, _ = next(dist.rendezvous("env://", d.rank, world_size, timeout=timedelta(seconds=timeout_s)))
        store = dist.PrefixStore(f"densenet/attempt{d.restart}", store)
        dist.init_process_group(backend, store=store, rank=d.rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"could not join the process group ({backend}, rank {d.rank} of {world_size}) at "
                          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {e}") from None
    d.backend = backend
    return d, device_name


def teardown(d: Dist, clean: bool) -> None:
    """Leave the group: after a barrier when every rank finished (gloo aborts a process that
    leaves while a peer still talks to it); at once after a failure (a peer may be gone)."""
    if d.enabled and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because a peer is gone or timed out."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset", "Timed out", "timed out", "Broken pipe",
        "NCCL", "Gloo", "gloo", "ProcessGroup"))
