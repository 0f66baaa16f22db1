"""LoRA: Low-Rank Adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

```
        x ──► W0 (frozen) ────────────────────┐
        │                                     + ──► h = W0 x + s · B A dropout(x)
        └──► dropout ──► A (r × in) ──► B (out × r) ──► · s ┘
```

`s = alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski, 2023). A starts
Kaiming-uniform (or Gaussian), B at zero, so the adapted model starts equal to the
base. Embeddings swap the roles (A zero, B Gaussian) as loralib and PEFT do.

Besides layers picked by `target_modules`, LoRA can adapt bare parameters
(`target_parameters`, e.g. fused MoE expert tensors) and train chosen embedding rows
(`trainable_token_indices`), both under the same adapter name and file, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.authoring import (
    Adapter,
    AdapterLayer,
    AdapterMethod,
    ConfigError,
    MethodConfig,
    TargetNotFoundError,
    UnsupportedModuleError,
    add_adapter,
    candidate_modules,
    check_pattern,
    hosts,
    peft_option,
    weight_source,
)
from variants.lora_init import WEIGHT_INITS, check_weight_init_targets, initialize_from_weights
from variants.lora_layers import LoraConv, LoraEmbedding, LoraLinear, LoraMultiheadAttention, LoraParameter
from variants.trainable_tokens import trainable_tokens

__all__ = [
    "DEFAULT_TARGETS",
    "LoraConfig",
    "LoraLinear",
    "LoraConv",
    "LoraEmbedding",
    "LoraMultiheadAttention",
    "LoraParameter",
    "LoRA",
]

# `target_modules: None` per model type, as PEFT's table: the attention query and value.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen2", "qwen3", "phi3", "opt"],
        ["q_proj", "v_proj"],
    ),
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta"], ["query", "value"]),
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
}


@dataclasses.dataclass
class LoraConfig(MethodConfig):
    """LoRA's options (names follow loralib; PEFT's spelling is used on disk).

    Args:
        r: rank of the update.
        alpha: scale numerator: the update is multiplied by `alpha / r`.
        dropout: dropout on the input of the low-rank path.
        rslora: scale by `alpha / sqrt(r)` instead, which keeps high ranks stable.
        init: where the adapter starts. `kaiming` (A uniform, as nn.Linear; B zero) or
            `gaussian` (A with std 1/r); `pissa`, `olora`, `loftq` start from the base
            weight and change it (see `variants.lora_init`; linear layers only, loftq
            over a 4-bit base); `eva` from the SVD of each layer's inputs over the first
            training batches (see `variants.lora_eva`).
        pissa_niter: 0 for PiSSA's exact SVD; k > 0 for a randomized SVD with k subspace
            iterations (PEFT's `pissa_niter_k`), much faster on large layers.
        loftq_iter: LoftQ's alternations of quantizing and SVD.
        eva_rho: EVA's bound on rank redistribution: a layer gets at most
            `round(r * eva_rho)` (>= 1; 1 keeps every layer at r).
        eva_batches: how many training batches EVA's SVD reads.
        freeze_a: LoRA-FA: train B only; A stays as initialised (no gradient, no optimizer state).
        rank_pattern: per-module rank, `{regex or name suffix: r}`.
        alpha_pattern: per-module alpha, likewise.
        lora_bias: give B a trained bias (zero at the start) that merges into the base
            layer's bias; for LoRA extracted from a full fine-tune, whose biases moved too.
        trainable_token_indices: embedding rows to train in full (new tokens), as ids
            of the input embedding, or `{embedding module name: ids}`.
        target_parameters: parameters to adapt where there is no layer to wrap (MoE
            experts as bare 2-D/3-D tensors), by full path or `.`-suffix, e.g.
            `["experts.gate_up_proj"]`. Pass `target_modules=[]` to adapt only these (on a
            model type without default targets, leaving it unset does the same, as in PEFT).
    """

    r: int = peft_option(8, "r", aliases=("rank", "lora_rank"))
    alpha: float = peft_option(8, "lora_alpha")
    dropout: float = peft_option(0.0, "lora_dropout")
    rslora: bool = peft_option(False, "use_rslora")
    init: Literal["kaiming", "gaussian", "pissa", "olora", "loftq", "eva"] = peft_option("kaiming")
    pissa_niter: int = peft_option(0)
    loftq_iter: int = peft_option(1)
    eva_rho: float = peft_option(2.0)
    eva_batches: int = peft_option(8)
    freeze_a: bool = peft_option(False)
    rank_pattern: dict[str, int] = peft_option({}, "rank_pattern")
    alpha_pattern: dict[str, float] = peft_option({}, "alpha_pattern")
    lora_bias: bool = peft_option(False, "lora_bias")
    trainable_token_indices: list[int] | dict[str, list[int]] | None = peft_option(None, "trainable_token_indices")
    target_parameters: list[str] | None = peft_option(None, "target_parameters")

    def __post_init__(self) -> None:
        super().__post_init__()
        where = type(self).__name__
        for key, rank in {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}.items():
            if rank <= 0:
                raise ConfigError(f"{where}.{key} must be a positive integer, got {rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}.")
        for option in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, option):
                check_pattern(f"{where}.{option} key", key)
        for key, value, least in [
            ("pissa_niter", self.pissa_niter, 0),
            ("loftq_iter", self.loftq_iter, 1),
            ("eva_rho", self.eva_rho, 1),
            ("eva_batches", self.eva_batches, 1),
        ]:
            if value < least:
                raise ConfigError(f"{where}.{key} must be {least} or more, got {value}.")
        if self.init in WEIGHT_INITS and self.target_parameters:
            raise ConfigError(
                f"{where}.init {self.init!r} is defined for linear layers, not bare parameters; got "
                f"target_parameters={self.target_parameters!r}. Use init 'kaiming' or 'gaussian' with them."
            )

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


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _matches(key: str, module_name: str) -> bool:
    """PEFT's rule for a pattern key: a regex matched against a whole trailing part of the path."""
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def _pattern_value(pattern: dict[str, float], module_name: str, default: float) -> float:
    return next((value for key, value in pattern.items() if _matches(key, module_name)), default)


class LoRA(AdapterMethod):
    """Low-rank adaptation of linear, GPT-2 Conv1D, embedding, Conv1d/2d/3d and multi-head attention layers."""

    name = "lora"
    description = "Low-rank update W0 + (alpha/r) B A; B starts at zero (Hu et al., 2021)."
    config_class = LoraConfig
    peft_type = "LORA"
    peft_markers = {"use_dora": False}
    has_rank = True
    default_targets = DEFAULT_TARGETS
    config: LoraConfig

    # Most specific type first: a 4-bit linear is also an nn.Linear.
    adapter_classes: ClassVar[dict[type[nn.Module], type[Adapter]]] = {
        nn.Embedding: LoraEmbedding,
        nn.MultiheadAttention: LoraMultiheadAttention,
        nn.Conv1d: LoraConv,
        nn.Conv2d: LoraConv,
        nn.Conv3d: LoraConv,
        Conv1D: LoraLinear,
        nn.Linear: LoraLinear,
    }

    def adaptable_types(self) -> tuple[type[nn.Module], ...]:
        return tuple(self.adapter_classes)

    def at_rank(self, rank: int) -> LoRA:
        """This method at rank `rank` with `alpha` scaled along, so `alpha / r` stays as configured."""
        scaled = self.config.alpha / self.config.r * rank
        alpha = int(scaled) if float(scaled).is_integer() else scaled
        return type(self).from_options(**{**self.options(), "r": rank, "alpha": alpha})

    def with_rank(self, rank: int, target_modules: str) -> LoRA:
        """A copy of this method at rank `rank` with unit scaling on exactly `target_modules`."""
        unit = {"r": rank, "alpha": float(rank), "rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
        only_these = {"target_modules": target_modules, "exclude_modules": None, "layers_to_transform": None}
        nothing_else = {"modules_to_save": None, "trainable_token_indices": None, "target_parameters": None}
        options = {**self.options(), **unit, **only_these, **nothing_else}
        options.update(init="kaiming", freeze_a=False)  # the factors are set by the caller
        return type(self).from_options(**options)

    def resolved_config(self, model: nn.Module) -> LoraConfig:
        """`target_modules=None` is the model type's default, as for every method; on a model without
        one, `target_parameters` alone adapts just those parameters (PEFT's rule for both)."""
        if self.config.target_modules is None and self.config.target_parameters:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in self.default_targets:
                return dataclasses.replace(self.config, target_modules=[])
        return super().resolved_config(model)

    def inject(self, model: nn.Module, adapter_name: str, layers: list[str]) -> list[str]:
        """The layers of `target_modules`, the modules holding `target_parameters`, the embeddings of tokens.

        Everything is selected and built before the first module is wrapped, so a bad
        option leaves the model as it was.
        """
        init = self.config.init
        if init in WEIGHT_INITS:
            check_weight_init_targets(model, init, layers, needs_4bit=init == "loftq")
        if self.config.freeze_a and any(isinstance(_unwrapped(model.get_submodule(p)), nn.Embedding) for p in layers):
            raise UnsupportedModuleError(
                "freeze_a=True trains B only, but an embedding's LoRA starts with A at zero (B random), so nothing "
                "would train; leave embeddings out of target_modules or drop freeze_a."
            )
        extra = self._parameter_adapters(model, layers) if self.config.target_parameters else {}
        if not layers and not extra:  # PEFT reads no LoRA file without a low-rank target, tokens or not
            raise TargetNotFoundError(
                "target_modules=[] selects no layer and no target_parameters were given; LoRA needs at least one "
                "(trainable_token_indices alone is PEFT's separate TRAINABLE_TOKENS method)."
            )
        if self.config.trainable_token_indices is not None:
            extra.update(trainable_tokens(model, self.config.trainable_token_indices, layers))
        targets = super().inject(model, adapter_name, layers)
        for path, adapter in extra.items():
            add_adapter(model, path, adapter_name, adapter)
        if init in WEIGHT_INITS:
            initialize_from_weights(
                model,
                adapter_name,
                targets,
                init,
                weight_source(model),
                pissa_niter=self.config.pissa_niter,
                loftq_iter=self.config.loftq_iter,
            )
        if init == "eva":
            warnings.warn(
                f"adapter {adapter_name!r}: init 'eva' starts from training data: until "
                "variants.lora_eva.initialize_eva(model, batches) runs (peftkit train runs it), A is Kaiming-uniform.",
                RuntimeWarning,
                stacklevel=2,
            )
        for option, keys in self.config.unmatched_pattern_keys(targets + list(extra)).items():
            warnings.warn(
                f"adapter {adapter_name!r}: {option} keys {keys} match no targeted module and were ignored; "
                f"targeted modules end in: {', '.join(sorted({t.rsplit('.', 1)[-1] for t in targets}))}.",
                RuntimeWarning,
                stacklevel=2,
            )
        return targets + list(extra)

    def _parameter_adapters(self, model: nn.Module, layers: list[str]) -> dict[str, LoraParameter]:
        """A `LoraParameter` chain per module with parameters matching `target_parameters` (PEFT's rule)."""
        names = self.config.target_parameters
        if self.config.dropout or self.config.lora_bias:
            raise UnsupportedModuleError(
                "target_parameters adapts a tensor, not a layer's input: it takes dropout=0 and lora_bias=False "
                f"(as PEFT), got dropout={self.config.dropout}, lora_bias={self.config.lora_bias}."
            )
        found: dict[str, tuple[nn.Module, list[str]]] = {}
        for path, module in candidate_modules(model):
            if path in layers:
                continue  # a layer of target_modules: its own parameters are adapted already
            owner = module.base_layer if isinstance(module, AdapterLayer) else module
            for name, _ in owner.named_parameters(recurse=False):
                key = f"{path}.{name}"
                if any(key == target or key.endswith("." + target) for target in names):
                    found.setdefault(path, (owner, []))[1].append(name)
        if not found:
            raise TargetNotFoundError(
                f"target_parameters={names!r} matched no parameter of {type(model).__name__}; give a parameter's "
                "path or its ending, e.g. 'experts.gate_up_proj'."
            )
        return {path: self._chain(owner, path, parameters) for path, (owner, parameters) in found.items()}

    def _chain(self, owner: nn.Module, path: str, parameter_names: list[str]) -> LoraParameter:
        """One adapter per parameter, each later one holding the earlier (PEFT's nesting and keys)."""
        adapter = None
        for name in parameter_names:
            r, alpha = self.config.rank_and_alpha(f"{path}.{name}")
            adapter = LoraParameter(owner, name, r, self.config.scaling(r, alpha), self.config.init, inner=adapter)
        return adapter

    def create_adapter(self, base_layer: nn.Module, module_name: str) -> Adapter:
        r, alpha = self.config.rank_and_alpha(module_name)
        adapter_class = next(cls for kind, cls in self.adapter_classes.items() if isinstance(base_layer, kind))
        return adapter_class(
            base_layer,
            r=r,
            scaling=self.config.scaling(r, alpha),
            dropout=self.config.dropout,
            init=self.config.init,
            bias=self.config.lora_bias,
        )

    # What the options say beyond PEFT's own keys, and how a saved adapter rebuilds.

    def _low_rank_modules(self, model: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
        """(model path, module) of every LoRA pair (and embedding LoRA) of this adapter, nested ones included."""
        for path, host in hosts(model):
            if adapter_name in host.adapters and isinstance(host, AdapterLayer):
                prefix = f"{path}.adapters.{adapter_name}"
                for inner, module in host.adapters[adapter_name].named_modules(prefix=prefix):
                    if isinstance(module, (LoraLinear, LoraEmbedding)):
                        yield inner, module

    def frozen_tensors(self, model: nn.Module, adapter_name: str) -> list[torch.Tensor]:
        if not self.config.freeze_a:
            return []
        return [m.lora_A.weight for _, m in self._low_rank_modules(model, adapter_name) if isinstance(m, LoraLinear)]

    def parameter_roles(self, model: nn.Module, adapter_name: str) -> dict[str, str]:
        roles = {}
        for path, module in self._low_rank_modules(model, adapter_name):
            if isinstance(module, LoraEmbedding):
                roles.update({f"{path}.{name}": "embedding" for name in ("lora_embedding_A", "lora_embedding_B")})
            else:
                roles.update({f"{path}.lora_B.{name}": "up" for name, _ in module.lora_B.named_parameters()})
        return roles

    def needs_data(self) -> bool:
        return self.config.init == "eva" and not getattr(self, "data_initialized", False)

    def initialize_from_data(
        self, model: nn.Module, adapter_name: str, batches: Iterable[Mapping[str, torch.Tensor]]
    ) -> None:
        from variants.lora_eva import initialize_eva

        initialize_eva(model, batches, adapter_name)

    def saved_form(
        self, model: nn.Module, adapter_name: str, values: dict[str, torch.Tensor]
    ) -> tuple[AdapterMethod, dict[str, torch.Tensor]]:
        """A PiSSA/OLoRA/LoftQ adapter as the plain LoRA of rank 2r that gives the trained model on the original base.

        `W_res + s B A = W + s (B A - B0 A0)`: A' = [A; A0], B' = [B, -B0] at rank 2r, with
        alpha doubled (rsLoRA: times sqrt 2) so the scaling is unchanged (PEFT's
        `path_initial_model_for_weight_conversion`).
        """
        if self.config.init not in WEIGHT_INITS:
            return self, values
        values = dict(values)
        for path, module in self._low_rank_modules(model, adapter_name):
            down_key, up_key = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
            factors = module.conversion_factors(values[down_key], values[up_key])
            if factors is not None:
                values[down_key], values[up_key] = factors
        factor = math.sqrt(2) if self.config.rslora else 2
        options = dataclasses.asdict(self.config)
        options.update(
            r=2 * self.config.r,
            alpha=factor * self.config.alpha,
            rank_pattern={key: 2 * r for key, r in self.config.rank_pattern.items()},
            alpha_pattern={key: factor * alpha for key, alpha in self.config.alpha_pattern.items()},
            init="kaiming",
        )
        return type(self).from_options(**options), values

    def for_loading(self) -> LoRA:
        if self.config.init in ("kaiming", "gaussian"):
            return self
        return type(self)(dataclasses.replace(self.config, init="kaiming"))

    def peft_fields(self) -> dict[str, Any]:
        """PEFT's `init_lora_weights`: True for Kaiming, else the init's name (`pissa_niter_k`: randomized PiSSA)."""
        init = self.config.init
        if init == "pissa" and self.config.pissa_niter:
            return {"init_lora_weights": f"pissa_niter_{self.config.pissa_niter}"}
        return {"init_lora_weights": True if init == "kaiming" else init}
