"""Which modules of a model a method adapts, following HF PEFT's matching rules.

A list of names matches a module whose path equals a name or ends with `.name`;
a string is a regex matched against the whole path; `"all-linear"` is every linear
layer but the output head. Modules inside peftkit's own hosts are never targets.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

from torch import nn

from peftkit.anatomy import output_head, task_heads
from peftkit.errors import ConfigError, TargetNotFoundError, UnsupportedModuleError
from peftkit.layer import AdapterHost, TrainableCopy
from peftkit.options import MethodConfig
from peftkit.weights import is_linear

__all__ = [
    "ALL_LINEAR",
    "candidate_modules",
    "find_targets",
    "matches_pattern",
    "layer_index",
    "portable_target_modules",
    "distinguishing_suffixes",
]

ALL_LINEAR = "all-linear"

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules a user could target: everything but peftkit's own internals."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, AdapterHost):
            inside.append(name + ".")
        if name:
            yield name, module


def matches_pattern(name: str, pattern: list[str] | str) -> bool:
    """PEFT's rule: a list matches by suffix on `.`, a string by full regex."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def layer_index(name: str) -> int | None:
    """The first numeric path component (`model.layers.3.mlp` -> 3), if any."""
    found = _LAYER_INDEX.search("." + name)
    return int(found.group(1)) if found else None


def _wanted(name: str, module: nn.Module, config: MethodConfig, heads: list[nn.Module]) -> bool:
    targets = config.target_modules
    if isinstance(module, TrainableCopy) or (config.modules_to_save and matches_pattern(name, config.modules_to_save)):
        return False  # trained in full already
    if targets == ALL_LINEAR:
        hit = is_linear(_unwrap(module)) and all(_unwrap(module) is not head for head in heads)
    else:
        hit = matches_pattern(name, targets)
    if not hit or (config.exclude_modules is not None and matches_pattern(name, config.exclude_modules)):
        return False
    if config.layers_to_transform is not None:
        layers = config.layers_to_transform
        layers = [layers] if isinstance(layers, int) else layers
        return layer_index(name) in layers
    return True


def _unwrap(module: nn.Module) -> nn.Module:
    return module.wrapped if isinstance(module, AdapterHost) else module


def _heads(model: nn.Module) -> list[nn.Module]:
    """Output and task heads, which "all-linear" leaves alone (as PEFT does)."""
    heads = [getattr(model, name) for name in task_heads(model)]
    head = output_head(model)
    return heads + ([head] if head is not None else [])


def find_targets(model: nn.Module, config: MethodConfig, adaptable: tuple[type[nn.Module], ...]) -> list[str]:
    """Paths of the modules `config` selects; errors if none match or one cannot be adapted.

    `config.target_modules` must be given: a None (the method's default) is resolved by
    the method (`AdapterMethod.resolved_config`), which alone knows its defaults.
    `target_modules=[]` selects nothing on purpose (PEFT's spelling for "only the
    parameters or tokens a method's own options name").
    """
    if config.target_modules == []:
        return []
    if config.target_modules is None:
        raise ConfigError(
            f"target_modules is None for {type(model).__name__}; resolve the method's default first "
            f"(AdapterMethod.resolved_config), or pass module names, a regex, or {ALL_LINEAR!r}."
        )
    heads = _heads(model)
    modules = list(candidate_modules(model))
    chosen = [(name, m) for name, m in modules if _wanted(name, m, config, heads)]
    if not chosen:
        examples = sorted({name.rsplit(".", 1)[-1] for name, m in modules if isinstance(_unwrap(m), adaptable)})
        raise TargetNotFoundError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}"
            + (f" (with exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
            + (f" (in layers {config.layers_to_transform!r})" if config.layers_to_transform is not None else "")
            + f". Adaptable module names in this model include: {', '.join(examples[:12]) or '(none)'}."
        )
    for name, module in chosen:
        if not isinstance(_unwrap(module), adaptable):
            raise UnsupportedModuleError(
                f"module {name!r} is a {type(_unwrap(module)).__name__}, which this method cannot adapt. "
                f"Supported types: {', '.join(t.__name__ for t in adaptable)}."
            )
    return [name for name, _ in chosen]


def portable_target_modules(model: nn.Module, targeted: list[str], config: MethodConfig) -> list[str] | str:
    """A `target_modules` value that selects exactly `targeted` under PEFT's rules.

    PEFT re-targets on load from the saved config, so "all-linear" or a regex that
    relied on peftkit's type filter is written as leaf names when those select the
    same set, else as a regex of the exact paths.
    """
    leaves = sorted({name.rsplit(".", 1)[-1] for name in targeted})
    by_leaves = dataclasses.replace(config, target_modules=leaves)
    reselected = [n for n, m in candidate_modules(model) if _wanted(n, m, by_leaves, [])]
    if sorted(reselected) == sorted(targeted):
        return leaves
    return "(" + "|".join(re.escape(name) for name in sorted(targeted)) + ")"


def distinguishing_suffixes(chosen: list[str], names: list[str]) -> list[str]:
    """The shortest dotted suffixes that select exactly `chosen` among `names` under PEFT's suffix rule.

    GPT-2's attention is `["c_attn", "attn.c_proj"]`: `c_proj` alone would also take the MLP's.
    """
    picked = set(chosen)
    suffixes: list[str] = []
    for path in chosen:
        parts = path.split(".")
        for start in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[start:])
            if all(name in picked for name in names if matches_pattern(name, [suffix])):
                break
        if suffix not in suffixes:
            suffixes.append(suffix)
    return suffixes
