"""All or nothing: a call that fails part-way gives the model back as it was.

Calls that change a model check what they can before changing anything. What a check
cannot foresee (a layer that cannot be adapted after others were wrapped, a file that
does not fit a freshly quantized base) is undone from a snapshot taken before the
call: which submodule, parameter and buffer objects every module holds, each
parameter's storage and `requires_grad`, and every module's plain attributes (flags,
lists of adapter names). No tensor is copied, so a snapshot is cheap; in exchange,
values written in place into existing tensors are not covered, which is why merging
checks every layer before it writes one.

A parameter that can be rebuilt from elsewhere (a weight init re-reads the checkpoint
it came from) need not be held: `rebuild_on_failure` swaps it out of the snapshots
for a callable that puts it back, so replacing a model's 4-bit weights one layer at a
time never keeps two copies of them.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["rebuild_on_failure", "restore_on_failure"]

# nn.Module's own containers, restored by content; its other private state (hooks) is left alone.
_CONTAINERS = ("_modules", "_parameters", "_buffers")


@dataclass
class _Rebuild:
    """Where a snapshot would hold a parameter: the callable that puts an equal one back on its module."""

    put_back: Callable[[], None]


@dataclass
class _ModuleState:
    module: nn.Module
    containers: dict[str, dict[str, Any]]
    attributes: dict[str, tuple[Any, Any]]  # name -> (the object, a copy of its content if it is a container)


def _content(value: Any) -> Any:
    return copy.copy(value) if isinstance(value, (list, dict, set)) else None


def _put_back(value: Any, content: Any) -> Any:
    """`value` holding `content` again (the same list/dict/set object, so references stay valid)."""
    if isinstance(value, list):
        value[:] = content
    elif content is not None:
        value.clear()
        value.update(content)
    return value


_Params = list[tuple[nn.Parameter, torch.Tensor, bool]]
_Snapshot = tuple[list[_ModuleState], _Params]
# The snapshots open on each model (nested calls), for `rebuild_on_failure` to reach.
_OPEN: weakref.WeakKeyDictionary[nn.Module, list[_Snapshot]] = weakref.WeakKeyDictionary()


def _snapshot(model: nn.Module) -> _Snapshot:
    modules = [
        _ModuleState(
            module,
            {name: dict(getattr(module, name)) for name in _CONTAINERS},
            {k: (v, _content(v)) for k, v in vars(module).items() if not k.startswith("_")},
        )
        for module in model.modules()
    ]
    params = {
        id(p): (p, p.data, p.requires_grad)
        for state in modules
        for p in state.containers["_parameters"].values()
        if p is not None
    }
    return modules, list(params.values())


def _restore(modules: list[_ModuleState], params: _Params) -> None:
    for state in modules:
        for key, value in list(state.containers["_parameters"].items()):
            if isinstance(value, _Rebuild):
                value.put_back()
                state.containers["_parameters"][key] = state.module._parameters[key]
        for name, content in state.containers.items():
            _put_back(getattr(state.module, name), content)
        for key in [k for k in vars(state.module) if not k.startswith("_") and k not in state.attributes]:
            delattr(state.module, key)
        for key, (value, content) in state.attributes.items():
            object.__setattr__(state.module, key, _put_back(value, content))
    with torch.no_grad():
        for param, data, requires_grad in params:
            now = param.data
            if (now.data_ptr(), now.dtype, now.shape) != (data.data_ptr(), data.dtype, data.shape):
                param.data = data
            param.requires_grad_(requires_grad)


@contextmanager
def restore_on_failure(model: nn.Module) -> Iterator[None]:
    """Within the block, an exception puts back the structure `model` had when it was entered."""
    snapshot = _snapshot(model)
    _OPEN.setdefault(model, []).append(snapshot)
    try:
        yield
    except BaseException:
        _restore(*snapshot)
        raise
    finally:
        _OPEN[model] = [open_ for open_ in _OPEN[model] if open_ is not snapshot]


def rebuild_on_failure(model: nn.Module, module: nn.Module, name: str, put_back: Callable[[], None]) -> None:
    """Let the open snapshots of `model` drop `module`'s parameter `name` as it is now; undo calls `put_back`.

    `put_back` must give `module` a parameter equal to the current one (e.g. re-read from
    the checkpoint it was loaded from). Call it before replacing or overwriting the parameter.
    """
    current = module._parameters[name]
    for modules, params in _OPEN.get(model, []):
        for state in modules:
            if state.module is module and state.containers["_parameters"].get(name) is current:
                state.containers["_parameters"][name] = _Rebuild(put_back)
        params[:] = [entry for entry in params if entry[0] is not current]
