"""Writing an adapter to disk in HF PEFT's format (`peftkit.peft_format` names it), atomically.

adapter_config.json and adapter_model.safetensors are written both or neither: a full
disk or a failed write leaves the directory as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from peftkit.files import atomic_write, atomic_write_json, check_writable, destination_errors
from peftkit.peft_format import CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME, peft_config, peft_key
from peftkit.record import DEFAULT_ADAPTER, adapted_model, adapter_method
from peftkit.registry import method_reference

__all__ = ["save_adapter", "write_adapter_files"]


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
    A directory that cannot be written (read-only, a full disk) raises DestinationError
    before or instead of a half-written adapter.
    """
    model = adapted_model(model)
    directory = Path(directory)
    method = adapter_method(model, name)
    values = {path: (state_dict or {}).get(path, t) for path, t in method.trainable_state(model, name).items()}
    method, values = method.saved_form(model, name, values)
    config = peft_config(model, name, method)
    tensors = {peft_key(path, name): t.detach().to("cpu").clone().contiguous() for path, t in values.items()}
    # The JSON as written, so loading can tell which of its fields were edited since.
    record = {"method": method_reference(type(method)), "options": method.options(), "adapter_config": config}
    return write_adapter_files(directory, config, tensors, {METADATA_KEY: json.dumps(record)})


def write_adapter_files(
    directory: str | os.PathLike[str],
    config: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write adapter_config.json and the safetensors file (PEFT key names) to `directory`, both or neither.

    Without peftkit's record in `metadata` the file reads back as PEFT would read it.
    """
    directory = Path(directory)
    header = {"format": "pt", **(metadata or {})}

    def write(tmp: Path) -> None:
        # The config is renamed into place only once the weights are written, and the
        # weights right after it: a full disk or a failed write leaves neither file new.
        save_file(dict(tensors), str(tmp), metadata=header)
        atomic_write_json(directory / CONFIG_NAME, config)

    check_writable(directory / CONFIG_NAME)
    created = not directory.exists()
    try:
        with destination_errors(directory):
            atomic_write(directory / WEIGHTS_NAME, write)
    except BaseException:
        if created:  # nothing of this save is left behind, not even its empty directory
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory
