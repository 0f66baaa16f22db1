"""LoRA: Low-Rank Adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

```
        x ──► W0 (frozen) ────────────────────┐
        │                                     + ──► h = W0 x + s · B A dropout(x)
        └──► dropout ──► A (r × in) ──► B (out × r) ──► · s ┘
```

`s = alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski, 2023). A starts
Kaiming-uniform (or Gaussian), B at zero, so the adapted model starts equal to the
base. Embeddings swap the roles (A zero, B Gaussian) as loralib and PEFT do.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import Adapter, AdapterMethod, ConfigError, MethodConfig, UnsupportedModuleError, peft_option
from peftkit.weights import layer_features

__all__ = ["LoraConfig", "LoraLinear", "LoraConv2d", "LoraEmbedding", "LoRA"]


@dataclasses.dataclass
class LoraConfig(MethodConfig):
    """LoRA's options (names follow loralib; PEFT's spelling is used on disk).

    Args:
        r: rank of the update.
        alpha: scale numerator: the update is multiplied by `alpha / r`.
        dropout: dropout on the input of the low-rank path.
        rslora: scale by `alpha / sqrt(r)` instead, which keeps high ranks stable.
        init: `kaiming` (uniform, as nn.Linear) or `gaussian` (std 1/r) for A.
        rank_pattern: per-module rank, `{regex or name suffix: r}`.
        alpha_pattern: per-module alpha, likewise.
    """

    r: int = peft_option(8, "r", aliases=("rank", "lora_rank"))
    alpha: float = peft_option(8, "lora_alpha")
    dropout: float = peft_option(0.0, "lora_dropout")
    rslora: bool = peft_option(False, "use_rslora")
    init: Literal["kaiming", "gaussian"] = peft_option("kaiming")
    rank_pattern: dict[str, int] = peft_option({}, "rank_pattern")
    alpha_pattern: dict[str, float] = peft_option({}, "alpha_pattern")

    def __post_init__(self) -> None:
        super().__post_init__()
        where = type(self).__name__
        for key, rank in {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}.items():
            if rank <= 0:
                raise ConfigError(f"{where}.{key} must be a positive integer, got {rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}.")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """This module's (r, alpha): a pattern entry if one matches, as PEFT resolves them."""
        return (
            _pattern_value(self.rank_pattern, module_name, self.r),
            _pattern_value(self.alpha_pattern, module_name, self.alpha),
        )

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def unmatched_pattern_keys(self, targets: list[str]) -> dict[str, list[str]]:
        """`rank_pattern`/`alpha_pattern` keys that match none of `targets` (so they change nothing)."""
        unmatched = {
            option: sorted(key for key in getattr(self, option) if not any(_matches(key, t) for t in targets))
            for option in ("rank_pattern", "alpha_pattern")
        }
        return {option: keys for option, keys in unmatched.items() if keys}


def _matches(key: str, module_name: str) -> bool:
    """PEFT's rule for a pattern key: a regex matched against a whole trailing part of the path."""
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def _pattern_value(pattern: dict[str, float], module_name: str, default: float) -> float:
    return next((value for key, value in pattern.items() if _matches(key, module_name)), default)


class LoraLinear(Adapter):
    """The low-rank path for any layer that acts as `x @ W.T` (Linear, Conv1D, 4-bit Linear)."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float, init: str) -> None:
        super().__init__()
        self.r = r
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.build(base_layer, r)
        self.reset_parameters(init)

    def build(self, base_layer: nn.Module, r: int) -> None:
        in_features, out_features = layer_features(base_layer)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)

    def reset_parameters(self, init: str) -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """`s * B A x` for an input that has already been through dropout.

        `s` scales the rank-r activations, not the full-width output: one pass over
        `tokens x r` values instead of `tokens x out` in the forward and the backward.
        """
        return self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)) * self.scaling)

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.low_rank(self.dropout(x)).to(base_output.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with the delta `up @ down` (kernels flattened), for combining adapters."""
        return self.lora_B.weight.reshape(-1, self.r), self.lora_A.weight.reshape(self.r, -1) * self.scaling

    def set_low_rank_factors(self, up: torch.Tensor, down: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_B.weight.copy_(up.reshape(self.lora_B.weight.shape) / self.scaling)
            self.lora_A.weight.copy_(down.reshape(self.lora_A.weight.shape))


class LoraConv2d(LoraLinear):
    """LoRA for `nn.Conv2d`: A is a conv with the base kernel, B a 1x1 conv (as PEFT)."""

    def build(self, base_layer: nn.Module, r: int) -> None:
        if base_layer.groups != 1:
            raise UnsupportedModuleError(f"LoRA supports Conv2d with groups=1 only, got groups={base_layer.groups}.")
        self.lora_A = nn.Conv2d(
            base_layer.in_channels,
            r,
            base_layer.kernel_size,
            base_layer.stride,
            base_layer.padding,
            base_layer.dilation,
            bias=False,
        )
        self.lora_B = nn.Conv2d(r, base_layer.out_channels, 1, bias=False)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        # Composing conv A with the 1x1 conv B is one conv whose kernel mixes A's channels by B.
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scaling


class LoraEmbedding(Adapter):
    """LoRA for `nn.Embedding`: a low-rank lookup table `A[:, ids]` mapped up by B."""

    def __init__(self, base_layer: nn.Embedding, r: int, scaling: float, dropout: float, init: str) -> None:
        super().__init__()
        self.r = r
        self.scaling = scaling
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base_layer.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.empty(base_layer.embedding_dim, r))
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        rows = F.embedding(
            x,
            self.lora_embedding_A.T,
            base_layer.padding_idx,
            base_layer.max_norm,
            base_layer.norm_type,
            base_layer.scale_grad_by_freq,
            base_layer.sparse,
        )
        # Scaled embeddings (Gemma's) multiply the looked-up rows, so a merged delta is scaled too.
        # Both factors are scalars: applied once, to the rank-r rows rather than the full width.
        embed_scale = getattr(base_layer, "embed_scale", None)
        factor = self.scaling if embed_scale is None else self.scaling * embed_scale.to(rows.dtype)
        return ((rows * factor) @ self.lora_embedding_B.T).to(base_output.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A) * self.scaling

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_B, self.lora_embedding_A * self.scaling

    def set_low_rank_factors(self, up: torch.Tensor, down: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_embedding_B.copy_(up / self.scaling)
            self.lora_embedding_A.copy_(down)


class LoRA(AdapterMethod):
    """Low-rank adaptation of linear, GPT-2 Conv1D, embedding and Conv2d layers."""

    name = "lora"
    description = "Low-rank update W0 + (alpha/r) B A; B starts at zero (Hu et al., 2021)."
    config_class = LoraConfig
    peft_type = "LORA"
    peft_markers = {"use_dora": False}
    config: LoraConfig

    # Most specific type first: a 4-bit linear is also an nn.Linear.
    adapter_classes: ClassVar[dict[type[nn.Module], type[Adapter]]] = {
        nn.Embedding: LoraEmbedding,
        nn.Conv2d: LoraConv2d,
        Conv1D: LoraLinear,
        nn.Linear: LoraLinear,
    }

    def adaptable_types(self) -> tuple[type[nn.Module], ...]:
        return tuple(self.adapter_classes)

    def with_rank(self, rank: int, target_modules: str) -> LoRA:
        """A copy of this method at rank `rank` with unit scaling on exactly `target_modules`."""
        options = dataclasses.asdict(self.config)
        options.update(
            r=rank,
            alpha=float(rank),
            rslora=False,
            rank_pattern={},
            alpha_pattern={},
            target_modules=target_modules,
            exclude_modules=None,
            layers_to_transform=None,
            modules_to_save=None,
        )
        return type(self).from_options(**options)

    def attach(self, model: nn.Module, adapter_name: str) -> list[str]:
        """Attach as every method does, warning (as PEFT does) about pattern keys that changed nothing."""
        targets = super().attach(model, adapter_name)
        for option, keys in self.config.unmatched_pattern_keys(targets).items():
            warnings.warn(
                f"adapter {adapter_name!r}: {option} keys {keys} match no targeted module and were ignored; "
                f"targeted modules end in: {', '.join(sorted({t.rsplit('.', 1)[-1] for t in targets}))}.",
                RuntimeWarning,
                stacklevel=2,
            )
        return targets

    def create_adapter(self, base_layer: nn.Module, module_name: str) -> Adapter:
        r, alpha = self.config.rank_and_alpha(module_name)
        adapter_class = next(cls for kind, cls in self.adapter_classes.items() if isinstance(base_layer, kind))
        return adapter_class(
            base_layer, r=r, scaling=self.config.scaling(r, alpha), dropout=self.config.dropout, init=self.config.init
        )
