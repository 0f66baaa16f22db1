"""4-bit layers without data: every tensor at its exact packed size, none allocated.

`peftkit estimate` runs a training step on fake tensors (see
`peftkit.training.simulate`); what that needs to know of bitsandbytes' insides (the
packed sizes, Params4bit's attributes, its CPU optimizer kernels) lives here, beside the
codec, not in the simulation. Under fsdp, the processes that do not read the checkpoint
build their 4-bit layers here too, and receive the codes and scales (`training.sharded_loading`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from peftkit.quant.codec import Linear4bit, Params4bit, bnb_functional, shell
from peftkit.quant.config import QuantizationConfig
from peftkit.targets import candidate_modules
from peftkit.weights import is_linear

__all__ = ["packed_on_meta", "quantize_on_meta", "fake_packed", "remade_state", "cpu_optimizer_kernels"]


def packed_on_meta(
    module: nn.Module, config: QuantizationConfig, compute_dtype: torch.dtype, dtype: torch.dtype, blocksize: int
) -> Linear4bit:
    """The `Linear4bit` that quantizing `module` makes, on the meta device: no data, every tensor at its size.

    The codes two a byte in `config.storage()`, the scales one float32 per block, or with
    double quantization one byte per block plus one float32 per 256 blocks and an offset;
    `dtype` is the dtype it dequantizes to (the weights' own). For estimating memory.
    """
    layer = shell(module, config, compute_dtype)
    elements = layer.in_features * layer.out_features
    blocks, storage = math.ceil(elements / blocksize), config.storage()
    meta = partial(torch.empty, device="meta")
    nested = None
    if config.double_quant:
        nested = bnb_functional.QuantState(
            absmax=meta(math.ceil(blocks / 256)), code=meta(256), blocksize=256, dtype=torch.float32
        )
    state = bnb_functional.QuantState(
        absmax=meta(blocks, dtype=torch.uint8 if config.double_quant else torch.float32),
        shape=torch.Size([layer.out_features, layer.in_features]),
        code=meta(16),
        blocksize=blocksize,
        quant_type=config.quant_type,
        dtype=dtype,
        offset=meta(()) if config.double_quant else None,
        state2=nested,
    )
    layer.weight = Params4bit(
        meta(math.ceil(elements / 2 / storage.itemsize), 1, dtype=storage),
        requires_grad=False,
        quant_state=state,
        blocksize=blocksize,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=storage,
        bnb_quantized=True,
        module=layer,
    )
    layer.quant_state = state  # where bitsandbytes finds it when FSDP hands the layer a plain weight
    if layer.bias is not None:
        layer.bias = nn.Parameter(meta(layer.out_features, dtype=dtype), requires_grad=False)
    return layer


def quantize_on_meta(
    model: nn.Module,
    config: QuantizationConfig,
    skipped: set[str],
    compute_dtype: torch.dtype,
    dtype: torch.dtype,
    blocksize: int,
) -> None:
    """Every linear layer of `model` outside `skipped` replaced by its `packed_on_meta` layer, as a 4-bit load
    replaces them; `dtype` is the dtype the weights dequantize to."""
    for path, module in list(candidate_modules(model)):
        if is_linear(module) and path not in skipped:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, packed_on_meta(module, config, compute_dtype, dtype, blocksize))


_PARAMS4BIT_ATTRIBUTES = ("bnb_quantized", "blocksize", "quant_type", "compress_statistics", "quant_storage")


def fake_packed(weight: torch.Tensor, fake: Callable[[torch.Tensor], torch.Tensor]) -> nn.Parameter:
    """A 4-bit weight as a plain frozen Parameter of `fake(weight)` carrying Params4bit's attributes and a
    quantization state whose tensors are `fake` too (Params4bit itself cannot wrap a fake tensor)."""
    made = nn.Parameter(fake(weight), requires_grad=False)
    for attribute in _PARAMS4BIT_ATTRIBUTES:
        setattr(made, attribute, getattr(weight, attribute))
    made.quant_state = remade_state(weight.quant_state, fake)
    return made


def remade_state(state: Any, make: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of a bitsandbytes QuantState whose tensors are `make(tensor)` (fake ones, or empty real ones to
    receive a meta layer's state), its nested state too."""
    copy = dataclasses.replace(state) if dataclasses.is_dataclass(state) else type(state).__new__(type(state))
    copy.__dict__.update(
        {k: make(v) if isinstance(v, torch.Tensor) else v for k, v in state.__dict__.items() if k != "state2"}
    )
    copy.state2 = None if state.state2 is None else remade_state(state.state2, make)
    return copy


def cpu_optimizer_kernels() -> dict[Any, Callable[..., Any]]:
    """bitsandbytes' CPU optimizer-update kernels by op (none without bitsandbytes loaded, or if they moved).

    8-bit AdamW's dequantizes both moments to float32 and computes the update in float32:
    five float32 copies of a parameter at once. On CUDA each update is one fused kernel.
    """
    if "bitsandbytes" not in sys.modules:
        return {}
    from bitsandbytes.backends.cpu import ops

    names = {
        "optimizer_update_8bit_blockwise": "_optimizer_update_8bit_blockwise_cpu",
        "optimizer_update_32bit": "_optimizer_update_32bit_cpu",
    }
    found = {op: getattr(ops, kernel, None) for op, kernel in names.items()}
    return {getattr(torch.ops.bitsandbytes, op).default: kernel for op, kernel in found.items() if kernel}
