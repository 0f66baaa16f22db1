"""Bottleneck adapters (Houlsby et al., 2019, https://arxiv.org/abs/1902.00751).

```
        x ──► sublayer (frozen) ──► h ──┬─────────────────────────────────────────► + ──► h + a(h)
                                        └──► down (d → m) ──► act ──► up (m → d) ──┘
```

A small bottleneck MLP placed after a sublayer's output projection (attention output
and MLP output by default), added to that output:

    a(h) = W_up · act(W_down · h + b_down) + b_up,   W_down: m × d,  W_up: d × m,  m ≪ d

`m` is `bottleneck_size`, or `d // reduction_factor`. `W_up` and `b_up` start at zero,
so `a(h) = 0` and the adapted model starts exactly equal to its base (the paper's
near-identity init, made exact); `W_down` starts as nn.Linear does, so the first steps
move `W_up` along useful directions. Unlike LoRA this is not a change of the weight:
`act` makes it non-linear in `h`, so it cannot be merged and always costs its two
small matmuls at inference.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.authoring import Adapter, AdapterMethod, ConfigError, MethodConfig, layer_features, peft_option

__all__ = ["ACTIVATIONS", "DEFAULT_TARGETS", "BottleneckConfig", "BottleneckAdapter", "Bottleneck"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# Where Houlsby places adapters: after the attention output projection and after the MLP
# output, per model type. Names follow the suffix rule (a name matches a path ending in
# `.name`): BERT's "output.dense" covers both `attention.output.dense` and the FFN's
# `output.dense`, and none of its other layers.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen2", "qwen3", "phi3"],
        ["o_proj", "down_proj"],
    ),
    "gpt2": ["c_proj"],  # both attn.c_proj and mlp.c_proj
    **dict.fromkeys(["bert", "roberta", "xlm-roberta"], ["output.dense"]),
    "distilbert": ["out_lin", "lin2"],
    "opt": ["out_proj", "fc2"],
    "gpt_neox": ["attention.dense", "dense_4h_to_h"],
    "falcon": ["self_attention.dense", "dense_4h_to_h"],
    "t5": ["o", "wo"],
}


@dataclasses.dataclass
class BottleneckConfig(MethodConfig):
    """Bottleneck adapter options.

    Args:
        bottleneck_size: inner width `m`; give this or `reduction_factor`, not both.
        reduction_factor: `m = d // reduction_factor` (at least 1); 16 when neither is given,
            AdapterHub's default.
        activation: the non-linearity: `relu`, `gelu`, `silu` (swish, AdapterHub's Houlsby
            preset) or `tanh`.

    `target_modules=None` means this method's own defaults (`DEFAULT_TARGETS`), not LoRA's.
    """

    bottleneck_size: int | None = peft_option(None)
    reduction_factor: int | None = peft_option(None)
    activation: Literal["relu", "gelu", "silu", "tanh"] = peft_option("silu")

    def __post_init__(self) -> None:
        super().__post_init__()
        where = type(self).__name__
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ConfigError(
                f"{where}: give bottleneck_size or reduction_factor, not both "
                f"(got {self.bottleneck_size} and {self.reduction_factor})."
            )
        for option in ("bottleneck_size", "reduction_factor"):
            value = getattr(self, option)
            if value is not None and value <= 0:
                raise ConfigError(f"{where}.{option} must be a positive integer, got {value}.")

    def width(self, features: int) -> int:
        """The bottleneck width `m` for a sublayer with `features` outputs."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, features // (self.reduction_factor or 16))


class BottleneckAdapter(Adapter):
    """`up(act(down(h)))` on a sublayer's output `h`; zero at init (see the module docstring)."""

    mergeable = False
    merge_refusal = (
        "a bottleneck adapter is a non-linear function of the layer's output, not a change of its weight, "
        "so it cannot be merged; keep it unmerged (or unload() to drop it)"
    )

    def __init__(self, features: int, width: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(features, width)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        hidden = base_output.to(self.down.weight.dtype)
        return self.up(self.act(self.down(hidden))).to(base_output.dtype)


class Bottleneck(AdapterMethod):
    """Houlsby bottleneck adapters after linear (and GPT-2 Conv1D) sublayers."""

    name = "bottleneck"
    description = "Houlsby bottleneck adapter up(act(down(h))) after attention and MLP outputs (Houlsby et al., 2019)."
    config_class = BottleneckConfig
    peft_type = None
    default_targets = DEFAULT_TARGETS
    config: BottleneckConfig

    def adaptable_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear, Conv1D)

    def create_adapter(self, base_layer: nn.Module, module_name: str) -> Adapter:
        _, features = layer_features(base_layer)
        return BottleneckAdapter(features, self.config.width(features), self.config.activation)
