"""Type checks for option dataclasses, so a bad value fails where it is given.

Method configs and the training config are plain dataclasses; `check_types`
validates every field against its annotation and `from_options` builds one
from a mapping, rejecting unknown keys with the closest valid one.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from peftkit.errors import ConfigError, did_you_mean

__all__ = ["check_types", "check_pattern", "from_options", "option_names", "option_aliases", "describe_type"]

T = TypeVar("T")


def option_names(cls: type) -> list[str]:
    """The field names of an option dataclass, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def option_aliases(cls: type) -> dict[str, str]:
    """Other names of the options (a field's `aliases` metadata, e.g. PEFT's key) -> the option."""
    return {
        alias: f.name
        for f in dataclasses.fields(cls)
        if f.init
        for alias in f.metadata.get("aliases", ())
        if alias != f.name
    }


def check_pattern(option: str, pattern: Any) -> None:
    """ConfigError naming `option` when `pattern` is a string that is no valid regex (a list holds plain names)."""
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"{option} {pattern!r} is not a valid regular expression ({error}).") from None


def from_options(cls: type[T], options: Mapping[str, Any], where: str) -> T:
    """Build `cls` from `options`; unknown keys raise ConfigError naming the valid ones.

    The suggestion for an unknown key is the closest option by name or by one of its
    aliases, so PEFT's `lora_alpha` points to `alpha`.
    """
    valid = option_names(cls)
    for key in options:
        if key not in valid:
            hint = did_you_mean(key, valid, option_aliases(cls))
            raise ConfigError(f"{where} has no option {key!r}.{hint} Valid options: {', '.join(valid)}.")
    return cls(**options)


def describe_type(annotation: Any) -> str:
    """A readable name for a type annotation: 'list[str] | str | None'."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(describe_type(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_types(obj: Any, where: str) -> None:
    """Raise ConfigError for the first field whose value does not fit its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(f"{where}.{f.name} must be {describe_type(hints[f.name])}, got {value!r}.")
