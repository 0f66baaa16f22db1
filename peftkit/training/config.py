"""The run config of `peftkit train`: one YAML file, checked in full before any model loads.

Each YAML section is a dataclass validated by type (peftkit.validation); the
`method` section is built into the method itself (an `AdapterMethod`, which checks its
own options), so a new method needs nothing here. `--set section.key=value` overrides are parsed
with YAML (`--set training.learning_rate=1e-4` gives a float).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from peftkit.errors import ConfigError, did_you_mean
from peftkit.method import AdapterMethod
from peftkit.quant.config import QuantizationConfig
from peftkit.registry import get_method
from peftkit.training.distributed import DistributedConfig, check_sharding, distributed_from_options
from peftkit.training.models import model_skeleton
from peftkit.training.optim import check_optimizer
from peftkit.training.quantized import quantization_from_options, skipped_modules
from peftkit.validation import check_types, from_options

__all__ = [
    "ModelConfig",
    "DataConfig",
    "TrainingConfig",
    "EvalConfig",
    "OutputConfig",
    "RunConfig",
    "read_text",
    "read_yaml",
    "load_config",
    "apply_overrides",
    "build_config",
    "build_method",
    "yaml_numbers",
    "resolve_file",
]


def _yaml_number(value: Any, hint: Any) -> Any:
    """`value` as the number `hint` asks for where YAML 1.1 left a string (`1e-4`, `1e2`).

    A float option gets the float; an int option gets the int when the number is whole
    (`1e2` -> 100); containers (`rank_pattern: {q_proj: 1e1}`) are converted inside.
    """
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    if isinstance(value, (dict, list)):
        kind = dict if isinstance(value, dict) else list
        inner = next((typing.get_args(h) for h in options if typing.get_origin(h) is kind), None)
        if not inner:
            return value
        if kind is dict:
            return {k: _yaml_number(v, inner[-1]) for k, v in value.items()}
        return [_yaml_number(v, inner[0]) for v in value]
    if not isinstance(value, str) or str in options:
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    if float in options:
        return number
    return int(number) if int in options and number.is_integer() else value


def yaml_numbers(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` for the dataclass `cls` with YAML's numeric strings read as its fields' number types.

    The one conversion for every section, the method's options included; unknown keys pass
    through for `from_options` to name.
    """
    hints = typing.get_type_hints(cls)
    return {key: _yaml_number(value, hints[key]) if key in hints else value for key, value in options.items()}


@dataclasses.dataclass
class _Section:
    """A YAML section: type-checked, then range-checked (`positive` and `non_negative` keys; None passes)."""

    section: typing.ClassVar[str]
    positive: typing.ClassVar[tuple[str, ...]] = ()
    non_negative: typing.ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        check_types(self, self.section)
        for key in self.positive + self.non_negative:
            value = getattr(self, key)
            if value is None or value > 0 or (value == 0 and key in self.non_negative):
                continue
            whole = int in (hints[key], *typing.get_args(hints[key]))
            valid = "0 or more" if key in self.non_negative else "at least 1" if whole else "above 0"
            optional = " (or null)" if type(None) in typing.get_args(hints[key]) else ""
            raise ConfigError(f"{self.section}.{key} must be {valid}{optional}, got {value!r}.")


@dataclasses.dataclass
class ModelConfig(_Section):
    """`name`: a hub id, a local path, or `gemma-3-270m` (the embedded default).

    `quantization` (given as a mapping of `peftkit.quant.QuantizationConfig`'s fields, held
    as the built config) loads the linear layers straight into 4 bits; the layers it
    leaves dense stay in `dtype`.
    """

    section = "model"
    name: str = "gemma-3-270m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    quantization: QuantizationConfig | None = None

    def __post_init__(self) -> None:
        if self.quantization is not None:
            self.quantization = quantization_from_options(self.quantization, "model.quantization")
        super().__post_init__()


@dataclasses.dataclass
class DataConfig(_Section):
    """Local JSONL/text files; `format: auto` picks text, prompt/completion or messages per file.

    `test` is held out from training and validation: `peftkit compare` scores every run on all of it.
    """

    section = "data"
    train: str = ""
    validation: str | None = None
    test: str | None = None
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
    per process; `loss_chunk_size` positions per loss chunk (None: automatic, 0: off; see peftkit.training.loss).
    `loraplus_lr_ratio` (LoRA+, off by default) trains each B at that multiple of `learning_rate`, LoRA
    embeddings at `loraplus_lr_embedding` (PEFT's `create_loraplus_optimizer`). `distributed`: how several
    processes share the work (peftkit.training.distributed: ddp, or fsdp sharding)."""

    section = "training"
    positive = (
        "learning_rate",
        "epochs",
        "max_steps",
        "batch_size",
        "gradient_accumulation_steps",
        "max_grad_norm",
        "log_every",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
    )
    non_negative = ("warmup_steps", "weight_decay", "seed", "loss_chunk_size")
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
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        self.distributed = distributed_from_options(self.distributed)
        super().__post_init__()
        check_optimizer(self.optimizer)


@dataclasses.dataclass
class EvalConfig(_Section):
    """Validation loss every `every` steps (and at start and end); `generations` greedy samples."""

    section = "eval"
    positive = ("every", "max_new_tokens", "batch_size")
    non_negative = ("generations",)
    every: int | None = None
    generations: int = 0
    max_new_tokens: int = 48
    batch_size: int = 8


@dataclasses.dataclass
class OutputConfig(_Section):
    """Where the run writes; a checkpoint every `save_every` steps, the last `keep_last` kept."""

    section = "output"
    positive = ("save_every", "keep_last")
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
    method: AdapterMethod
    data: DataConfig
    training: TrainingConfig
    eval: EvalConfig
    output: OutputConfig

    def base_quantization(self) -> QuantizationConfig | None:
        """How the base loads: `model.quantization`, else the method's own default (qlora's 4-bit NF4), else dense."""
        return self.model.quantization or self.method.base_quantization()

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data, every option spelled out (the method's flattened in)."""
        data = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        data["method"] = {"name": self.method.name, **self.method.options()}
        return {name: data[name] for name in _ALL_SECTIONS}


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to the raw YAML mapping; values are parsed as YAML.

    A longer path reaches into nested mappings (`model.quantization.skip_modules=[]`).
    """
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or "." not in path:
            raise ConfigError(f"--set expects section.key=value, got {item!r}.")
        section, *keys = path.split(".")
        known = _ALL_SECTIONS + _OTHER_COMMANDS_SECTIONS
        if section not in known:
            raise ConfigError(
                f"--set {item!r}: no section {section!r}.{did_you_mean(section, known)} Sections: {', '.join(known)}."
            )
        target, where = raw.setdefault(section, {}), section
        for key in keys[:-1]:
            if not isinstance(target, dict):
                break
            if target.get(key) is None:  # absent, or null in the YAML
                target[key] = {}
            target, where = target[key], f"{where}.{key}"
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: {where} must be a mapping, got {target!r}.")
        target[keys[-1]] = yaml.safe_load(text)
    return raw


def _resolve_data_files(data: DataConfig, base: Path | None) -> None:
    data.train = resolve_file(data.train, base, "data.train")
    if data.validation:
        data.validation = resolve_file(data.validation, base, "data.validation")
    if data.test:
        data.test = resolve_file(data.test, base, "data.test")


def resolve_file(path: str, base: Path | None, key: str) -> str:
    """A data path as given (relative to the working directory), else beside the config file."""
    candidates = [Path(path)] + ([base / path] if base is not None and not Path(path).is_absolute() else [])
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"{key}: file {path!r} does not exist.")


def build_method(raw: Any) -> AdapterMethod:
    """The `method` section (`name` and the method's options) as the built method; ConfigError names the fault."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
        raise ConfigError("method.name is required: a registered method such as 'lora'.")
    method = get_method(raw["name"])  # raises on an unknown method, naming the close ones
    options = yaml_numbers(method.config_class, {k: v for k, v in raw.items() if k != "name"})
    try:
        return method.from_options(**options)
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith("method") else f"method {raw['name']!r}: {message}") from None


def build_config(raw: Mapping[str, Any], base: Path | None = None, data_files: bool = True) -> RunConfig:
    """Validate a raw mapping (as read from YAML) into a RunConfig; `base` resolves data paths.

    `data_files=False` leaves the data paths unchecked (`peftkit estimate` reads no data).
    """
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
        sections[name] = from_options(cls, yaml_numbers(cls, values), where=name)
    data = sections["data"]
    if data_files:
        _resolve_data_files(data, base)
    quantization = sections["model"].quantization
    if quantization is not None:  # which layers stay dense, checked on the model's skeleton: no weights read
        skipped_modules(model_skeleton(sections["model"].name), quantization, "model.quantization")
    method = build_method(raw.get("method"))
    if sections["training"].distributed.strategy == "fsdp":
        generations = sections["eval"].generations
        check_sharding(sections["model"].dtype, quantization or method.base_quantization(), generations)
    return RunConfig(method=method, **sections)


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """A file's text; ConfigError names `what` and the file when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{what} {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8."
        ) from None


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping of sections in a YAML config file; ConfigError says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(read_text(path, "config file")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}.")
    return raw


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = (), data_files: bool = True) -> RunConfig:
    """Read, override and validate a YAML run config; ConfigError names the key at fault (see build_config)."""
    return build_config(apply_overrides(read_yaml(path), overrides), base=Path(path).parent, data_files=data_files)
