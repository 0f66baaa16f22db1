"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, https://arxiv.org/abs/2402.09353).

```
        x ──► W0 (frozen) ──► W0 x + b ──────────────┬─────────────────────────┐
        │                                            ▼                         + ──► h = W0 x + b + delta
        └──► dropout ──► A ──► B · f s ──► delta = (f − 1)(W0 x) + f s B A x ──┘
                              f = m / ||W0 + s B A||   (per output feature; a constant in backward)
```

LoRA's low-rank path, with the adapted weight split into a trained magnitude `m`
(one per output feature) and a direction `W0 + s B A` normalised per output
feature. The adapter adds `delta = (m/n − 1) W0 x + (m/n) s B A x` to the base
output, so the base matmul is done once, by the base layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.authoring import Adapter, AdapterStateError, ConfigError, UnsupportedModuleError, read_weight
from variants.lora import LoRA, LoraConfig, LoraConv, LoraEmbedding, LoraLinear

__all__ = ["DoraConfig", "MagnitudeDirection", "DoraLinear", "DoraConv", "DoraEmbedding", "DoRA"]


@dataclasses.dataclass
class DoraConfig(LoraConfig):
    """LoRA's options; DoRA adds none (on disk it is a PEFT LoRA file with `use_dora: true`).

    `lora_bias` and `target_parameters` are refused, as PEFT refuses them: a bias on B
    would sit inside the normalised direction, and a bare parameter has no layer norm.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_bias:
            raise ConfigError(f"{type(self).__name__}.lora_bias must be False (DoRA has no lora_bias), got True.")
        if self.target_parameters:
            raise ConfigError(
                f"{type(self).__name__}.target_parameters must be None: DoRA needs a layer's weight norm per output "
                f"feature, and PEFT has no DoRA on bare parameters either; got {self.target_parameters!r}."
            )


class MagnitudeDirection(Adapter):
    """Mixin for a LoRA adapter: DoRA's trained magnitude `m` over the row-normalised weight.

    Holds what every DoRA layer shares: `m` (initialised to `||W0 + s B A||`), the
    norm `n` as a constant, and the merge rule `W -> (m / n) (W + s B A)` with its exact
    inverse. Norms are over every weight dimension but the output one (a convolution's
    input channels and kernel together). `low_rank_factors` (`up @ down = s B A`,
    kernels flattened) comes from the LoRA class mixed in after this one. The base
    weight is read only through `peftkit.weights.read_weight`, so a 4-bit base
    (dequantized there) works unchanged.
    """

    additive_merge = False  # W -> (m / n) (W + s B A)
    stackable = False  # the magnitude rescales the base output too
    lora_magnitude_vector: nn.Parameter
    merged_norm: torch.Tensor | None

    def __init__(self, base_layer: nn.Module, **lora_options: Any) -> None:
        super().__init__(base_layer, **lora_options)
        norm = self.weight_norm(read_weight(base_layer))
        self.lora_magnitude_vector = nn.Parameter(self.per_output(norm))
        # n at merge time, needed to invert the merge exactly (the merged weight has another norm).
        self.register_buffer("merged_norm", None, persistent=False)

    def start_from(self, down: torch.Tensor, up: torch.Tensor, base_layer: nn.Module) -> None:
        """LoRA's weight-init start, then `m = ||W' + s B A||` on the changed base (PEFT inits DoRA after it)."""
        super().start_from(down, up, base_layer)
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.per_output(self.weight_norm(read_weight(base_layer))))

    def per_output(self, values: torch.Tensor) -> torch.Tensor:
        """One value per output feature, shaped to broadcast over the layer's output (and as PEFT stores `m`)."""
        return values

    def combined_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """`W0 + s B A` in the adapter's dtype, in one fused op (no separate delta matrix)."""
        up, down = self.low_rank_factors()
        return torch.addmm(weight.flatten(1).to(down.dtype), up, down).view(weight.shape)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """`n = ||W0 + s B A||` per output feature, as a constant (outside the autograd graph)."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.combined_weight(weight).flatten(1), dim=1)

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        """`m / n` per output feature (shaped as `m`); gradients reach `m` only."""
        return self.lora_magnitude_vector / self.per_output(self.weight_norm(weight))

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            combined = self.combined_weight(weight).to(weight.dtype)
            self.merged_norm = torch.linalg.vector_norm(combined.flatten(1), dim=1)
            return self._factor(weight) * combined

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.merged_norm is None:
            raise AdapterStateError(f"{type(self).__name__} was not merged, so it cannot be unmerged.")
        with torch.no_grad():
            up, down = self.low_rank_factors()
            result = weight / self._factor(weight) - (up @ down).view(weight.shape).to(weight.dtype)
        self.merged_norm = None
        return result

    def _factor(self, weight: torch.Tensor) -> torch.Tensor:
        """`m / n` at merge time, shaped to scale each output row of `weight`."""
        factor = self.lora_magnitude_vector.flatten() / self.merged_norm
        return factor.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1))


class DoraLinear(MagnitudeDirection, LoraLinear):
    """DoRA for layers that act as `x @ W.T + b` (Linear, GPT-2 Conv1D, 4-bit Linear).

    With `f = m / n` (a vector over output features), the adapter adds

        delta = (f − 1) (W0 x) + B' A x,   B' = (f s) ⊙ B  (row o of B scaled by f_o s),

    computed as one matmul for the low-rank term (with `(1 − f) b` as its bias, which
    takes the base's bias back out of `base_output`) and one fused multiply-add with
    the base layer's output: no second matmul with W0, no dense weight in the graph,
    and no full-size pass for `s` or `f` on the low-rank output. Autograd gives
    `dL/dm` through both uses of `f`, and `dL/dB`, `dL/dA` through `B'`.

    With dropout active in training, the base term is recomputed on the dropped-out
    input, `W0 dropout(x)`, as PEFT does, so both terms see the same input.
    """

    def _terms(
        self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(B' A x + (1 - f) b, base term, f)`: the adapted output is `low_rank + f * base`."""
        weight = read_weight(base_layer)
        factor = self.scale(weight)
        dropped = self.dropout(x).to(factor.dtype)
        if self._recomputes_base():
            base, bias = self.base_map(base_layer, dropped, weight.to(factor.dtype)), None
        else:
            base, bias = base_output, getattr(base_layer, "bias", None)
        row_scale = (factor.flatten() * self.scaling).view(-1, *[1] * (self.lora_B.weight.dim() - 1))
        shift = None if bias is None else (1 - factor.flatten()) * bias.to(factor.dtype)
        return self.project_up(self.lora_A(dropped), self.lora_B.weight * row_scale, shift), base, factor

    def base_map(self, base_layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`W0 x` without the bias, for the dropout path."""
        return F.linear(x, weight)

    def _recomputes_base(self) -> bool:
        return self.training and not isinstance(self.dropout, nn.Identity)

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        low_rank, base, factor = self._terms(x, base_output, base_layer)
        return torch.addcmul(low_rank, base, factor - 1).to(base_output.dtype)

    def output(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """`f * (W0 x) + B' A x` in one multiply-add: no separate add of `base_output`, and in
        the backward no second gradient to accumulate into it."""
        if self._recomputes_base():  # the base term is W0 dropout(x), not base_output
            return super().output(x, base_output, base_layer)
        low_rank, base, factor = self._terms(x, base_output, base_layer)
        return torch.addcmul(low_rank, base, factor).to(base_output.dtype)


class DoraConv(DoraLinear, LoraConv):
    """DoRA for `nn.Conv1d/2d/3d` (groups=1): DoraLinear's terms with the convolution for the matmul.

    `f = m / n` has one value per output channel, `n` the norm of each output
    channel's whole kernel (input channels and kernel positions), and `m` is stored
    with shape `(1, out, 1, ...)` as PEFT does, so it broadcasts over `(batch, out, ...)`.
    """

    def build(self, base_layer: nn.Module, r: int, bias: bool) -> None:
        if base_layer.groups > 1:
            raise UnsupportedModuleError(
                f"DoRA cannot adapt a {type(base_layer).__name__} with groups={base_layer.groups}: its LoRA update "
                "has no kernel in the grouped layout, so the adapted weight's norm is undefined. "
                "Use LoRA on it, or DoRA on convolutions with groups=1."
            )
        super().build(base_layer, r, bias)

    def per_output(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(1, -1, *[1] * (self.lora_A.weight.dim() - 2))

    def base_map(self, base_layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The base conv's functional form (its stride, padding, dilation, groups, padding mode) without bias.
        return base_layer._conv_forward(x, weight, None)


class DoraEmbedding(MagnitudeDirection, LoraEmbedding):
    """DoRA for `nn.Embedding`, seen as the linear map `W0.T` on one-hot ids (no bias, no dropout, as PEFT)."""

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        factor = self.scale(read_weight(base_layer))
        low_rank = super().forward(x, base_output, base_layer)
        return torch.addcmul(factor * low_rank, base_output, factor - 1).to(base_output.dtype)


class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation (Liu et al., 2024, https://arxiv.org/abs/2402.09353).

    The adapted weight is a trained magnitude times a LoRA-adapted direction:

        W' = m * (W0 + s B A) / n,   n = ||W0 + s B A||  (L2 norm of each output row of [out, in]),

    with `m` initialised to `||W0||` (B starts at zero), so the model starts equal to
    its base. As in the paper (section 4.3) and PEFT, `n` is treated as a constant in
    the backward pass, so gradients reach `m`, A and B but do not flow through `n`.
    Layers: nn.Linear, GPT-2 Conv1D (and 4-bit linear layers through QDoRA), nn.Embedding,
    nn.Conv1d/2d/3d with groups=1. Saved as a PEFT LoRA file with `use_dora: true` and
    `lora_magnitude_vector` of shape (out,), or (1, out, 1, ...) on a convolution.
    """

    name = "dora"
    description = "LoRA direction with a trained magnitude per output feature (Liu et al., 2024)."
    config_class = DoraConfig
    peft_type = "LORA"
    peft_markers = {"use_dora": True}

    adapter_classes: ClassVar[dict[type[nn.Module], type[Adapter]]] = {
        nn.Embedding: DoraEmbedding,
        nn.Conv1d: DoraConv,
        nn.Conv2d: DoraConv,
        nn.Conv3d: DoraConv,
        Conv1D: DoraLinear,
        nn.Linear: DoraLinear,
    }
