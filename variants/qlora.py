"""QLoRA and QDoRA: LoRA and DoRA over a 4-bit NF4 frozen base (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314).

```
        x ──► dequant(Wq) (4-bit NF4, frozen) ──────────┐
        │                                               + ──► h = dequant(Wq) x + s · B A x
        └──► adapter path of the method (LoRA, DoRA) ───┘
```

The adapter is the plain method's: only the frozen base differs, so these classes
add one option, `quantization` (a `peftkit.quant.QuantizationConfig` or its
fields as a dict; default NF4 with double quantization), and quantize the targeted
linear layers before attaching. Files are PEFT's LoRA/DoRA files, so PEFT loads them
over a bitsandbytes-4-bit base; a PEFT LoRA file loads back as plain `lora` onto
whatever base the user has (pass `method="qlora"` to `load_adapter` to quantize it).

bitsandbytes is imported only when a model is adapted, never when a config is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from peftkit.authoring import (
    AdapterLayer,
    AdapterMethod,
    from_options,
    is_linear,
    peft_option,
    read_weight,
    using_weight_source,
    weight_source,
)
from peftkit.quant import QuantizationConfig
from variants.dora import DoRA, DoraConfig
from variants.lora import LoRA, LoraConfig
from variants.lora_init import WEIGHT_INITS

__all__ = ["QuantizedConfig", "QuantizedBase", "QLoraConfig", "QLoRA", "QDoraConfig", "QDoRA"]


@dataclasses.dataclass
class QuantizedConfig:
    """Mixin for a method config: how the frozen base is quantized.

    Args:
        quantization: a `QuantizationConfig` or a dict of its fields. Kept as a
            complete dict of those fields, so the options stay JSON (they are saved
            with the adapter).
    """

    quantization: dict[str, Any] = peft_option({})

    def __post_init__(self) -> None:
        if isinstance(self.quantization, QuantizationConfig):
            self.quantization = dataclasses.asdict(self.quantization)
        super().__post_init__()  # type checks
        self.quantization = dataclasses.asdict(self.quantization_config)

    @property
    def quantization_config(self) -> QuantizationConfig:
        """The options as a `QuantizationConfig`."""
        return from_options(QuantizationConfig, self.quantization, where=f"{type(self).__name__}.quantization")


def _linear_path(model: nn.Module, path: str) -> str | None:
    """Where the linear layer a target stands for lives (inside its host if already adapted)."""
    module = model.get_submodule(path)
    if isinstance(module, AdapterLayer):
        module, path = module.base_layer, path + ".base_layer"
    return path if is_linear(module) else None


class QuantizedBase(AdapterMethod):
    """Mixin for a weight-delta method: quantize the targeted linear layers, then attach as the method does.

    Only targeted layers are quantized; target `"all-linear"` for the QLoRA paper's
    setup (every linear layer but the head in 4-bit), or quantize the whole model
    first with `peftkit.quant.quantize_model` (or load it with transformers'
    `BitsAndBytesConfig`, or `model.quantization` under `peftkit train`, which is
    where `base_quantization` sends this method's default): layers that are already
    4-bit are adapted as they are. When it quantizes layers itself, the model is then
    prepared with `prepare_for_kbit_training` (non-4-bit half-precision parameters in
    float32); a base loaded in 4 bits keeps the dtype it was loaded in.
    """

    config: Any  # a QuantizedConfig mixed into the method's own config
    reads_peft_files = False

    def base_quantization(self) -> QuantizationConfig:
        return self.config.quantization_config

    def inject(self, model: nn.Module, adapter_name: str, targets: list[str]) -> list[str]:
        """Quantize the dense linear layers among `targets`, then inject as the method does."""
        from peftkit.quant import is_quantized, keep_one_kernel, prepare_for_kbit_training, quantize_model

        paths = [p for p in (_linear_path(model, target) for target in targets) if p is not None]
        dense = [p for p in paths if not is_quantized(model.get_submodule(p))]
        # A weight init (PiSSA, LoftQ) reads the dense weights being replaced, not their 4-bit copies.
        reads_weights = self.config.init in WEIGHT_INITS
        originals = {p.removesuffix(".base_layer"): read_weight(model.get_submodule(p)).detach() for p in dense}
        originals = originals if reads_weights else {}
        quantize_model(model, self.config.quantization_config, targets=dense)
        keep_one_kernel(model)
        if dense:  # a base loaded in 4 bits keeps the dtype it was loaded in
            prepare_for_kbit_training(model)
        known = weight_source(model)
        with using_weight_source(model, lambda path: originals.get(path, known(path))):
            return super().inject(model, adapter_name, targets)


@dataclasses.dataclass
class QLoraConfig(QuantizedConfig, LoraConfig):
    """LoRA's options plus `quantization` (see `QuantizedConfig`)."""


class QLoRA(QuantizedBase, LoRA):
    """LoRA on a 4-bit (NF4 by default) frozen base; saved as a PEFT LoRA adapter."""

    name = "qlora"
    description = "LoRA over a 4-bit NF4 frozen base through bitsandbytes (Dettmers et al., 2023)."
    config_class = QLoraConfig


@dataclasses.dataclass
class QDoraConfig(QuantizedConfig, DoraConfig):
    """DoRA's options plus `quantization` (see `QuantizedConfig`)."""


class QDoRA(QuantizedBase, DoRA):
    """DoRA on a 4-bit (NF4 by default) frozen base; saved as a PEFT LoRA adapter with `use_dora`.

    The weight norm `||W0 + s B A||` is taken on the dequantized base, `dequant(Wq)`,
    which is the weight the base layer computes with (as PEFT does over bitsandbytes).
    """

    name = "qdora"
    description = "DoRA over a 4-bit NF4 frozen base through bitsandbytes."
    config_class = QDoraConfig
