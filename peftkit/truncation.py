"""An adapter cut to a lower rank by SVD, and how much that changes a model's logits.

Each layer's update `ΔW = s·B A` is replaced by its best rank-K approximation
(Eckart-Young), written as a PEFT LoRA file with `r = lora_alpha = K` (unit scaling):
`B' = U_K S_K^½`, `A' = S_K^½ V_K^T`. A DoRA adapter keeps its magnitude and
`use_dora`, since dropping the magnitude would change the model far more than the
truncation does. The file carries no peftkit record, so it reads back, in peftkit or
PEFT, as the plain LoRA (or DoRA) file it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.adapters import delete_adapter
from peftkit.analysis import LowRankFile, read_low_rank_adapter
from peftkit.errors import ConfigError
from peftkit.loading import load_adapter
from peftkit.peft_format import LORA_DOWN, LORA_MAGNITUDE, LORA_UP, PEFT_PREFIX
from peftkit.saving import write_adapter_files

__all__ = ["check_truncation", "truncate_adapter", "logit_change"]

# The options that change with the rank; everything else in adapter_config.json is kept.
_RESET = {"use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}


def check_truncation(source: LowRankFile, rank: int) -> None:
    """ConfigError unless `source` can be cut to `rank`: 1 to its smallest layer rank, linear LoRA layers only."""
    path, smallest = min(((path, update.rank) for path, update in source.layers.items()), key=lambda item: item[1])
    if not 0 < rank <= smallest:
        raise ConfigError(f"--truncate must be between 1 and the adapter's rank {smallest} (of {path!r}), got {rank}.")
    if source.skipped:
        raise ConfigError(
            f"{str(source.directory)!r} also holds tensors that are not linear LoRA layers ({source.skipped[:3]}); "
            "truncation writes linear layers only."
        )


def truncate_adapter(adapter: str | os.PathLike[str] | LowRankFile, rank: int, out: str | os.PathLike[str]) -> Path:
    """Write `adapter` cut to rank `rank` to directory `out` (PEFT's format); returns `out`.

    ConfigError (see `check_truncation`) before anything is written.
    """
    source = read_low_rank_adapter(adapter)
    check_truncation(source, rank)
    tensors: dict[str, torch.Tensor] = {}
    for path, update in source.layers.items():
        up, down = update.svd.truncated(rank)  # float64 from the SVD; written as float32
        tensors[f"{PEFT_PREFIX}{path}.{LORA_UP}"] = up.float().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.{LORA_DOWN}"] = down.float().contiguous()
        if update.magnitude is not None:
            tensors[f"{PEFT_PREFIX}{path}.{LORA_MAGNITUDE}"] = update.magnitude.contiguous()
    config = {**source.config, **_RESET, "r": rank, "lora_alpha": rank, "target_modules": sorted(source.layers)}
    return write_adapter_files(out, config, tensors)


def _logits(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=ids[None]).logits[0].float() for ids in inputs]


def logit_change(
    model: nn.Module, adapter: str | os.PathLike[str], other: str | os.PathLike[str], inputs: Sequence[torch.Tensor]
) -> dict[str, Any]:
    """How far the logits of `model` with adapter `other` are from those with `adapter`, on token id rows `inputs`.

    Each adapter is loaded, run and deleted in turn, so the model is left as it was.
    """
    outputs = []
    for index, directory in enumerate((adapter, other)):
        name = f"analyze_{index}"
        load_adapter(model, directory, name)
        try:
            outputs.append(_logits(model, inputs))
        finally:
            delete_adapter(model, name)
    diffs = [(a - b).abs() for a, b in zip(*outputs, strict=True)]
    agree = [(a.argmax(-1) == b.argmax(-1)).float().mean() for a, b in zip(*outputs, strict=True)]
    return {
        "prompts": len(inputs),
        "max_abs": max(float(d.max()) for d in diffs),
        "mean_abs": float(torch.cat([d.flatten() for d in diffs]).mean()),
        "top1_agreement": float(torch.stack(agree).mean()),
    }
