"""Training data from local files: JSONL or text, tokenized with loss masks.

Three record shapes, recognised per file (or forced with `data.format`):
- `{"text": ...}` (and plain .txt files, one example per paragraph): loss on every token;
- `{"prompt": ..., "completion": ...}`: loss only on the completion (and the EOS after it);
- `{"messages": [{"role", "content"}, ...]}`: the tokenizer's chat template, loss only on
  assistant turns (each turn's span is found by rendering the conversation up to it).
Labels of masked tokens are -100, as transformers' losses expect.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import ConfigError
from peftkit.training.config import DataConfig, TrainingConfig, read_text

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "read_records",
    "record_format",
    "encode",
    "pack",
    "collate",
    "epoch_order",
    "global_batch",
    "process_batches",
    "count_steps",
    "generation_prompt",
    "load_datasets",
    "DataReport",
    "Datasets",
    "DROP_REASONS",
]

IGNORE_INDEX = -100
FORMATS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}


@dataclasses.dataclass
class Example:
    """One tokenized training sequence; `labels[i]` is IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def _check_record(record: Any, where: str) -> None:
    """Raise ConfigError at `where` (file:line) unless the record's known fields have the shape they need."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__} {_short(record)}.")
    for key in ("text", "prompt", "completion"):
        if key in record and not isinstance(record[key], str):
            raise ConfigError(
                f"{where}: {key!r} must be a string, got {type(record[key]).__name__} {_short(record[key])}."
            )
    messages = record.get("messages", [])
    if not isinstance(messages, list):
        raise ConfigError(
            f"{where}: 'messages' must be a list of {{'role', 'content'}} objects, got {_short(messages)}."
        )
    for number, message in enumerate(messages, 1):
        if not (isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))):
            raise ConfigError(
                f"{where}: message {number} must be an object with string 'role' and 'content', got {_short(message)}."
            )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a .jsonl/.json file, or of a text file (one `text` record per paragraph).

    Every record is checked here, where its line is known, so a bad one is named by file:line.
    """
    path = Path(path)
    text = read_text(path, "data file")
    if path.suffix == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(loaded, list):
            raise ConfigError(f"{path} must hold a JSON list of records, got {type(loaded).__name__}.")
        numbered = [(f"{path} record {i}", r) for i, r in enumerate(loaded, 1)]
    elif path.suffix == ".jsonl":
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{path}:{number} is not valid JSON: {error}") from None
    else:
        numbered = [(str(path), {"text": part.strip()}) for part in text.split("\n\n") if part.strip()]
    if not numbered:
        raise ConfigError(f"{path} holds no records; expected JSON objects, one per line.")
    for where, record in numbered:
        _check_record(record, where)
    return [record for _, record in numbered]


def record_format(record: dict[str, Any], where: str) -> str:
    """Which of the shapes a record has: `messages`, `prompt_completion` or `text`."""
    for name in ("messages", "prompt_completion", "text"):
        if all(key in record for key in FORMATS[name]):
            return name
    raise ConfigError(
        f"{where}: a record with keys {sorted(record)} is none of the known shapes: "
        "'text', 'prompt' + 'completion', or 'messages'."
    )


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_messages(record: dict[str, Any], tokenizer: Any) -> Example:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data has 'messages' records, but the tokenizer has no chat template.")
    messages = record["messages"]
    ids = _ids(tokenizer, _render(tokenizer, messages, False), False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_ids(tokenizer, _render(tokenizer, messages[:i], True), False))
        end = len(_ids(tokenizer, _render(tokenizer, messages[: i + 1], False), False))
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def encode(record: dict[str, Any], tokenizer: Any, fmt: str, max_length: int) -> Example:
    """Tokenize one record in format `fmt`, masked as the module docstring says, cut to `max_length`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "messages":
        example = _encode_messages(record, tokenizer)
    elif fmt == "prompt_completion":
        prompt = _ids(tokenizer, record["prompt"], True)
        completion = _ids(tokenizer, record["completion"], False) + eos
        example = Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
    else:
        ids = _ids(tokenizer, record["text"], True) + eos
        example = Example(ids, list(ids))
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Concatenate examples and cut the stream into full `max_length` blocks (the rest is dropped)."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    return [
        Example(ids[i : i + max_length], labels[i : i + max_length])
        for i in range(0, len(ids) - max_length + 1, max_length)
    ]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so resume can replay it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def global_batch(step: int, micro: int, accum: int, n_examples: int, per_global: int, seed: int) -> list[int]:
    """Example indices of micro-batch `micro` of optimizer step `step`, for all processes together."""
    per_epoch = n_examples // per_global
    index = step * accum + micro
    epoch, within = divmod(index, per_epoch)
    return epoch_order(n_examples, seed, epoch)[within * per_global : (within + 1) * per_global]


def process_batches(examples: list[Example], size: int, rank: int, world: int) -> Iterator[list[Example]]:
    mine = examples[rank::world]
    for start in range(0, len(mine), size):
        yield mine[start : start + size]


def count_steps(tc: TrainingConfig, n_train: int, world: int) -> int:
    per_global = tc.batch_size * world
    if n_train < per_global:
        raise ConfigError(
            f"training.batch_size {tc.batch_size} x {world} process(es) exceeds the {n_train} training examples."
        )
    total = tc.max_steps or tc.epochs * (n_train // per_global) // tc.gradient_accumulation_steps
    if total < 1:
        raise ConfigError("training: one epoch is shorter than one optimizer step; lower gradient_accumulation_steps.")
    return total


def generation_prompt(record: dict[str, Any], tokenizer: Any) -> tuple[str, str] | None:
    """(prompt text, reference) for a sample generation, or None for plain-text records."""
    fmt = record_format(record, "generation")
    if fmt == "prompt_completion":
        return record["prompt"], record["completion"]
    if fmt == "messages" and record["messages"][-1].get("role") == "assistant":
        return _render(tokenizer, record["messages"][:-1], True), record["messages"][-1]["content"]
    return None


# Why a row gave no example, as metrics.jsonl records it -> as a sentence says it.
DROP_REASONS = {
    "no_assistant_turn": "chat record(s) without an assistant turn (the loss is on assistant turns only)",
    "prompt_fills_max_length": "record(s) whose prompt fills data.max_length {max_length}, leaving no token to learn",
    "empty_text": "record(s) with empty text",
}


@dataclasses.dataclass
class DataReport:
    """What one split's records became: examples kept, rows dropped by reason, what packing and batching cut off."""

    records: int
    examples: int
    dropped: dict[str, int]
    packing_remainder_tokens: int = 0
    left_out_per_epoch: int = 0  # set by the loop: examples past the last whole global batch of an epoch

    def describe(self, max_length: int) -> str:
        """The drops in words ("" when nothing was dropped)."""
        parts = [f"{n} {DROP_REASONS[why].format(max_length=max_length)}" for why, n in self.dropped.items()]
        if self.packing_remainder_tokens:
            parts.append(f"the last {self.packing_remainder_tokens} tokens, short of a {max_length}-token block")
        if self.left_out_per_epoch:
            parts.append(
                f"{self.left_out_per_epoch} example(s) of each epoch, short of a whole global batch (others each epoch)"
            )
        return "; ".join(parts)


@dataclasses.dataclass
class Datasets:
    """The examples to train and validate on, the validation records (for generations), and the reports."""

    train: list[Example]
    validation: list[Example]
    validation_records: list[dict[str, Any]]
    reports: dict[str, DataReport]


def _drop_reason(record: dict[str, Any], example: Example, fmt: str) -> str | None:
    """Why `example` has no token to learn from (None when it has one)."""
    if any(t != IGNORE_INDEX for t in example.labels[1:]):  # the first token is never predicted
        return None
    if fmt == "messages" and not any(m["role"] == "assistant" for m in record["messages"]):
        return "no_assistant_turn"
    return "empty_text" if fmt == "text" else "prompt_fills_max_length"


def _encode_file(
    records: list[dict[str, Any]], tokenizer: Any, config: DataConfig, where: str
) -> tuple[list[Example], DataReport]:
    fmt = config.format if config.format != "auto" else record_format(records[0], where)
    for number, record in enumerate(records, 1):
        if not all(key in record for key in FORMATS[fmt]):
            raise ConfigError(f"{where}: record {number} lacks {FORMATS[fmt]} (format {fmt!r}).")
    examples, dropped = [], {}
    for record in records:
        example = encode(record, tokenizer, fmt, config.max_length)
        reason = _drop_reason(record, example, fmt)
        if reason is None:
            examples.append(example)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    report = DataReport(len(records), len(examples), dropped)
    if not examples:
        hint = " Raise data.max_length." if "prompt_fills_max_length" in dropped else ""
        raise ConfigError(
            f"{where}: none of the {len(records)} records has a token to learn from: "
            f"{report.describe(config.max_length)}.{hint}"
        )
    if config.packing:
        tokens = sum(len(e.input_ids) for e in examples)
        examples = pack(examples, config.max_length)
        report.examples, report.packing_remainder_tokens = len(examples), tokens - len(examples) * config.max_length
        if not examples:
            raise ConfigError(
                f"{where}: packing joins {tokens} tokens, short of one data.max_length block of "
                f"{config.max_length}; lower data.max_length or set data.packing: false."
            )
    return examples, report


def load_datasets(config: DataConfig, tokenizer: Any, seed: int) -> Datasets:
    """The train and validation examples `config` asks for, with what was dropped on the way."""
    train_records = read_records(config.train)
    valid_records = read_records(config.validation) if config.validation else []
    if config.validation_split:
        order = epoch_order(len(train_records), seed, -1)
        cut = max(1, int(len(train_records) * config.validation_split))
        valid_records = [train_records[i] for i in order[:cut]]
        train_records = [train_records[i] for i in order[cut:]]
    train, train_report = _encode_file(train_records, tokenizer, config, "data.train")
    reports = {"train": train_report}
    valid: list[Example] = []
    if valid_records:
        valid, reports["validation"] = _encode_file(valid_records, tokenizer, config, "data.validation")
    return Datasets(train, valid, valid_records, reports)
