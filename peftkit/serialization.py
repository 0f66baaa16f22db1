"""Adapters on disk in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

This is the one place that knows PEFT's names. Internally an adapter's tensor lives
at `<module>.adapters.<name>.<param>`; PEFT writes `base_model.model.<module>.<param>`.
Config fields map through each option's `peft` metadata, so adapter_config.json is
exactly what PEFT reads; peftkit's own full options ride along in the safetensors
header metadata (which PEFT ignores), so a peftkit round trip is exact.
Loading reads JSON and safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peftkit.anatomy import task_type
from peftkit.errors import AdapterFileError, AdapterStateError, ShapeMismatchError
from peftkit.files import atomic_write, atomic_write_json, read_json
from peftkit.hosts import hosts
from peftkit.inject import DEFAULT_ADAPTER, adapt, adapted_model, adapter_methods, delete_adapter, mark_trainable
from peftkit.layer import AdapterLayer
from peftkit.method import AdapterMethod
from peftkit.registry import available_methods, get_method, method_reference
from peftkit.targets import portable_target_modules
from peftkit.weights import fan_in_fan_out

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PEFT_PREFIX",
    "adapter_state_dict",
    "peft_config",
    "save_adapter",
    "load_adapter",
    "read_adapter_config",
    "method_from_config",
    "hot_swap_adapter",
    "copy_adapter_tensors",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
METADATA_KEY = "peftkit"


def _peft_key(path: str, adapter_name: str) -> str:
    """PEFT's name for a tensor: the adapter-name level dropped, `base_model.model.` in front."""
    return PEFT_PREFIX + path.replace(f".adapters.{adapter_name}.", ".")


def adapter_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The live tensors that make up one adapter, under PEFT's key names."""
    model = adapted_model(model)
    method = adapter_methods(model)[adapter_name]
    return {_peft_key(path, adapter_name): t for path, t in method.trainable_state(model, adapter_name).items()}


def _options(method: AdapterMethod) -> dict[str, Any]:
    return {f.name: getattr(method.config, f.name) for f in dataclasses.fields(method.config)}


def peft_config(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, Any]:
    """The adapter_config.json content PEFT would write for this adapter."""
    model = adapted_model(model)
    method = adapter_methods(model)[adapter_name]
    targeted = {
        path: host.base_layer
        for path, host in hosts(model)
        if isinstance(host, AdapterLayer)
        and adapter_name in host.adapters
        and host.adapters[adapter_name].selected_by_target_modules
    }
    config: dict[str, Any] = {
        f.metadata["peft"]: getattr(method.config, f.name)
        for f in dataclasses.fields(method.config)
        if "peft" in f.metadata
    }
    config.update(method.peft_markers)
    if method.peft_type is not None:  # PEFT warns and corrects it on load when the targets store [in, out]
        config["fan_in_fan_out"] = any(fan_in_fan_out(base) for base in targeted.values())
    config.update(
        peft_type=method.peft_type,
        target_modules=portable_target_modules(model, list(targeted), method.config),
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        task_type=task_type(model),
        inference_mode=True,
    )
    return config


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    name: str = DEFAULT_ADAPTER,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write one adapter to `directory` in PEFT's format (only adapter tensors); returns the path.

    `state_dict` (model path -> tensor, e.g. gathered from FSDP or DeepSpeed shards, whose
    live tensors are partial) supplies the values to write; paths it lacks use the live tensor.
    """
    model = adapted_model(model)
    directory = Path(directory)
    method = adapter_methods(model)[name]
    config = peft_config(model, name)
    values = {path: (state_dict or {}).get(path, t) for path, t in method.trainable_state(model, name).items()}
    tensors = {_peft_key(path, name): t.detach().to("cpu").clone().contiguous() for path, t in values.items()}
    own = {"method": method_reference(type(method)), "options": _options(method)}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(own)}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse `adapter_config.json`, with a clear error when it is missing or not JSON."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"no {CONFIG_NAME} in {str(directory)!r}; is this an adapter directory?")
    config = read_json(path, AdapterFileError)
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    return config


def _peft_method_class(config: dict[str, Any]) -> type[AdapterMethod]:
    peft_type = config.get("peft_type")
    candidates = [
        cls
        for cls in map(get_method, available_methods())
        if cls.reads_peft_files
        and cls.peft_type is not None
        and cls.peft_type == peft_type
        and all(config.get(key, False) == value for key, value in cls.peft_markers.items())
    ]
    if len(candidates) != 1:
        readable = sorted({cls.peft_type for cls in map(get_method, available_methods()) if cls.peft_type})
        raise AdapterFileError(
            f"adapter_config.json is for peft_type {peft_type!r}"
            + (f" with {', '.join(sorted(config.keys() & {'use_dora'}))}" if len(candidates) > 1 else "")
            + f", which no registered method reads. Readable peft_types: {', '.join(readable)}; "
            f"registered methods: {', '.join(available_methods())}."
        )
    return candidates[0]


def method_from_config(config: dict[str, Any], metadata: dict[str, str] | None = None) -> AdapterMethod:
    """Rebuild the method an adapter was saved with: from peftkit's metadata, else PEFT's config."""
    own = json.loads((metadata or {}).get(METADATA_KEY, "null"))
    if isinstance(own, dict) and "method" in own:
        return get_method(own["method"]).from_options(**own.get("options", {}))
    cls = _peft_method_class(config)
    options = {
        f.name: config[f.metadata["peft"]]
        for f in dataclasses.fields(cls.config_class)
        if "peft" in f.metadata and config.get(f.metadata["peft"]) is not None
    }
    return cls.from_options(**options)


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        pickled = path.with_name("adapter_model.bin")
        hint = (
            f" ({pickled.name} exists, but peftkit never unpickles files; re-save it as safetensors)"
            if pickled.exists()
            else ""
        )
        raise AdapterFileError(f"missing {path}{hint}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"{path} is not a readable safetensors file: {error}") from error


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
    tensors, metadata = _load_tensors(directory / WEIGHTS_NAME)
    if method is None:
        method = method_from_config(config, metadata)
    elif isinstance(method, str):
        method = get_method(method).from_options(**_options(method_from_config(config, metadata)))
    adapt(model, method, name)
    try:
        copy_adapter_tensors(model, name, tensors, directory)
    except Exception:
        delete_adapter(model, name)
        raise
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

    Nothing is copied unless every tensor fits, so a mismatch leaves the adapter as it was;
    `source` (a directory or file) is named in the error.
    """
    expected = adapter_state_dict(model, adapter_name)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ShapeMismatchError(
            f"adapter in {str(source)!r} does not fit this model: "
            + (f"{len(missing)} tensor(s) missing (e.g. {missing[:3]})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (
                f"{len(unexpected)} tensor(s) name modules this model lacks (e.g. {unexpected[:3]})"
                if unexpected
                else ""
            )
            + "."
        )
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
    tensors, metadata = _load_tensors(directory / WEIGHTS_NAME)
    incoming = method_from_config(config, metadata)
    if incoming.name != current.name:
        raise AdapterFileError(f"cannot hot-swap a {incoming.name} adapter into {name!r}, which is {current.name}.")
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer) and name in host.adapters:
            if not host.adapters[name].selected_by_target_modules:
                continue  # placed by another option; its shapes are checked when its tensors are copied
            if name in host.merged_adapters:
                raise AdapterStateError(f"adapter {name!r} is merged into {path!r}; unmerge it before hot-swapping.")
            live, fresh = (
                _settings(host.adapters[name]),
                _settings(incoming.create_adapter(host.base_layer, path)),
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
