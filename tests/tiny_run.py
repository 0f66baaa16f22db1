"""Helpers for the training tests: a byte-level tokenizer, a tiny Llama on disk, a run config.

Everything is built offline in memory; a model directory written here loads through
the same `from_pretrained` path `peftkit train` uses for any local model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml
from conftest import tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["CHAT_TEMPLATE", "tiny_tokenizer", "make_model_dir", "write_records", "write_run"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + pad/bos/eos) with a simple chat template."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model_dir(path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Save a tiny random Llama (hidden 32, 2 layers; `overrides` change its config) and its tokenizer."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(
        seed,
        **{
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 128,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            **overrides,
        },
    )
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(path)
    return path


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
