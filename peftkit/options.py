"""The options every layer-injecting method shares, and how a method declares its own.

A method's config is a dataclass of `peft_option` fields: each records its key in
PEFT's adapter_config.json (if PEFT has one), which is how serialization maps names
and how a PEFT spelling given by mistake is recognised.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from peftkit.validation import check_pattern, check_types

__all__ = ["MethodConfig", "peft_option"]


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
            linear layer except the output head). None uses the method's default for
            the model type (`AdapterMethod.default_target_modules`).
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
        where = type(self).__name__
        check_types(self, where)
        check_pattern(f"{where}.target_modules", self.target_modules)
        check_pattern(f"{where}.exclude_modules", self.exclude_modules)
