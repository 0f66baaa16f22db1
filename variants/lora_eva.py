"""EVA: LoRA's A from the principal directions of each layer's inputs, ranks redistributed by explained variance.

Explained Variance Adaptation (Paischer et al., 2024, https://arxiv.org/abs/2410.07170):

```
    first batches ──► inputs X of each adapted layer (padding and label -100 positions left out)
                  ──► PCA of X: directions v_1.., explained-variance ratios e_1..
    ranks:  the `sum r` largest e_j over all layers, at most round(r * rho) per layer
    A = [v_1 .. v_k]ᵀ (k = the layer's rank),  B = 0,  alpha scaled by k / r
```

A layer whose rank comes out 0 is left without an adapter. The options then say what
was built (`rank_pattern`, `alpha_pattern`, `target_modules`), so the adapter saves
and reloads like any LoRA. PEFT runs an incremental PCA until the directions stop
moving (cosine similarity `tau`); here the PCA is exact over the first `eva_batches`
batches, from each distinct input's mean and `in x in` second-moment matrix
(accumulated in float64), so the directions agree with PEFT's to within its
convergence threshold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from peftkit.authoring import (
    DEFAULT_ADAPTER,
    AdapterLayer,
    ConfigError,
    adapter_methods,
    disable_adapters,
    hosts,
    is_linear,
    mark_trainable,
    record_for_update,
)
from variants.lora_layers import LoraLinear

__all__ = ["IGNORE_INDEX", "InputMoments", "eva_ranks", "initialize_eva"]

IGNORE_INDEX = -100  # labels of positions the loss ignores (PEFT's `label_mask_value`)


class InputMoments:
    """Running count, sum and `Xᵀ X` of a layer's input rows, for an exact PCA at the end."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        if self.total is None:
            self.total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
            self.gram = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.gram += rows.T @ rows

    def principal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(explained-variance ratios, directions as rows), largest first, of the centred inputs."""
        mean = self.total / self.count
        covariance = (self.gram - self.count * torch.outer(mean, mean)) / max(self.count - 1, 1)
        values, vectors = torch.linalg.eigh(covariance)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        return values / values.sum(), vectors.T


def eva_ranks(ratios: dict[str, torch.Tensor], ranks: dict[str, int], rho: float) -> dict[str, int]:
    """Each layer's rank: its share of the `sum(ranks)` largest ratios, at most `round(r * rho)` of its own."""
    entries = [(float(value), name) for name, values in ratios.items() for value in values[: round(ranks[name] * rho)]]
    entries.sort(key=lambda entry: -entry[0])
    chosen = {name: 0 for name in ratios}
    for _, name in entries[: sum(ranks.values())]:
        chosen[name] += 1
    return chosen


def _positions(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The (row, position) pairs whose inputs count: attended, and labelled where labels are given."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    if "labels" in batch:
        mask &= batch["labels"] != IGNORE_INDEX
    return mask


def _collect(
    model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Mapping[str, torch.Tensor]], limit: int
) -> tuple[dict[str, InputMoments], dict[str, str]]:
    """Input moments per distinct input, and for each layer the layer whose input it shares (q, k, v share one)."""
    moments: dict[str, InputMoments] = {}
    shared: dict[str, str] = {}
    # Inputs seen in this forward, held so that no other tensor can take a freed one's id.
    seen: dict[int, tuple[str, torch.Tensor]] = {}
    mask: list[torch.Tensor] = []

    def hook(path: str):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            owner = shared.setdefault(path, seen.setdefault(id(x), (path, x))[0])
            if owner == path:
                moments.setdefault(path, InputMoments()).add(x[mask[0].to(x.device)])

        return record

    handles = [layer.register_forward_pre_hook(hook(path)) for path, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), disable_adapters(model):
            for index, batch in enumerate(batches):
                if index == limit:
                    break
                mask[:] = [_positions(batch)]
                seen.clear()
                model(**{key: value for key, value in batch.items() if key != "labels"})
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return moments, shared


def initialize_eva(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, int]:
    """Run EVA for a LoRA adapter made with `init="eva"`; returns each layer's new rank.

    `batches` are model inputs (`input_ids`, `attention_mask`, optionally `labels`);
    the first `eva_batches` are read. Linear layers get EVA's A (with B = 0 a DoRA
    magnitude stays `||W||`); other layers keep their Kaiming init, as in PEFT.
    """
    method = adapter_methods(model)[adapter_name]
    config = method.config
    if config.init != "eva":
        raise ConfigError(f"adapter {adapter_name!r} was made with init {config.init!r}; EVA needs init 'eva'.")
    layers = {
        path: host.base_layer
        for path, host in hosts(model)
        if isinstance(host, AdapterLayer)
        and adapter_name in host.adapters
        and isinstance(host.adapters[adapter_name], LoraLinear)
        and is_linear(host.base_layer)
    }
    moments, shared = _collect(model, layers, batches, config.eva_batches)
    if not moments or any(m.count == 0 for m in moments.values()):
        raise ConfigError(
            "init 'eva' needs training data: no labelled, attended token reached "
            f"{next(iter(layers), 'the layers')!r}; give batches with input_ids (and attention_mask/labels), "
            "e.g. through peftkit train."
        )
    principal = {path: m.principal() for path, m in moments.items()}
    ranks = {path: config.rank_and_alpha(path)[0] for path in layers}
    new_ranks = eva_ranks({p: principal[shared[p]][0] for p in layers}, ranks, config.eva_rho)
    _rebuild(model, method, adapter_name, {p: principal[shared[p]][1] for p in layers}, new_ranks)
    return new_ranks


def _rebuild(
    model: nn.Module, method: object, adapter_name: str, directions: dict[str, torch.Tensor], ranks: dict[str, int]
) -> None:
    """New adapters at the chosen ranks (A = the top directions, B = 0), and options that say so."""
    config = method.config
    rank_pattern, alpha_pattern = {}, {}
    for path, rank in ranks.items():
        old_rank, alpha = config.rank_and_alpha(path)
        if rank and rank != config.r:
            rank_pattern[path] = rank
        if rank and alpha * rank / old_rank != config.alpha:
            alpha_pattern[path] = alpha * rank / old_rank
    kept = [path for path, host in hosts(model) if adapter_name in host.adapters and ranks.get(path, 1)]
    removed = [path for path, rank in ranks.items() if rank == 0]
    options = {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if removed:
        options.update(target_modules=sorted(kept), exclude_modules=None)
    rebuilt = type(method)(dataclasses.replace(config, **options))
    for path, rank in ranks.items():
        host = model.get_submodule(path)
        if rank == 0:
            del host.adapters[adapter_name]
            host.active_adapters = [n for n in host.active_adapters if n != adapter_name]
            if not host.adapters:
                model.set_submodule(path, host.base_layer)
            continue
        adapter = rebuilt.create_adapter(host.base_layer, path)
        with torch.no_grad():
            adapter.lora_A.weight.copy_(directions[path][:rank])
        host.adapters[adapter_name] = adapter.to(host.adapters[adapter_name].lora_A.weight.device)
    rebuilt.data_initialized = True
    record_for_update(model)[adapter_name] = rebuilt
    mark_trainable(model, adapter_name)
