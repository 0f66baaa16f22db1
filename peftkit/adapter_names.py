"""PEFT's `adapter_names=[...]` keyword on an adapted model's `forward` and `generate`.

`model(input_ids, adapter_names=["sql", "base"])` routes row i through adapter i, as
`peftkit.routing.mixed_batch` does; PEFT users write it this way. Only the model
instance changes (a forward pre-hook and an instance `generate`); no transformers
class is patched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.hosts import hosts
from peftkit.routing import mixed_batch

__all__ = ["accept_adapter_names", "release_adapter_names"]


_HOOKS = "peftkit_adapter_names_hooks"
_CALL_BLOCK = "peftkit_call_mixed_batch"


def accept_adapter_names(model: nn.Module) -> None:
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
    """Undo `accept_adapter_names` (the model has no adapters left)."""
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
