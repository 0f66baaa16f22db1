"""New adapters from weighted existing ones: `linear`, `cat` and `svd`, as in HF PEFT.

Combining works on any method whose adapters are a pure low-rank weight delta
`up @ down` (LoRA); the method declares it (`has_rank`) and says how to make a copy of
itself at another rank (`with_rank`).
For per-module weights w_i and deltas `U_i D_i`:

- `linear`: `up = sum sign(w_i) sqrt|w_i| U_i`, `down = sum sqrt|w_i| D_i` (equal ranks;
  cross terms between adapters remain, exactly as PEFT's "linear").
- `cat`:    factors stacked along the rank, so the delta is exactly `sum w_i U_i D_i`.
- `svd`:    the best rank-k approximation of `sum w_i U_i D_i` (Eckart-Young).
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from torch import nn

from peftkit.adapters import adapt
from peftkit.errors import ConfigError
from peftkit.injection import hosts
from peftkit.layer import Adapter, AdapterLayer, LowRankAdapter
from peftkit.record import adapter_methods, require_adapters
from peftkit.undo import restore_on_failure

__all__ = ["combine_adapters"]

Combination = Literal["linear", "cat", "svd"]


def _factors(path: str, name: str, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        not (isinstance(adapter, LowRankAdapter) and adapter.additive_merge)
        or adapter.acts_on_parameters
        or adapter.delta_bias() is not None
    ):
        raise ConfigError(
            f"adapter {name!r} at {path!r} ({type(adapter).__name__}) is not a pure low-rank delta; "
            "combining supports LoRA-style adapters only."
        )
    up, down = adapter.low_rank_factors()
    return up.detach().float(), down.detach().float()


def _combine(
    factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], how: Combination, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if how == "linear":
        up = sum(math.copysign(math.sqrt(abs(w)), w) * u for (u, _), w in zip(factors, weights, strict=True))
        down = sum(math.sqrt(abs(w)) * d for (_, d), w in zip(factors, weights, strict=True))
    elif how == "cat":
        up = torch.cat([w * u for (u, _), w in zip(factors, weights, strict=True)], dim=1)
        down = torch.cat([d for _, d in factors], dim=0)
    else:
        delta = sum(w * (u @ d) for (u, d), w in zip(factors, weights, strict=True))
        u_, s_, vh = torch.linalg.svd(delta, full_matrices=False)
        up, down = u_[:, :rank] * s_[:rank], vh[:rank]
    pad = rank - up.shape[1]  # a layer that lacks some adapters, or is narrower than the rank
    return nn.functional.pad(up, (0, pad)), nn.functional.pad(down, (0, 0, 0, pad))


def combine_adapters(
    model: nn.Module,
    adapter_names: list[str],
    weights: list[float],
    new_name: str,
    combination: Combination = "linear",
    rank: int | None = None,
) -> nn.Module:
    """Add adapter `new_name` made from `adapter_names` weighted by `weights`; returns the model.

    `rank` is for `svd` (default: the largest input rank); `linear` needs equal ranks and
    `cat` sums them. The new adapter has unit scaling and saves like any other.
    """
    methods = adapter_methods(model)
    if len(adapter_names) != len(weights) or not adapter_names:
        raise ConfigError(f"give one weight per adapter: {len(adapter_names)} adapters, {len(weights)} weights.")
    require_adapters(model, adapter_names)
    if combination not in ("linear", "cat", "svd"):
        raise ConfigError(f"combination must be 'linear', 'cat' or 'svd', got {combination!r}.")
    first = methods[adapter_names[0]]
    if not first.has_rank:
        raise ConfigError(f"method {first.name!r} cannot be combined: it has no rank to set.")

    per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    per_layer_weights: dict[str, list[float]] = {}
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer):
            present = [(n, w) for n, w in zip(adapter_names, weights, strict=True) if n in host.adapters]
            if present:
                per_layer[path] = [_factors(path, n, host.adapters[n]) for n, _ in present]
                per_layer_weights[path] = [w for _, w in present]
    if not per_layer:
        raise ConfigError(f"adapters {adapter_names} are on no adapted layer; nothing to combine.")
    ranks = {f[1].shape[0] for fs in per_layer.values() for f in fs}
    if combination == "linear" and len(ranks) > 1:
        raise ConfigError(f"'linear' needs adapters of equal rank, got ranks {sorted(ranks)}; use 'cat' or 'svd'.")
    if combination == "cat":
        new_rank = max(sum(f[1].shape[0] for f in fs) for fs in per_layer.values())
    else:
        new_rank = rank or max(ranks)

    targets = "(" + "|".join(re.escape(path) for path in per_layer) + ")"
    with restore_on_failure(model):  # no half-filled adapter is left behind
        adapt(model, first.with_rank(new_rank, targets), new_name)
        for path, factors in per_layer.items():
            up, down = _combine(factors, per_layer_weights[path], combination, new_rank)
            model.get_submodule(path).adapters[new_name].set_low_rank_factors(up, down)
    return model
