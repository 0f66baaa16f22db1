"""A 4-bit frozen base through bitsandbytes (QLoRA: Dettmers et al., 2023, https://arxiv.org/abs/2305.14314).

```
    nn.Linear W (fp32/bf16/fp16)                      Linear4bit
    ┌──────────────┐  quantize_model   ┌────────────────────────────────────────────┐
    │ [out, in]    │ ───────────────►  │ 4-bit codes, one scale per `blocksize`     │
    └──────────────┘                   │ weights (scales 8-bit too: double quant)   │
                                       └────────────────────────────────────────────┘
    forward: y = x @ dequant(Wq).T + b, computed in `compute_dtype`
    merge:   Wq <- quant(dequant(Wq) + delta)   (lossy; `requantization_errors` says how much)
```

This is the one peftkit module that imports bitsandbytes. `import peftkit` does not
import it; `peftkit.weights` loads it when it meets a bitsandbytes layer, and the
import registers how to read (dequantize) and write (re-quantize) a `Linear4bit`, so
the core merges onto a 4-bit base without knowing bitsandbytes. Use it explicitly:

    from peftkit.quantization import QuantizationConfig, quantize_model
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from peftkit.errors import ConfigError, MergeError, UnsupportedModuleError
from peftkit.merge import merge_and_unload
from peftkit.targets import LINEAR_TYPES, candidate_modules, matches_pattern
from peftkit.undo import restore_on_failure
from peftkit.validation import check_types
from peftkit.weights import WeightAccess, read_weight, register_weight_access

try:
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Linear4bit, Linear8bitLt, Params4bit
except ImportError as error:
    raise ImportError(
        "peftkit.quantization (the 4-bit base of qlora and qdora) needs bitsandbytes, which is not installed: "
        "pip install bitsandbytes"
    ) from error

__all__ = [
    "BLOCKSIZES",
    "COMPUTE_DTYPES",
    "QuantizationConfig",
    "quantize_model",
    "is_quantized",
    "prepare_for_kbit_training",
    "supported_compute_dtypes",
    "resolve_compute_dtype",
    "dequantize",
    "requantize",
    "dequantized_copy",
    "dequantize_model",
    "merge_and_dequantize",
    "requantization_errors",
    "weight_nbytes",
]

# What bitsandbytes.functional.quantize_4bit accepts (0.45 through 0.50).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HALF = (torch.float16, torch.bfloat16)


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
        skip_modules: modules left in full precision, as names or a regex (matched
            like `target_modules`). None keeps the model's output head.
    """

    bits: int = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    blocksize: int | None = None
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    skip_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        check_types(self, "QuantizationConfig")
        if self.bits != 4:
            raise ConfigError(
                f"QuantizationConfig.bits must be 4 (only 4-bit NF4/FP4 is supported for now), got {self.bits}."
            )
        if self.blocksize is not None and self.blocksize not in BLOCKSIZES:
            raise ConfigError(
                f"QuantizationConfig.blocksize must be one of {', '.join(map(str, BLOCKSIZES))} "
                f"(what bitsandbytes accepts), got {self.blocksize}."
            )


def supported_compute_dtypes(device: torch.device) -> list[str]:
    """The compute dtypes 4-bit layers can use on `device`."""
    if device.type == "cuda":
        # Emulated bfloat16 (pre-Ampere GPUs) is not something bitsandbytes' kernels run on.
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return [name for name in COMPUTE_DTYPES if name != "bfloat16" or native_bf16]
    supported = []
    for name, dtype in COMPUTE_DTYPES.items():
        try:
            probe = torch.ones(2, 2, dtype=dtype, device=device)
            probe @ probe
        except (RuntimeError, TypeError):
            continue
        supported.append(name)
    return supported


def resolve_compute_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The torch dtype for compute dtype `name` on `device`; ConfigError if the device cannot use it."""
    supported = supported_compute_dtypes(device)
    if name is None:
        name = "bfloat16" if device.type == "cuda" and "bfloat16" in supported else "float32"
    if name not in supported:
        raise ConfigError(
            f"QuantizationConfig.compute_dtype {name!r} cannot be used on device {str(device)!r}; "
            f"that device supports: {', '.join(supported) or '(none)'}."
        )
    return COMPUTE_DTYPES[name]


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is, or contains, a 4-bit bitsandbytes layer."""
    return any(isinstance(m, Linear4bit) for m in module.modules())


def _is_bitsandbytes(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def _skipped(model: nn.Module, config: QuantizationConfig) -> set[str]:
    if config.skip_modules is not None:
        return {name for name, _ in candidate_modules(model) if matches_pattern(name, config.skip_modules)}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in candidate_modules(model) if head is not None and module is head}


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


def _to_4bit(module: nn.Module, path: str, config: QuantizationConfig, compute_dtype: torch.dtype) -> Linear4bit:
    """A frozen `Linear4bit` computing what `module` (Linear or GPT-2 Conv1D) computes."""
    weight = read_weight(module).detach()  # [out, in], whatever the layer's storage
    out_features, in_features = weight.shape
    blocksize = _blocksize(config, in_features, weight.device, path)
    bias = getattr(module, "bias", None)
    layer = Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        device="meta",
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    _store(layer, weight, blocksize, config.double_quant, config.quant_type, torch.uint8)
    # bitsandbytes repacks CPU weights for a bfloat16 kernel on the first eval-mode
    # forward without grad: outputs then differ from training mode (about 5e-3 on the
    # test model) and unpacking re-quantizes the scales. Keep one numeric path.
    layer.support_avx512bf16_for_cpu = False
    return layer


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


def quantize_model(
    model: nn.Module, config: QuantizationConfig | None = None, targets: list[str] | None = None
) -> nn.Module:
    """Replace linear layers of `model` in place by frozen 4-bit `Linear4bit` layers; returns `model`.

    `targets` are module paths (default: every `nn.Linear` and GPT-2 `Conv1D`).
    Modules in `config.skip_modules` (default: the output head) and layers that are
    already bitsandbytes layers stay as they are.
    """
    config = config or QuantizationConfig()
    skipped = _skipped(model, config)
    compute_dtypes: dict[torch.device, torch.dtype] = {}
    if targets is None:
        targets = [n for n, m in candidate_modules(model) if isinstance(m, LINEAR_TYPES) and not _is_bitsandbytes(m)]
    with restore_on_failure(model):  # a layer that cannot be quantized leaves the others dense too
        for path in targets:
            module = model.get_submodule(path)
            if path in skipped or _is_bitsandbytes(module):
                continue
            if not isinstance(module, LINEAR_TYPES):
                raise UnsupportedModuleError(
                    f"cannot quantize {path!r}: it is a {type(module).__name__}; "
                    f"4-bit layers replace {', '.join(t.__name__ for t in LINEAR_TYPES)} only."
                )
            device = module.weight.device
            if device.type == "meta":
                raise ConfigError(
                    f"cannot quantize {path!r}: its weight is on the meta device; load the weights first."
                )
            if device not in compute_dtypes:
                compute_dtypes[device] = resolve_compute_dtype(config.compute_dtype, device)
            model.set_submodule(path, _to_4bit(module, path, config, compute_dtypes[device]))
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
    With `gradient_checkpointing`, the input embeddings' output requires grad, so
    gradients reach the adapters through checkpointed blocks whose own inputs and
    weights are all frozen, and checkpointing is switched on.
    """
    needed = ("gradient_checkpointing_enable", "enable_input_require_grads")
    if gradient_checkpointing and not all(callable(getattr(model, name, None)) for name in needed):
        raise ConfigError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); "
            "gradient checkpointing needs a transformers model."
        )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear4bit):
                module.support_avx512bf16_for_cpu = False
                continue
            for param in module.parameters(recurse=False):
                if param.dtype in _HALF:
                    param.data = param.data.float()
    if gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    return model


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


def requantize(layer: Linear4bit, weight: torch.Tensor) -> None:
    """Quantize the dense `weight` into `layer` in place, with the layer's own settings (lossy).

    The largest absolute error this adds, `max |dequant(quant(W)) - W|`, is kept on the
    layer as `requantization_error` (see `requantization_errors`).
    """
    state = _quant_state(layer)
    old = layer.weight
    target = weight.detach().to(device=old.device, dtype=state.dtype)
    _store(layer, target, old.blocksize, old.compress_statistics, old.quant_type, old.quant_storage)
    layer.requantization_error = (dequantize(layer).float() - weight.detach().float()).abs().max().item()


def dequantized_copy(layer: Linear4bit, dtype: torch.dtype | None = None) -> nn.Linear:
    """A frozen dense `nn.Linear` with the layer's dequantized weight, in `dtype` (default: its compute dtype)."""
    dtype = dtype or layer.compute_dtype or _quant_state(layer).dtype
    weight = dequantize(layer).to(dtype)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return dense


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


def _tensors(state: Any) -> list[torch.Tensor]:
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
            for tensor in [module.weight.data, *_tensors(state)]:
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


register_weight_access(Linear4bit, WeightAccess(read=dequantize, write=requantize, features=_features))
register_weight_access(Linear8bitLt, WeightAccess(read=_eight_bit, write=_eight_bit, features=_features))
