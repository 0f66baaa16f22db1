"""Folding adapters into the base weights and taking them out again.

Merging is arithmetic on the canonical weight (`peftkit.weights`) in float32: in
place for a float32 weight, else on a float32 copy written back in the layer's own
dtype (or re-quantized). A merge that would produce NaN or Inf is refused before
anything is written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from peftkit.errors import AdapterStateError, MergeError
from peftkit.inject import adapter_methods, hosts, release_adapter_names, require_adapters, set_active_adapters
from peftkit.layer import Adapter, AdapterLayer, TrainableCopy, is_additive
from peftkit.weights import read_weight, write_weight

__all__ = ["merge", "unmerge", "merge_and_unload", "unload", "switch_merged_adapter"]


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every path it appears under, for parameters shared by several modules."""
    paths: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(param), []).append(name)
    return {key: names for key, names in paths.items() if len(names) > 1}


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
    if is_additive(adapter):
        delta = adapter.delta_weight().detach().to(weight.dtype)
        if not torch.isfinite(delta.sum()):
            raise MergeError(f"{where} would write NaN/Inf; nothing was changed there.")
        weight.add_(delta, alpha=sign)
        return
    result = adapter.merged_weight(weight) if sign > 0 else adapter.unmerged_weight(weight)
    if not torch.isfinite(result.sum()):
        raise MergeError(f"{where} would write NaN/Inf; nothing was changed there.")
    weight.copy_(result)


def _check_foldable(path: str, layer: AdapterLayer, names: list[str], tied: dict[int, list[str]], verb: str) -> None:
    """Raise what folding `names` into `layer` would raise, writing nothing (see `_plan`)."""
    shared = [n for n in tied.get(id(getattr(layer.base_layer, "weight", None)), []) if not n.startswith(path + ".")]
    if shared:
        raise MergeError(
            f"the weight of {path!r} is tied to {', '.join(shared)}; merging would change all of them. "
            "Untie the weights (e.g. tie_word_embeddings=False) or do not target this module. Nothing was merged."
        )
    read_weight(layer.base_layer)  # a layer peftkit cannot write into (8-bit) says so here
    for name in names:
        adapter = layer.adapters[name]
        finite = torch.isfinite(adapter.delta_weight().detach().sum()) and all(
            torch.isfinite(p.detach()).all() for p in adapter.parameters()
        )
        if not finite:
            raise MergeError(f"{verb} adapter {name!r} at {path!r} would write NaN/Inf; nothing was changed.")


def _plan(
    model: nn.Module, chosen: Callable[[AdapterLayer], list[str]], verb: str
) -> list[tuple[str, AdapterLayer, list[str]]]:
    """Each layer with the adapters to fold into it, once every layer is known to take them.

    A merge is all or nothing: a NaN in the last layer's adapter, a tied weight or a
    method that is no weight delta is found before the first weight is written.
    """
    tied = _tied_weights(model)
    plan = []
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer) and (names := chosen(host)):
            _check_foldable(path, host, names, tied, verb)
            plan.append((path, host, names))
    return plan


def _fold_layer(path: str, layer: AdapterLayer, names: list[str], sign: int) -> None:
    """Fold `names` into one layer (sign as in `_fold`): all of them or, on an error, none."""
    weight, in_place = _working_weight(layer.base_layer)
    where = f"{'merging' if sign > 0 else 'unmerging'} adapters {names} at {path!r}"
    applied: list[str] = []
    try:
        for name in names:
            _fold(weight, layer.adapters[name], sign, where)
            applied.append(name)
    except Exception:
        if in_place:  # a copy is simply not written back
            for name in reversed(applied):
                _fold(weight, layer.adapters[name], -sign, where)
        raise
    if not in_place:
        write_weight(layer.base_layer, weight)
    if sign > 0:
        layer.merged_adapters.extend(names)
    else:
        layer.merged_adapters[:] = [n for n in layer.merged_adapters if n not in names]


def _apply(plan: list[tuple[str, AdapterLayer, list[str]]], sign: int) -> None:
    """Fold the plan in; should a layer still fail (a DoRA row of norm 0), the layers done are folded back."""
    done: list[tuple[str, AdapterLayer, list[str]]] = []
    try:
        for path, layer, names in plan:
            _fold_layer(path, layer, names, sign)
            done.append((path, layer, names))
    except Exception:
        for path, layer, names in reversed(done):
            _fold_layer(path, layer, names[::-1], -sign)
        raise


def merge(model: nn.Module, adapter_names: str | list[str] | None = None) -> nn.Module:
    """Add the adapters' deltas (default: the active ones) into the base weights, in place.

    All or nothing: every layer is checked before the first one is written.
    """
    if adapter_names is not None:
        adapter_names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        require_adapters(model, adapter_names)

    def pending(host: AdapterLayer) -> list[str]:
        names = host.active_adapters if adapter_names is None else adapter_names
        return [n for n in names if n in host.adapters and n not in host.merged_adapters]

    _apply(_plan(model, pending, "merging"), +1)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights (last merged first); all or nothing."""
    _apply(_plan(model, lambda host: host.merged_adapters[::-1], "unmerging"), -1)
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
    release_adapter_names(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain model: no peftkit module left."""
    if not adapter_methods(model):
        raise AdapterStateError(f"{type(model).__name__} has no peftkit adapters to merge.")
    return unload(merge(model))


def switch_merged_adapter(model: nn.Module, adapter_names: str | list[str]) -> nn.Module:
    """Serve another adapter at base-model speed: unmerge what is merged, merge `adapter_names`.

    The new adapters are checked before anything is unmerged, so a bad name or adapter
    leaves the model serving what it served.
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    require_adapters(model, names)
    _plan(model, lambda host: [n for n in names if n in host.adapters], "merging")
    unmerge(model)
    set_active_adapters(model, names)
    return merge(model)
