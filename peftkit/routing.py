"""Mixed batches: each row of one forward goes through its own adapter (or none).

Two ways to compute a layer's per-row adapter output:

- grouped (any method, training included): rows are grouped per adapter once per
  forward; each layer does one gather, one adapter call and one scatter-add per
  distinct adapter, so the cost grows with the number of adapters, not of rows;
- stacked (inference over adapters that declare themselves `stackable`, LoRA-style
  `up @ down` deltas on linear layers): the factors of all the batch's adapters are
  stacked once, and each layer does two matmuls whatever the number of adapters, a
  row mask keeping each row's own block:

      delta = ((x @ [D_1; D_2; ...].T) * row_mask) @ [U_1, U_2, ...].T

PEFT's `adapter_names=[...]` keyword drives the same routing: `model(input_ids,
adapter_names=["sql", "base"])` routes row i through adapter i, as `mixed_batch` does;
PEFT users write it this way. Only the model instance changes (a forward pre-hook and
an instance `generate`); no transformers class is patched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.injection import hosts
from peftkit.layer import AdapterLayer, LowRankAdapter
from peftkit.record import require_adapters

__all__ = ["BASE_NAMES", "RowRouting", "accept_adapter_names", "mixed_batch", "release_adapter_names"]


class RowRouting:
    """Which batch rows go to which adapter, for the forwards inside one `mixed_batch` block."""

    BASE = "base"

    def __init__(self, adapter_names: list[str]) -> None:
        self.rows = len(adapter_names)
        self.names = list(adapter_names)
        # Set while `generate` runs: it repeats each prompt row per beam / returned sequence.
        self.rows_repeated = False
        self._groups: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = {}
        self._stacks: dict[
            tuple[int, int, torch.device], tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}

    def _per_row(self, batch: int) -> list[str]:
        """Each row's adapter: one name per row, one for all rows, or (in `generate`) one per copy of a row."""
        if self.rows == 1 or batch == self.rows or (self.rows_repeated and batch % self.rows == 0):
            return [name for name in self.names for _ in range(batch // self.rows)]
        repeated = f"; generate repeats each prompt row, but {batch} is not a multiple of {self.rows}"
        raise ConfigError(
            f"mixed batch has {self.rows} adapter names for a batch of {batch} rows; give one name per row "
            f"(or a single name for all rows){repeated if self.rows_repeated else ''}."
        )

    def groups(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Row indices per adapter (base rows left out) for a batch of `batch` rows."""
        key = (batch, device)
        if key not in self._groups:
            per_row = self._per_row(batch)
            self._groups[key] = {
                name: torch.tensor([i for i, n in enumerate(per_row) if n == name], device=device)
                for name in dict.fromkeys(per_row)
                if name != self.BASE
            }
        return self._groups[key]

    def layer_output(self, layer: AdapterLayer, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """`base_output` plus, for every row, the output of that row's adapter at `layer`."""
        groups = {n: rows for n, rows in self.groups(x.shape[0], x.device).items() if n in layer.adapters}
        if not groups:
            return base_output
        adapters = [layer.adapters[name] for name in groups]
        stackable = not torch.is_grad_enabled() and all(
            isinstance(a, LowRankAdapter) and a.stackable and a.delta_bias() is None and not a.training
            for a in adapters
        )
        if stackable:
            return self._add_stacked_delta(layer, list(groups), x, base_output)
        result = base_output.clone()  # one copy, then each adapter's rows are added in place
        for name, rows in groups.items():
            if len(rows) == x.shape[0]:
                result.add_(layer.adapters[name](x, base_output, layer.base_layer))
            else:
                result.index_add_(0, rows, layer.adapters[name](x[rows], base_output[rows], layer.base_layer))
        return result

    def _add_stacked_delta(
        self, layer: AdapterLayer, names: list[str], x: torch.Tensor, base_output: torch.Tensor
    ) -> torch.Tensor:
        """`base_output` with every row's delta added in place (no graph to keep: inference only)."""
        key = (id(layer), x.shape[0], x.device)
        versions = tuple(p._version for name in names for p in layer.adapters[name].parameters())
        cached = self._stacks.get(key)
        if cached is None or cached[0] != versions:  # weights changed inside the block: rebuild
            factors = [layer.adapters[name].low_rank_factors() for name in names]
            up = torch.cat([u for u, _ in factors], dim=1).detach()
            down = torch.cat([d for _, d in factors], dim=0).detach()
            mask = torch.zeros(x.shape[0], down.shape[0], dtype=down.dtype, device=x.device)
            ranks = {name: d.shape[0] for name, (_, d) in zip(names, factors, strict=True)}
            starts = torch.tensor([0, *ranks.values()]).cumsum(0).tolist()
            offsets = dict(zip(names, starts[:-1], strict=True))
            for row, name in enumerate(self._per_row(x.shape[0])):
                if name in offsets:
                    mask[row, offsets[name] : offsets[name] + ranks[name]] = 1
            cached = self._stacks[key] = (versions, up, down, mask)
        _, up, down, mask = cached
        hidden = (x.to(down.dtype) @ down.T).mul_(mask.view(x.shape[0], *[1] * (x.dim() - 2), -1))
        if not base_output.is_contiguous():
            base_output = base_output.contiguous()
        flat = base_output.view(-1, base_output.shape[-1])
        flat.addmm_(hidden.reshape(-1, hidden.shape[-1]).to(flat.dtype), up.T.to(flat.dtype))
        return base_output


# The base model's name in a mixed batch: peftkit's, and PEFT's spelling.
BASE_NAMES = (RowRouting.BASE, "__base__")


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, batch row i goes through adapter `adapter_names[i]` ("base" or PEFT's "__base__": none).

    Works for forward and `generate` (beam search repeats rows; that is followed).
    Each row's output equals that of a batch run with its adapter alone. The same
    routing is what PEFT's `adapter_names=[...]` keyword on `model(...)` and
    `model.generate(...)` gives (see `peftkit.routing`).
    """
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names) or not adapter_names:
        raise ConfigError(f"adapter_names must be a non-empty list of names, one per row; got {adapter_names!r}.")
    names = [RowRouting.BASE if name in BASE_NAMES else name for name in adapter_names]
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


# ---------------------------------------------------------------- PEFT's adapter_names keyword

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
