"""The modules peftkit puts into a model: hosts that wrap a frozen module and hold adapters.

```
            x ──► base_layer (frozen) ──► base_output ──┬──────────► + ──► y
            │                                           ▼            ▲
            └──────────────► adapters[name](x, base_output, base) ───┘   for each active name
```

A host keeps the original module as `base_layer` (HF PEFT's layout, so state-dict
keys line up) and one `Adapter` per adapter name. Each adapter returns what it adds
to the base output, so several adapters, a merged one, or a per-row choice of
adapter compose by addition and the host never needs to know the method.

What an adapter can do is declared by its class, never inferred from its type or from
which methods it overrides; the core reads each capability in one place:

| capability | declared by | read by |
| --- | --- | --- |
| `mergeable`, `merge_refusal` | adapters that change no weight (bottleneck) | `merge`: refuses, computing nothing |
| `additive_merge` | adapters whose merge is not `W + delta` (DoRA) | `merge` (checks the delta first), `combine` |
| `acts_on_parameters` | `ParameterAdapter` (MHA, bare parameters) | `merge` (folds `parameter_deltas`), `combine` |
| `stackable` | `up @ down` deltas on linear layers (LoRA's linear) | `routing` (one matmul pair per mixed batch) |
| `selected_by_target_modules` | adapters placed by an option of their method | saving (`target_modules` in the file) |
| `AdapterMethod.trains_in_place` | full, head | `adapt`, disabling, compare (no target sets) |
| `AdapterMethod.trains_base_weights` | full | the estimate (no 4-bit suggestion) |
| `AdapterMethod.has_rank` | LoRA and its family | combine, analyze, compare's rank sweep |
| `AdapterMethod.base_quantization()` | qlora, qdora | `peftkit train`, the estimate (how the base loads) |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from peftkit.errors import AdapterStateError, MergeError

__all__ = [
    "Adapter",
    "AdapterHost",
    "AdapterLayer",
    "LowRankAdapter",
    "ParameterAdapter",
    "Routing",
    "TrainableCopy",
]


class Adapter(nn.Module, ABC):
    """One method's trainable state for one layer under one adapter name.

    Subclasses implement `forward`; methods that are a weight delta also implement
    `delta_weight`, and methods whose merge is not `W + delta` (DoRA) override
    `merged_weight`/`unmerged_weight` and set `additive_merge = False`.

    Class attributes (capabilities, declared by the class that has them; see the table above):
        selected_by_target_modules: False for adapters a method places by an option of its
            own (on bare parameters, on embedding rows), so their layers are left out of
            the saved `target_modules`.
        mergeable: the adapter is a change of the base weight, so it can be folded in
            (a bottleneck adapter, a function of the layer's output, is not);
            `merge_refusal` says why not, in the merge's error.
        additive_merge: merging is `W + delta_weight()` and unmerging its inverse, so a
            merge can check the delta before writing anything.
        acts_on_parameters: the adapter changes named parameters of its layer for the call
            (`parameter_deltas`) instead of adding to its output.
        stackable: the adapter adds `x @ (up @ down).T` to a linear layer's output, so the
            adapters of a mixed batch stack into one matmul pair (`peftkit.routing`).
    """

    selected_by_target_modules: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    merge_refusal: ClassVar[str] = ""
    additive_merge: ClassVar[bool] = True
    acts_on_parameters: ClassVar[bool] = False
    stackable: ClassVar[bool] = False

    @abstractmethod
    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """What this adapter adds to `base_output` for input `x`."""

    def output(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The layer's whole output with this adapter: `base_output + forward(...)`.

        A method that can form it in fewer full-width passes than an addition overrides
        this (DoRA: one multiply-add instead of a multiply-add and an add); the contract
        suite checks that both ways give the same values for every registered method.
        """
        return base_output + self(x, base_output, base_layer)

    def delta_weight(self) -> torch.Tensor:
        """The dense `[out, in, ...]` change this adapter makes to the base weight."""
        raise MergeError(f"{type(self).__name__} is not a weight delta and cannot be merged.")

    def parameter_deltas(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """Parameter path inside `base_layer` -> the change to it (see `acts_on_parameters`); none by default."""
        return {}

    def delta_bias(self) -> torch.Tensor | None:
        """The change this adapter makes to the base layer's bias when merged (LoRA's `lora_bias`), if any."""
        return None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with this adapter folded in."""
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `merged_weight`."""
        return weight - self.delta_weight().to(weight.dtype)


class ParameterAdapter(Adapter):
    """An adapter that changes named parameters of its base layer for the call, adding nothing to its output.

    For layers that read their weights directly instead of calling submodules
    (`nn.MultiheadAttention` uses `out_proj.weight` without calling `out_proj`), or
    weights that are bare parameters (the fused expert tensors of MoE layers). The
    host runs the base layer with `P + delta` in place of each named parameter `P`
    (`torch.func.functional_call`): nothing is written to the base, and autograd
    reaches the adapter through the substituted tensors. Merging adds the deltas in.
    """

    acts_on_parameters = True

    @abstractmethod
    def parameter_deltas(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """Parameter path inside `base_layer` -> the change to it, in that parameter's own layout."""

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        raise AdapterStateError(
            f"{type(self).__name__} changes its layer's parameters and has no output of its own to add, "
            "so its rows cannot be routed apart in a mixed batch."
        )


class LowRankAdapter(Adapter):
    """An adapter whose delta is `up @ down` (scaling folded into `down`), like LoRA's.

    Such adapters can be combined (`peftkit.combine`) when their merge is additive.
    """

    @abstractmethod
    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with the delta `up @ down` (kernels flattened)."""

    @abstractmethod
    def set_low_rank_factors(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """Make the delta `up @ down` (the inverse of `low_rank_factors`)."""


class Routing(Protocol):
    """What a host asks of a per-row routing (`peftkit.routing.Routing`) inside a mixed batch."""

    def layer_output(self, layer: AdapterLayer, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """`base_output` plus, for every row, the output of that row's adapter at `layer`."""

    def groups(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Row indices per adapter (base rows left out) for a batch of `batch` rows."""


class AdapterHost(nn.Module):
    """Shared state of every module peftkit inserts: named adapters, which are active, on/off.

    Attribute look-ups the host cannot answer go to the wrapped module, so code that
    reads `layer.weight` or `layer.in_features` keeps working after adaptation.
    """

    wrapped_attribute: str

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.adapters_enabled = True
        self.routing: Routing | None = None

    @property
    def wrapped(self) -> nn.Module:
        return self._modules[self.wrapped_attribute]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if self.wrapped_attribute not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules[self.wrapped_attribute], name)


class AdapterLayer(AdapterHost):
    """Wraps a frozen layer: output = base_layer(x) + sum of the active adapters' outputs."""

    wrapped_attribute = "base_layer"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged_adapters: list[str] = []
        # Over a lossy base (4-bit), each merge keeps what restores the stored weight before it,
        # with how many adapters were merged then: unmerging back to that count is exact.
        self.restore_points: list[tuple[int, Callable[[], None]]] = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.adapters_enabled and self.merged_adapters:
            raise AdapterStateError(
                f"adapters {self.merged_adapters} are merged into the base weights; "
                "unmerge them before disabling adapters."
            )
        if not self.adapters_enabled:
            return self.base_layer(x, *args, **kwargs)
        if self.routing is not None:
            return self._routed(x, self.base_layer(x, *args, **kwargs), self.routing)
        unmerged = [name for name in self.active_adapters if name not in self.merged_adapters]
        substituting = [name for name in unmerged if isinstance(self.adapters[name], ParameterAdapter)]
        base_output = self._base_output(substituting, x, args, kwargs)
        adding = [name for name in unmerged if name not in substituting]
        if not adding:
            return base_output
        result = self.adapters[adding[0]].output(x, base_output, self.base_layer)
        for name in adding[1:]:
            result = result + self.adapters[name](x, base_output, self.base_layer)
        return result

    def _base_output(self, names: list[str], x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The base layer's output, with the parameter changes of the `ParameterAdapter`s `names` applied."""
        if not names:
            return self.base_layer(x, *args, **kwargs)
        parameters: dict[str, torch.Tensor] = {}
        for name in names:
            for path, delta in self.adapters[name].parameter_deltas(self.base_layer).items():
                current = parameters.get(path, self.base_layer.get_parameter(path))
                parameters[path] = current + delta.to(current.dtype)
        return torch.func.functional_call(self.base_layer, parameters, (x, *args), kwargs)

    def _routed(self, x: torch.Tensor, base_output: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.merged_adapters:
            raise AdapterStateError(f"adapters {self.merged_adapters} are merged; unmerge them before a mixed batch.")
        substituting = [n for n, a in self.adapters.items() if isinstance(a, ParameterAdapter)]
        if substituting:
            raise AdapterStateError(
                f"adapter {substituting[0]!r} changes this layer's parameters and has no output of its own, "
                "so its rows cannot be routed apart in a mixed batch."
            )
        return routing.layer_output(self, x, base_output)


class TrainableCopy(AdapterHost):
    """`modules_to_save`: the original module stays frozen; each adapter trains a full copy of it."""

    wrapped_attribute = "original_module"

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.adapters_enabled:
            return self.original_module(x, *args, **kwargs)
        if self.routing is not None:
            return self._routed(x, self.routing, *args, **kwargs)
        if self.active_adapters:
            return self.adapters[self.active_adapters[-1]](x, *args, **kwargs)
        return self.original_module(x, *args, **kwargs)

    def _routed(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.original_module(x, *args, **kwargs)
        for name, rows in routing.groups(x.shape[0], x.device).items():
            if name in self.adapters:
                result = result.index_copy(0, rows, self.adapters[name](x[rows], *args, **kwargs))
        return result
