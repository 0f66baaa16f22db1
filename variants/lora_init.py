"""Where a LoRA adapter starts: the weight-driven inits PiSSA, OLoRA and LoftQ.

```
    init      A, B from                                   base weight becomes
    pissa     top-r SVD of W: B = U√(S/s), A = √(S/s)Vᵀ    W − s B A   (residual)
    olora     QR of W: B = Q[:, :r], A = R[:r]            W − s B A   (residual)
    loftq     SVD of W − Q, alternating `loftq_iter` times  Q = quant(W − s B A)  (4-bit)
```

PiSSA (Meng et al., 2024, https://arxiv.org/abs/2404.02948) trains the principal
singular directions of W and freezes the rest; OLoRA (Büyükakyüz, 2024,
https://arxiv.org/abs/2406.01775) starts from an orthonormal basis of W's columns;
LoftQ (Li et al., 2023, https://arxiv.org/abs/2310.08659) picks B A so that the 4-bit
base plus the adapter is closer to W than the 4-bit base alone. All three keep the
adapted model equal to the base at the start (LoftQ: closer to the unquantized one).

Over a 4-bit base the residual is what gets quantized, so `Q + s B A` approximates
W better than `quant(W)` does. W is the full-precision weight when one is at hand
(a dense base being quantized, or a checkpoint read layer by layer through
`peftkit.weights.weight_source`); otherwise the 4-bit weight, dequantized.

The factors follow PEFT's formulas (`pissa_init`, `olora_init`, `loftq_init`), with
one difference: LoftQ here divides the singular values by the scaling `s` as PiSSA
does, so `Q + s B A` is the approximation for any `lora_alpha`; PEFT's equals it
only when `s = 1`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from peftkit.authoring import (
    AdapterLayer,
    ConfigError,
    UnsupportedModuleError,
    is_linear,
    read_weight,
    rebuild_on_failure,
    write_weight,
)

__all__ = [
    "INITS",
    "WEIGHT_INITS",
    "svd_factors",
    "olora_factors",
    "loftq_factors",
    "check_weight_init_targets",
    "initialize_from_weights",
]

INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq", "eva")
# Inits that read the base weight and change it: the adapter only means something on that changed base.
WEIGHT_INITS = ("pissa", "olora", "loftq")

WeightSource = Callable[[str], torch.Tensor | None]


@torch.no_grad()
def svd_factors(weight: torch.Tensor, r: int, scaling: float, niter: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with `s B A` the best rank-r approximation of `weight` (`niter` > 0: randomized SVD).

    `B = U_r √(S_r / s)`, `A = √(S_r / s) V_rᵀ`: both factors get the same share of
    each singular value, as in PiSSA. `niter` subspace iterations of torch's
    `svd_lowrank` trade exactness for time on large layers (PEFT's `pissa_niter_k`).
    """
    weight = weight.float()
    if niter == 0:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh = v.T
    root = (s / scaling).sqrt()
    return root[:, None] * vh, u * root[None, :]


@torch.no_grad()
def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R[:r], Q[:, :r]) of the QR decomposition `W = Q R`: B has orthonormal columns."""
    q, upper = torch.linalg.qr(weight.float())
    return upper[:r].contiguous(), q[:, :r].contiguous()


@torch.no_grad()
def loftq_factors(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    iterations: int,
    round_trip: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of LoftQ: alternately `Q = round_trip(W − s B A)` and `s B A = SVD_r(W − Q)`.

    `round_trip` quantizes its argument into the base layer and returns it dequantized,
    so the layer ends holding the last `Q`, the one the returned factors fit.
    """
    weight = weight.float()
    residual = weight
    for _ in range(iterations):
        quantized = round_trip(residual).float()
        down, up = svd_factors(weight - quantized, r, scaling)
        residual = weight - scaling * (up @ down)
    return down, up


def _base_and_adapter(model: nn.Module, path: str, adapter_name: str) -> tuple[nn.Module, nn.Module]:
    host = model.get_submodule(path)
    return host.base_layer, host.adapters[adapter_name]


def check_weight_init_targets(model: nn.Module, init: str, targets: list[str], needs_4bit: bool) -> None:
    """Refuse, before anything changes, targets that `init` is not defined on (or, for LoftQ, a dense base)."""
    for path in targets:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        if not is_linear(base):
            raise UnsupportedModuleError(
                f"init {init!r} is defined for linear layers (Linear, Conv1D, 4-bit Linear) only; {path!r} is a "
                f"{type(base).__name__}. Exclude it (exclude_modules) or use init 'kaiming' or 'gaussian'."
            )
        if needs_4bit and not _is_packed(base):
            raise ConfigError(
                f"init 'loftq' fits the adapter to a 4-bit base, but {path!r} is a dense {type(base).__name__}; "
                "use method 'qlora' or 'qdora', or load the base with model.quantization."
            )


def _is_packed(layer: nn.Module) -> bool:
    """Whether the layer stores its weight packed (a 4-bit base), so writing it back re-quantizes."""
    return getattr(getattr(layer, "weight", None), "quant_state", None) is not None


def _replace_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Give `layer` the dense `[out, in]` weight as a new tensor (4-bit: re-quantized), so a failed
    adapt can put the old one back (`peftkit.undo` restores parameter objects, not values; a 4-bit
    one read from a weight source is re-read from it instead)."""
    if not _is_packed(layer):
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    write_weight(layer, weight)


@torch.no_grad()
def initialize_from_weights(
    model: nn.Module,
    adapter_name: str,
    targets: list[str],
    init: str,
    source: WeightSource,
    pissa_niter: int = 0,
    loftq_iter: int = 1,
) -> None:
    """Run a weight init (`WEIGHT_INITS`) on each target's adapter and base layer, one layer at a time.

    `source(path)` is the layer's full-precision `[out, in]` weight if one is known,
    else None (the layer's own weight is used, dequantized if it is 4-bit). Layers on
    the meta device (memory estimates) have no values to decompose and are left alone.
    """
    for path in targets:
        base, adapter = _base_and_adapter(model, path, adapter_name)
        current = read_weight(base)
        if current.is_meta:
            continue
        original = source(path)
        if original is not None and original.shape != current.shape:
            original = original.T  # stored [in, out] (GPT-2's Conv1D)
        if original is not None and _is_packed(base):
            # The source gives the 4-bit weight back if adapt fails: holding it meanwhile would keep
            # a second copy of every replaced layer until the last one is done.
            rebuild_on_failure(model, base, "weight", lambda base=base, path=path: write_weight(base, source(path)))
        weight = (current if original is None else original).detach().to(current.device, torch.float32)
        if init == "pissa":
            down, up = svd_factors(weight, adapter.r, adapter.scaling, pissa_niter)
        elif init == "olora":
            down, up = olora_factors(weight, adapter.r)
        else:

            def round_trip(residual: torch.Tensor, layer: nn.Module = base) -> torch.Tensor:
                write_weight(layer, residual)
                return read_weight(layer)

            down, up = loftq_factors(weight, adapter.r, adapter.scaling, loftq_iter, round_trip)
        if init != "loftq":
            _replace_weight(base, weight - adapter.scaling * (up @ down))
        adapter.start_from(down, up, base)
