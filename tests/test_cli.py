"""The `densenet` command and the README's examples."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from densenet.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_models_table_matches_the_registry_and_the_readme(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = {cells(l)[0]: cells(l) for l in out[2:]}
    assert rows["densenet_bc100_k12"][1:5] == ["100", "12", "BC", "769,162"]
    assert rows["densenet264"][4] == rows["densenet264"][5] == "33,337,704"
    assert len(rows) == 11 and all(r[4] == r[5] for r in rows.values())
    assert float(rows["densenet121"][7]) == pytest.approx(2.83, abs=0.01)  # ~2.9 GFLOPs in the paper's Table 1 sense
    readme = (ROOT / "README.md").read_text()
    for name, row in rows.items():
        assert "| " + " | ".join(row) + " |" in readme, f"README's models table is out of date for {name}"


def test_info(capsys):
    assert main(["info", "densenet_bc100_k12"]) == 0
    out = capsys.readouterr().out
    assert "769,162" in out
    assert re.search(r"denseblock1 \(16 layers\)\s*\|\s*24\s*\|\s*216\s*\|\s*32x32", out)
    assert re.search(r"transition2\s*\|\s*300\s*\|\s*150\s*\|\s*8x8", out)
    assert main(["info", "densenet121", "--input-size", "64"]) == 0
    assert re.search(r"denseblock4 .*\|\s*2x2", capsys.readouterr().out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "densenet12"], "unknown model 'densenet12'; did you mean 'densenet121'"),
        (["info", "densenet_bc99_k12"], "L - 4 must be a positive multiple of 6"),
        (["info", "densenet121", "--input-size", "16"], "too small"),
    ],
)
def test_bad_input_is_a_clear_message_not_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_entry_point_and_module():
    out = subprocess.run([sys.executable, "-m", "densenet", "info", "densenet40_k12"], capture_output=True, text=True, check=True)
    assert "1,019,722" in out.stdout


def test_readme_quick_start_runs_as_pasted():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", readme, re.DOTALL).group(1)
    out = subprocess.run([sys.executable, "-c", block], check=False, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "769162" in out.stdout and "torch.Size([8, 10])" in out.stdout


def test_every_readme_train_command_resolves_to_a_valid_run():
    import shlex

    from densenet.cli import build_parser
    from densenet.config import resolve_config
    from densenet.data import DATASETS
    from densenet.paper import TABLE2, TABLE3

    readme = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())  # join continued lines
    commands = [c for c in re.findall(r"densenet train [^`\n|]*", readme) if "NAME" not in c and "--help" not in c]  # not the synopsis
    assert len(commands) >= sum(e is not None for row in TABLE2.values() for e in row) + len(TABLE3)
    seen = set()
    for command in commands:
        argv = shlex.split(command.split("#")[0])[1:]
        args = build_parser().parse_args(argv)
        overrides = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config", "resume", "force")}
        config = resolve_config(overrides)
        assert config.dataset in DATASETS
        create = __import__("densenet").model_spec(config.model)
        seen.add((config.model, config.dataset))
        if config.dataset == "imagenet":
            assert (config.epochs, config.batch_size) == (90, 256) and create.input_size == 224
    for model, errors in TABLE2.items():
        for dataset, error in zip(("cifar10", "cifar10+", "cifar100", "cifar100+", "svhn"), errors):
            assert error is None or (model, dataset) in seen, (model, dataset)
