"""densenet.training.allocator: freed memory kept for reuse (no page faults the second time), and left
alone where the user said so; each case in a fresh process, since malloc's settings are the process's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")

PROBE = r"""
import json, resource, sys, torch
from densenet import create_model
from densenet.training import allocator
kept = allocator.keep_freed_memory()
torch.manual_seed(0)
model = create_model("densenet_bc40_k12", num_classes=10)
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [faults_of_a_step() for _ in range(int(sys.argv[1]))] or [0]
print(json.dumps({"kept": kept, "status": allocator.status(), "first": faults[0], "later": sum(faults[1:])}))
"""


def probe(steps: int = 4, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "DENSENET_KEEP_FREED_MEMORY" and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE, str(steps)], env={**environ, **env}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_training_steps_memory_is_reused_without_page_faults():
    """Measured (2026-12-08, Zen 3): steps 2-4 of this BC-40 batch faulted about 70,000 pages in all with
    malloc's defaults, about 15,000 with freed memory kept; the first step about 60,000-80,000 either way."""
    kept, default = probe(), probe(DENSENET_KEEP_FREED_MEMORY="0")
    assert kept["kept"] and "DENSENET_KEEP_FREED_MEMORY=0" in kept["status"]
    assert not default["kept"] and default["status"] == ""
    assert default["later"] > 0.5 * default["first"], default  # what the setting is for: the pages fault in again
    assert kept["later"] < 0.4 * default["later"], (kept, default)


@pytest.mark.parametrize("setting", ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_"])
def test_a_users_own_malloc_settings_are_left_alone(setting):
    assert not probe(0, **{setting: "1048576"})["kept"]


@pytest.mark.parametrize(("device", "memory_efficient", "asked"), [("cpu", False, True), ("cpu", True, False),
                                                                   ("meta", False, False)])
def test_densenet_train_asks_for_it_on_the_cpu_unless_memory_efficient(monkeypatch, device, memory_efficient, asked):
    import torch

    from densenet.training import allocator, loop
    from densenet.training.config import TrainConfig

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    seed = torch.initial_seed()
    try:
        loop.configure_runtime(TrainConfig(memory_efficient=memory_efficient), torch.device(device))
    finally:
        torch.manual_seed(seed)
    assert bool(calls) == asked
