"""Scoring a model on a whole test set, one score per example, so any two runs can be paired.

Metrics by kind (`compare.metric`):
- `label`: classification as generation. At the answer position (the end of the prompt) the
  label whose first token scores highest is the prediction; score 1 if it is the reference.
  Every label must be one token of its own, so the choice is one forward pass per batch.
- `exact_match`: greedy, batched generation, compared after normalising case and spaces.
- `chrf`, `bleu`: sacrebleu's sentence scores of the greedy generations.
- `package.module:function`: called as `function(predictions, references)`, returning one
  number per example.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from peftkit.anatomy import output_head
from peftkit.errors import ConfigError
from peftkit.training.data import IGNORE_INDEX, collate, encode, generation_prompt, read_records
from peftkit.training.loss import CausalLMLoss, loss_chunk_size

__all__ = [
    "BUILT_IN_METRICS",
    "check_metric",
    "metric_function",
    "label_tokens",
    "test_pairs",
    "label_predictions",
    "generate_batch",
    "score_predictions",
    "macro_f1",
    "text_loss",
    "scoring_spec",
]

BUILT_IN_METRICS = ("label", "exact_match", "chrf", "bleu")


def check_metric(name: str) -> None:
    """ConfigError unless `name` is a built-in metric or a `module:function` that imports."""
    if name not in BUILT_IN_METRICS:
        metric_function(name)


def metric_function(path: str) -> Callable[[list[str], list[str]], Sequence[float]]:
    """The function a `package.module:function` metric names; ConfigError says why it cannot be used."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"compare.metric {path!r} is neither one of {', '.join(BUILT_IN_METRICS)} nor a 'package.module:function'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"compare.metric {path!r}: module {module_name!r} does not import ({error}).") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"compare.metric {path!r}: {module_name} has no function {attribute!r}.")
    return function


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def test_pairs(records: Sequence[dict[str, Any]], tokenizer: Any) -> list[tuple[str, str]]:
    """(prompt, reference) of every test record; ConfigError for a record with no reference."""
    pairs = []
    for number, record in enumerate(records, 1):
        pair = generation_prompt(record, tokenizer)
        if pair is None:
            raise ConfigError(
                f"data.test record {number} has no reference to score: give prompt/completion or messages "
                "ending with an assistant turn."
            )
        pairs.append(pair)
    return pairs


def label_tokens(labels: Sequence[str], tokenizer: Any) -> list[int]:
    """The one token of each label as a continuation; ConfigError names a label that is not one distinct token."""
    tokens = []
    for label in labels:
        ids = list(tokenizer(label, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ConfigError(
                f"compare.metric label: label {label!r} tokenizes as {len(ids)} tokens {pieces}; each label must be "
                "a single token (e.g. with its leading space, ' positive') so its score can be read at one position."
            )
        tokens.append(ids[0])
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"compare.metric label: labels {list(labels)} share a token; each needs its own.")
    return tokens


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _answer_logits(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Each row's logits at position `last` only: the head over every position would cost more than the
    model with a large vocabulary (Gemma's 262k words), as in `CausalLMLoss`."""
    body, head = getattr(model, "base_model", model), output_head(model)
    rows = torch.arange(len(last), device=input_ids.device)
    if body is model or head is None:
        return model(input_ids=input_ids, attention_mask=mask).logits[rows, last]
    hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return head(hidden[rows, last])


def label_predictions(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], labels: Sequence[str], batch_size: int
) -> list[str]:
    """The label whose token scores highest after each prompt (batched by length, right-padded)."""
    tokens = torch.tensor(label_tokens(labels, tokenizer))
    ids = [list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) for prompt in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    pad = tokenizer.pad_token_id
    device = _device(model)
    predictions: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            positions = order[start : start + batch_size]
            chunk = [ids[i] for i in positions]
            width = max(len(row) for row in chunk)
            input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in chunk], device=device)
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in chunk], device=device)
            last = torch.tensor([len(row) - 1 for row in chunk], device=device)
            at_answer = _answer_logits(model, input_ids, mask, last)
            best = at_answer[:, tokens.to(at_answer.device)].float().argmax(dim=-1)
            for position, choice in zip(positions, best.tolist(), strict=True):
                predictions[position] = labels[choice]
    model.train(was_training)
    return predictions


def generate_batch(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy continuations of `prompts` (new text only), left-padded in batches, each stopping at EOS."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                encoded = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
                encoded = encoded.to(_device(model))
                generated = model.generate(
                    **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                new = generated[:, encoded["input_ids"].shape[1] :]
                outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def score_predictions(metric: str, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """One score per example (0/1 for label and exact_match, 0-100 for chrF and BLEU)."""
    if metric == "label":
        return [float(p == r) for p, r in zip(predictions, references, strict=True)]
    if metric == "exact_match":
        return [float(_normalise(p) == _normalise(r)) for p, r in zip(predictions, references, strict=True)]
    if metric in ("chrf", "bleu"):
        from sacrebleu.metrics import BLEU, CHRF

        scorer = CHRF() if metric == "chrf" else BLEU(effective_order=True)
        return [
            scorer.sentence_score(p.strip(), [r.strip()]).score for p, r in zip(predictions, references, strict=True)
        ]
    scores = metric_function(metric)(list(predictions), list(references))
    try:
        values = [float(value) for value in scores]
    except (TypeError, ValueError):
        values = []
    if len(values) != len(references) or not all(math.isfinite(v) for v in values):
        raise ConfigError(
            f"compare.metric {metric!r} must return one finite number per example ({len(references)}), "
            f"got {type(scores).__name__} {str(scores)[:60]}."
        )
    return values


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The unweighted mean over reference classes of each class's F1, in [0, 1]."""
    scores = []
    for label in sorted(set(references)):
        hits = sum(p == r == label for p, r in zip(predictions, references, strict=True))
        predicted, actual = sum(p == label for p in predictions), sum(r == label for r in references)
        scores.append(0.0 if hits == 0 else 2 * hits / (predicted + actual))
    return sum(scores) / len(scores)


def text_loss(
    model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int, batch_size: int
) -> float:
    """Token-weighted next-token loss of `model` on plain-text records (the forgetting measure)."""
    examples = [encode(record, tokenizer, "text", max_length) for record in records]
    loss = CausalLMLoss(model, loss_chunk_size(None, getattr(model.config, "vocab_size", 0)))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
            batch = {key: value.to(_device(model)) for key, value in batch.items()}
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += loss(**batch).item() * tokens
            count += tokens
    model.train(was_training)
    return total / count


def scoring_spec(
    metric: str, labels: Sequence[str] | None, test: str | None, forgetting: str | None, tokenizer: Any
) -> dict[str, Any]:
    """What every run's child scores, checked before any run starts: a label that is not one token, a
    reference outside the labels, or a metric function of the wrong shape fails here, not in every run."""
    spec: dict[str, Any] = {"metric": metric, "labels": None, "references": None, "forgetting": forgetting}
    if forgetting:
        records = read_records(forgetting)  # empty or unreadable: fails now
        if not all(isinstance(record.get("text"), str) for record in records):
            raise ConfigError(f"compare.forgetting {forgetting!r} must be plain text (or JSONL records with 'text').")
    if not test:
        return spec
    references = [reference for _, reference in test_pairs(read_records(test), tokenizer)]
    spec["references"] = references
    if metric == "label":
        spec["labels"] = list(labels) if labels else sorted(set(references))
        label_tokens(spec["labels"], tokenizer)
        unknown = sorted(set(references) - set(spec["labels"]))
        if unknown:
            raise ConfigError(
                f"data.test has references {unknown[:3]} that are not among compare.labels {spec['labels']}."
            )
    else:
        score_predictions(metric, references, references)  # a metric function's shape, on the references
    return spec
