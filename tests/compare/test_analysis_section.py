"""The compare report's analysis section: a row per finished LoRA-family run, nothing for the others."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from conftest import randomize_adapters
from tiny_models import make_model_dir
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.compare.analysis import analysis_section


def _run(runs: Path, model_dir: Path, name: str, method: str, **options: object) -> dict[str, object]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peftkit.adapt(model, method, target_modules="all-linear", **options)
    randomize_adapters(model)
    peftkit.save_adapter(model, runs / name / "adapter")
    return {"name": name, "status": "ok", "rank": options.get("r")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_rows_for_lora_family_runs_only(tmp_path: Path, model_dir: Path) -> None:
    runs = tmp_path / "runs"
    rows = [
        _run(runs, model_dir, "lora-r4", "lora", r=4),
        _run(runs, model_dir, "dora-r2", "dora", r=2),
        _run(runs, model_dir, "bottleneck", "bottleneck"),
        {"name": "qlora-r4", "status": "failed", "rank": 4},
    ]
    section = analysis_section(rows, runs, str(model_dir))
    table = [line for line in section.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == ["lora-r4", "dora-r2"]
    result = peftkit.analyze(runs / "lora-r4" / "adapter", base=AutoModelForCausalLM.from_pretrained(model_dir))
    cells = [cell.strip() for cell in table[0].strip("|").split("|")]
    mean_99 = statistics.fmean(layer["effective_rank_99"] for layer in result["layers"].values())
    amplification = statistics.fmean(layer["amplification"] for layer in result["layers"].values())
    assert cells[1] == "4" and cells[3] == f"{mean_99:.3g}" and cells[6] == f"{amplification:.3g}"
    assert "q_proj 4" in cells[7]


def test_no_section_without_lora_family_runs(tmp_path: Path) -> None:
    rows = [{"name": "full", "status": "ok", "rank": None}, {"name": "x", "status": "failed", "rank": 4}]
    assert analysis_section(rows, tmp_path / "runs", "no/such-model") == ""
