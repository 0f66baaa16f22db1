"""Loading adapters written in HF PEFT's format onto a model, and swapping their tensors in place.

The format itself (names, config fields, reading and writing files) is
`peftkit.peft_format`; this module changes models: it adapts one as a saved config
says and fills in the saved tensors, shape-checked, all or nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.adapters import adapt, mark_trainable
from peftkit.errors import AdapterFileError, AdapterStateError, ShapeMismatchError
from peftkit.injection import hosts
from peftkit.layer import AdapterLayer
from peftkit.method import AdapterMethod
from peftkit.peft_format import (
    CONFIG_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    adapter_state_dict,
    method_from_config,
    read_adapter_config,
    read_adapter_tensors,
)
from peftkit.record import DEFAULT_ADAPTER, adapted_model, adapter_methods
from peftkit.registry import get_method
from peftkit.undo import restore_on_failure

__all__ = ["load_adapter", "hot_swap_adapter", "copy_adapter_tensors"]


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    name: str = DEFAULT_ADAPTER,
    *,
    method: str | AdapterMethod | None = None,
    trainable: bool = False,
) -> nn.Module:
    """Adapt `model` as the saved config says, fill in the saved tensors, and make it active.

    `method` overrides the method named in the file (e.g. `"qlora"` to load a LoRA file
    onto a base that should be quantized). With `trainable=False` (PEFT's default) the
    loaded adapter is frozen for inference.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors, metadata = read_adapter_tensors(directory / WEIGHTS_NAME)
    if method is None:
        method = method_from_config(config, metadata, directory / CONFIG_NAME)
    elif isinstance(method, str):
        saved = method_from_config(config, metadata, directory / CONFIG_NAME).options()
        method = get_method(method).from_options(**saved)
    method = method.for_loading()
    with restore_on_failure(model):  # a file that does not fit leaves no adapter, and no quantized base
        adapt(model, method, name)
        copy_adapter_tensors(model, name, tensors, directory)
    if trainable:
        mark_trainable(model, name)
    else:
        for param in adapter_state_dict(model, name).values():
            param.requires_grad_(False)
    return model


def copy_adapter_tensors(
    model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], source: str | os.PathLike[str]
) -> None:
    """Copy saved tensors (PEFT key names) into the live adapter, after checking names and shapes.

    Nothing is copied unless every tensor fits and is finite (a corrupt file's bytes read
    as NaN), so a bad file leaves the adapter as it was; `source` (a directory or file) is
    named in the error.
    """
    _check_finite(tensors, source)
    expected = adapter_state_dict(model, adapter_name)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        problems = [f"{len(missing)} tensor(s) missing (e.g. {missing[:3]})"] if missing else []
        problems += _unexpected_tensors(model, adapter_name, unexpected)
        raise ShapeMismatchError(f"adapter in {str(source)!r} does not fit this model: {'; '.join(problems)}.")
    for key, target in expected.items():
        if target.shape != tensors[key].shape:
            local = key.removeprefix(PEFT_PREFIX)
            module = max(
                (p for p, _ in hosts(model) if local.startswith(p + ".")), key=len, default=local.rpartition(".")[0]
            )
            name = local[len(module) + 1 :]
            raise ShapeMismatchError(
                f"module {module!r}: saved {name} has shape {tuple(tensors[key].shape)}, "
                f"but this model needs {tuple(target.shape)}; was the adapter trained on another base model?"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))


def _unexpected_tensors(model: nn.Module, adapter_name: str, keys: list[str]) -> list[str]:
    """Why saved tensors have no place in the live adapter: the module is missing, untargeted, or has no such tensor.

    A config that lists fewer modules than the file holds tensors for is told apart from
    an adapter for another model: the model has those modules, the config does not target them.
    """
    modules = dict(adapted_model(model).named_modules())
    adapted = {path for path, host in hosts(model) if adapter_name in getattr(host, "adapters", {})}
    groups: dict[str, list[str]] = {"lacks": [], "untargeted": [], "extra": []}
    for key in keys:
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        # An adapter tensor is its module's path plus one or two parts (`lora_A.weight`, `lora_magnitude_vector`).
        owner = next((".".join(parts[:-n]) for n in (1, 2) if ".".join(parts[:-n]) in modules), None)
        groups["lacks" if owner is None else "extra" if owner in adapted else "untargeted"].append(key)
    texts = {
        "lacks": "name modules this model lacks",
        "untargeted": "belong to modules of this model that adapter_config.json does not target "
        "(its target_modules lists fewer modules than the file has tensors for)",
        "extra": "are not part of this method's adapter on modules it does target",
    }
    return [f"{len(found)} tensor(s) {texts[group]} (e.g. {found[:3]})" for group, found in groups.items() if found]


def _check_finite(tensors: dict[str, torch.Tensor], source: str | os.PathLike[str]) -> None:
    """AdapterFileError naming the file and the first tensor that holds NaN or Inf."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not (finite := torch.isfinite(tensor)).all():
            path = Path(source) / WEIGHTS_NAME if Path(source).is_dir() else Path(source)
            raise AdapterFileError(
                f"{path}: tensor {key!r} holds {int((~finite).sum())} NaN/Inf value(s) of {tensor.numel()}; "
                "the file is corrupt (or was saved from a run that diverged). Nothing was loaded."
            )


def _settings(adapter: nn.Module) -> dict[str, Any]:
    """The plain (non-tensor) attributes that shape an adapter's output, e.g. LoRA's scaling."""
    return {k: v for k, v in vars(adapter).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}


def hot_swap_adapter(model: nn.Module, directory: str | os.PathLike[str], name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Overwrite an adapter's tensors in place from `directory`, keeping every module object.

    A served (even compiled) model keeps its graph: nothing is rebuilt, so the saved
    adapter must have the same method, targets, shapes and settings (rank, scaling).
    """
    directory = Path(directory)
    current = adapter_methods(model).get(name)
    if current is None:
        raise AdapterFileError(f"model has no adapter named {name!r} to hot-swap; load it first.")
    config = read_adapter_config(directory)
    tensors, metadata = read_adapter_tensors(directory / WEIGHTS_NAME)
    incoming = method_from_config(config, metadata, directory / CONFIG_NAME)
    if type(incoming) is not type(current):
        raise AdapterFileError(f"cannot hot-swap a {incoming.name} adapter into {name!r}, which is {current.name}.")
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer) and name in host.adapters:
            if not host.adapters[name].selected_by_target_modules:
                continue  # placed by another option; its shapes are checked when its tensors are copied
            if name in host.merged_adapters:
                raise AdapterStateError(f"adapter {name!r} is merged into {path!r}; unmerge it before hot-swapping.")
            live, fresh = (
                _settings(host.adapters[name]),
                _settings(incoming.for_loading().create_adapter(host.base_layer, path)),
            )
            if live != fresh:
                differing = {
                    k: (live.get(k), fresh.get(k)) for k in live.keys() | fresh.keys() if live.get(k) != fresh.get(k)
                }
                raise ShapeMismatchError(
                    f"module {path!r}: hot-swap needs equal settings; (live, saved) differ in {differing}."
                )
    copy_adapter_tensors(model, name, tensors, directory)
    return model
