"""`peftkit compare` with a test set, seeds, a base row and the label metric, on the tiny Llama."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import make_model_dir, tiny_tokenizer
from tiny_run import write_records, write_run

from peftkit.cli import main
from peftkit.compare import compare
from peftkit.compare.plan import compare_settings, plan_runs
from peftkit.compare.scoring import generate_batch, label_predictions, macro_f1, score_predictions, scoring_spec
from peftkit.errors import ConfigError

LABELS = ["a", "b", "c"]  # one byte each: one token of the byte-level tokenizer
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _labelled(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": f"n={a:02d}:", "completion": LABELS[a % 3]} for a in (rng.randrange(100) for _ in range(count))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _config(root: Path, model_dir: Path, **compare_section) -> Path:
    path = write_run(root, model_dir, eval={"every": 3})
    raw = yaml.safe_load(path.read_text())
    write_records(root / "train.jsonl", _labelled(32, 1))
    write_records(root / "valid.jsonl", _labelled(8, 2))
    raw["data"]["test"] = str(write_records(root / "test.jsonl", _labelled(12, 3)))
    (root / "general.txt").write_text("Some general text.\n\nAnother paragraph of it.\n", encoding="utf-8")
    raw["compare"] = {
        "out": str(root / "out"),
        "metric": "label",
        "forgetting": str(root / "general.txt"),
        **compare_section,
    }
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("seeds")
    methods = ["lora", {"name": "lora", "label": "lora-fast", "learning_rate": 0.05, "r": 2}]
    assert main(["compare", str(_config(root, model_dir, methods=methods)), "--seeds", "2"]) == 0
    return root / "out"


def test_two_seeds_write_both_seeds_and_the_base_row(two_seeds: Path) -> None:
    rows = json.loads((two_seeds / "results.json").read_text())["runs"]
    assert [(row["name"], row["group"], row["seed"]) for row in rows] == [
        ("base", "base", 0),
        ("lora-s0", "lora", 0),
        ("lora-s1", "lora", 1),
        ("lora-fast-s0", "lora-fast", 0),
        ("lora-fast-s1", "lora-fast", 1),
    ]
    assert {row["status"] for row in rows} == {"ok"}
    for row in rows:
        assert len(row["test_scores"]) == 12 and set(row["test_scores"]) <= {0.0, 1.0}
        assert set(row["predictions"]) <= set(LABELS)
        assert row["test_score"] == pytest.approx(100 * sum(row["test_scores"]) / 12)
        assert row["forgetting_loss"] > 0
    assert rows[0]["trainable_params"] == 0
    # The seed drives the adapter's init and the data order: the two seeds' runs differ.
    assert rows[1]["train_loss"] != rows[2]["train_loss"]
    # The entry's own learning rate and rank reach its runs only.
    configs = {row["name"]: yaml.safe_load((two_seeds / "runs" / row["name"] / "run.yaml").read_text()) for row in rows}
    assert configs["lora-fast-s1"]["training"]["learning_rate"] == 0.05 and configs["lora-fast-s1"]["method"]["r"] == 2
    assert configs["lora-s1"]["training"]["learning_rate"] == 0.03 and configs["lora-s1"]["training"]["seed"] == 1


def test_report_gives_mean_sd_pairs_and_error_bars(two_seeds: Path) -> None:
    rows = json.loads((two_seeds / "results.json").read_text())["runs"]
    report = (two_seeds / "REPORT.md").read_text()
    assert report.index("## Verdict") < report.index("## Paired differences") < report.index("## Plots")
    lora = [row["test_score"] for row in rows if row["group"] == "lora"]
    mean, sd = sum(lora) / 2, abs(lora[0] - lora[1]) / 2**0.5
    assert f"**{mean:.1f} ± {sd:.1f}**" in report
    assert re.search(r"\| `lora` − `base` \| [+-]\d", report) or re.search(r"\| `base` − `lora` \|", report)
    assert "McNemar (exact)" in report and "Best quality: " in report and "Significantly above the base model" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert sorted(images) == ["cost.png", "pareto.png", "quality.png", "val_loss.png"]
    for name in images:
        data = (two_seeds / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_label_scoring_is_the_argmax_over_the_label_tokens(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = tiny_tokenizer()
    prompts = ["n=1:", "n=22:", "n=333:"]  # different lengths: right padding must not move the answer position
    got = label_predictions(model, tokenizer, prompts, LABELS, batch_size=2)
    tokens = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in LABELS]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            logits = model(input_ids=ids).logits[0, -1]
            expected.append(LABELS[int(logits[tokens].argmax())])
    assert got == expected


def test_bad_scoring_input_fails_before_any_run(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    tokenizer = tiny_tokenizer()
    test = write_records(
        tmp_path / "t.jsonl", [{"prompt": "x", "completion": "yes"}, {"prompt": "y", "completion": "no"}]
    )
    with pytest.raises(ConfigError, match=r"label 'no' tokenizes as 2 tokens \['n', 'o'\]"):
        scoring_spec("label", None, str(test), None, tokenizer)
    with pytest.raises(ConfigError, match=r"references \['no', 'yes'\] that are not among compare.labels \['a'\]"):
        scoring_spec("label", ["a"], str(test), None, tokenizer)
    with pytest.raises(ConfigError, match="module 'no_such_pkg.metrics' does not import"):
        compare_settings({"methods": ["lora"], "metric": "no_such_pkg.metrics:score"})
    (tmp_path / "my_metrics.py").write_text(
        "def one(p, r):\n    return [1.0]\n\ndef good(p, r):\n    return [0.5] * len(p)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"'my_metrics:one' must return one finite number per example \(2\), got list"
    ):
        scoring_spec("my_metrics:one", None, str(test), None, tokenizer)
    assert scoring_spec("my_metrics:good", None, str(test), None, tokenizer)["references"] == ["yes", "no"]
    with pytest.raises(ConfigError, match=r"compare.seeds must be list\[int\] \| None, got \['0'\]"):
        compare_settings({"methods": ["lora"], "seeds": ["0"]})
    with pytest.raises(ConfigError, match="compare.methods entry 'lora' has no option 'rank'"):
        compare_settings({"methods": [{"name": "lora", "rank": 2}]})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = _config(tmp_path, model_dir, methods=["lora"])
    raw = yaml.safe_load(config.read_text())
    raw["data"]["test"] = str(empty)
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="empty.jsonl holds no records"):
        compare(config, stream=None)
    assert not (tmp_path / "out").exists()


def test_read_only_output_fails_before_any_run(tmp_path: Path, model_dir: Path, read_only_dir: Path, capsys) -> None:
    """Issue 18 item 8: the old code trained the first run, then failed with an OSError traceback."""
    config = _config(tmp_path, model_dir, methods=["lora"])
    assert main(["compare", str(config), "--out", str(read_only_dir)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"peftkit compare: error: cannot write '{read_only_dir}/REPORT.md'")
    assert "running" not in captured.out and list(read_only_dir.iterdir()) == []


def test_plan_names_runs_by_entry_and_seed(tmp_path: Path, model_dir: Path) -> None:
    raw = yaml.safe_load(_config(tmp_path, model_dir).read_text())
    raw.pop("compare")
    settings = compare_settings(
        {
            "methods": ["head", {"name": "lora", "label": "lora-b", "weight_decay": 0.1}],
            "seeds": [3, 5],
            "out": str(tmp_path / "o"),
        }
    )
    runs = plan_runs(raw, tmp_path, settings)
    assert [(r.name, r.group, r.seed) for r in runs] == [
        ("base", "base", 3),
        ("head-s3", "head", 3),
        ("head-s5", "head", 5),
        ("lora-b-s3", "lora-b", 3),
        ("lora-b-s5", "lora-b", 5),
    ]
    assert runs[4].config["training"]["weight_decay"] == 0.1 and runs[2].config["training"]["weight_decay"] == 0.0
    assert runs[4].config["training"]["seed"] == 5 and runs[0].base


def test_batched_generation_equals_one_prompt_at_a_time(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from peftkit.training.models import generate_text

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = tiny_tokenizer()
    prompts = ["n=1:", "n=22:", "a longer prompt n=333:"]  # left padding must not change a continuation
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    assert batched == [generate_text(model, tokenizer, prompt, 5) for prompt in prompts]
    assert tokenizer.padding_side == "right"  # restored


def test_per_example_scores_by_metric() -> None:
    assert score_predictions("exact_match", [" The  Cat", "dog"], ["the cat", "cat"]) == [1.0, 0.0]
    assert score_predictions("label", [" a", " b"], [" a", " a"]) == [1.0, 0.0]
    chrf = score_predictions("chrf", ["the cat sat", "xyz"], ["the cat sat", "the cat sat"])
    assert chrf[0] == pytest.approx(100.0) and 0 <= chrf[1] < 20
    assert macro_f1(["a", "a", "b", "c"], ["a", "b", "b", "c"]) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_missing_data_names_the_preparation_script(tmp_path: Path, model_dir: Path, capsys) -> None:
    config = _config(tmp_path, model_dir, methods=["lora"])
    raw = yaml.safe_load(config.read_text())
    raw["data"]["test"] = "data/sentiment/test.jsonl"
    config.write_text(yaml.safe_dump(raw))
    (tmp_path / "prepare_sentiment.py").write_text("")
    assert main(["compare", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "peftkit compare: error: data.test: file 'data/sentiment/test.jsonl' does not exist. "
        f"Prepare the data first: python {tmp_path / 'prepare_sentiment.py'}."
    )
