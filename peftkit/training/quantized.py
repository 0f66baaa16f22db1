"""Loading a model straight into 4 bits: each weight is quantized as its shard is read.

transformers' `BitsAndBytesConfig` does the per-weight work while the checkpoint
streams in, onto the process's own device, so an 8B model never needs its 16 GB of
bf16 weights in memory at once. This module turns peftkit's `QuantizationConfig`
into that config, checked first against the model's skeleton (its modules built on
the meta device from `config.json`, no weights): which layers stay dense (the
output head by default), and that some linear layer is left to quantize.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.quant.config import QuantizationConfig, resolve_compute_dtype
from peftkit.targets import candidate_modules
from peftkit.validation import from_options
from peftkit.weights import is_linear

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

__all__ = [
    "LOAD_BLOCKSIZE",
    "local_device",
    "quantization_from_options",
    "skipped_modules",
    "bitsandbytes_config",
]

# transformers creates its 4-bit layers with bitsandbytes' default blocksize and offers no option for it.
LOAD_BLOCKSIZE = 64


def quantization_from_options(options: Mapping[str, Any] | QuantizationConfig, where: str) -> QuantizationConfig:
    """`options` (a mapping of its fields, or the config) as the `QuantizationConfig` of a load, checked for one:
    bitsandbytes installed, the blocksize transformers loads with, a compute dtype this process's device can use;
    else a ConfigError naming `where`."""
    if not isinstance(options, (Mapping, QuantizationConfig)):
        raise ConfigError(f"{where} must be a mapping of QuantizationConfig's fields (or null), got {options!r}.")
    try:
        from peftkit.quant import codec  # noqa: F401  (bitsandbytes is needed only when 4 bits are asked for)
    except ImportError as error:
        raise ConfigError(f"{where} loads the model in 4 bits, which needs bitsandbytes: {error}") from None
    try:
        config = (
            options if isinstance(options, QuantizationConfig) else from_options(QuantizationConfig, options, where)
        )
        resolve_compute_dtype(config.compute_dtype, local_device())
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    if config.blocksize not in (None, LOAD_BLOCKSIZE):
        raise ConfigError(
            f"{where}.blocksize {config.blocksize}: loading straight into 4 bits (transformers' BitsAndBytesConfig) "
            f"always uses blocksize {LOAD_BLOCKSIZE}; leave it unset, or load in full precision and quantize with "
            "peftkit.quant.quantize_model for another blocksize."
        )
    return config


def local_device() -> torch.device:
    """The device this process trains on: its GPU under a launcher (LOCAL_RANK), else the first, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def skipped_modules(skeleton: nn.Module, config: QuantizationConfig, where: str) -> list[str]:
    """Paths of the linear layers that stay dense; ConfigError if no linear layer is left to quantize."""
    linear = [name for name, module in candidate_modules(skeleton) if is_linear(module)]
    try:
        dense = config.dense_modules(skeleton)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    skipped = [name for name in linear if name in dense]
    if len(skipped) == len(linear):
        raise ConfigError(
            f"{where}: {type(skeleton).__name__} has no linear layer for bitsandbytes to quantize"
            + (f" outside skip_modules={config.skip_modules!r}" if linear else "")
            + "; 4-bit layers replace Linear and Conv1D only. Drop model.quantization, or narrow skip_modules."
        )
    return skipped


def bitsandbytes_config(
    config: QuantizationConfig, compute_dtype: torch.dtype, skipped: list[str]
) -> BitsAndBytesConfig:
    """transformers' `BitsAndBytesConfig` for `config`, keeping exactly `skipped` dense."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=config.storage(),
        # transformers matches these from the start of a module's path: exact, escaped paths.
        llm_int8_skip_modules=[re.escape(name) for name in skipped],
    )
