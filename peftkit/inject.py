"""Adapting a model and steering its adapters: adapt, freeze, activate, enable, delete, rename.

The model stays the user's own object (so `generate`, `save_pretrained` and
transformers' `Trainer` keep working); peftkit records which method each adapter
name uses on the adapted module itself, and finds that record through any wrapper
put around it later (DDP, accelerate, a loss module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from peftkit.errors import AdapterExistsError, AdapterNotFoundError, AdapterStateError, ConfigError
from peftkit.hosts import hosts
from peftkit.layer import AdapterLayer
from peftkit.method import AdapterMethod
from peftkit.registry import get_method
from peftkit.routing import RowRouting

__all__ = [
    "DEFAULT_ADAPTER",
    "ON_ADAPT",
    "adapt",
    "adapted_model",
    "adapter_methods",
    "forget_adapters",
    "set_active_adapters",
    "set_adapters_enabled",
    "disable_adapters",
    "mark_trainable",
    "delete_adapter",
    "rename_adapter",
    "list_adapters",
    "mixed_batch",
    "trainable_parameters",
]

DEFAULT_ADAPTER = "default"

# Called with the model at the end of every `adapt`: how a layer built on this one joins in
# (peftkit.pretrained gives the model PEFT-format save_pretrained) without inject importing it.
ON_ADAPT: list[Callable[[nn.Module], None]] = []


_STATE = "peftkit_methods"


def _state_owner(model: nn.Module) -> nn.Module | None:
    """The module that holds the adapters' record: `model` itself, or the adapted model inside a wrapper."""
    return next((module for module in model.modules() if _STATE in module.__dict__), None)


def adapted_model(model: nn.Module) -> nn.Module:
    """The adapted model itself: `model`, or the one a wrapper (DDP, accelerate, a loss module) holds.

    Paths in an adapter's state are relative to it, whatever wraps it.
    """
    return _state_owner(model) or model


def adapter_methods(model: nn.Module) -> dict[str, AdapterMethod]:
    """The adapters on `model` (or on the model a wrapper holds), by name, with the method each was built from."""
    owner = _state_owner(model)
    return owner.__dict__[_STATE] if owner is not None else {}


def _record(model: nn.Module) -> dict[str, AdapterMethod]:
    """The record to change: the existing one, or a new one on `model`."""
    owner = _state_owner(model) or model
    return owner.__dict__.setdefault(_STATE, {})


def forget_adapters(model: nn.Module) -> None:
    """Drop the record of adapters, once their modules are gone from the model (`unload`)."""
    owner = _state_owner(model)
    if owner is not None:
        del owner.__dict__[_STATE]


def adapt(
    model: nn.Module,
    method: str | AdapterMethod,
    adapter_name: str = DEFAULT_ADAPTER,
    **options: Any,
) -> nn.Module:
    """Adapt `model` in place with `method` (a registered name or an instance) and return it.

    The new adapter becomes the active one and its parameters the only trainable ones.
    """
    if isinstance(method, str):
        method = get_method(method).from_options(**options)
    elif options:
        raise TypeError("pass options either in the method instance or as keywords, not both.")
    methods = _record(model)
    if adapter_name == RowRouting.BASE:
        raise ConfigError(
            f"adapter name {RowRouting.BASE!r} is reserved: it stands for the base model in mixed batches."
        )
    in_place = [f"{n!r} ({m.name})" for n, m in methods.items() if m.trains_in_place]
    if in_place:
        raise AdapterStateError(
            f"adapter {', '.join(in_place)} trains the model's own weights, so no other adapter can join it; "
            "merge_and_unload it first, or start from a fresh model."
        )
    if adapter_name in methods:
        raise AdapterExistsError(
            f"model already has an adapter named {adapter_name!r} ({methods[adapter_name].name}); "
            f"pick another adapter_name. In use: {', '.join(methods)}."
        )
    method.attach(model, adapter_name)
    methods[adapter_name] = method
    set_active_adapters(model, adapter_name)
    mark_trainable(model, adapter_name)
    for hook in ON_ADAPT:
        hook(model)
    return model


def _require_adapters(model: nn.Module, names: list[str]) -> None:
    known = adapter_methods(model)
    for name in names:
        if name not in known:
            raise AdapterNotFoundError(
                f"model has no adapter named {name!r}; adapters: {', '.join(known) or '(none)'}."
            )


def set_active_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the adapters whose outputs are added in every forward."""
    names = [names] if isinstance(names, str) else list(names)
    _require_adapters(model, names)
    for _, host in hosts(model):
        host.active_adapters = [n for n in names if n in host.adapters]


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch all adapters on or off; off gives the base model's output."""
    in_place = [f"{n!r} ({m.name})" for n, m in adapter_methods(model).items() if m.trains_in_place]
    if in_place and not enabled:
        raise AdapterStateError(
            f"adapter {', '.join(in_place)} trains the model's own weights: there is no base output to fall back to."
        )
    for _, host in hosts(model):
        host.adapters_enabled = enabled


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`with disable_adapters(model):` runs the base model, then restores the adapters."""
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        set_adapters_enabled(model, True)


def mark_trainable(model: nn.Module, adapter_name: str) -> None:
    """Freeze everything but the parameters `adapter_name` trains."""
    _require_adapters(model, [adapter_name])
    for param in model.parameters():
        param.requires_grad_(False)
    for tensor in adapter_methods(model)[adapter_name].trainable_state(model, adapter_name).values():
        if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
            tensor.requires_grad_(True)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter and free its parameters; hosts left empty give back their module."""
    _require_adapters(model, [adapter_name])
    for path, host in hosts(model):
        if adapter_name in getattr(host, "merged_adapters", ()):
            raise AdapterStateError(f"adapter {adapter_name!r} is merged into {path!r}; unmerge it before deleting.")
    for path, host in list(hosts(model)):
        if adapter_name not in host.adapters:
            continue
        del host.adapters[adapter_name]
        host.active_adapters = [n for n in host.active_adapters if n != adapter_name]
        if not host.adapters:
            model.set_submodule(path, host.wrapped)
    del _record(model)[adapter_name]


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on `model`, in the order they were added."""
    return list(adapter_methods(model))


def rename_adapter(model: nn.Module, old: str, new: str) -> None:
    """Give an adapter a new name everywhere (its parameters are kept, not copied)."""
    _require_adapters(model, [old])
    methods = adapter_methods(model)
    if new in methods or new == RowRouting.BASE:
        raise AdapterExistsError(f"cannot rename {old!r} to {new!r}: that name is in use or reserved.")
    for _, host in hosts(model):
        if old in host.adapters:
            entries = [(new if name == old else name, module) for name, module in host.adapters.items()]
            host.adapters = nn.ModuleDict(entries)
            host.active_adapters = [new if n == old else n for n in host.active_adapters]
            if isinstance(host, AdapterLayer):
                host.merged_adapters = [new if n == old else n for n in host.merged_adapters]
    renamed = {new if name == old else name: m for name, m in methods.items()}
    methods.clear()
    methods.update(renamed)


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str]) -> Iterator[nn.Module]:
    """Within the block, batch row i goes through adapter `adapter_names[i]` ("base": none).

    Works for forward and `generate` (beam search repeats rows; that is followed).
    Each row's output equals that of a batch run with its adapter alone.
    """
    _require_adapters(model, sorted({n for n in adapter_names if n != RowRouting.BASE}))
    routing = RowRouting(adapter_names)
    all_hosts = [host for _, host in hosts(model)]
    for host in all_hosts:
        host.routing = routing
    try:
        yield model
    finally:
        for host in all_hosts:
            host.routing = None


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their unpacked elements."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel() * (2 if getattr(param, "quant_state", None) is not None else 1)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
