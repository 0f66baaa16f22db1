"""Folding adapters into the base weights and taking them out again.

Merging is arithmetic on the canonical weight (`peftkit.weights`) in float32: in
place for a float32 weight, else on a float32 copy written back in the layer's own
dtype (or re-quantized). A merge that would produce NaN or Inf is refused before
anything is written.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.anatomy import tied_parameters
from peftkit.errors import AdapterStateError, MergeError
from peftkit.hosts import hosts
from peftkit.inject import adapter_methods, forget_adapters, set_active_adapters
from peftkit.layer import Adapter, AdapterLayer, ParameterAdapter, TrainableCopy
from peftkit.pretrained import uninstall
from peftkit.weights import read_weight, write_weight

__all__ = ["merge", "unmerge", "merge_and_unload", "unload", "switch_merged_adapter"]


def _working_weight(layer: nn.Module) -> tuple[torch.Tensor, bool]:
    """The canonical weight to fold adapters into, and whether it is the layer's own storage.

    A float32 weight read as a view is edited in place (no copy of a large matrix);
    anything else (bf16, a 4-bit base) is folded in float32 and written back.
    """
    weight = read_weight(layer).detach()
    own = getattr(layer, "weight", None)
    in_place = (
        weight.dtype == torch.float32
        and isinstance(own, torch.Tensor)
        and weight.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()
    )
    return (weight, True) if in_place else (weight.float(), False)


def _fold(weight: torch.Tensor, adapter: Adapter, sign: int, where: str) -> None:
    """Merge (sign=+1) or unmerge (sign=-1) one adapter into `weight`, in place.

    Nothing is written unless the result is finite: an additive adapter's delta is
    checked before it is added; any other merge rule's result before it is copied.
    """
    if adapter.additive_merge:
        delta = adapter.delta_weight().detach().to(weight.dtype)
        if not torch.isfinite(delta.sum()):
            raise MergeError(f"{where} would write NaN/Inf; nothing was changed there.")
        weight.add_(delta, alpha=sign)
        return
    result = adapter.merged_weight(weight) if sign > 0 else adapter.unmerged_weight(weight)
    if not torch.isfinite(result.sum()):
        raise MergeError(f"{where} would write NaN/Inf; nothing was changed there.")
    weight.copy_(result)


def _fold_bias(layer: nn.Module, adapter: Adapter, sign: int) -> None:
    """Add (sign=+1) or take out (sign=-1) the adapter's bias change, if it has one (LoRA's `lora_bias`)."""
    delta = adapter.delta_bias()
    if delta is not None:
        with torch.no_grad():
            layer.bias.add_(delta.detach().to(layer.bias.dtype), alpha=sign)


def _fold_parameters(base_layer: nn.Module, adapter: ParameterAdapter, sign: int, where: str) -> None:
    """Add (sign=+1) or take out (sign=-1) a `ParameterAdapter`'s changes to the parameters it names."""
    deltas = {path: delta.detach() for path, delta in adapter.parameter_deltas(base_layer).items()}
    if not all(torch.isfinite(delta.sum()) for delta in deltas.values()):
        raise MergeError(f"{where} would write NaN/Inf; nothing was changed there.")
    with torch.no_grad():
        for path, delta in deltas.items():
            param = base_layer.get_parameter(path)
            param.add_(delta.to(param.dtype), alpha=sign)


def _merge_layer(path: str, layer: AdapterLayer, names: list[str], tied: dict[int, list[str]]) -> None:
    pending = [n for n in names if n not in layer.merged_adapters]
    for name in [n for n in pending if isinstance(layer.adapters[n], ParameterAdapter)]:
        _fold_parameters(layer.base_layer, layer.adapters[name], +1, f"merging adapter {name!r} into {path!r}")
        layer.merged_adapters.append(name)
        pending.remove(name)
    if not pending:
        return
    biased = [n for n in pending if layer.adapters[n].delta_bias() is not None]
    if biased and getattr(layer.base_layer, "bias", None) is None:
        raise MergeError(
            f"adapter {biased[0]!r} trains a bias (lora_bias) but {path!r} has none to merge it into; "
            "keep it unmerged, or adapt with lora_bias=False."
        )
    shared = [n for n in tied.get(id(getattr(layer.base_layer, "weight", None)), []) if not n.startswith(path + ".")]
    if shared:
        raise MergeError(
            f"the weight of {path!r} is tied to {', '.join(shared)}; merging would change all of them. "
            "Untie the weights (e.g. tie_word_embeddings=False) or do not target this module."
        )
    weight, in_place = _working_weight(layer.base_layer)
    try:
        for name in pending:
            _fold(weight, layer.adapters[name], +1, f"merging adapter {name!r} into {path!r}")
            _fold_bias(layer.base_layer, layer.adapters[name], +1)
            layer.merged_adapters.append(name)
    finally:
        if not in_place:
            write_weight(layer.base_layer, weight)


def merge(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Add the adapters' deltas (default: the active ones) into the base weights, in place."""
    tied = tied_parameters(model)
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer):
            names = host.active_adapters if adapter_names is None else [n for n in adapter_names if n in host.adapters]
            _merge_layer(path, host, names, tied)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights (last merged first)."""
    for path, host in hosts(model):
        if not (isinstance(host, AdapterLayer) and host.merged_adapters):
            continue
        last_first = list(reversed(host.merged_adapters))
        for name in [n for n in last_first if isinstance(host.adapters[n], ParameterAdapter)]:
            _fold_parameters(host.base_layer, host.adapters[name], -1, f"unmerging adapter {name!r} from {path!r}")
        by_weight = [n for n in last_first if not isinstance(host.adapters[n], ParameterAdapter)]
        if by_weight:
            weight, in_place = _working_weight(host.base_layer)
            for name in by_weight:
                _fold(weight, host.adapters[name], -1, f"unmerging adapter {name!r} from {path!r}")
                _fold_bias(host.base_layer, host.adapters[name], -1)
            if not in_place:
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
    forget_adapters(model)
    uninstall(model)
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
