"""HF PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`, named and written.

This is the one place that knows PEFT's names. Internally an adapter's tensor lives
at `<module>.adapters.<name>.<param>`; PEFT writes `base_model.model.<module>.<param>`.
Config fields map through each option's `peft` metadata, so adapter_config.json is
exactly what PEFT reads; peftkit's own full options ride along in the safetensors
header metadata (which PEFT ignores), so a peftkit round trip is exact. The JSON is
the ecosystem's source of truth: where it was edited after saving, the method read
back follows it (and warns), and only the options PEFT has no key for come from the
metadata. Reading is JSON and safetensors only: nothing is ever unpickled. Writing the
files is `peftkit.saving`; loading them onto a model, `peftkit.loading`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from peftkit.anatomy import task_type
from peftkit.errors import AdapterFileError
from peftkit.files import read_json
from peftkit.injection import hosts
from peftkit.layer import AdapterLayer
from peftkit.method import AdapterMethod
from peftkit.record import DEFAULT_ADAPTER, adapted_model, adapter_method
from peftkit.registry import available_methods, get_method
from peftkit.targets import portable_target_modules
from peftkit.validation import option_names
from peftkit.weights import fan_in_fan_out

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PEFT_PREFIX",
    "METADATA_KEY",
    "adapter_state_dict",
    "peft_config",
    "peft_key",
    "read_adapter_config",
    "read_adapter_tensors",
    "method_from_config",
    "LORA_DOWN",
    "LORA_UP",
    "LORA_MAGNITUDE",
    "lora_layer_tensors",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
METADATA_KEY = "peftkit"
# A LoRA layer's tensors in PEFT's files: A (r x in), B (out x r), DoRA's magnitude (out).
LORA_DOWN = "lora_A.weight"
LORA_UP = "lora_B.weight"
LORA_MAGNITUDE = "lora_magnitude_vector"


def peft_key(path: str, adapter_name: str) -> str:
    """PEFT's name for a tensor: the adapter-name level dropped, `base_model.model.` in front."""
    return PEFT_PREFIX + path.replace(f".adapters.{adapter_name}.", ".")


def adapter_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The live tensors that make up one adapter, under PEFT's key names."""
    model = adapted_model(model)
    method = adapter_method(model, adapter_name)
    return {peft_key(path, adapter_name): t for path, t in method.trainable_state(model, adapter_name).items()}


def peft_config(
    model: nn.Module, adapter_name: str = DEFAULT_ADAPTER, method: AdapterMethod | None = None
) -> dict[str, Any]:
    """The adapter_config.json content PEFT would write for this adapter (as `method`, default its own)."""
    model = adapted_model(model)
    method = method or adapter_method(model, adapter_name)
    targeted = {
        path: host.base_layer
        for path, host in hosts(model)
        if isinstance(host, AdapterLayer)
        and adapter_name in host.adapters
        and host.adapters[adapter_name].selected_by_target_modules
    }
    config: dict[str, Any] = {key: getattr(method.config, name) for name, key in _peft_fields(type(method)).items()}
    config.update(method.peft_markers)
    config.update(method.peft_fields())
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


def lora_layer_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """A PEFT LoRA file's tensors by layer: `{module path in the base model: {lora_A.weight: ..., ...}}`.

    A layer is a module with a 2-D `lora_A.weight` (linear layers; a convolution's
    kernels are 4-D). The second value lists the keys of every other tensor (embedding
    or convolution LoRA, trainable token rows, modules_to_save), so a caller can say what it left out.
    """
    layers = {
        key.removeprefix(PEFT_PREFIX).removesuffix("." + LORA_DOWN): {}
        for key, tensor in tensors.items()
        if key.endswith("." + LORA_DOWN) and tensor.dim() == 2
    }
    others = []
    for key, tensor in tensors.items():
        module, _, name = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if module in layers and name:
            layers[module]["lora_" + name] = tensor
        else:
            others.append(key)
    return layers, others


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse `adapter_config.json`, with a clear error when it is missing or not JSON."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"no {CONFIG_NAME} in {str(directory)!r}; is this an adapter directory?")
    config = read_json(path, AdapterFileError)
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    return config


def _peft_fields(cls: type[AdapterMethod]) -> dict[str, str]:
    """Option name -> its adapter_config.json key, for the options PEFT reads."""
    return {f.name: f.metadata["peft"] for f in dataclasses.fields(cls.config_class) if "peft" in f.metadata}


def _peft_identity(cls: type[AdapterMethod]) -> dict[str, Any]:
    """The adapter_config.json fields that say which method a file is."""
    return {"peft_type": cls.peft_type, **cls.peft_markers}


def _is_file_of(cls: type[AdapterMethod], config: dict[str, Any]) -> bool:
    """Whether adapter_config.json `config` is, for PEFT, a file of method `cls` (or of its base-storage variants)."""
    return all(config.get(key, False) == value for key, value in _peft_identity(cls).items())


def _peft_method_class(config: dict[str, Any]) -> type[AdapterMethod]:
    peft_type = config.get("peft_type")
    candidates = [
        cls
        for cls in map(get_method, available_methods())
        if cls.reads_peft_files and cls.peft_type is not None and _is_file_of(cls, config)
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


def method_from_config(
    config: dict[str, Any], metadata: dict[str, str] | None = None, source: str | os.PathLike[str] = CONFIG_NAME
) -> AdapterMethod:
    """Rebuild the method an adapter was saved with, as adapter_config.json says.

    peftkit's record in the safetensors metadata supplies what PEFT's JSON has no key for
    (`init`, `quantization`, `target_modules` as the user gave them) and the method's
    name (`qlora` is a LoRA file). Fields of the JSON edited since saving win over the
    record, with a warning naming them, so peftkit and PEFT build the same model.
    """
    try:
        own = json.loads((metadata or {}).get(METADATA_KEY, "null"))
    except json.JSONDecodeError as error:
        raise AdapterFileError(
            f"{Path(source).with_name(WEIGHTS_NAME)}: peftkit's record in its metadata is not valid JSON ({error}); "
            "re-save the adapter, or remove the record to load it as PEFT would."
        ) from error
    if not (isinstance(own, dict) and "method" in own):
        cls = _peft_method_class(config)
        return cls.from_options(
            **{name: config[key] for name, key in _peft_fields(cls).items() if config.get(key) is not None}
        )
    cls = get_method(own["method"])
    options: dict[str, Any] = own.get("options", {})
    # Files of older versions lack the JSON as written; their options stand in for it.
    written = own.get("adapter_config") or {
        **_peft_identity(cls),
        **{key: options.get(name) for name, key in _peft_fields(cls).items()},
    }
    edited = sorted(key for key in written.keys() | config.keys() if written.get(key) != config.get(key))
    if cls.peft_type is not None and not _is_file_of(cls, config):
        cls = _peft_method_class(config)
    fields = _peft_fields(cls)
    options = {name: value for name, value in options.items() if name in option_names(cls.config_class)}
    for name, key in fields.items():
        if key in edited:
            options.pop(name, None)
            if config.get(key) is not None:
                options[name] = config[key]
    followed = [key for key in edited if key in fields.values() or key in _peft_identity(cls)]
    if followed:
        differences = ", ".join(f"{key} (json {config.get(key)!r}, peftkit {written.get(key)!r})" for key in followed)
        warnings.warn(
            f"{source}: adapter_config.json was changed after peftkit saved it: {differences}; "
            f"following adapter_config.json (as PEFT does): loading as {cls.name}.",
            UserWarning,
            stacklevel=3,
        )
    return cls.from_options(**options)


def read_adapter_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of an adapter's safetensors file; AdapterFileError if unreadable."""
    path = Path(path)
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
