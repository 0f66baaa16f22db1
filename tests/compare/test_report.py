"""The comparison's files from given rows: ranking, CSV/JSON contents, plots, and a rewrite from JSON."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from peftkit.compare.report import CSV_COLUMNS, machine_description, rank_rows, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(name: str, val_loss: float, chrf: float | None = 40.0, **extra: Any) -> dict[str, Any]:
    row = {
        "name": name,
        "method": name.split("-")[0],
        "rank": 16,
        "targets": None,
        "options": {"r": 16, "alpha": 32},
        "status": "ok",
        "error": None,
        "trainable_params": 3_000_000,
        "total_params": 271_000_000,
        "trainable_pct": 100 * 3e6 / 271e6,
        "adapter_mb": 12.0,
        "peak_memory_gb": 4.2,
        "step_time_s": 2.5,
        "tokens_per_s": 300.0,
        "time_s": 310.0,
        "steps": 80,
        "train_loss": val_loss + 0.1,
        "val_loss_start": 2.65,
        "val_loss": val_loss,
        "val_ppl": 2.718281828459045**val_loss,
        "exact_match": None if chrf is None else 0.0,
        "bleu": None if chrf is None else chrf / 2,
        "chrf": chrf,
        "chrf_start": None if chrf is None else 20.0,
        "curve": [[0, 2.65], [40, (2.65 + val_loss) / 2], [80, val_loss]],
    }
    return {**row, **extra}


FAILED = {
    "name": "qlora",
    "method": "qlora",
    "rank": 16,
    "targets": None,
    "options": {"r": 16},
    "status": "failed",
    "error": "killed by SIGKILL (out of memory?)",
}
META = {
    "config": "examples/compare.yaml",
    "date": "2025-01-02 03:04 UTC",
    "machine": "Linux x86_64, a CPU (2 cores)",
    "methods": ["lora", "dora", "qlora"],
    "generations": 8,
    "shared": {
        "model": {"name": "gemma-3-270m", "dtype": "float32"},
        "data": {"train": "train.jsonl", "validation": "valid.jsonl", "validation_split": 0.0, "max_length": 128},
        "training": {
            "max_steps": 80,
            "epochs": 1,
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 3e-4,
            "schedule": "cosine",
            "warmup_steps": 8,
            "seed": 0,
            "mixed_precision": "bf16",
        },
        "eval": {"every": 20, "max_new_tokens": 48},
    },
}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000  # a real chart, not an empty canvas
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_ranks_runs_and_lists_failures(tmp_path: Path) -> None:
    rows = [_row("lora", 1.10), FAILED, _row("dora", 1.05)]
    report = write_report(rows, tmp_path, META).read_text()
    assert [row["name"] for row in rank_rows(rows)] == ["dora", "lora", "qlora"]
    assert report.index("| 1 | `dora` |") < report.index("| 2 | `lora` |")
    assert (
        "| 1 | `dora` | – | – | 2.650 → 1.050 | 20.0 → 40.0 | 1.150 | 3.00M | 12.00 MB | 4.200 GB | 2.5 s | 300 |"
        in report
    )
    assert "| `dora` (dora) | 1 | **1.050** | – | – | 4.200 GB | 2.50 s | 3.00M |" in report  # the verdict
    assert "Best quality: `dora`" in report and "No test set was scored" in report
    assert "- `qlora`: killed by SIGKILL (out of memory?)" in report
    assert "Run on 2025-01-02 03:04 UTC" in report and "Machine: Linux x86_64, a CPU (2 cores)." in report
    assert "- budget: every run takes the same 80 steps x 8 sequences in the same order for a seed" in report
    assert '| `lora` | lora | `{"alpha": 32, "r": 16}` |' in report


def test_results_files_hold_one_row_per_run(tmp_path: Path) -> None:
    rows = [_row("lora", 1.10), FAILED]
    write_report(rows, tmp_path, META)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == {"meta": META, "runs": rows}
    with open(tmp_path / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == CSV_COLUMNS and len(table) == 2
    assert float(table[0]["val_loss"]) == 1.10 and table[0]["options"] == '{"alpha": 32, "r": 16}'
    assert table[1]["status"] == "failed" and table[1]["error"] == FAILED["error"] and table[1]["val_loss"] == ""


def test_plots_are_pngs_and_leave_out_empty_panels(tmp_path: Path) -> None:
    write_report([_row("lora", 1.10), _row("dora", 1.05), FAILED], tmp_path / "with", META)
    write_report([_row("lora", 1.10, chrf=None), _row("dora", 1.05, chrf=None)], tmp_path / "without", META)
    names = ["cost.png", "pareto.png", "quality.png", "val_loss.png"]
    assert sorted(p.name for p in (tmp_path / "with").glob("*.png")) == names
    sizes = {name: _png_size(tmp_path / "with" / name) for name in names}
    assert all(width > 400 and height > 200 for width, height in sizes.values())
    # Memory and time panels in both; the quality plot has one panel (validation loss) here.
    assert _png_size(tmp_path / "without" / "cost.png") == sizes["cost.png"]
    assert _png_size(tmp_path / "with" / "quality.png")[0] < sizes["cost.png"][0]


def test_report_without_finished_runs(tmp_path: Path) -> None:
    report = write_report([FAILED], tmp_path, META).read_text()
    assert "No run finished." in report and "![" not in report and not list(tmp_path.glob("*.png"))


def test_report_is_rewritten_from_results_json(tmp_path: Path) -> None:
    first = write_report([_row("lora", 1.10), FAILED], tmp_path / "a", META).read_text()
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert write_report(**saved, out=tmp_path / "b").read_text() == first


def test_machine_description() -> None:
    text = machine_description()
    assert f"({os.cpu_count()} cores" in text and f"torch {torch.__version__}" in text
    assert ("no GPU" in text) != torch.cuda.is_available()


@pytest.mark.parametrize("missing", ["val_loss", "chrf"])
def test_rows_without_a_number_still_report(tmp_path: Path, missing: str) -> None:
    report = write_report([{**_row("lora", 1.10), missing: None}], tmp_path, META).read_text()
    assert "| 1 | `lora` |" in report and "–" in report
