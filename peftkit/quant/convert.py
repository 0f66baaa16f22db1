"""Model surgery over the 4-bit codec: quantize a model's linear layers, prepare it for
k-bit training, and bring it back to a dense model (with its adapters merged).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.activations import check_checkpointable, enable_gradient_checkpointing
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.merge import merge_and_unload
from peftkit.quant.codec import Linear4bit, dequantized_copy, is_bitsandbytes, is_quantized, keep_one_kernel, to_4bit
from peftkit.quant.config import QuantizationConfig, resolve_compute_dtype
from peftkit.targets import candidate_modules
from peftkit.undo import restore_on_failure
from peftkit.weights import is_linear

__all__ = [
    "quantize_model",
    "prepare_for_kbit_training",
    "dequantize_model",
    "merge_and_dequantize",
    "requantization_errors",
]

_HALF = (torch.float16, torch.bfloat16)


def quantize_model(
    model: nn.Module, config: QuantizationConfig | None = None, targets: list[str] | None = None
) -> nn.Module:
    """Replace linear layers of `model` in place by frozen 4-bit `Linear4bit` layers; returns `model`.

    `targets` are module paths (default: every `nn.Linear` and GPT-2 `Conv1D`).
    Modules in `config.skip_modules` (default: the output head) and layers that are
    already bitsandbytes layers stay as they are.
    """
    config = config or QuantizationConfig()
    skipped = config.dense_modules(model)
    compute_dtypes: dict[torch.device, torch.dtype] = {}
    if targets is None:
        targets = [n for n, m in candidate_modules(model) if is_linear(m) and not is_bitsandbytes(m)]
    with restore_on_failure(model):  # a layer that cannot be quantized leaves the others dense too
        for path in targets:
            module = model.get_submodule(path)
            if path in skipped or is_bitsandbytes(module):
                continue
            if not is_linear(module):
                raise UnsupportedModuleError(
                    f"cannot quantize {path!r}: it is a {type(module).__name__}; "
                    "4-bit layers replace Linear, Conv1D only."
                )
            device = module.weight.device
            if device.type == "meta":
                raise ConfigError(
                    f"cannot quantize {path!r}: its weight is on the meta device; load the weights first."
                )
            if device not in compute_dtypes:
                compute_dtypes[device] = resolve_compute_dtype(config.compute_dtype, device)
            model.set_submodule(path, to_4bit(module, path, config, compute_dtypes[device]))
        # The flag transformers sets for bitsandbytes models; PEFT and the Trainer read it.
        model.is_loaded_in_4bit = is_quantized(model)
    return model


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Make a 4-bit model ready to train adapters on it; returns `model`.

    Every non-4-bit float16/bfloat16 parameter (norms, embeddings, the head, dense
    layers left unquantized) becomes float32: norms and the head are where half
    precision hurts training, and casting only them would feed float32 activations
    to half-precision layers. 4-bit layers compute as in training mode in eval too.
    With `gradient_checkpointing`, checkpointing is switched on through the one switch,
    `peftkit.activations.enable_gradient_checkpointing` (non-reentrant unless the kwargs
    say otherwise), and, as PEFT does here before any adapter exists, the input
    embeddings' output requires grad, so gradients reach the adapters through
    checkpointed blocks whose own inputs and weights are all frozen.
    """
    if gradient_checkpointing:
        check_checkpointable(model)  # before anything changes
    keep_one_kernel(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear4bit):
                continue
            for param in module.parameters(recurse=False):
                if param.dtype in _HALF:
                    param.data = param.data.float()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, gradient_checkpointing_kwargs, inputs_require_grad=True)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every 4-bit layer (adapted ones included) by its `dequantized_copy`; returns `model`."""
    for path, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            model.set_submodule(path, dequantized_copy(module, dtype))
    model.is_loaded_in_4bit = False
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # loaded by transformers with a BitsAndBytesConfig
        quantizer.remove_quantization_config(model)
    return model


def merge_and_dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge the active adapters and return the plain dense model holding `dequant(Wq) + delta`.

    The whole model comes back in `dtype` (default: the 4-bit layers' compute dtype),
    so no layer meets activations of another dtype. `peftkit.merge_and_unload` on a
    4-bit model instead keeps the layers 4-bit, re-quantizing the merged ones (as PEFT
    does), which adds the error `requantization_errors` reports.
    """
    if dtype is None:
        dtypes = {m.compute_dtype or torch.float32 for m in model.modules() if isinstance(m, Linear4bit)}
        if len(dtypes) > 1:
            raise ConfigError(f"the 4-bit layers compute in {sorted(map(str, dtypes))}; pass the dtype to merge into.")
        dtype = dtypes.pop() if dtypes else torch.float32
    with restore_on_failure(model):  # a merge that fails leaves the 4-bit layers, not dense copies
        return merge_and_unload(dequantize_model(model, dtype)).to(dtype)


def requantization_errors(model: nn.Module) -> dict[str, float]:
    """Per re-quantized 4-bit layer (by merge or unmerge), the max abs error its last re-quantization added."""
    return {
        path.removesuffix(".base_layer"): module.requantization_error
        for path, module in model.named_modules()
        if isinstance(module, Linear4bit) and hasattr(module, "requantization_error")
    }
