"""All or nothing: a call that fails part-way gives the model back as it was.

Calls that change a model check what they can before changing anything. What a check
cannot foresee (a layer that cannot be adapted after others were wrapped, a file that
does not fit a freshly quantized base) is undone from a snapshot taken before the
call: which submodule, parameter and buffer objects every module holds, each
parameter's storage and `requires_grad`, and every module's plain attributes (flags,
lists of adapter names). No tensor is copied, so a snapshot is cheap; in exchange,
values written in place into existing tensors are not covered, which is why merging
checks every layer before it writes one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["restore_on_failure"]

# nn.Module's own containers, restored by content; its other private state (hooks) is left alone.
_CONTAINERS = ("_modules", "_parameters", "_buffers")


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


def _snapshot(model: nn.Module) -> tuple[list[_ModuleState], list[tuple[nn.Parameter, torch.Tensor, bool]]]:
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


def _restore(modules: list[_ModuleState], params: list[tuple[nn.Parameter, torch.Tensor, bool]]) -> None:
    for state in modules:
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
    try:
        yield
    except BaseException:
        _restore(*snapshot)
        raise
