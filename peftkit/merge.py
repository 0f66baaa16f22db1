"""Folding adapters into the base weights and taking them out again.

Merging is exact arithmetic on the canonical weight (`peftkit.weights`), done in
float32 and written back in the layer's own dtype; a merge that would produce NaN
or Inf is refused before anything is written.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.errors import AdapterStateError, MergeError
from peftkit.inject import adapter_methods, hosts, set_active_adapters
from peftkit.layer import AdapterLayer, TrainableCopy
from peftkit.weights import read_weight, write_weight

__all__ = ["merge", "unmerge", "merge_and_unload", "unload", "switch_merged_adapter"]


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every path it appears under, for parameters shared by several modules."""
    paths: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(param), []).append(name)
    return {key: names for key, names in paths.items() if len(names) > 1}


def _merge_layer(path: str, layer: AdapterLayer, names: list[str], tied: dict[int, list[str]]) -> None:
    shared = [n for n in tied.get(id(getattr(layer.base_layer, "weight", None)), []) if not n.startswith(path + ".")]
    if shared and any(n not in layer.merged_adapters for n in names):
        raise MergeError(
            f"the weight of {path!r} is tied to {', '.join(shared)}; merging would change all of them. "
            "Untie the weights (e.g. tie_word_embeddings=False) or do not target this module."
        )
    weight = read_weight(layer.base_layer).detach().float()
    pending = [n for n in names if n not in layer.merged_adapters]
    for name in pending:
        weight = layer.adapters[name].merged_weight(weight)
        if not torch.isfinite(weight).all():
            raise MergeError(f"merging adapter {name!r} into {path!r} would write NaN/Inf; nothing was changed there.")
    if pending:
        write_weight(layer.base_layer, weight)
        layer.merged_adapters.extend(pending)


def merge(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Add the adapters' deltas (default: the active ones) into the base weights, in place."""
    tied = _tied_weights(model)
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer):
            names = host.active_adapters if adapter_names is None else [n for n in adapter_names if n in host.adapters]
            _merge_layer(path, host, names, tied)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights (last merged first)."""
    for _, host in hosts(model):
        if isinstance(host, AdapterLayer) and host.merged_adapters:
            weight = read_weight(host.base_layer).detach().float()
            for name in reversed(host.merged_adapters):
                weight = host.adapters[name].unmerged_weight(weight)
            write_weight(host.base_layer, weight)
            host.merged_adapters.clear()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Put every wrapped module back and forget the adapters; merged weights stay as they are."""
    for path, host in list(hosts(model)):
        if isinstance(host, TrainableCopy) and host.active_adapters and host.adapters_enabled:
            replacement = host.adapters[host.active_adapters[-1]]
        else:
            replacement = host.wrapped
        model.set_submodule(path, replacement)
    model.__dict__.pop("peftkit_methods", None)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain model: no peftkit module left."""
    if not adapter_methods(model):
        raise AdapterStateError(f"{type(model).__name__} has no peftkit adapters to merge.")
    return unload(merge(model))


def switch_merged_adapter(model: nn.Module, adapter_names: str | list[str]) -> nn.Module:
    """Serve another adapter at base-model speed: unmerge what is merged, merge `adapter_names`."""
    unmerge(model)
    set_active_adapters(model, adapter_names)
    return merge(model)
