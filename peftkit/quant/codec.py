"""The 4-bit codec: bitsandbytes' NF4/FP4 storage of one layer, apart from any model surgery.

```
    nn.Linear W (fp32/bf16/fp16)                      Linear4bit
    ┌──────────────┐     to_4bit       ┌────────────────────────────────────────────┐
    │ [out, in]    │ ───────────────►  │ 4-bit codes, one scale per `blocksize`     │
    └──────────────┘  ◄─────────────── │ weights (scales 8-bit too: double quant)   │
                        dequantize     └────────────────────────────────────────────┘
    forward: y = x @ dequant(Wq).T + b, computed in `compute_dtype`
    merge:   Wq <- quant(dequant(Wq) + delta)   (lossy: merge warns with the error; unmerge puts
                                                 the packed weight it kept back, exactly)
```

With `peftkit.quant.convert` and `peftkit.quant.meta`, the only peftkit code that imports
bitsandbytes; `import peftkit` imports none of them. This module registers, through the
`peftkit.weight_layouts` entry point, how the core reads (dequantizes) and writes
(re-quantizes) a `Linear4bit`, so merging and DoRA work on a 4-bit base that the
core knows nothing about.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError, MergeError
from peftkit.quant.config import BLOCKSIZES, QuantizationConfig
from peftkit.weights import WeightAccess, layer_features, read_weight

try:
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Linear4bit, Linear8bitLt, Params4bit
except ImportError as error:
    raise ImportError(
        "peftkit.quant (the 4-bit base of qlora and qdora) needs bitsandbytes, which is not installed: "
        "pip install bitsandbytes"
    ) from error

__all__ = [
    "Linear4bit",
    "Params4bit",
    "bnb_functional",
    "dequantize",
    "dequantized_copy",
    "is_bitsandbytes",
    "is_quantized",
    "keep_one_kernel",
    "keep_packed",
    "quant_state_tensors",
    "requantize",
    "shell",
    "sliced_forward",
    "to_4bit",
    "weight_layouts",
    "weight_nbytes",
]


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is, or contains, a 4-bit bitsandbytes layer."""
    return any(isinstance(m, Linear4bit) for m in module.modules())


def is_bitsandbytes(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def _blocksize(config: QuantizationConfig, in_features: int, device: torch.device, path: str) -> int:
    """One layer's blocksize: the configured one, but on CPU one that divides its rows.

    bitsandbytes' CPU kernels (0.50) quantize the flattened weight but dequantize block
    by block within each row: a block that straddles two rows comes back wrong, with
    errors the size of the weights themselves.
    """
    wanted = config.blocksize or 64
    if device.type != "cpu" or in_features % wanted == 0:
        return wanted
    fitting = [size for size in BLOCKSIZES if in_features % size == 0]
    if config.blocksize is None and fitting:
        return fitting[0]
    raise ConfigError(
        f"cannot quantize {path!r} on CPU with blocksize {wanted}: bitsandbytes' CPU kernels need a blocksize "
        f"that divides in_features ({in_features}); valid here: {', '.join(map(str, fitting)) or '(none)'}. "
        "Pick one, or keep the module in full precision with skip_modules."
    )


def shell(module: nn.Module, config: QuantizationConfig, compute_dtype: torch.dtype) -> Linear4bit:
    """An empty `Linear4bit` (on the meta device) of `module`'s shape and `config`'s settings."""
    in_features, out_features = layer_features(module)
    return Linear4bit(
        in_features,
        out_features,
        bias=getattr(module, "bias", None) is not None,
        compute_dtype=compute_dtype,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=config.storage(),
        device="meta",
    )


def to_4bit(module: nn.Module, path: str, config: QuantizationConfig, compute_dtype: torch.dtype) -> Linear4bit:
    """A frozen `Linear4bit` computing what `module` (Linear or GPT-2 Conv1D) computes."""
    weight = read_weight(module).detach()  # [out, in], whatever the layer's storage
    blocksize = _blocksize(config, weight.shape[1], weight.device, path)
    bias = getattr(module, "bias", None)
    layer = shell(module, config, compute_dtype)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    _store(layer, weight, blocksize, config.double_quant, config.quant_type, config.storage())
    keep_one_kernel(layer)
    return layer


def keep_one_kernel(module: nn.Module) -> None:
    """Make every 4-bit layer in `module` compute in eval mode as in training mode.

    bitsandbytes repacks CPU weights for a bfloat16 kernel on the first eval-mode
    forward without grad: outputs then differ from training mode (about 5e-3 on the
    test model) and unpacking re-quantizes the scales. Keep one numeric path.
    """
    for layer in module.modules():
        if isinstance(layer, Linear4bit):
            layer.support_avx512bf16_for_cpu = False


def _store(
    layer: Linear4bit, weight: torch.Tensor, blocksize: int, double_quant: bool, quant_type: str, storage: torch.dtype
) -> None:
    """Quantize the dense `weight` into `layer` the bitsandbytes way: moving a Params4bit to a device."""
    packed = Params4bit(
        weight.contiguous(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=storage,
        module=layer,
    )
    layer.weight = packed.to(weight.device)


def _quant_state(layer: Linear4bit) -> Any:
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # A layer bitsandbytes repacked for its CPU inference kernel (loaded by
        # transformers, then run in eval mode); its own state_dict() unpacks it.
        layer.state_dict()
        state = layer.weight.quant_state
    return state


def dequantize(layer: Linear4bit) -> torch.Tensor:
    """The dense `[out, in]` weight a 4-bit layer computes with, in its original dtype."""
    state = _quant_state(layer)  # first: it may unpack `layer.weight` in place
    return bnb_functional.dequantize_4bit(layer.weight.data, state)


def requantize(layer: Linear4bit, weight: torch.Tensor) -> float:
    """Quantize the dense `weight` into `layer` in place, with the layer's own settings (lossy).

    Returns the largest absolute error this adds, `max |dequant(quant(W)) - W|`, also kept
    on the layer as `requantization_error` (see `requantization_errors`).
    """
    state = _quant_state(layer)
    old = layer.weight
    target = weight.detach().to(device=old.device, dtype=state.dtype)
    _store(layer, target, old.blocksize, old.compress_statistics, old.quant_type, old.quant_storage)
    layer.requantization_error = (dequantize(layer).float() - weight.detach().float()).abs().max().item()
    return layer.requantization_error


def keep_packed(layer: Linear4bit) -> Callable[[], None]:
    """The callable that puts back the layer's packed weight as it is now, bit for bit.

    `requantize` stores a new `Params4bit` rather than writing into the old one, so
    holding on to the old one (its codes and quantization state) is all it takes.
    """
    packed = layer.weight

    def restore() -> None:
        layer.weight = packed
        layer.__dict__.pop("requantization_error", None)

    return restore


def dequantized_copy(layer: Linear4bit, dtype: torch.dtype | None = None) -> nn.Linear:
    """A frozen dense `nn.Linear` with the layer's dequantized weight, in `dtype` (default: its compute dtype)."""
    dtype = dtype or layer.compute_dtype or _quant_state(layer).dtype
    weight = dequantize(layer).to(dtype)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return dense


# Output rows a sliced forward dequantizes at once: at most this many weights (32 MiB of bfloat16).
SLICE_ELEMENTS = 2**24


def _row_slices(layer: Linear4bit, dtype: torch.dtype) -> Iterator[tuple[slice, torch.Tensor]]:
    """The layer's dense weight as (output rows, weight rows) pairs, dequantized one slice at a time."""
    state = _quant_state(layer)
    rows, columns = state.shape
    absmax = state.absmax
    if state.nested:  # the scales are 8-bit themselves: dequantize them once (rows x columns / blocksize floats)
        absmax = bnb_functional.dequantize_blockwise(absmax, state.state2) + state.offset
    codes = layer.weight.data.reshape(-1).view(torch.uint8)  # two 4-bit codes a byte, row-major
    step = max(1, SLICE_ELEMENTS // columns)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        part = bnb_functional.QuantState(
            absmax=absmax[start * columns // state.blocksize : stop * columns // state.blocksize].float(),
            shape=torch.Size([stop - start, columns]),
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )
        packed = codes[start * columns // 2 : stop * columns // 2].view(-1, 1)
        yield slice(start, stop), bnb_functional.dequantize_4bit(packed, part).to(dtype)


class _SlicedLinear4bit(torch.autograd.Function):
    """`x @ W.T` for a frozen 4-bit W that is dequantized a slice of rows at a time, in forward and backward.

    bitsandbytes dequantizes the whole weight for each call and again for its backward:
    for a 128k-word output head that is a 1 GB bfloat16 temporary per loss chunk.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer
        out = x.new_empty(*x.shape[:-1], layer.out_features)
        for rows, weight in _row_slices(layer, x.dtype):
            out[..., rows] = x @ weight.T
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_x = None
        for rows, weight in _row_slices(ctx.layer, grad.dtype):
            part = grad[..., rows] @ weight
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None


def sliced_forward(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """What `layer(x)` computes, with at most SLICE_ELEMENTS of its weight dense at any time.

    For a layer whose rows are not whole blocks (`in_features % blocksize`), it is `layer(x)`.
    """
    state = _quant_state(layer)
    if layer.in_features % state.blocksize or layer.weight.requires_grad:
        return layer(x)
    compute = layer.compute_dtype or x.dtype
    out = _SlicedLinear4bit.apply(x.to(compute), layer)
    if layer.bias is not None:
        out = out + layer.bias.to(compute)
    return out.to(x.dtype)


def quant_state_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors of a 4-bit weight's quantization state: scales, code tables, and the scales' own."""
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def weight_nbytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the 4-bit weights hold, with their quantization state; bytes the same weights take in float16).

    Counted from the tensors in memory, each storage once (bitsandbytes shares code
    tables between layers).
    """
    seen: dict[int, int] = {}
    fp16 = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            state = _quant_state(module)
            for tensor in [module.weight.data, *quant_state_tensors(state)]:
                storage = tensor.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            fp16 += module.in_features * module.out_features * 2
    return sum(seen.values()), fp16


def _features(layer: nn.Module) -> tuple[int, int]:
    return layer.in_features, layer.out_features


def _eight_bit(layer: nn.Module, *_: Any) -> torch.Tensor:
    raise MergeError(
        f"{type(layer).__name__} is an 8-bit bitsandbytes layer; peftkit adapts it but cannot merge into it. "
        "Merging is supported on 4-bit (Linear4bit) and full-precision layers."
    )


def weight_layouts() -> dict[type, WeightAccess]:
    """The `peftkit.weight_layouts` entry point: how the core reads and writes bitsandbytes layers."""
    return {
        Linear4bit: WeightAccess(read=dequantize, write=requantize, features=_features, keep=keep_packed),
        Linear8bitLt: WeightAccess(read=_eight_bit, write=_eight_bit, features=_features),
    }
