"""Adapting a model and steering its adapters: adapt, freeze, activate, enable, delete, rename.

The model stays the user's own object (so `generate`, `save_pretrained` and
transformers' `Trainer` keep working); peftkit records which method each adapter
name uses on the adapted module itself, and finds that record through any wrapper
put around it later (DDP, accelerate, a loss module).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from peftkit.errors import AdapterExistsError, AdapterStateError, ConfigError
from peftkit.injection import hosts
from peftkit.layer import AdapterLayer
from peftkit.method import AdapterMethod
from peftkit.pretrained import install as install_pretrained
from peftkit.record import DEFAULT_ADAPTER, adapter_method, adapter_methods, record_for_update, require_adapters
from peftkit.registry import get_method
from peftkit.routing import BASE_NAMES, accept_adapter_names, release_adapter_names
from peftkit.undo import restore_on_failure

__all__ = [
    "adapt",
    "set_active_adapters",
    "set_adapters_enabled",
    "disable_adapters",
    "mark_trainable",
    "delete_adapter",
    "rename_adapter",
    "list_adapters",
    "trainable_parameters",
]


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
    methods = adapter_methods(model)
    _check_adapter_name(adapter_name)
    _refuse_peft_wrapped(model)
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
    with restore_on_failure(model):  # e.g. a target that cannot be adapted after others were wrapped
        method.attach(model, adapter_name)
        record_for_update(model)[adapter_name] = method
        set_active_adapters(model, adapter_name)
        mark_trainable(model, adapter_name)
    accept_adapter_names(model)
    install_pretrained(model)
    return model


def _refuse_peft_wrapped(model: nn.Module) -> None:
    """Say so when HF PEFT has wrapped the model already: its layers are no plain layers to adapt."""
    wrapped = next(
        ((path, module) for path, module in model.named_modules() if type(module).__module__.split(".")[0] == "peft"),
        None,
    )
    if wrapped is not None:
        path, module = wrapped
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        where = f" ({kind} at {path!r})" if path else f" ({kind})"
        raise ConfigError(
            f"this model is already adapted by HF PEFT{where}; peftkit adapts a plain model. Take PEFT's adapter "
            "off first (model.unload() or model.merge_and_unload() on the PeftModel), or load the saved PEFT "
            "adapter onto the plain model with peftkit.load_adapter(model, directory)."
        )


def _check_adapter_name(name: Any) -> None:
    """Refuse a name that cannot key the adapters of a host (nn.ModuleDict) or stands for the base model."""
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"an adapter name must be a non-empty string without '.', got {name!r}.")
    if name in BASE_NAMES:
        raise ConfigError(f"adapter name {name!r} is reserved: it stands for the base model in mixed batches.")


def set_active_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the adapters whose outputs are added in every forward."""
    names = [names] if isinstance(names, str) else list(names)
    require_adapters(model, names)
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
    require_adapters(model, [adapter_name])
    for param in model.parameters():
        param.requires_grad_(False)
    method = adapter_method(model, adapter_name)
    frozen = {id(tensor) for tensor in method.frozen_tensors(model, adapter_name)}
    for tensor in method.trainable_state(model, adapter_name).values():
        if isinstance(tensor, nn.Parameter) and tensor.is_floating_point() and id(tensor) not in frozen:
            tensor.requires_grad_(True)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter and free its parameters; hosts left empty give back their module."""
    require_adapters(model, [adapter_name])
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
    del record_for_update(model)[adapter_name]
    if not adapter_methods(model):
        release_adapter_names(model)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on `model`, in the order they were added."""
    return list(adapter_methods(model))


def rename_adapter(model: nn.Module, old: str, new: str) -> None:
    """Give an adapter a new name everywhere (its parameters are kept, not copied)."""
    require_adapters(model, [old])
    _check_adapter_name(new)
    methods = adapter_methods(model)
    if new in methods:
        raise AdapterExistsError(f"cannot rename {old!r} to {new!r}: that name is in use ({', '.join(methods)}).")
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


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit weight counts the weights it holds.

    Those are read from its quantization state (the dense shape it dequantizes to), whatever
    storage dtype packs them: PEFT's count, `numel * 2 * storage itemsize`, gives the same.
    """
    trainable = total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        count = math.prod(state.shape) if state is not None else param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
