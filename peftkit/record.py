"""Which adapters a model has: the record `adapt` keeps on the adapted model, found through wrappers.

The record (adapter name -> the method instance it was built from) lives in the
adapted module's `__dict__`, so DDP, accelerate or a loss module wrapped around the
model later still lead to it.
"""

from __future__ import annotations

from torch import nn

from peftkit.errors import AdapterNotFoundError
from peftkit.method import AdapterMethod

__all__ = [
    "DEFAULT_ADAPTER",
    "adapted_model",
    "adapter_methods",
    "record_for_update",
    "forget_adapters",
    "require_adapters",
    "adapter_method",
]

DEFAULT_ADAPTER = "default"

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


def record_for_update(model: nn.Module) -> dict[str, AdapterMethod]:
    """The record to change: the existing one, or a new one on `model`."""
    owner = _state_owner(model) or model
    return owner.__dict__.setdefault(_STATE, {})


def forget_adapters(model: nn.Module) -> None:
    """Drop the record of adapters, once their modules are gone from the model (`unload`)."""
    owner = _state_owner(model)
    if owner is not None:
        del owner.__dict__[_STATE]


def require_adapters(model: nn.Module, names: list[str]) -> None:
    """Raise AdapterNotFoundError for the first of `names` the model has no adapter under."""
    for name in names:
        adapter_method(model, name)


def adapter_method(model: nn.Module, name: str) -> AdapterMethod:
    """The method of adapter `name`; AdapterNotFoundError naming the adapters the model has."""
    known = adapter_methods(model)
    if name not in known:
        if not known:
            raise AdapterNotFoundError(
                f"{type(model).__name__} has no peftkit adapters (asked for {name!r}); "
                "adapt it (peftkit.adapt) or load one (peftkit.load_adapter) first."
            )
        raise AdapterNotFoundError(f"model has no adapter named {name!r}; adapters: {', '.join(known)}.")
    return known[name]
