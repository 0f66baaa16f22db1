"""Adapter methods by name: a decorator to register one, entry points to find them.

Built-in methods (in the top-level `variants` package) and third-party ones are
declared the same way, in the `peftkit.methods` entry-point group:

    [project.entry-points."peftkit.methods"]
    lora = "variants.lora:LoRA"

The core never imports a method by name; it loads the group on first use. A method
not installed as a plugin can still be named by its dotted path, `package.module:Class`
(torchtune's `_component_` idea), to try it without reinstalling anything.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from importlib.metadata import entry_points
from typing import TypeVar

from peftkit.errors import ConfigError, UnknownMethodError, closest_match
from peftkit.method import AdapterMethod

__all__ = [
    "ENTRY_POINT_GROUP",
    "register_method",
    "get_method",
    "method_reference",
    "available_methods",
    "discover_methods",
]

ENTRY_POINT_GROUP = "peftkit.methods"

M = TypeVar("M", bound=type[AdapterMethod])

_METHODS: dict[str, type[AdapterMethod]] = {}
_BROKEN: dict[str, str] = {}  # entry-point name -> why it failed to load
_discovered = False


def register_method(cls: M) -> M:
    """Class decorator: make `cls` available under `cls.name`."""
    if not (inspect.isclass(cls) and issubclass(cls, AdapterMethod)) or inspect.isabstract(cls):
        raise TypeError(f"register_method takes a concrete AdapterMethod subclass, got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__qualname__} must set a non-empty `name` to be registered.")
    existing = _METHODS.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ConfigError(
            f"method name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}."
        )
    _METHODS[name] = cls
    return cls


def discover_methods() -> None:
    """Load every `peftkit.methods` entry point once; a loaded class registers itself if needed."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as error:  # one broken plugin must not take the others down
            _BROKEN[entry.name] = f"{entry.value}: {type(error).__name__}: {error}"
            warnings.warn(f"peftkit method {entry.name!r} failed to load ({_BROKEN[entry.name]})", stacklevel=2)
            continue
        if inspect.isclass(loaded) and issubclass(loaded, AdapterMethod) and loaded.name not in _METHODS:
            register_method(loaded)


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    discover_methods()
    return sorted(_METHODS)


def _import_method(path: str) -> type[AdapterMethod]:
    """The class a `package.module:Class` path names, checked as `register_method` checks one."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UnknownMethodError(f"adapter method {path!r}: cannot import module {module_name!r} ({error}).") from None
    cls = getattr(module, attribute, None)
    if cls is None:
        raise UnknownMethodError(f"adapter method {path!r}: module {module_name!r} has no attribute {attribute!r}.")
    if not (inspect.isclass(cls) and issubclass(cls, AdapterMethod)) or inspect.isabstract(cls):
        raise UnknownMethodError(f"adapter method {path!r} is {cls!r}, not a concrete AdapterMethod subclass.")
    return cls


def method_reference(cls: type[AdapterMethod]) -> str:
    """What `get_method` takes to give `cls` back: its registered name, else its dotted path."""
    discover_methods()
    if _METHODS.get(getattr(cls, "name", "")) is cls:
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"


def get_method(name: str) -> type[AdapterMethod]:
    """The method class registered as `name`, or named by a `package.module:Class` path.

    An unknown name lists the registered ones.
    """
    discover_methods()
    if name in _METHODS:
        return _METHODS[name]
    if ":" in name:
        return _import_method(name)
    if name in _BROKEN:
        raise UnknownMethodError(f"adapter method {name!r} is installed but failed to load: {_BROKEN[name]}")
    names = sorted(_METHODS)
    hint = closest_match(name, names)
    raise UnknownMethodError(
        f"unknown adapter method {name!r}."
        + (f" Did you mean {hint!r}?" if hint else "")
        + f" Registered methods: {', '.join(names) or '(none)'}; or give a dotted path, package.module:Class."
    )
