"""4-bit storage of a frozen base through bitsandbytes (QLoRA: Dettmers et al., 2023,
https://arxiv.org/abs/2305.14314).

`config` holds the settings (`QuantizationConfig`, the compute-dtype rule) and imports
no bitsandbytes, so every room can type and build configs at module level; `codec` is
one layer's storage (quantize, dequantize, re-quantize, the weight layout the core
reads through); `convert` is model surgery on top of it (quantize a model, prepare it
for k-bit training, dequantizing merges); `meta` gives 4-bit layers without data for
the memory estimate. The codec's names load bitsandbytes when first used, not before;
`import peftkit` imports none of this.
"""

from typing import Any

from peftkit.quant.config import (
    BLOCKSIZES,
    COMPUTE_DTYPES,
    QuantizationConfig,
    default_compute_dtype,
    resolve_compute_dtype,
    supported_compute_dtypes,
)

_CODEC = (
    "dequantize",
    "dequantized_copy",
    "is_quantized",
    "keep_one_kernel",
    "quant_state_tensors",
    "requantize",
    "sliced_forward",
    "weight_nbytes",
)
_CONVERT = (
    "dequantize_model",
    "merge_and_dequantize",
    "prepare_for_kbit_training",
    "quantize_model",
    "requantization_errors",
)

__all__ = [
    "BLOCKSIZES",
    "COMPUTE_DTYPES",
    "QuantizationConfig",
    "default_compute_dtype",
    "dequantize",
    "dequantize_model",
    "dequantized_copy",
    "is_quantized",
    "keep_one_kernel",
    "merge_and_dequantize",
    "prepare_for_kbit_training",
    "quant_state_tensors",
    "quantize_model",
    "requantization_errors",
    "requantize",
    "resolve_compute_dtype",
    "sliced_forward",
    "supported_compute_dtypes",
    "weight_nbytes",
]


def __getattr__(name: str) -> Any:
    """The codec's and the surgery's names, importing bitsandbytes on first use (ImportError says how to get it)."""
    if name in _CODEC:
        from peftkit.quant import codec

        return getattr(codec, name)
    if name in _CONVERT:
        from peftkit.quant import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'peftkit.quant' has no attribute {name!r}")
