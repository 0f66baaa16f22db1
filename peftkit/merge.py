"""Folding adapters into the base weights and taking them out again.

Merging is arithmetic on the canonical weight (`peftkit.weights`) in float32: in
place for a float32 weight, else on a float32 copy written back in the layer's own
dtype (or re-quantized). An adapter that changes named parameters of its layer
(`ParameterAdapter`) adds its deltas to them; one with a bias change (`lora_bias`)
adds it to the layer's bias. A merge is all or nothing: every layer is checked
(NaN or Inf, tied weights, an adapter that is no weight change) before the first
one is written.

Writing into a lossy base (a 4-bit layer re-quantizes `dequant(Wq) + delta`) adds an
error of its own: the merge warns with it, per layer, and keeps the packed weight it
replaced, so that unmerging puts the base back bit for bit instead of rounding twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from peftkit.adapters import set_active_adapters
from peftkit.anatomy import tied_parameters
from peftkit.errors import AdapterStateError, LossyMergeWarning, MergeError
from peftkit.injection import hosts
from peftkit.layer import Adapter, AdapterLayer, TrainableCopy
from peftkit.pretrained import uninstall
from peftkit.record import adapter_methods, forget_adapters, require_adapters
from peftkit.routing import release_adapter_names
from peftkit.weights import keep_weight, read_weight, write_weight

__all__ = ["merge", "unmerge", "merge_and_unload", "unload", "switch_merged_adapter"]

Plan = list[tuple[str, AdapterLayer, list[str]]]


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


def _fold_parameters(base_layer: nn.Module, adapter: Adapter, sign: int) -> None:
    """Add (sign=+1) or take out (sign=-1) the changes of an adapter that acts on parameters (a
    `ParameterAdapter`) to the parameters it names."""
    with torch.no_grad():
        for path, delta in adapter.parameter_deltas(base_layer).items():
            param = base_layer.get_parameter(path)
            param.add_(delta.detach().to(param.dtype), alpha=sign)


def _changes(layer: AdapterLayer, adapter: Adapter) -> list[torch.Tensor]:
    """What folding `adapter` into `layer` adds (raises MergeError for an adapter that is no weight change)."""
    if adapter.acts_on_parameters:
        return list(adapter.parameter_deltas(layer.base_layer).values())
    bias = adapter.delta_bias()
    return [adapter.delta_weight()] + ([bias] if bias is not None else [])


def _check_foldable(path: str, layer: AdapterLayer, names: list[str], tied: dict[int, list[str]], verb: str) -> None:
    """Raise what folding `names` into `layer` would raise, writing nothing (see `_plan`)."""
    for name in names:
        adapter = layer.adapters[name]
        if not adapter.mergeable:
            raise MergeError(
                f"adapter {name!r} at {path!r} ({type(adapter).__name__}) cannot be merged: "
                f"{adapter.merge_refusal or 'it is no change of the weight'}. Nothing was merged."
            )
    by_weight = [n for n in names if not layer.adapters[n].acts_on_parameters]
    if by_weight:
        weight = getattr(layer.base_layer, "weight", None)
        shared = [n for n in tied.get(id(weight), []) if not n.startswith(path + ".")]
        if shared:
            raise MergeError(
                f"the weight of {path!r} is tied to {', '.join(shared)}; merging would change all of them. "
                "Untie the weights (e.g. tie_word_embeddings=False) or do not target this module. Nothing was merged."
            )
        read_weight(layer.base_layer)  # a layer peftkit cannot write into (8-bit) says so here
    for name in names:
        adapter = layer.adapters[name]
        if adapter.delta_bias() is not None and getattr(layer.base_layer, "bias", None) is None:
            raise MergeError(
                f"adapter {name!r} trains a bias (lora_bias) but {path!r} has none to merge it into; "
                "keep it unmerged, or adapt with lora_bias=False. Nothing was merged."
            )
        finite = all(torch.isfinite(change.detach().sum()) for change in _changes(layer, adapter)) and all(
            torch.isfinite(p.detach()).all() for p in adapter.parameters()
        )
        if not finite:
            raise MergeError(f"{verb} adapter {name!r} at {path!r} would write NaN/Inf; nothing was changed.")


def _plan(model: nn.Module, chosen: Callable[[AdapterLayer], list[str]], verb: str) -> Plan:
    """Each layer with the adapters to fold into it, once every layer is known to take them."""
    tied = tied_parameters(model)
    plan = []
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer) and (names := chosen(host)):
            _check_foldable(path, host, names, tied, verb)
            plan.append((path, host, names))
    return plan


def _fold_layer(path: str, layer: AdapterLayer, names: list[str], sign: int) -> float | None:
    """Fold `names` into one layer (sign as in `_fold`): all of them or, on an error, none.

    Returns the largest error a lossy base's write added (None: exact). Unmerging back to
    a restore point puts the kept weight back instead of writing a difference.
    """
    by_weight = [n for n in names if not layer.adapters[n].acts_on_parameters]
    where = f"{'merging' if sign > 0 else 'unmerging'} adapters {names} at {path!r}"
    error = None
    if by_weight:
        remaining = len(layer.merged_adapters) - len(names)
        point = next((i for i, (count, _) in enumerate(layer.restore_points) if count == remaining), None)
        if sign < 0 and point is not None:  # the weight as it was with `remaining` merged; later points go too
            layer.restore_points[point][1]()
            del layer.restore_points[point:]
        else:
            error = _fold_weight(layer, by_weight, sign, where)
        for name in by_weight:
            _fold_bias(layer.base_layer, layer.adapters[name], sign)
    for name in names:
        if layer.adapters[name].acts_on_parameters:
            _fold_parameters(layer.base_layer, layer.adapters[name], sign)
    if sign > 0:
        layer.merged_adapters.extend(names)
    else:
        layer.merged_adapters[:] = [n for n in layer.merged_adapters if n not in names]
    return error


def _fold_weight(layer: AdapterLayer, names: list[str], sign: int, where: str) -> float | None:
    """Fold the weight changes of `names` into the base weight; a lossy base keeps a restore point first."""
    weight, in_place = _working_weight(layer.base_layer)
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
    if in_place:
        return None
    restore = keep_weight(layer.base_layer) if sign > 0 else None
    error = write_weight(layer.base_layer, weight)
    if restore is not None:
        layer.restore_points.append((len(layer.merged_adapters), restore))
    return error


def _apply(plan: Plan, sign: int) -> dict[str, float]:
    """Fold the plan in; should a layer still fail (a DoRA row of norm 0), the layers done are folded back.

    Returns the error each lossy layer's write added, by path.
    """
    done: Plan = []
    errors: dict[str, float] = {}
    try:
        for path, layer, names in plan:
            error = _fold_layer(path, layer, names, sign)
            done.append((path, layer, names))
            if error is not None:
                errors[path] = error
    except Exception:
        for path, layer, names in reversed(done):
            _fold_layer(path, layer, names[::-1], -sign)
        raise
    return errors


def _warn_lossy(errors: dict[str, float]) -> None:
    """Say which layers a merge re-quantized and by how much, largest first."""
    if not errors:
        return
    worst = sorted(errors.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{path} {error:.3g}" for path, error in worst[:5])
    more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
    warnings.warn(
        f"merging re-quantized {len(errors)} 4-bit layer(s): their weights now differ from dequant(Wq) + delta "
        f"by up to {worst[0][1]:.3g} (max abs; {shown}{more}), so outputs differ from the unmerged model's. "
        "unmerge() restores the model exactly; for an exact merged model write a dense one "
        "(peftkit.quant.merge_and_dequantize, or `peftkit merge`).",
        LossyMergeWarning,
        stacklevel=3,
    )


def merge(model: nn.Module, adapter_names: str | list[str] | None = None) -> nn.Module:
    """Add the adapters' deltas (default: the active ones) into the base weights, in place.

    All or nothing: every layer is checked before the first one is written. Into a 4-bit
    base the merge is lossy: a `LossyMergeWarning` names the layers and the error.
    """
    if adapter_names is not None:
        adapter_names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        require_adapters(model, adapter_names)

    def pending(host: AdapterLayer) -> list[str]:
        names = host.active_adapters if adapter_names is None else adapter_names
        return [n for n in names if n in host.adapters and n not in host.merged_adapters]

    _warn_lossy(_apply(_plan(model, pending, "merging"), +1))
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
    forget_adapters(model)
    release_adapter_names(model)
    uninstall(model)
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
