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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterStateError, MergeError

__all__ = ["Adapter", "AdapterHost", "AdapterLayer", "RowRouting", "TrainableCopy"]


class Adapter(nn.Module, ABC):
    """One method's trainable state for one layer under one adapter name.

    Subclasses implement `forward`; methods that are a weight delta also implement
    `delta_weight`, and methods whose merge is not `W + delta` (DoRA) override
    `merged_weight`/`unmerged_weight`.
    """

    @abstractmethod
    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """What this adapter adds to `base_output` for input `x`."""

    def delta_weight(self) -> torch.Tensor:
        """The dense `[out, in, ...]` change this adapter makes to the base weight."""
        raise MergeError(f"{type(self).__name__} is not a weight delta and cannot be merged.")

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with this adapter folded in."""
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `merged_weight`."""
        return weight - self.delta_weight().to(weight.dtype)


class RowRouting:
    """Which batch rows go to which adapter, for one mixed-batch forward.

    Row indices are grouped once per adapter name, so each layer does one gather and
    one scatter per distinct adapter: the cost grows with the number of adapters in the
    batch, not with its size. Rows named `BASE` get the base output.
    """

    BASE = "base"

    def __init__(self, adapter_names: list[str]) -> None:
        self.rows = len(adapter_names)
        self.names = list(adapter_names)
        self._groups: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = {}

    def groups(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Row indices per adapter for a batch of `batch` rows (a multiple, under beam search)."""
        key = (batch, device)
        if key not in self._groups:
            if batch % self.rows:
                raise AdapterStateError(
                    f"mixed batch names an adapter for {self.rows} rows, but a layer got {batch} rows."
                )
            repeat = batch // self.rows  # generate() repeats each row per beam
            per_row = [name for name in self.names for _ in range(repeat)]
            self._groups[key] = {
                name: torch.tensor([i for i, n in enumerate(per_row) if n == name], device=device)
                for name in dict.fromkeys(per_row)
                if name != self.BASE
            }
        return self._groups[key]


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
        self.routing: RowRouting | None = None

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

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.adapters_enabled and self.merged_adapters:
            raise AdapterStateError(
                f"adapters {self.merged_adapters} are merged into the base weights; "
                "unmerge them before disabling adapters."
            )
        base_output = self.base_layer(x, *args, **kwargs)
        if not self.adapters_enabled:
            return base_output
        if self.routing is not None:
            return self._routed(x, base_output, self.routing)
        result = base_output
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = result + self.adapters[name](x, base_output, self.base_layer)
        return result

    def _routed(self, x: torch.Tensor, base_output: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        if self.merged_adapters:
            raise AdapterStateError(f"adapters {self.merged_adapters} are merged; unmerge them before a mixed batch.")
        result = base_output
        for name, rows in routing.groups(x.shape[0], x.device).items():
            if name not in self.adapters:
                continue  # this adapter does not touch this layer
            if len(rows) == x.shape[0]:
                result = result + self.adapters[name](x, base_output, self.base_layer)
            else:
                delta = self.adapters[name](x[rows], base_output[rows], self.base_layer)
                result = result.index_add(0, rows, delta)
        return result


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

    def _routed(self, x: torch.Tensor, routing: RowRouting, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.original_module(x, *args, **kwargs)
        for name, rows in routing.groups(x.shape[0], x.device).items():
            if name in self.adapters:
                result = result.index_copy(0, rows, self.adapters[name](x[rows], *args, **kwargs))
        return result
