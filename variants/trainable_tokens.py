"""Trainable tokens: train chosen rows of an embedding table only (PEFT's `trainable_token_indices`).

```
        ids ──► W0 (frozen) ──► W0[ids] ─────────────────────────┐
         │                                                       + ──► rows i in I read V[i], others W0[i]
         └──► D[ids],  D = V − W0[I] on the rows I, zero elsewhere ┘
```

For new tokens (a chat template's markers, say) the whole table need not train:
only the rows `I` do, as a `len(I) x dim` tensor `V` that starts equal to `W0[I]`.
Saved under PEFT's key `<embedding>.token_adapter.trainable_tokens_delta` (which,
despite its name, holds the rows' values `V`, not a difference).
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.authoring import (
    Adapter,
    AdapterLayer,
    ConfigError,
    TargetNotFoundError,
    UnsupportedModuleError,
    candidate_modules,
    matches_pattern,
)

__all__ = ["TrainableTokens", "trainable_tokens"]


class TrainableTokens(Adapter):
    """The trained rows `V` of an embedding, as the additive change `D[ids]` with `D = V − W0[I]` on rows `I`.

    Additive so that it composes with other adapters and mixed batches like any
    other; merging writes `W0[I] + (V − W0[I]) = V` into the table, and unmerging
    takes it out again. `W0[I]` is copied when the adapter is made, so it is not saved.
    """

    selected_by_target_modules = False

    def __init__(self, base_layer: nn.Embedding, indices: list[int]) -> None:
        super().__init__()
        vocabulary = base_layer.num_embeddings
        if len(set(indices)) != len(indices) or not all(0 <= i < vocabulary for i in indices):
            raise ConfigError(
                f"trainable_token_indices must be distinct ids in [0, {vocabulary}) for this embedding, got {indices}."
            )
        rows = base_layer.weight.detach()[indices].clone()
        # A submodule only for PEFT's key path, `token_adapter.trainable_tokens_delta`.
        self.token_adapter = nn.Module()
        self.token_adapter.trainable_tokens_delta = nn.Parameter(rows.clone())
        self.register_buffer("originals", rows, persistent=False)
        slots = torch.full((vocabulary,), -1, dtype=torch.long, device=rows.device)
        slots[torch.tensor(indices, device=rows.device)] = torch.arange(len(indices), device=rows.device)
        self.register_buffer("slots", slots, persistent=False)  # id -> its row in V, or -1

    def _change(self) -> torch.Tensor:
        return self.token_adapter.trainable_tokens_delta - self.originals

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        slot = self.slots[x]
        rows = self._change()[slot.clamp(min=0)] * (slot >= 0).unsqueeze(-1)
        embed_scale = getattr(base_layer, "embed_scale", None)  # Gemma scales looked-up rows, PEFT's too
        if embed_scale is not None:
            rows = rows * embed_scale.to(rows.dtype)
        return rows.to(base_output.dtype)

    def delta_weight(self) -> torch.Tensor:
        table = torch.zeros(
            self.slots.shape[0], self.originals.shape[1], dtype=self.originals.dtype, device=self.originals.device
        )
        table[self.slots >= 0] = self._change()[self.slots[self.slots >= 0]]
        return table.T  # canonical [out=dim, in=vocabulary], as peftkit.weights reads an embedding


def _input_embedding_path(model: nn.Module) -> str:
    """Where a bare list of ids applies: the model's input embedding, else a module named `embed_tokens`."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    for name, module in candidate_modules(model):
        if module is embedding or (embedding is None and name.rsplit(".", 1)[-1] == "embed_tokens"):
            return name
    raise TargetNotFoundError(
        f"trainable_token_indices is a list, which applies to the input embedding, but {type(model).__name__} "
        "has none (no get_input_embeddings, no embed_tokens); pass {module name: [ids]} instead."
    )


def trainable_tokens(
    model: nn.Module, token_indices: list[int] | dict[str, list[int]], layers: list[str]
) -> dict[str, TrainableTokens]:
    """A `TrainableTokens` adapter per embedding `token_indices` names, by path (nothing is wrapped yet).

    `layers` are the paths the same adapter puts LoRA on, which cannot also train rows.
    """
    by_name = token_indices if isinstance(token_indices, dict) else {_input_embedding_path(model): token_indices}
    output = getattr(model, "get_output_embeddings", lambda: None)()
    adapters = {}
    for key, indices in by_name.items():
        chosen = [(name, m) for name, m in candidate_modules(model) if matches_pattern(name, [key])]
        if not chosen:
            raise TargetNotFoundError(f"trainable_token_indices names {key!r}, which matches no module of the model.")
        for name, module in chosen:
            if name in layers:
                raise ConfigError(
                    f"{name!r} is a LoRA target of the same adapter; take it out of target_modules or out of "
                    "trainable_token_indices."
                )
            embedding = module.base_layer if isinstance(module, AdapterLayer) else module
            if not isinstance(embedding, nn.Embedding):
                raise UnsupportedModuleError(
                    f"trainable_token_indices needs an nn.Embedding; {name!r} is a {type(embedding).__name__}."
                )
            if output is not None and getattr(output, "weight", None) is embedding.weight:
                raise UnsupportedModuleError(
                    f"{name!r} is tied to the output head, whose logits would not see the trained rows; "
                    "untie the weights (tie_word_embeddings=False) to train tokens."
                )
            adapters[name] = TrainableTokens(embedding, indices)
    return adapters
