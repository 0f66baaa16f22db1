"""Read and write a layer's weight in one canonical orientation, whatever its storage.

Methods compute deltas as `[out_features, in_features, ...]`, the orientation of
`nn.Linear`. Layers that store the transpose (GPT-2's `Conv1D`, `nn.Embedding`
seen as a one-hot linear map) or a packed form (a 4-bit base, registered by
`peftkit.quantization`) say here how to convert, so merging is written once.
Convolutions keep their `[out, in / groups, *kernel]` kernel as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "WeightAccess",
    "register_weight_access",
    "weight_access",
    "read_weight",
    "write_weight",
    "layer_features",
]


@dataclass(frozen=True)
class WeightAccess:
    """How to get a dense canonical weight out of a layer type, and put one back."""

    read: Callable[[nn.Module], torch.Tensor]
    write: Callable[[nn.Module, torch.Tensor], None]
    features: Callable[[nn.Module], tuple[int, int]]


_ACCESS: dict[type, WeightAccess] = {}


def register_weight_access(layer_type: type, access: WeightAccess) -> None:
    """Teach peftkit the weight layout of `layer_type` (and its subclasses)."""
    _ACCESS[layer_type] = access


def weight_access(layer: nn.Module) -> WeightAccess | None:
    """The access rule for `layer`'s most specific registered type, or None."""
    if type(layer).__module__.startswith("bitsandbytes"):
        # Quantized layers subclass nn.Linear; their rule lives in the one module
        # that imports bitsandbytes, loaded only when such a layer is seen.
        importlib.import_module("peftkit.quantization")
    for cls in type(layer).__mro__:
        if cls in _ACCESS:
            return _ACCESS[cls]
    return None


def _require(layer: nn.Module) -> WeightAccess:
    access = weight_access(layer)
    if access is None:
        raise TypeError(f"peftkit does not know the weight layout of {type(layer).__name__}.")
    return access


def read_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense `[out, in, ...]` tensor (a view where possible)."""
    return _require(layer).read(layer)


def write_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store a dense `[out, in, ...]` weight back into the layer, in place."""
    _require(layer).write(layer, weight)


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of the layer seen as a linear map."""
    return _require(layer).features(layer)


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


_direct = WeightAccess(
    read=lambda layer: layer.weight,
    write=lambda layer, w: _copy_into(layer.weight, w),
    features=lambda layer: (layer.weight.shape[1], layer.weight.shape[0]),
)
_transposed = WeightAccess(
    read=lambda layer: layer.weight.T,
    write=lambda layer, w: _copy_into(layer.weight, w.T),
    features=lambda layer: (layer.weight.shape[0], layer.weight.shape[1]),
)

register_weight_access(nn.Linear, _direct)
register_weight_access(nn.Conv1d, _direct)  # [out, in / groups, *kernel]
register_weight_access(nn.Conv2d, _direct)
register_weight_access(nn.Conv3d, _direct)
register_weight_access(Conv1D, _transposed)
register_weight_access(nn.Embedding, _transposed)
