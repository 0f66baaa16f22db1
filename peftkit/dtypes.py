"""Floating-point dtypes by the names configs use: one table for every subsystem."""

from __future__ import annotations

import torch

from peftkit.errors import ConfigError

__all__ = ["DTYPES", "dtype_named"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def dtype_named(name: str, where: str) -> torch.dtype:
    """The dtype called `name`; ConfigError naming `where` and the valid names otherwise."""
    if name not in DTYPES:
        raise ConfigError(f"{where} must be one of {', '.join(DTYPES)}, got {name!r}.")
    return DTYPES[name]
