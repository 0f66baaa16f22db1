"""The run config of `peftkit train`: one YAML file, checked in full before any model loads.

Each YAML section is a dataclass validated by type (peftkit.validation); the
`method` section is the method's own config, checked by the method itself, so a
new method needs nothing here. `--set section.key=value` overrides are parsed
with YAML (`--set training.learning_rate=1e-4` gives a float).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from peftkit.errors import ConfigError, did_you_mean
from peftkit.registry import get_method
from peftkit.training.optim import check_optimizer
from peftkit.validation import check_types, from_options

__all__ = [
    "ModelConfig",
    "MethodSection",
    "DataConfig",
    "TrainingConfig",
    "EvalConfig",
    "OutputConfig",
    "RunConfig",
    "read_yaml",
    "load_config",
    "apply_overrides",
    "build_config",
]


def _as_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string; take it as the float a person meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclasses.dataclass
class _Section:
    def __post_init__(self) -> None:
        for name, hint in typing.get_type_hints(type(self)).items():
            if float in typing.get_args(hint) or hint is float:
                setattr(self, name, _as_float(getattr(self, name)))
        check_types(self, type(self).section)  # type: ignore[attr-defined]


@dataclasses.dataclass
class ModelConfig(_Section):
    """`name`: a hub id, a local path, or `gemma-3-270m` (the embedded default)."""

    section = "model"
    name: str = "gemma-3-270m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class MethodSection:
    """The method's registry name and its options, already validated by the method."""

    name: str
    options: dict[str, Any]


@dataclasses.dataclass
class DataConfig(_Section):
    """Local JSONL/text files; `format: auto` picks text, prompt/completion or messages per file."""

    section = "data"
    train: str = ""
    validation: str | None = None
    validation_split: float = 0.0
    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    max_length: int = 256
    packing: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.train:
            raise ConfigError("data.train is required: a JSONL or text file to train on.")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {self.max_length}.")
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"data.validation_split must be in [0, 1), got {self.validation_split}.")
        if self.validation and self.validation_split:
            raise ConfigError("data.validation and data.validation_split are exclusive; give one.")


@dataclasses.dataclass
class TrainingConfig(_Section):
    """Optimisation: `optimizer` (see peftkit.training.optim) with a warmup then a `schedule`; `batch_size` is
    per process; `loss_chunk_size` positions per loss chunk (None: automatic, 0: off; see peftkit.training.loss)."""

    section = "training"
    learning_rate: float = 2.0e-4
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = 1
    optimizer: str = "adamw"
    loss_chunk_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("epochs", "batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"training.{key} must be at least 1, got {getattr(self, key)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"training.max_steps must be at least 1, got {self.max_steps}.")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 0:
            raise ConfigError(
                f"training.loss_chunk_size must be None (auto), 0 (off) or positive, got {self.loss_chunk_size}."
            )
        check_optimizer(self.optimizer)


@dataclasses.dataclass
class EvalConfig(_Section):
    """Validation loss every `every` steps (and at start and end); `generations` greedy samples."""

    section = "eval"
    every: int | None = None
    generations: int = 0
    max_new_tokens: int = 48
    batch_size: int = 8


@dataclasses.dataclass
class OutputConfig(_Section):
    """Where the run writes; a checkpoint every `save_every` steps, the last `keep_last` kept."""

    section = "output"
    dir: str = "runs/peftkit"
    save_every: int | None = None
    keep_last: int = 2


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
}
_ALL_SECTIONS = ["model", "method", "data", "training", "eval", "output"]
# Sections other commands read from the same file; `peftkit train` accepts and ignores them.
_OTHER_COMMANDS_SECTIONS = ["compare"]


@dataclasses.dataclass
class RunConfig:
    """Everything one `peftkit train` run needs, validated."""

    model: ModelConfig
    method: MethodSection
    data: DataConfig
    training: TrainingConfig
    eval: EvalConfig
    output: OutputConfig

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data (method options flattened in)."""
        data = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        data["method"] = {"name": self.method.name, **self.method.options}
        return {name: data[name] for name in _ALL_SECTIONS}


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to the raw YAML mapping; values are parsed as YAML."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or "." not in path:
            raise ConfigError(f"--set expects section.key=value, got {item!r}.")
        section, key = path.split(".", 1)
        if section not in _ALL_SECTIONS:
            raise ConfigError(
                f"--set {item!r}: no section {section!r}.{did_you_mean(section, _ALL_SECTIONS)} "
                f"Sections: {', '.join(_ALL_SECTIONS)}."
            )
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section} must be a mapping, got {target!r}.")
        target[key] = yaml.safe_load(text)
    return raw


def _resolve_file(path: str, base: Path | None, key: str) -> str:
    """A data path as given (relative to the working directory), else beside the config file."""
    candidates = [Path(path)] + ([base / path] if base is not None and not Path(path).is_absolute() else [])
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"{key}: file {path!r} does not exist.")


def _method_section(raw: Any) -> MethodSection:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
        raise ConfigError("method.name is required: a registered method such as 'lora'.")
    options = {k: v for k, v in raw.items() if k != "name"}
    method = get_method(raw["name"])  # raises on an unknown method, naming the close ones
    try:
        method.from_options(**options)
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith("method") else f"method {raw['name']!r}: {message}") from None
    return MethodSection(raw["name"], options)


def build_config(raw: Mapping[str, Any], base: Path | None = None) -> RunConfig:
    """Validate a raw mapping (as read from YAML) into a RunConfig; `base` resolves data paths."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}.")
    known = _ALL_SECTIONS + _OTHER_COMMANDS_SECTIONS
    for section in raw:
        if section not in known:
            raise ConfigError(
                f"unknown section {section!r}.{did_you_mean(str(section), known)} Sections: {', '.join(known)}."
            )
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"{name} must be a mapping of options, got {values!r}.")
        sections[name] = from_options(cls, values, where=name)
    data = sections["data"]
    data.train = _resolve_file(data.train, base, "data.train")
    if data.validation:
        data.validation = _resolve_file(data.validation, base, "data.validation")
    return RunConfig(method=_method_section(raw.get("method")), **sections)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping of sections in a YAML config file; ConfigError says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}.")
    return raw


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a YAML run config; ConfigError names the key at fault."""
    return build_config(apply_overrides(read_yaml(path), overrides), base=Path(path).parent)
