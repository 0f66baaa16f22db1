"""Adapting a model and steering its adapters: adapt, freeze, activate, enable, delete, rename.

The model stays the user's own object (so `generate`, `save_pretrained` and
transformers' `Trainer` keep working); peftkit records which method each adapter
name uses on the adapted module itself, and finds that record through any wrapper
put around it later (DDP, accelerate, a loss module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterExistsError, AdapterNotFoundError, AdapterStateError, ConfigError
from peftkit.hosts import hosts
from peftkit.layer import AdapterLayer
from peftkit.method import AdapterMethod
from peftkit.registry import get_method
from peftkit.routing import RowRouting
from peftkit.undo import restore_on_failure

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
    "release_adapter_names",
    "require_adapters",
    "trainable_parameters",
]

DEFAULT_ADAPTER = "default"
# The base model's name in a mixed batch: peftkit's, and PEFT's spelling.
_BASE_NAMES = (RowRouting.BASE, "__base__")

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
    _check_adapter_name(adapter_name)
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
        methods[adapter_name] = method
        set_active_adapters(model, adapter_name)
        mark_trainable(model, adapter_name)
    _accept_adapter_names(model)
    for hook in ON_ADAPT:
        hook(model)
    return model


def _check_adapter_name(name: Any) -> None:
    """Refuse a name that cannot key the adapters of a host (nn.ModuleDict) or stands for the base model."""
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"an adapter name must be a non-empty string without '.', got {name!r}.")
    if name in _BASE_NAMES:
        raise ConfigError(f"adapter name {name!r} is reserved: it stands for the base model in mixed batches.")


_HOOKS = "peftkit_adapter_names_hooks"
_CALL_BLOCK = "peftkit_call_mixed_batch"


def _accept_adapter_names(model: nn.Module) -> None:
    """Let `model(..., adapter_names=[...])` and `model.generate(..., adapter_names=[...])` route rows, as in PEFT.

    Only this model instance changes: a forward pre-hook takes the keyword out of the
    call and opens a `mixed_batch` for it (an always-called forward hook closes it, so an
    error does not leave the rows routed), and the instance's `generate` takes it before
    transformers validates its keywords. Hooks use the module they are called with, so
    a deep copy of the model routes its own rows.
    """
    if _HOOKS in model.__dict__:
        return
    model.__dict__[_HOOKS] = [
        model.register_forward_pre_hook(_open_call_block, with_kwargs=True),
        model.register_forward_hook(_close_call_block, always_call=True),
    ]
    if callable(getattr(type(model), "generate", None)):
        model.generate = _GenerateWithAdapterNames(model)


def release_adapter_names(model: nn.Module) -> None:
    """Undo `_accept_adapter_names` (the model has no adapters left)."""
    for handle in model.__dict__.pop(_HOOKS, []):
        handle.remove()
    if isinstance(model.__dict__.get("generate"), _GenerateWithAdapterNames):
        del model.__dict__["generate"]


def _open_call_block(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    if module.training and torch.is_grad_enabled() and getattr(module, "is_gradient_checkpointing", False):
        # The backward recomputes checkpointed layers after this call has ended, unrouted.
        raise ConfigError(
            "adapter_names cannot route a training forward with gradient checkpointing: the backward pass "
            "recomputes layers after the call. Wrap forward and backward in peftkit.mixed_batch, or disable "
            "gradient checkpointing."
        )
    block = mixed_batch(module, names)
    block.__enter__()
    module.__dict__[_CALL_BLOCK] = block
    return args, kwargs


def _close_call_block(module: nn.Module, args: tuple, output: Any) -> None:
    block = module.__dict__.pop(_CALL_BLOCK, None)
    if block is not None:
        block.__exit__(None, None, None)


class _GenerateWithAdapterNames:
    """The model instance's `generate`: its class's, plus PEFT's `adapter_names` (row i of the prompts uses adapter i).

    An object rather than a bound function, so a pickled or deep-copied model keeps it,
    bound to the copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        model = self.model
        with ExitStack() as stack:
            if adapter_names is not None:
                stack.enter_context(mixed_batch(model, adapter_names))
            prompts = next((a for a in (*args[:1], *map(kwargs.get, _PROMPT_KEYWORDS)) if torch.is_tensor(a)), None)
            stack.enter_context(_repeated_rows(model, None if prompts is None else prompts.shape[0]))
            return type(model).generate(model, *args, **kwargs)


_PROMPT_KEYWORDS = ("inputs", "input_ids", "inputs_embeds")


@contextmanager
def _repeated_rows(model: nn.Module, prompt_rows: int | None) -> Iterator[None]:
    """While `generate` runs, a mixed batch accepts each prompt row repeated (beams, num_return_sequences).

    The names are checked against the prompt rows first: after the repetition a wrong
    count can look like a right one (3 prompts x 2 beams are 6 rows, as 2 names x 3).
    """
    routings = list({id(host.routing): host.routing for _, host in hosts(model) if host.routing is not None}.values())
    for routing in routings:
        if prompt_rows is not None and routing.rows not in (1, prompt_rows):
            raise ConfigError(
                f"mixed batch has {routing.rows} adapter names for {prompt_rows} prompt rows; "
                "give one name per row (or a single name for all rows)."
            )
    for routing in routings:
        routing.rows_repeated = True
    try:
        yield
    finally:
        for routing in routings:
            routing.rows_repeated = False


def require_adapters(model: nn.Module, names: list[str]) -> None:
    """Raise AdapterNotFoundError for the first of `names` the model has no adapter under."""
    known = adapter_methods(model)
    for name in names:
        if name not in known:
            raise AdapterNotFoundError(
                f"model has no adapter named {name!r}; adapters: {', '.join(known) or '(none)'}."
            )


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
    for tensor in adapter_methods(model)[adapter_name].trainable_state(model, adapter_name).values():
        if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
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
    del _record(model)[adapter_name]
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


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, batch row i goes through adapter `adapter_names[i]` ("base" or PEFT's "__base__": none).

    Works for forward and `generate` (beam search repeats rows; that is followed).
    Each row's output equals that of a batch run with its adapter alone. The same
    routing is what PEFT's `adapter_names=[...]` keyword on `model(...)` and
    `model.generate(...)` gives (see `_accept_adapter_names`).
    """
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names) or not adapter_names:
        raise ConfigError(f"adapter_names must be a non-empty list of names, one per row; got {adapter_names!r}.")
    names = [RowRouting.BASE if name in _BASE_NAMES else name for name in adapter_names]
    require_adapters(model, sorted({n for n in names if n != RowRouting.BASE}))
    routing = RowRouting(names)
    previous = [(host, host.routing) for _, host in hosts(model)]
    for host, _ in previous:
        host.routing = routing
    try:
        yield model
    finally:
        for host, routing_before in previous:
            host.routing = routing_before


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their unpacked elements."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel() * (2 if getattr(param, "quant_state", None) is not None else 1)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
