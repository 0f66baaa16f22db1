"""Read and write a layer's weight in one canonical orientation, whatever its storage.

Methods compute deltas as `[out_features, in_features, ...]`, the orientation of
`nn.Linear`. Layers that store the transpose (GPT-2's `Conv1D`, `nn.Embedding`
seen as a one-hot linear map) or a packed form (a 4-bit base) say here how to
convert, so merging is written once.

Layouts are keyed by the layer class's qualified name, so the core names
transformers' `Conv1D` without importing transformers. Packages that bring layer
types of their own (peftkit's 4-bit codec over bitsandbytes, or a third party)
declare their layouts in the `peftkit.weight_layouts` entry-point group: a callable
returning `{layer type: WeightAccess}`, loaded the first time a layer of an
unregistered type is met.
Convolutions keep their `[out, in / groups, *kernel]` kernel as it is.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch
from torch import nn

from peftkit.errors import UnsupportedModuleError

__all__ = [
    "LAYOUT_ENTRY_POINT_GROUP",
    "WeightAccess",
    "register_weight_access",
    "weight_access",
    "read_weight",
    "write_weight",
    "keep_weight",
    "layer_features",
    "is_linear",
    "fan_in_fan_out",
    "WeightSource",
    "set_weight_source",
    "weight_source",
    "using_weight_source",
]

LAYOUT_ENTRY_POINT_GROUP = "peftkit.weight_layouts"
_LINEAR = "torch.nn.modules.linear.Linear"
_CONV1D = "transformers.pytorch_utils.Conv1D"


@dataclass(frozen=True)
class WeightAccess:
    """How to get a dense canonical weight out of a layer type, and put one back.

    A lossy layout (a 4-bit base) declares `keep`: it captures what restores the layer's
    stored weight exactly and returns the callable that does so, which is how an unmerge
    undoes a merge without a second rounding. Its `write` returns the largest absolute
    error the write added (`max |read(layer) - weight|`); an exact layout's returns None.
    """

    read: Callable[[nn.Module], torch.Tensor]
    write: Callable[[nn.Module, torch.Tensor], float | None]
    features: Callable[[nn.Module], tuple[int, int]]
    keep: Callable[[nn.Module], Callable[[], None]] | None = None


_ACCESS: dict[str, WeightAccess] = {}
_discovered = False


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_weight_access(layer_type: type | str, access: WeightAccess) -> None:
    """Teach peftkit the weight layout of `layer_type` (a class or its qualified name) and its subclasses."""
    _ACCESS[layer_type if isinstance(layer_type, str) else _qualified(layer_type)] = access


def _discover_layouts() -> None:
    """Load every `peftkit.weight_layouts` entry point once; a broken one is skipped with a warning."""
    global _discovered
    _discovered = True
    for entry in entry_points(group=LAYOUT_ENTRY_POINT_GROUP):
        try:
            layouts = entry.load()()
        except Exception as error:  # e.g. bitsandbytes not installed: its layers cannot exist either
            warnings.warn(f"peftkit weight layouts {entry.name!r} failed to load ({error})", stacklevel=3)
            continue
        for layer_type, access in layouts.items():
            register_weight_access(layer_type, access)


def weight_access(layer: nn.Module) -> WeightAccess | None:
    """The access rule for `layer`'s most specific registered type, or None."""
    if not _discovered and _qualified(type(layer)) not in _ACCESS:
        _discover_layouts()
    for cls in type(layer).__mro__:
        access = _ACCESS.get(_qualified(cls))
        if access is not None:
            return access
    return None


def _require(layer: nn.Module) -> WeightAccess:
    access = weight_access(layer)
    if access is None:
        raise UnsupportedModuleError(
            f"peftkit does not know the weight layout of {type(layer).__name__}; known layouts: "
            f"{', '.join(sorted(name.rpartition('.')[2] for name in _ACCESS))}."
        )
    return access


def read_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense `[out, in, ...]` tensor (a view where possible)."""
    return _require(layer).read(layer)


def write_weight(layer: nn.Module, weight: torch.Tensor) -> float | None:
    """Store a dense `[out, in, ...]` weight back into the layer, in place.

    Returns the largest absolute error a lossy layout's write added, None for an exact one.
    """
    return _require(layer).write(layer, weight)


def keep_weight(layer: nn.Module) -> Callable[[], None] | None:
    """For a lossy layout, the callable that restores the layer's stored weight as it is now; else None."""
    keep = _require(layer).keep
    return keep(layer) if keep is not None else None


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of the layer seen as a linear map."""
    return _require(layer).features(layer)


def is_linear(module: nn.Module) -> bool:
    """Whether `module` computes `x @ W.T (+ b)`: an `nn.Linear` (4-bit ones included) or GPT-2's `Conv1D`."""
    return any(_qualified(cls) in (_LINEAR, _CONV1D) for cls in type(module).__mro__)


def fan_in_fan_out(layer: nn.Module) -> bool:
    """Whether a linear layer stores its weight as `[in, out]` (GPT-2's `Conv1D`): PEFT's `fan_in_fan_out`."""
    return is_linear(layer) and weight_access(layer) is _transposed


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
register_weight_access(_CONV1D, _transposed)
register_weight_access(nn.Embedding, _transposed)


# A model's full-precision weights where its layers hold packed (4-bit) ones: module path -> `[out, in]`.
WeightSource = Callable[[str], torch.Tensor | None]
_SOURCES: weakref.WeakKeyDictionary[nn.Module, WeightSource] = weakref.WeakKeyDictionary()


def _no_source(path: str) -> None:
    return None


def set_weight_source(model: nn.Module, source: WeightSource | None) -> None:
    """Tell inits that read the base weight (PiSSA, LoftQ) where `model`'s full-precision weights are.

    A model loaded straight into 4 bits has only quantized layers; its loader can name a
    reader of the checkpoint, called one layer at a time, so the full-precision model
    never has to exist whole in memory. None forgets it.
    """
    if source is None:
        _SOURCES.pop(model, None)
    else:
        _SOURCES[model] = source


def weight_source(model: nn.Module) -> WeightSource:
    """`model`'s full-precision weight reader: module path -> `[out, in]` tensor, or None where unknown."""
    return _SOURCES.get(model, _no_source)


@contextmanager
def using_weight_source(model: nn.Module, source: WeightSource) -> Iterator[None]:
    """`source` for the duration (e.g. the dense weights of layers being quantized), then the previous one."""
    previous = _SOURCES.get(model)
    _SOURCES[model] = source
    try:
        yield
    finally:
        set_weight_source(model, previous)
