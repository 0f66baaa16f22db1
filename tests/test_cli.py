"""The `peftkit` command: errors in one line with exit 2, and train -> inspect/generate/merge."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_model_dir
from tiny_run import write_run
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("run")
    assert main(["train", str(write_run(root, model_dir, training={"max_steps": 4})), "--quiet"]) == 0
    return root / "run" / "adapter"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("training.lerning_rate=0.1", "Did you mean 'learning_rate'"),
        ("training.max_steps=many", "training.max_steps"),
        ("data.validation=nowhere.jsonl", "data.validation"),
        ("method.name=lroa", "Did you mean 'lora'"),
        ("method.rr=4", "Did you mean 'r'"),
    ],
)
def test_config_errors_exit_2_in_one_line_writing_nothing(
    tmp_path: Path, model_dir: Path, capsys, override: str, named: str
) -> None:
    config = write_run(tmp_path, model_dir)
    assert main(["train", str(config), "--set", override]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and named in captured.err
    assert captured.err.startswith("peftkit train: error: ")
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint_is_an_error(tmp_path: Path, model_dir: Path, capsys) -> None:
    assert main(["train", str(write_run(tmp_path, model_dir)), "--resume", str(tmp_path / "none")]) == 2
    assert "no whole checkpoint" in capsys.readouterr().err


def test_methods_lists_lora_with_options() -> None:
    done = subprocess.run([sys.executable, "-m", "peftkit", "methods"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("lora") or "\nlora " in done.stdout
    assert "r = 8" in done.stdout and "target_modules = None" in done.stdout


def test_inspect(trained: Path, capsys) -> None:
    assert main(["inspect", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "method:     lora (r=4)" in out and "parameters: " in out
    # 2 layers: q,k,v,o,gate,up,down with r=4 -> 4 * (in + out) each
    per_layer = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
    assert f"parameters: {2 * per_layer:,}" in out


def test_generate_with_adapter(trained: Path, model_dir: Path, capsys) -> None:
    assert (
        main(
            [
                "generate",
                "--base",
                str(model_dir),
                "--adapter",
                str(trained),
                "--prompt",
                "n=07:",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out) > 1


def test_merged_model_loads_in_plain_transformers(tmp_path: Path, trained: Path, model_dir: Path) -> None:
    assert main(["merge", str(trained), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(".adapters." in name or "base_layer" in name for name in merged.state_dict())
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    with_adapter = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), trained)
    ids = torch.tensor([[3, 40, 50, 60, 70]])
    expected = with_adapter(input_ids=ids).logits
    assert not torch.allclose(
        expected, AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits, atol=1e-4
    )
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
