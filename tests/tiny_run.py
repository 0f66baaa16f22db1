"""Helpers for the training tests: data files and a run config (the tiny model on disk is tiny_models').

Everything is built offline in memory; a model directory written here loads through
the same `from_pretrained` path `peftkit train` uses for any local model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

__all__ = ["write_records", "write_run"]


def write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _pairs(count: int, seed: int) -> list[dict[str, str]]:
    """Prompt/completion pairs of equal length, so every batch has the same token count."""
    rng = random.Random(seed)
    return [
        {"prompt": f"n={a:02d}:", "completion": f" {a % 7} {a % 5}"} for a in (rng.randrange(100) for _ in range(count))
    ]


def write_run(root: Path, model_dir: Path, **sections: dict[str, Any]) -> Path:
    """A run config under `root` (train/valid data written beside it); `sections` update the defaults."""
    root.mkdir(parents=True, exist_ok=True)
    write_records(root / "train.jsonl", _pairs(32, seed=1))
    write_records(root / "valid.jsonl", _pairs(8, seed=2))
    config: dict[str, dict[str, Any]] = {
        "model": {"name": str(model_dir)},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(root / "train.jsonl"), "validation": str(root / "valid.jsonl"), "max_length": 32},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 3.0e-2, "seed": 0},
        "output": {"dir": str(root / "run")},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
