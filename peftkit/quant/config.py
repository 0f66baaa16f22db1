"""How the frozen base is stored in 4 bits, as plain settings: no bitsandbytes import.

Configs travel through every room (the run config, the methods, the estimate), so
they must be importable and typed everywhere, also where bitsandbytes is missing or
not yet wanted; `peftkit.quant.codec` turns them into packed layers.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from peftkit.anatomy import output_head
from peftkit.dtypes import DTYPES
from peftkit.errors import ConfigError
from peftkit.targets import candidate_modules, matches_pattern
from peftkit.validation import check_pattern, check_types
from peftkit.weights import is_linear

__all__ = [
    "BLOCKSIZES",
    "COMPUTE_DTYPES",
    "QuantizationConfig",
    "default_compute_dtype",
    "resolve_compute_dtype",
    "supported_compute_dtypes",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = {name: DTYPES[name] for name in ("float32", "bfloat16", "float16")}


@dataclasses.dataclass
class QuantizationConfig:
    """How the frozen base is stored, separate from any adapter method.

    Args:
        bits: 4, the only width supported for now.
        quant_type: `nf4` (NormalFloat, quantiles of a normal distribution: the QLoRA
            paper's choice for normally distributed weights) or `fp4`.
        double_quant: quantize the per-block scales too (8-bit, blocks of 256),
            saving about 0.37 bits per weight.
        blocksize: weights sharing one scale; smaller is more accurate and larger.
            None is 64 (the paper's), lowered on CPU to 32 for layers whose
            `in_features` 64 does not divide, as bitsandbytes' CPU kernels need.
        compute_dtype: dtype the dequantized weight is multiplied in. None picks
            bfloat16 on a CUDA device with native support, else float32.
        skip_modules: modules left in full precision besides the output head, as names
            or a regex (matched like `target_modules`); each must match a module. `[]`
            quantizes the head too.
        storage_dtype: the dtype the packed 4-bit codes are stored in (bitsandbytes'
            `quant_storage`): None is its packed uint8; a float dtype lets FSDP shard the
            4-bit weights together with the model's other float tensors.
    """

    bits: int = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    blocksize: int | None = None
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    skip_modules: list[str] | str | None = None
    storage_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def __post_init__(self) -> None:
        check_types(self, "QuantizationConfig")
        if self.bits != 4:
            raise ConfigError(
                f"QuantizationConfig.bits must be 4 (only 4-bit NF4/FP4 is supported for now), got {self.bits}."
            )
        check_pattern("QuantizationConfig.skip_modules", self.skip_modules)
        if self.blocksize is not None and self.blocksize not in BLOCKSIZES:
            raise ConfigError(
                f"QuantizationConfig.blocksize must be one of {', '.join(map(str, BLOCKSIZES))} "
                f"(what bitsandbytes accepts), got {self.blocksize}."
            )

    def dense_modules(self, model: nn.Module) -> set[str]:
        """Paths of the modules this config keeps in full precision: the output head and `skip_modules`.

        `skip_modules: []` is the one way to quantize the head too. An entry that matches no
        module is an error: a typo would otherwise quantize what it meant to keep.
        """
        if self.skip_modules == []:
            return set()
        modules = list(candidate_modules(model))
        head = output_head(model)
        dense = {name for name, module in modules if head is not None and module is head}
        patterns = [self.skip_modules] if isinstance(self.skip_modules, str) else self.skip_modules or []
        for pattern in patterns:
            rule = pattern if isinstance(self.skip_modules, str) else [pattern]
            matched = {name for name, _ in modules if matches_pattern(name, rule)}
            if not matched:
                linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules if is_linear(module)})
                raise ConfigError(
                    f"QuantizationConfig.skip_modules entry {pattern!r} matches no module of {type(model).__name__}; "
                    f"its linear layers are named: {', '.join(linear) or '(none)'}."
                )
            dense |= matched
        return dense

    def storage(self) -> torch.dtype:
        """The torch dtype the packed codes are stored in."""
        return DTYPES[self.storage_dtype] if self.storage_dtype else torch.uint8


def supported_compute_dtypes(device: torch.device) -> list[str]:
    """The compute dtypes 4-bit layers can use on `device`."""
    if device.type == "cuda":
        return [name for name in COMPUTE_DTYPES if name != "bfloat16" or _native_bf16()]
    supported = []
    for name, dtype in COMPUTE_DTYPES.items():
        try:
            probe = torch.ones(2, 2, dtype=dtype, device=device)
            probe @ probe
        except (RuntimeError, TypeError):
            continue
        supported.append(name)
    return supported


def _native_bf16() -> bool:
    """Whether this machine's GPU computes bfloat16 natively; emulated bfloat16 (T4, V100) is not something
    bitsandbytes' kernels run on. Without a GPU here (estimating for one elsewhere) a current GPU is assumed."""
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)


def default_compute_dtype(device_type: str) -> str:
    """The compute dtype a config without one gets: bfloat16 on a GPU that has it natively, else float32.

    The one rule, for loading, quantizing and estimating alike."""
    return "bfloat16" if device_type == "cuda" and _native_bf16() else "float32"


def resolve_compute_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The torch dtype for compute dtype `name` (None: the default) on `device`; ConfigError if the device cannot
    use it."""
    name = name or default_compute_dtype(device.type)
    supported = supported_compute_dtypes(device)
    if name not in supported:
        raise ConfigError(
            f"QuantizationConfig.compute_dtype {name!r} cannot be used on device {str(device)!r}; "
            f"that device supports: {', '.join(supported) or '(none)'}."
        )
    return COMPUTE_DTYPES[name]
