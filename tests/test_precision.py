"""The training precision: --amp auto picks bf16 on CPUs with bfloat16 instructions, the choice is
written into config.yaml (a resumed run keeps it), and bad choices are refused with the fix."""
import pytest
import torch
import yaml

import densenet.training.precision as precision
from densenet.cli import main
from densenet.training.config import ConfigError
from densenet.training.precision import check_precision, resolve_amp

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("found, expected", [("AMX and AVX512_BF16", "bf16"), ("AVX512_BF16", "bf16"), (None, "off")])
def test_auto_is_bf16_exactly_where_the_cpu_has_bfloat16_instructions(monkeypatch, found, expected):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: found)
    assert resolve_amp("auto", CPU) == expected
    assert resolve_amp("auto", CUDA) == "off"  # GPUs: as before, a choice of the user's
    assert resolve_amp("none", CPU) == resolve_amp("off", CPU) == "off"
    assert resolve_amp("bf16", CPU) == "bf16"


def test_choices_give_their_dtype_and_refusals_name_the_fix(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: "AVX512_BF16")
    assert check_precision("off", CPU) == (None, False)
    assert check_precision("bf16", CPU) == (torch.bfloat16, False)
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA GPU.*--amp bf16"):
        check_precision("fp16", CPU)
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: None)
    with pytest.warns(UserWarning, match="no bfloat16 instructions.*slower than float32.*--amp off"):
        assert check_precision("bf16", CPU) == (torch.bfloat16, False)


def test_the_plan_says_why_and_config_yaml_keeps_the_concrete_choice(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: "AMX")
    out = tmp_path / "run"
    args = ["train", "--model", "densenet_bc16_k8", "--epochs", "1", "--train-subset", "64", "--test-subset", "32",
            "--batch-size", "32", "--quiet", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "amp bf16 (by default on this CPU: it has " in printed and "; --amp off for float32)" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["amp"] == "bf16"
    assert main(args[:-2] + ["--amp", "none", "--out", str(tmp_path / "f32")]) == 0
    assert ", float32" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "f32" / "config.yaml").read_text())["amp"] == "off"
    assert main(args[:-2] + ["--amp", "fp8", "--out", str(tmp_path / "bad")]) != 0
    captured = capsys.readouterr()
    assert "amp must be one of auto, bf16, off, none, fp16" in captured.out + captured.err
