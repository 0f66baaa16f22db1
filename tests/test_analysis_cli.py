"""`peftkit analyze` on the command line: the JSON, plots, truncation with logit change, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import randomize_adapters
from tiny_models import make_model_dir
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _adapter(model_dir: Path, path: Path, method: str = "lora", r: int = 4, seed: int = 1) -> Path:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peftkit.adapt(model, method, r=r, alpha=2 * r, target_modules="all-linear")
    randomize_adapters(model, seed=seed)
    return peftkit.save_adapter(model, path)


def test_json_plots_and_truncation_with_logit_change(tmp_path: Path, model_dir: Path, capsys) -> None:
    adapter = _adapter(model_dir, tmp_path / "a")
    other = _adapter(model_dir, tmp_path / "b", r=2, seed=2)
    argv = ["analyze", str(adapter), "--base", str(model_dir), "--against", str(other), "--json"]
    argv += ["--plots", str(tmp_path / "plots"), "--truncate", "4", "--out", str(tmp_path / "cut")]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    layer = result["layers"]["model.layers.1.mlp.up_proj"]
    assert len(layer["singular_values"]) == 4 and layer["singular_values"] == sorted(layer["singular_values"])[::-1]
    assert layer["amplification"] > 0 and 0 <= layer["intruders"] <= 10
    grid = result["similarity"]["model.layers.1.mlp.up_proj"]
    assert len(grid) == 4 and len(grid[0]) == 2 and all(0 <= phi <= 1 + 1e-9 for row in grid for phi in row)
    assert result["truncation"]["logit_change"]["max_abs"] < 1e-4  # the full rank: the same model
    assert result["truncation"]["logit_change"]["prompts"] == 3
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "effective_rank.png",
        "similarity.png",
        "spectrum.png",
    ]
    assert json.loads((tmp_path / "cut" / "adapter_config.json").read_text())["r"] == 4


def test_text_report_names_types_and_suggested_ranks(tmp_path: Path, model_dir: Path, capsys) -> None:
    adapter = _adapter(model_dir, tmp_path / "a")
    assert main(["analyze", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "lora, 14 layers" in out and "suggested r" in out
    assert [line.split()[0] for line in out.splitlines()[3:10]] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--truncate", "9", "--out", "{tmp}/cut"], "--truncate must be between 1 and the adapter's rank 4"),
        (["--truncate", "0", "--out", "{tmp}/cut"], "got 0"),
        (["--truncate", "2"], "--truncate K and --out DIR go together"),
        (["--out", "{tmp}/a"], "--truncate K and --out DIR go together"),
        (["--truncate", "2", "--out", "{tmp}/a"], "holds the adapter"),
        (["--intruder-threshold", "1.5", "--base", "{model}"], "intruder_threshold must be between 0 and 1"),
        (["--against", "{tmp}/missing"], "no adapter_config.json in"),
    ],
)
def test_bad_input_exits_2_in_one_line(tmp_path: Path, model_dir: Path, capsys, extra: list[str], message: str) -> None:
    adapter = _adapter(model_dir, tmp_path / "a")
    capsys.readouterr()
    argv = ["analyze", str(adapter)] + [e.format(tmp=tmp_path, model=model_dir) for e in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "cut").exists()


def test_a_bottleneck_adapter_exits_2_saying_what_can_be_analysed(tmp_path: Path, model_dir: Path, capsys) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peftkit.adapt(model, "bottleneck", target_modules="all-linear")
    peftkit.save_adapter(model, tmp_path / "x")
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "x"), "--base", str(model_dir)]) == 2
    assert "holds a bottleneck adapter" in capsys.readouterr().err
