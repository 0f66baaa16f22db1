"""One run of a comparison in its own process: `python -m peftkit.compare.child RUN.yaml RESULT.json SCORING.json`.

The child trains as RUN.yaml says (or, for the base row, only loads the model), then scores
the model on the whole test set and the forgetting text as SCORING.json says, and writes
RESULT.json: parameter counts, the predictions and per-example scores, the forgetting loss.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.adapters import trainable_parameters
from peftkit.compare.scoring import generate_batch, label_predictions, score_predictions, test_pairs, text_loss
from peftkit.errors import PeftkitError
from peftkit.files import atomic_write_json
from peftkit.training.config import RunConfig, load_config
from peftkit.training.data import read_records
from peftkit.training.loop import train
from peftkit.training.models import load_model, load_tokenizer

__all__ = ["RESULT_NAME", "SCORING_NAME", "score_model"]

RESULT_NAME = "run.json"  # what the child adds to the run directory
SCORING_NAME = "scoring.json"  # what the parent tells it to score


def score_model(model: nn.Module, tokenizer: Any, config: RunConfig, scoring: dict[str, Any]) -> dict[str, Any]:
    """Predictions and per-example scores on data.test, and the loss on the forgetting text (None if absent)."""
    # In the model's own dtype, without autocast: under no_grad, bfloat16 autocast on a CPU without bf16
    # instructions ran 17x slower than float32 (64 test prompts: 83 s against 4.8 s on Gemma-3-270M).
    result: dict[str, Any] = {"test": None, "forgetting_loss": None}
    batch_size = config.eval.batch_size
    if config.data.test:
        prompts, references = zip(*test_pairs(read_records(config.data.test), tokenizer), strict=True)
        if scoring["metric"] == "label":
            predictions = label_predictions(model, tokenizer, prompts, scoring["labels"], batch_size)
        else:
            predictions = generate_batch(model, tokenizer, prompts, config.eval.max_new_tokens, batch_size)
        scores = score_predictions(scoring["metric"], predictions, references)
        result["test"] = {"metric": scoring["metric"], "predictions": predictions, "scores": scores}
    if scoring.get("forgetting"):
        records = read_records(scoring["forgetting"])
        result["forgetting_loss"] = text_loss(model, tokenizer, records, config.data.max_length, batch_size)
    return result


def _child_main(argv: Sequence[str]) -> int:
    """A run in its own process: train (or load the base), score, write the result."""
    config_path, result_path, scoring_path = argv
    scoring = json.loads(Path(scoring_path).read_text(encoding="utf-8"))
    try:
        config = load_config(config_path)
        if scoring.get("base"):
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model = load_model(config.model.name, config.model.dtype, config.model.quantization, device)
            model.requires_grad_(False)
        else:
            model = train(config).model
        tokenizer = load_tokenizer(config.model.name)
        scored = score_model(model, tokenizer, config, scoring)
    except PeftkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    trainable, total = trainable_parameters(model)
    atomic_write_json(result_path, {"trainable_params": trainable, "total_params": total, **scored})
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
