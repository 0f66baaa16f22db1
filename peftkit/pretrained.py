"""An adapted model's `save_pretrained` and `load_state_dict` in PEFT's format, for transformers' Trainer.

transformers' `Trainer` (and TRL's trainers, built on it) save any `PreTrainedModel`
with `model.save_pretrained(dir, state_dict=..., is_main_process=...)`, for
`trainer.save_model()` and for every checkpoint. On `train(resume_from_checkpoint=...)`
a model that is not a `peft.PeftModel` is restored by `load_sharded_checkpoint`: it
reads `model.safetensors.index.json` and calls `model.load_state_dict(tensors,
strict=False)` once per file the index names. `adapt` gives the model *instance*
(never its class) its own two methods, so both paths see adapters:

```
 save_pretrained(dir) ─► dir/adapter_config.json, adapter_model.safetensors   adapter "default" (PEFT's layout)
                         dir/<name>/adapter_config.json, ...                  every other adapter
                         dir/model.safetensors.index.json                     model key -> file of the active adapter
 Trainer resume ─► load_sharded_checkpoint ─► model.load_state_dict({"base_model.model.<module>.<param>": t})
                                              ─► copied into the active adapter's live tensors (nothing re-injected)
```

Only the model files change: the Trainer still writes its optimizer, scheduler, RNG and
trainer state beside them. PEFT (`PeftModel.from_pretrained`, vLLM, ...) reads the adapter
files and ignores the index; transformers' `from_pretrained(dir)` sees `adapter_config.json`
without `config.json` and loads the base model from `base_model_name_or_path`.

Two things the Trainer does that this cannot change: on resume it logs every frozen base
weight as a "missing key" (they are not in the checkpoint: they come from the base model),
and `load_best_model_at_end=True` fails, since for any non-PEFT model with an adapter file
it opens `pytorch_model.bin`. `unload` takes both methods away again, so a merged model
saves as a plain transformers model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterNotFoundError, AdapterStateError, ConfigError, ShapeMismatchError
from peftkit.files import atomic_write_json
from peftkit.injection import hosts
from peftkit.peft_format import PEFT_PREFIX, WEIGHTS_NAME, adapter_state_dict
from peftkit.record import DEFAULT_ADAPTER, adapter_method, adapter_methods
from peftkit.saving import save_adapter

__all__ = ["install", "uninstall", "save_pretrained", "load_state_dict", "active_adapters"]

# transformers' name for a sharded checkpoint's index (transformers.utils.SAFE_WEIGHTS_INDEX_NAME),
# spelled here so that `import peftkit` does not import transformers.
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _saves_adapters(model: nn.Module) -> bool:
    """Whether `model` has adapters beside its weights (an in-place method's are its own weights)."""
    methods = adapter_methods(model)
    return bool(methods) and not any(m.trains_in_place for m in methods.values())


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters whose outputs a forward adds, in the order they were added."""
    active = {name for _, host in hosts(model) for name in host.active_adapters}
    return [name for name in adapter_methods(model) if name in active]


def _directory_of(root: Path, adapter_name: str) -> Path:
    """Where PEFT puts an adapter: "default" at the top, every other in a subfolder of its name."""
    return root if adapter_name == DEFAULT_ADAPTER else root / adapter_name


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    is_main_process: bool = True,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
    max_shard_size: int | str | None = None,
    **kwargs: Any,
) -> None:
    """Write the model's adapters as `PeftModel.save_pretrained` does, plus the Trainer's resume index.

    Args:
        save_directory: the directory; adapter "default" goes at its top, others in subfolders.
        is_main_process: only the main process writes (the others return at once).
        state_dict: model path -> tensor to save instead of the live tensors (the
            Trainer passes one gathered from FSDP or DeepSpeed shards).
        safe_serialization: must be True: peftkit writes safetensors only (PEFT reads them).
        selected_adapters: the adapters to write (default: all).
        max_shard_size: accepted for `push_to_hub`, which passes it; an adapter is one file.
    """
    if not _saves_adapters(model):  # every adapter deleted since `adapt`: a plain model again
        if max_shard_size is not None:
            kwargs["max_shard_size"] = max_shard_size
        type(model).save_pretrained(
            model, save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs
        )
        return
    if kwargs:
        raise ConfigError(
            f"save_pretrained of a peftkit-adapted model got unsupported argument(s) {', '.join(sorted(kwargs))}; "
            "it takes save_directory, is_main_process, state_dict, safe_serialization, selected_adapters, "
            "max_shard_size. Use peftkit.merge_and_unload(model) first to save a full model."
        )
    if not safe_serialization:
        raise ConfigError(
            "save_pretrained(safe_serialization=False) asks for a pickled adapter_model.bin; peftkit writes only "
            "adapter_model.safetensors, which PEFT and transformers read too. Pass safe_serialization=True."
        )
    names = list(adapter_methods(model)) if selected_adapters is None else list(selected_adapters)
    unknown = [name for name in names if name not in adapter_methods(model)]
    if unknown:
        raise AdapterNotFoundError(
            f"selected_adapters names {', '.join(map(repr, unknown))}, which this model lacks; "
            f"adapters: {', '.join(adapter_methods(model))}."
        )
    if not is_main_process:
        return
    root = Path(save_directory)
    for name in names:
        save_adapter(model, _directory_of(root, name), name, state_dict=state_dict)
    _write_resume_index(model, root, [name for name in active_adapters(model) if name in names])


def _write_resume_index(model: nn.Module, root: Path, adapter_names: list[str]) -> None:
    """The index the Trainer's resume path reads: each active adapter's model keys -> its file.

    Keys are the model's own (`model.state_dict()` names), so the Trainer reports no
    unexpected keys; the file holds them under PEFT's names, which `load_state_dict` reads.
    """
    weight_map = {
        path: _directory_of(Path(), name).joinpath(WEIGHTS_NAME).as_posix()
        for name in adapter_names
        for path in adapter_method(model, name).trainable_state(model, name)
    }
    if weight_map:
        note = "peftkit: adapter tensors only, for Trainer(resume_from_checkpoint=...); the base model is not here."
        atomic_write_json(root / SAFE_WEIGHTS_INDEX_NAME, {"metadata": {"format": note}, "weight_map": weight_map})


def _to_model_paths(model: nn.Module, peft_named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT-named tensors renamed to the active adapter's model paths, checked to be exactly that adapter."""
    active = active_adapters(model)
    if len(active) != 1:
        raise AdapterStateError(
            f"PEFT-named tensors (e.g. {next(iter(peft_named))!r}) carry no adapter name, so they load into the "
            f"one active adapter; this model has active adapters {active or '(none)'}. "
            "Call peftkit.set_active_adapters(model, name) with one name first."
        )
    name = active[0]
    paths = {id(t): path for path, t in adapter_method(model, name).trainable_state(model, name).items()}
    to_path = {key: paths[id(t)] for key, t in adapter_state_dict(model, name).items()}
    missing, unexpected = sorted(to_path.keys() - peft_named.keys()), sorted(peft_named.keys() - to_path.keys())
    if missing or unexpected:
        raise ShapeMismatchError(
            f"PEFT-named tensors do not fit adapter {name!r}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} it does not have (e.g. {unexpected[:2]})."
        )
    return {to_path[key]: tensor for key, tensor in peft_named.items()}


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
    """`nn.Module.load_state_dict` that also reads PEFT-named tensors into the active adapter, in place.

    Keys `base_model.model.<module>.<param>` (an `adapter_model.safetensors`) are renamed
    to the active adapter's tensors; every other key loads as the class would load it.
    """
    peft_named = {key: t for key, t in state_dict.items() if key.startswith(PEFT_PREFIX)}
    if peft_named:
        state_dict = {key: t for key, t in state_dict.items() if key not in peft_named} | _to_model_paths(
            model, peft_named
        )
    return type(model).load_state_dict(model, state_dict, strict=strict, assign=assign)


def install(model: nn.Module) -> None:
    """Give `model` (the instance) the PEFT-format `save_pretrained` and `load_state_dict` above.

    A model whose only adapter trains its own tensors (`full`, `head`) keeps the class's
    methods: its saved form is the plain model.
    """
    if _saves_adapters(model):
        for function in (save_pretrained, load_state_dict):
            vars(model)[function.__name__] = MethodType(function, model)


def uninstall(model: nn.Module) -> None:
    """Give `model` back its class's `save_pretrained` and `load_state_dict`."""
    for function in (save_pretrained, load_state_dict):
        vars(model).pop(function.__name__, None)
