"""The contract every adapter method fulfils.

A method supplies only what is its own: a name, a config dataclass, the layer
types it can adapt, how to build its `Adapter` around one frozen layer, and its
default targets per model type. The core does the rest (targeting, injection,
freezing, merging, saving) once for all. A method that does not live in layers
(prefix tuning, say) overrides `attach`.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.injection import adapter_tensors, inject_adapters
from peftkit.layer import Adapter
from peftkit.options import MethodConfig
from peftkit.quant.config import QuantizationConfig
from peftkit.targets import ALL_LINEAR, find_targets
from peftkit.validation import from_options

__all__ = ["AdapterMethod"]


class AdapterMethod(ABC):
    """An adapter method: registered by name, built from its config, attached to a model.

    Class attributes:
        name: the registry name (`lora`, `dora`, ...).
        description: one line for `peftkit methods`.
        config_class: the method's `MethodConfig` subclass.
        peft_type: PEFT's `peft_type` for this method, or None if PEFT has none.
        peft_markers: fixed adapter_config.json fields that tell this method apart
            from others with the same `peft_type` (DoRA: `{"use_dora": True}`).
        reads_peft_files: whether a PEFT-written file with this `peft_type` and these
            markers loads as this method. Variants that differ only in how the base
            is stored (QLoRA is LoRA on a 4-bit base) set False, so such files load
            as the plain method onto whatever base the user has.
        trains_in_place: whether the method trains the model's own tensors (full
            fine-tuning, a head) instead of adapters beside them; such an adapter
            cannot be disabled and must be the only one on its model.
        trains_base_weights: whether it trains the base's own weight matrices (full
            fine-tuning), which a 4-bit base cannot hold.
        has_rank: whether its adapters are low-rank factors whose rank the config
            sets (`r`): such a method builds copies at another rank (`at_rank`,
            `with_rank`), which compare's rank sweep, combining and analysis need.
        default_targets: `target_modules` per model type (`config.model_type`) when
            the config gives None; a method without defaults leaves it empty.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    peft_type: ClassVar[str | None] = None
    peft_markers: ClassVar[dict[str, Any]] = {}
    reads_peft_files: ClassVar[bool] = True
    trains_in_place: ClassVar[bool] = False
    trains_base_weights: ClassVar[bool] = False
    has_rank: ClassVar[bool] = False
    default_targets: ClassVar[dict[str, list[str]]] = {}

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} takes a {self.config_class.__name__}, got {type(config).__name__}.")
        self.config = config

    @classmethod
    def from_options(cls, **options: Any) -> AdapterMethod:
        """Build the method from keyword options, naming any the method does not have.

        A PEFT marker given as an option (`use_dora=True` to `lora`) is a choice of
        method, not an option: the error names the method that has that marker.
        """
        for key, value in options.items():
            if key in cls.peft_markers:
                raise ConfigError(f"method {cls.name!r} has no option {key!r}: {cls._marker_hint(key, value)}")
        return cls(from_options(cls.config_class, options, where=f"method {cls.name!r}"))

    @classmethod
    def _marker_hint(cls, key: str, value: Any) -> str:
        """Which method PEFT's marker `key=value` stands for, among the loaded methods like this one."""
        if cls.peft_markers[key] == value:
            return f"{cls.name!r} already is {key}={value!r}; drop the option."
        kin = sorted(
            method.name
            for method in _concrete_methods(AdapterMethod)
            if method.peft_type == cls.peft_type
            and method.peft_markers.get(key) == value
            and method.reads_peft_files == cls.reads_peft_files
        )
        chosen = " or ".join(repr(name) for name in kin) or "another method"
        return f"in PEFT it selects another method; use method {chosen} instead of {cls.name!r}."

    @abstractmethod
    def adaptable_types(self) -> tuple[type[nn.Module], ...]:
        """The module types this method can wrap."""

    @abstractmethod
    def create_adapter(self, base_layer: nn.Module, module_name: str) -> Adapter:
        """A freshly initialised adapter for `base_layer` (found at `module_name`)."""

    def default_target_modules(self, model: nn.Module) -> list[str]:
        """This method's `target_modules` for `model`'s type, from `default_targets`."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in self.default_targets:
            raise ConfigError(
                f"{self.name} has no default target_modules for model type {model_type!r}; pass target_modules "
                f"(module names, a regex, or {ALL_LINEAR!r})."
                + (f" Known defaults: {', '.join(sorted(self.default_targets))}." if self.default_targets else "")
            )
        return self.default_targets[model_type]

    def resolved_config(self, model: nn.Module) -> MethodConfig:
        """The config with `target_modules=None` replaced by this method's default for `model`."""
        if self.config.target_modules is not None:
            return self.config
        return dataclasses.replace(self.config, target_modules=self.default_target_modules(model))

    def base_quantization(self) -> QuantizationConfig | None:
        """How this method wants the frozen base stored when it loads the model itself (`peftkit train`).

        None (the default) keeps the base as loaded; a `QuantizationConfig` asks for it
        straight in 4 bits (QLoRA's and QDoRA's default base).
        """
        return None

    def at_rank(self, rank: int) -> AdapterMethod:
        """This method at rank `rank`, its scaling per rank kept (LoRA: alpha / r); see `has_rank`."""
        raise ConfigError(f"method {self.name!r} has no rank to set.")

    def with_rank(self, rank: int, target_modules: str) -> AdapterMethod:
        """A plain copy at rank `rank` with unit scaling on exactly `target_modules`, for factors set by the
        caller (`combine_adapters`); see `has_rank`."""
        raise ConfigError(f"method {self.name!r} has no rank to set.")

    def attach(self, model: nn.Module, adapter_name: str) -> list[str]:
        """Add this method to `model` under `adapter_name`; returns the adapted module names.

        The targets are resolved once, here, and handed to `inject`, the hook a method overrides."""
        targets = find_targets(model, self.resolved_config(model), self.adaptable_types())
        return self.inject(model, adapter_name, targets)

    def inject(self, model: nn.Module, adapter_name: str, targets: list[str]) -> list[str]:
        """Put an adapter from `create_adapter` on each of `targets` (paths); returns the adapted module names.

        A method that does more around injection (quantize the targets first, add adapters on
        parameters) overrides this and calls it."""
        return inject_adapters(model, adapter_name, self.resolved_config(model), targets, self.create_adapter)

    def trainable_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Model path -> live tensor for what this adapter trains and saves.

        By default found by structure: the adapter modules peftkit inserted (plus the
        biases of the `bias` policy). A method that trains tensors of the model itself
        (full fine-tuning, a head) overrides this.
        """
        return adapter_tensors(model, adapter_name, self.config.bias)

    def frozen_tensors(self, model: nn.Module, adapter_name: str) -> list[torch.Tensor]:
        """Tensors of `trainable_state` saved but not trained (LoRA-FA's A): no gradient, no optimizer state."""
        return []

    def parameter_roles(self, model: nn.Module, adapter_name: str) -> dict[str, str] | None:
        """Model path -> `"up"` or `"embedding"` for tensors outside the default `"down"` role, or None when the
        method has no low-rank pairs. LoRA+ gives the `"up"` factors (B) a higher learning rate."""
        return None

    def needs_data(self) -> bool:
        """Whether the adapter starts from statistics of training data (`initialize_from_data`), as EVA does."""
        return False

    def initialize_from_data(
        self, model: nn.Module, adapter_name: str, batches: Iterable[Mapping[str, torch.Tensor]]
    ) -> None:
        """Initialise the adapter from model inputs (dicts of tensors for `model(**batch)`); see `needs_data`.

        A hook with nothing to do by default, as most methods start without data.
        """
        return None

    def saved_form(
        self, model: nn.Module, adapter_name: str, values: dict[str, torch.Tensor]
    ) -> tuple[AdapterMethod, dict[str, torch.Tensor]]:
        """The method and tensors (model path -> tensor) to write for this adapter; by default as they are.

        A method whose init changed the base weights (PiSSA) writes what loads on the original base instead.
        """
        return self, values

    def for_loading(self) -> AdapterMethod:
        """This method as it rebuilds a saved adapter: saved tensors replace the init, so an init that
        reads data or changes the base is not run again."""
        return self

    def peft_fields(self) -> dict[str, Any]:
        """adapter_config.json fields whose value is not one option's (LoRA's `init_lora_weights`)."""
        return {}

    def options(self) -> dict[str, Any]:
        """The method's options as plain data (nested configs as mappings): `from_options(**options())` rebuilds
        it. How a run config writes its method back to YAML."""
        return {f.name: _plain(getattr(self.config, f.name)) for f in dataclasses.fields(self.config) if f.init}

    def __eq__(self, other: object) -> bool:
        """Two methods are equal when they are the same method with equal options (a run config round-trips)."""
        return type(other) is type(self) and other.config == self.config  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # equal by options, which may change

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _plain(value: Any) -> Any:
    """`value` as plain data the caller owns: a change to it never reaches the method's config."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)


def _concrete_methods(base: type[AdapterMethod]) -> list[type[AdapterMethod]]:
    """Loaded subclasses of `base` that have a name (the registry imports this module, not the reverse)."""
    found = []
    for sub in base.__subclasses__():
        if isinstance(sub.__dict__.get("name"), str):
            found.append(sub)
        found.extend(_concrete_methods(sub))
    return list(dict.fromkeys(found))
