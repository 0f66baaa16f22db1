"""examples/prepare_sentiment.py on a few rows it is given (the real CSV is downloaded, never shipped)."""

from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _script():
    spec = importlib.util.spec_from_file_location("prepare_sentiment", EXAMPLES / "prepare_sentiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_writes_balanced_disjoint_splits(tmp_path: Path) -> None:
    rows = ["sentiment,confidence,text"]
    for label in ("negative", "neutral", "positive"):
        rows += [f"{label},1.0,{label} tweet number {i}" for i in range(6)]
    rows += [
        "positive,0.4,an unsure positive tweet",
        "negative,,no confidence given",
        "negative,1.0,Negative  tweet number 0",
    ]
    csv_path = tmp_path / "tweets.csv"
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["--csv", str(csv_path), "--out", str(out), "--test", "6", "--validation", "3", "--train", "30"]
    assert _script().main([*args, "--general", "5"]) == 0
    splits = {
        name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        for name in ("train", "valid", "test")
    }
    for name, size in (("test", 6), ("valid", 3), ("train", 9)):  # 6 per label: 2 test, 1 valid, 3 left each
        counts = collections.Counter(r["completion"] for r in splits[name])
        assert counts == {" negative": size // 3, " neutral": size // 3, " positive": size // 3}
    prompts = [r["prompt"] for records in splits.values() for r in records]
    assert len(set(prompts)) == len(prompts) == 18  # the duplicate (case and spaces aside) kept once
    assert all(p.startswith("Tweet: ") and p.endswith("\nSentiment:") for p in prompts)
    assert not any("unsure" in p or "no confidence" in p for p in prompts)
    paragraphs = (out / "general.txt").read_text().split("\n\n")
    assert len(paragraphs) == 5 and all(len(p.split()) >= 12 for p in paragraphs)
