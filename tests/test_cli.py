"""The `densenet` command and the README's examples."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from densenet import model_spec
from densenet.analysis.paper import TABLE2, TABLE3
from densenet.cli import build_parser, main
from densenet.data import DATASETS
from densenet.training.config import resolve_config

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


def test_a_bug_is_a_crash_with_its_traceback_not_a_one_line_message(capsys, monkeypatch):
    """Only this project's own errors become one-line messages; anything else (a TypeError of a bug)
    shows its traceback and asks for a report."""
    import densenet.cli as cli

    def broken(model, size):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(cli, "stage_summary", broken)
    assert main(["info", "densenet_bc40_k12"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert "TypeError: unsupported operand" in err and "a bug in densenet" in err and "please report it" in err


def test_num_classes_zero_means_no_classifier(capsys):
    assert main(["info", "densenet_bc40_k12", "--num-classes", "0"]) == 0
    zero = capsys.readouterr().out
    assert main(["info", "densenet_bc40_k12"]) == 0
    ten = capsys.readouterr().out
    assert re.search(r"head \(BN-ReLU, pool, linear\)\s*\|\s*132\s*\|\s*0\s*\|", zero)
    assert re.search(r"head \(BN-ReLU, pool, linear\)\s*\|\s*132\s*\|\s*10\s*\|", ten)
    with pytest.raises(SystemExit):
        main(["info", "densenet_bc40_k12", "--num-classes", "-1"])
    assert "expected an integer of at least 0, got -1" in capsys.readouterr().err


def test_train_flags_take_the_types_of_the_configuration():
    """Every TrainConfig field has a flag whose parsed value has the field's type."""
    from densenet.training.config import TrainConfig, field_types

    values = {int: "3", float: "0.5", str: "x"}
    argv, expected = [], {}
    for name, annotation in field_types().items():
        flag = "--" + name.replace("_", "-")
        if annotation is bool:
            argv.append("--no-" + flag[2:])
            expected[name] = False
            continue
        if getattr(annotation, "__origin__", None) is list:
            argv += [flag, "2", "3"]
            expected[name] = [2, 3]
            continue
        base = next(t for t in getattr(annotation, "__args__", (annotation,)) if t is not type(None))
        if getattr(base, "__origin__", None) is list:  # one value or several (--image-size 96 / 64 96 96)
            argv += [flag, "2", "3"]
            expected[name] = [2, 3]
            continue
        argv += [flag, values[base]]
        expected[name] = base(values[base])
    args = vars(build_parser().parse_args(["train", *argv]))
    assert {k: args[k] for k in expected} == expected
    assert all(type(args[k]) is type(v) for k, v in expected.items())
    assert set(expected) == {f for f in TrainConfig.__dataclass_fields__}


def test_console_entry_point_and_module():
    out = subprocess.run([sys.executable, "-m", "densenet", "info", "densenet40_k12"], capture_output=True, text=True, check=True)
    assert "1,019,722" in out.stdout


@pytest.mark.slow
def test_output_piped_into_a_reader_that_leaves_is_not_a_crash():
    """`densenet models | head -1`: the reader closes the pipe; no traceback, no bug report request."""
    p = subprocess.Popen([sys.executable, "-m", "densenet", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first write
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == "", err


@pytest.mark.slow
def test_readme_quick_start_runs_as_pasted():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", readme, re.DOTALL).group(1)
    out = subprocess.run([sys.executable, "-c", block], check=False, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "769162" in out.stdout and "torch.Size([8, 10])" in out.stdout


def test_every_documented_train_command_resolves_to_a_valid_run():
    """Every `densenet train` command of the README and the pages under docs/ (the recipes page has
    one per row of the paper's Tables 2 and 3) parses and resolves to a valid configuration."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = re.sub(r"\\\n\s*", " ", "\n".join(p.read_text() for p in pages))  # join continued lines
    commands = [c for c in re.findall(r"densenet train [^`\n|]*", text)
                if "NAME" not in c and "--help" not in c]  # not the synopsis
    assert len(commands) >= sum(e is not None for row in TABLE2.values() for e in row) + len(TABLE3)
    seen = set()
    for command in commands:
        argv = shlex.split(command.split("#")[0])[1:]
        args = build_parser().parse_args(argv)
        overrides = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config", "resume", "force")}
        config = resolve_config(overrides)
        assert config.dataset in DATASETS
        create = model_spec(config.model)
        seen.add((config.model, config.dataset))
        if config.dataset == "imagenet":
            assert (config.epochs, config.batch_size) == (90, 256) and create.input_size == 224
    for model, errors in TABLE2.items():
        for dataset, error in zip(("cifar10", "cifar10+", "cifar100", "cifar100+", "svhn"), errors):
            assert error is None or (model, dataset) in seen, (model, dataset)
