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
from transformers.pytorch_utils import Conv1D

from peftkit.errors import ConfigError, TargetNotFoundError, UnsupportedModuleError
from peftkit.layer import AdapterHost, TrainableCopy
from peftkit.method import MethodConfig

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGETS",
    "LINEAR_TYPES",
    "candidate_modules",
    "find_targets",
    "matches_pattern",
    "layer_index",
    "portable_target_modules",
    "resolved_config_targets",
    "task_heads",
]

ALL_LINEAR = "all-linear"
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

# Defaults for `target_modules: None`, as PEFT's table: the attention query and value.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen2", "qwen3", "phi3", "opt"],
        ["q_proj", "v_proj"],
    ),
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "distilbert"], ["query", "value"]),
    "t5": ["q", "v"],
}

# Task heads that start random and so always train and save with the adapter, as PEFT
# does for its SEQ_CLS / TOKEN_CLS / QUESTION_ANS task types.
TASK_HEADS: dict[str, list[str]] = {
    "ForSequenceClassification": ["classifier", "score"],
    "ForTokenClassification": ["classifier", "score"],
    "ForQuestionAnswering": ["qa_outputs"],
}

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
        hit = isinstance(_unwrap(module), LINEAR_TYPES) and all(_unwrap(module) is not head for head in heads)
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
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    return [head for head in [output, *(getattr(model, name) for name in task_heads(model))] if head is not None]


def task_heads(model: nn.Module) -> list[str]:
    """Names of the randomly initialised task head of a transformers task model, if any."""
    cls = type(model).__name__
    heads = next((names for suffix, names in TASK_HEADS.items() if cls.endswith(suffix)), [])
    return [name for name in heads if isinstance(getattr(model, name, None), nn.Module)]


def resolved_config_targets(model: nn.Module, config: MethodConfig) -> list[str] | str:
    """`config.target_modules`, or the model type's default when it is None."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ConfigError(
        f"no default target_modules for model type {model_type!r}; pass target_modules "
        f"(module names, a regex, or {ALL_LINEAR!r}). Known defaults: {', '.join(sorted(DEFAULT_TARGETS))}."
    )


def find_targets(model: nn.Module, config: MethodConfig, adaptable: tuple[type[nn.Module], ...]) -> list[str]:
    """Paths of the modules `config` selects; errors if none match or one cannot be adapted.

    `target_modules=[]` selects nothing on purpose (PEFT's spelling for "only the
    parameters or tokens a method's own options name").
    """
    if config.target_modules == []:
        return []
    config = dataclasses.replace(config, target_modules=resolved_config_targets(model, config))
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
