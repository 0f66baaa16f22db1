"""4-bit storage of a frozen base through bitsandbytes (QLoRA: Dettmers et al., 2023,
https://arxiv.org/abs/2305.14314).

`codec` is one layer's storage (quantize, dequantize, re-quantize, the weight layout
the core reads through); `convert` is model surgery on top of it (quantize a model,
prepare it for k-bit training, dequantizing merges). Importing this package imports
bitsandbytes; `import peftkit` does not.
"""

from peftkit.quant.codec import QuantizationConfig, dequantize, is_quantized, requantize, weight_nbytes
from peftkit.quant.convert import (
    dequantize_model,
    merge_and_dequantize,
    prepare_for_kbit_training,
    quantize_model,
    requantization_errors,
)

__all__ = [
    "QuantizationConfig",
    "dequantize",
    "dequantize_model",
    "is_quantized",
    "merge_and_dequantize",
    "prepare_for_kbit_training",
    "quantize_model",
    "requantization_errors",
    "requantize",
    "weight_nbytes",
]
