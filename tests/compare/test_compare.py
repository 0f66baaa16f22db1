"""`peftkit compare` on a tiny model: the grid, one process per run, failed rows, the files."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from tiny_models import make_model_dir
from tiny_run import write_run

from peftkit.cli import main
from peftkit.compare import compare
from peftkit.compare.plan import compare_settings, plan_runs, target_modules
from peftkit.compare.report import CSV_COLUMNS
from peftkit.compare.runner import task_scores
from peftkit.errors import ConfigError, PeftkitError
from peftkit.training.config import apply_overrides

# The tiny Llama (tests/tiny_run.py): 35,168 weights; LoRA r=4 on all 7 linear layers of its 2 blocks
# trains 4 * (in + out) each, DoRA adds a magnitude per output feature (256 per block).
BASE_PARAMS = 35_168
LORA_R4 = 2 * 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
DORA_R4 = LORA_R4 + 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _config(root: Path, model_dir: Path, **compare_section) -> Path:
    """A tiny run config with validation every 2 of 6 steps and a `compare:` section."""
    path = write_run(root, model_dir, eval={"every": 2, "max_new_tokens": 6})
    raw = yaml.safe_load(path.read_text())
    raw["compare"] = {"generations": 3, "out": str(root / "out"), **compare_section}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """lora vs dora through the command line, whose --methods overrides the YAML's."""
    root = tmp_path_factory.mktemp("compare")
    config = _config(root, model_dir, methods=["lora"])
    assert main(["compare", str(config), "--methods", "lora,dora"]) == 0
    return root / "out"


def test_compare_writes_one_sane_row_per_run(compared: Path) -> None:
    rows = json.loads((compared / "results.json").read_text())["runs"]
    assert [row["name"] for row in rows] == ["lora", "dora"] and {row["status"] for row in rows} == {"ok"}
    for row, trainable in zip(rows, [LORA_R4, DORA_R4], strict=True):
        assert row["trainable_params"] == trainable and row["total_params"] == BASE_PARAMS + trainable
        assert row["trainable_pct"] == pytest.approx(100 * trainable / (BASE_PARAMS + trainable))
        # float32 tensors plus a small safetensors header
        assert trainable * 4 / 1e6 < row["adapter_mb"] < trainable * 4 / 1e6 + 0.02
        assert [step for step, _ in row["curve"]] == [0, 2, 4, 6]
        assert row["curve"][0][1] == row["val_loss_start"] and row["curve"][-1][1] == row["val_loss"]
        assert row["val_loss"] < row["val_loss_start"] - 0.2  # 5.60 -> ~5.33 on this random model
        assert row["val_ppl"] == pytest.approx(2.718281828 ** row["val_loss"], rel=1e-6)
        assert 0.1 < row["peak_memory_gb"] < 8 and 0 < row["step_time_s"] < 5 and row["tokens_per_s"] > 0
        assert row["steps"] == 6 and row["time_s"] > 0 and row["train_loss"] > 0
        assert all(0 <= row[key] <= 100 for key in ("exact_match", "bleu", "chrf", "chrf_start"))
        assert row["options"] == {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    # Same data, seed and evaluation: both runs start from the same validation loss.
    assert rows[0]["val_loss_start"] == rows[1]["val_loss_start"]
    with open(compared / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == CSV_COLUMNS and [r["name"] for r in table] == ["lora", "dora"]
    assert float(table[1]["val_loss"]) == rows[1]["val_loss"] and json.loads(table[0]["options"])["r"] == 4


def test_compare_report_embeds_valid_plots(compared: Path) -> None:
    report = (compared / "REPORT.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert sorted(images) == ["cost.png", "pareto.png", "quality.png", "val_loss.png"]
    for name in images:
        data = (compared / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 400 and height > 200
    assert re.search(r"Run on \d{4}-\d\d-\d\d \d\d:\d\d UTC", report) and "Machine: " in report and "cores" in report
    rows = json.loads((compared / "results.json").read_text())["runs"]
    best = min(rows, key=lambda row: row["val_loss"])["name"]
    assert re.search(rf"\| 1 \| `{best}` \|", report)


def test_failed_runs_become_rows_while_the_others_complete(tmp_path: Path, model_dir: Path) -> None:
    """r=0 fails validation (no process); a target set matching nothing fails in the child."""
    progress = io.StringIO()
    rows = compare(
        _config(tmp_path, model_dir, methods=["lora"]), ranks="0,2", targets="attn,no_such_proj", stream=progress
    )
    status = {row["name"]: (row["status"], row["error"]) for row in rows}
    assert list(status) == ["lora-r0-attn", "lora-r0-no_such_proj", "lora-r2-attn", "lora-r2-no_such_proj"]
    assert status["lora-r2-attn"] == ("ok", None)
    for name in ("lora-r0-attn", "lora-r0-no_such_proj"):
        assert status[name] == ("failed", "method 'lora': LoraConfig.r must be a positive integer, got 0.")
    assert status["lora-r2-no_such_proj"][0] == "failed"
    assert status["lora-r2-no_such_proj"][1].startswith("target_modules=['no_such_proj'] matched no module")
    done = next(row for row in rows if row["status"] == "ok")
    assert done["options"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert done["trainable_params"] == 2 * 2 * ((32 + 32) + (32 + 16) * 2 + (32 + 32))  # r=2 on q, k, v, o
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "## Failed runs" in report and "- `lora-r2-no_such_proj`: target_modules=['no_such_proj']" in report
    lines = progress.getvalue().splitlines()
    assert lines[-1].endswith("1 done, 3 failed | report: " + str(tmp_path / "out" / "REPORT.md"))
    assert any(line.startswith("[4/4 | ") and "FAILED" in line for line in lines)


def test_all_runs_failing_is_an_error_after_the_report(tmp_path: Path, model_dir: Path, capsys) -> None:
    config = _config(tmp_path, model_dir, methods=["lora"])
    assert main(["compare", str(config), "--ranks", "0"]) == 2
    assert capsys.readouterr().err.startswith("peftkit compare: error: all 1 runs failed")
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [(row["name"], row["status"]) for row in rows] == [("lora-r0", "failed")]


def test_a_run_past_its_timeout_is_stopped(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(PeftkitError, match="all 1 runs failed"):
        compare(_config(tmp_path, model_dir, methods=["lora"], timeout_s=0.5), stream=None)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert rows[0]["error"] == "timed out after 0.5 s"


def test_plan_runs_the_same_setup_over_the_grid(tmp_path: Path, model_dir: Path) -> None:
    raw = yaml.safe_load(write_run(tmp_path, model_dir).read_text())
    raw["method"] = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"}
    settings = compare_settings({"methods": ["lora", "full"], "out": str(tmp_path / "o")}, None, "4,16", "attn", None)
    runs = plan_runs(raw, None, settings)
    assert [run.name for run in runs] == ["lora-r4-attn", "lora-r16-attn", "full"]
    assert [run.error for run in runs] == [None, None, None]
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert runs[0].config["method"] == {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": attn}
    assert runs[1].config["method"]["alpha"] == 32  # alpha / r stays 2
    assert runs[2].config["method"] == {"name": "full", "target_modules": "all-linear"}  # r, alpha, dropout: lora's
    for run in runs:
        assert run.config["data"] == runs[0].config["data"] and run.config["eval"]["generations"] == 0
        assert run.config["training"] == {**runs[0].config["training"], "log_every": 1}
        assert run.config["output"]["save_every"] is None
        assert run.dir == tmp_path / "o" / "runs" / run.name
    # An option no method takes is kept, so the run fails with the method's own message.
    raw["method"]["rr"] = 2
    typo = plan_runs(raw, None, compare_settings({"methods": ["lora"]}, None, None, None, None))
    assert "no option 'rr'. Did you mean 'r'?" in typo[0].error


def test_settings_from_flags_and_section() -> None:
    settings = compare_settings({"methods": ["lora"], "ranks": [8]}, "lora,dora", None, "attn,q_proj+v_proj", None)
    assert settings.methods == ["lora", "dora"] and settings.ranks == [8]
    assert settings.targets == ["attn", ["q_proj", "v_proj"]]
    raw = apply_overrides({"compare": {"methods": ["lora"]}}, ["compare.generations=2", "compare.ranks=[4, 8]"])
    overridden = compare_settings(raw["compare"])  # `--set compare.*` goes through the run config's parser
    assert overridden.generations == 2 and overridden.ranks == [4, 8] and overridden.methods == ["lora"]
    with pytest.raises(ConfigError, match="--ranks expects a comma-separated list of int, got '4,x'"):
        compare_settings(None, "lora", "4,x", None, None)
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        compare_settings(None, "lroa", None, None, None)
    with pytest.raises(ConfigError, match="compare has no option 'method'. Did you mean 'methods'"):
        compare_settings({"method": ["lora"]}, None, None, None, None)
    with pytest.raises(ConfigError, match="compare.methods is empty"):
        compare_settings({}, None, None, None, None)


def test_target_sets_find_the_attention_projections_by_structure() -> None:
    assert target_modules("attn", tiny_llama()) == ("attn", ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert target_modules("attn", tiny_gpt2()) == ("attn", ["c_attn", "attn.c_proj"])  # not mlp.c_proj
    assert target_modules("attn", tiny_bert()) == ("attn", ["query", "key", "value", "attention.output.dense"])
    assert target_modules("all-linear", None) == ("all-linear", "all-linear")
    assert target_modules(["q_proj", "v_proj"], None) == ("q_proj+v_proj", ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match=r"--targets attn: Sequential has no attention block"):
        target_modules("attn", torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_task_scores() -> None:
    same = [{"output": " the cat sat on the mat ", "reference": "the cat sat on the mat"}] * 2
    assert task_scores(same) == {"exact_match": 100.0, "bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    half = [same[0], {"output": "a dog", "reference": "the cat sat on the mat"}]
    scores = task_scores(half)
    assert scores["exact_match"] == 50.0 and 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    assert task_scores([]) == {"exact_match": None, "bleu": None, "chrf": None}
