"""The contract every adapter method fulfils, and the options all of them share.

A method supplies only what is its own: a name, a config dataclass, the layer
types it can adapt, and how to build its `Adapter` around one frozen layer. The
core does the rest (targeting, injection, freezing, merging, saving) once for all.
A method that does not live in layers (prefix tuning, say) overrides `attach`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.layer import Adapter
from peftkit.validation import check_types, from_options

__all__ = ["MethodConfig", "AdapterMethod", "peft_option"]


def peft_option(default: Any = None, peft_name: str | None = None, aliases: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """A config field; `peft_name` is its key in PEFT's adapter_config.json, if it has one.

    `aliases` are names users coming from elsewhere write for it (`rank` for `r`); with
    the PEFT key they are what an unknown option is matched against for a suggestion.
    """
    metadata: dict[str, Any] = {"aliases": (peft_name, *aliases) if peft_name else aliases}
    if peft_name:
        metadata["peft"] = peft_name
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclasses.dataclass
class MethodConfig:
    """Options every layer-injecting method shares: which modules, and what else trains.

    Args:
        target_modules: module names (a module matches if its path equals or ends with
            `.name`), a regex matched against the full path, or `"all-linear"` (every
            linear layer except the output head). None uses the model type's default.
        exclude_modules: names or a regex, as above, removed from the targets.
        layers_to_transform: only adapt modules in these layer indices.
        modules_to_save: modules trained in full and saved with the adapter (a head).
        bias: which biases train: `none`, `all`, or `lora_only` (those of adapted
            layers; the name is loralib's, kept for PEFT compatibility).
    """

    target_modules: list[str] | str | None = peft_option(None, "target_modules")
    exclude_modules: list[str] | str | None = peft_option(None, "exclude_modules")
    layers_to_transform: list[int] | int | None = peft_option(None, "layers_to_transform")
    modules_to_save: list[str] | None = peft_option(None, "modules_to_save")
    bias: Literal["none", "all", "lora_only"] = peft_option("none", "bias")

    def __post_init__(self) -> None:
        check_types(self, type(self).__name__)


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
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    peft_type: ClassVar[str | None] = None
    peft_markers: ClassVar[dict[str, Any]] = {}
    reads_peft_files: ClassVar[bool] = True
    trains_in_place: ClassVar[bool] = False

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

    def attach(self, model: nn.Module, adapter_name: str) -> list[str]:
        """Add this method to `model` under `adapter_name`; returns the adapted module names."""
        from peftkit.inject import inject_adapters  # inject builds on this module

        return inject_adapters(model, self, adapter_name)

    def trainable_state(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Model path -> live tensor for what this adapter trains and saves.

        By default found by structure: the adapter modules peftkit inserted (plus the
        biases of the `bias` policy). A method that trains tensors of the model itself
        (full fine-tuning, a head) overrides this.
        """
        from peftkit.inject import adapter_tensors

        return adapter_tensors(model, adapter_name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _concrete_methods(base: type[AdapterMethod]) -> list[type[AdapterMethod]]:
    """Loaded subclasses of `base` that have a name (the registry imports this module, not the reverse)."""
    found = []
    for sub in base.__subclasses__():
        if isinstance(sub.__dict__.get("name"), str):
            found.append(sub)
        found.extend(_concrete_methods(sub))
    return list(dict.fromkeys(found))
