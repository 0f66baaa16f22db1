"""The run config: YAML sections validated by type, --set overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peftkit.errors import ConfigError, UnknownMethodError
from peftkit.training.config import apply_overrides, build_config, load_config


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")
    raw = {
        "model": {"name": "some/model"},
        "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": "train.jsonl", "max_length": 256},  # relative: resolved beside the YAML
        "training": {"max_steps": 200, "batch_size": 4, "learning_rate": 2.0e-4, "seed": 0},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_issue_shape_loads_with_defaults(config_file: Path) -> None:
    config = load_config(config_file)
    method = config.method  # the built method: its config holds the given options and the defaults
    assert method.name == "lora" and (method.config.r, method.config.alpha) == (16, 32)
    assert method.config.target_modules == "all-linear" and method.config.dropout == 0.0
    assert config.to_dict()["method"] == {"name": "lora", **method.options()} and len(method.options()) > 3
    assert config.training.max_steps == 200 and config.training.learning_rate == 2.0e-4
    assert config.training.gradient_accumulation_steps == 1 and config.output.keep_last == 2
    assert Path(config.data.train) == config_file.parent / "train.jsonl"


def test_overrides_are_parsed_as_yaml(config_file: Path) -> None:
    config = load_config(
        config_file,
        [
            "training.learning_rate=1e-4",  # YAML 1.1 reads this as a string; a float is meant
            "training.batch_size=8",
            "data.packing=true",
            "method.target_modules=[q_proj, v_proj]",
            "method.r=4",
        ],
    )
    assert config.training.learning_rate == 1e-4 and isinstance(config.training.learning_rate, float)
    assert config.training.batch_size == 8 and config.data.packing is True
    assert config.method.config.target_modules == ["q_proj", "v_proj"] and config.method.config.r == 4


def test_a_longer_override_path_reaches_into_nested_options() -> None:
    raw = {"model": {"name": "m", "quantization": None}}  # null: as if absent
    apply_overrides(raw, ["model.quantization.bits=4"])
    apply_overrides(raw, ["model.quantization.skip_modules=[]", "model.quantization.blocksize=64", "eval.x.y=1"])
    assert raw == {
        "model": {"name": "m", "quantization": {"bits": 4, "skip_modules": [], "blocksize": 64}},
        "eval": {"x": {"y": 1}},
    }
    with pytest.raises(ConfigError, match=r"--set 'model.name.bits=4': model.name must be a mapping, got 'm'"):
        apply_overrides(raw, ["model.name.bits=4"])


def test_resolved_config_round_trips(config_file: Path) -> None:
    config = load_config(config_file, ["eval.every=5"])
    assert build_config(config.to_dict()) == config


@pytest.mark.parametrize(
    ("override", "error", "names"),
    [
        ("training.lerning_rate=0.1", ConfigError, ["lerning_rate", "Did you mean 'learning_rate'"]),
        ("training.batch_size=four", ConfigError, ["training.batch_size", "int", "'four'"]),
        ("data.train=missing.jsonl", ConfigError, ["data.train", "missing.jsonl", "does not exist"]),
        ("data.test=missing.jsonl", ConfigError, ["data.test", "missing.jsonl", "does not exist"]),
        ("method.name=lorra", UnknownMethodError, ["'lorra'", "Did you mean 'lora'"]),
        ("method.alhpa=8", ConfigError, ["'alhpa'", "'lora'", "Did you mean 'alpha'"]),
        ("method.r=0", ConfigError, ["method 'lora'", "r must be a positive integer"]),
        ("modle.name=x", ConfigError, ["'modle'", "Did you mean 'model'"]),
        ("training.mixed_precision=fp8", ConfigError, ["training.mixed_precision", "'bf16'"]),
    ],
)
def test_errors_name_the_key(config_file: Path, override: str, error: type, names: list[str]) -> None:
    with pytest.raises(error) as caught:
        load_config(config_file, [override])
    message = str(caught.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_unknown_section_in_file(config_file: Path) -> None:
    raw = yaml.safe_load(config_file.read_text())
    raw["trainig"] = {}
    with pytest.raises(ConfigError, match="unknown section 'trainig'. Did you mean 'training'"):
        build_config(raw, base=config_file.parent)


def test_compare_section_is_left_to_peftkit_compare(config_file: Path) -> None:
    raw = yaml.safe_load(config_file.read_text())
    plain = build_config(raw, base=config_file.parent)
    raw["compare"] = {"methods": ["lora", "dora"]}
    assert build_config(raw, base=config_file.parent) == plain


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("output.keep_last=0", "output.keep_last must be at least 1, got 0."),
        ("output.keep_last=-2", "output.keep_last must be at least 1, got -2."),
        ("output.save_every=0", "output.save_every must be at least 1 (or null), got 0."),
        ("eval.every=0", "eval.every must be at least 1 (or null), got 0."),
        ("eval.every=-5", "eval.every must be at least 1 (or null), got -5."),
        ("eval.batch_size=0", "eval.batch_size must be at least 1, got 0."),
        ("eval.max_new_tokens=-1", "eval.max_new_tokens must be at least 1, got -1."),
        ("eval.generations=-1", "eval.generations must be 0 or more, got -1."),
        ("training.learning_rate=0", "training.learning_rate must be above 0, got 0."),
        ("training.learning_rate=-1e-4", "training.learning_rate must be above 0, got -0.0001."),
        ("training.warmup_steps=-1", "training.warmup_steps must be 0 or more, got -1."),
        ("training.weight_decay=-0.01", "training.weight_decay must be 0 or more, got -0.01."),
        ("training.max_grad_norm=-1.0", "training.max_grad_norm must be above 0 (or null), got -1.0."),
        ("training.seed=-3", "training.seed must be 0 or more, got -3."),
        ("training.batch_size=0", "training.batch_size must be at least 1, got 0."),
        ("training.max_steps=0", "training.max_steps must be at least 1 (or null), got 0."),
    ],
)
def test_out_of_range_values_name_key_value_and_range(config_file: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, [override])
    assert str(caught.value) == message


def test_zero_is_valid_where_it_means_none(config_file: Path) -> None:
    config = load_config(config_file, ["training.warmup_steps=0", "training.weight_decay=0", "eval.generations=0"])
    assert (config.training.warmup_steps, config.training.weight_decay, config.eval.generations) == (0, 0.0, 0)


def test_yaml_1_1_exponents_are_numbers_in_every_section(config_file: Path) -> None:
    """YAML 1.1 reads `1e2` (no dot) as a string; every section takes the number its option's type asks for."""
    raw = yaml.safe_load(config_file.read_text())
    raw["method"].update(alpha="1e2", dropout="5e-2", r="1e1", rank_pattern={"q_proj": "2e0"})
    raw["training"].update(learning_rate="1e-4", max_steps="1e3")
    config = build_config(raw, base=config_file.parent)
    options = config.method.options()
    assert (options["alpha"], options["dropout"], options["r"], options["rank_pattern"]) == (
        100.0,
        0.05,
        10,
        {"q_proj": 2},
    )
    assert (
        isinstance(options["alpha"], float)
        and type(options["r"]) is int
        and type(options["rank_pattern"]["q_proj"]) is int
    )
    assert (
        config.training.learning_rate == 1e-4
        and type(config.training.max_steps) is int
        and config.training.max_steps == 1000
    )


def test_a_fractional_number_for_an_int_option_is_refused(config_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"r must be int, got '1\.5e0'"):
        load_config(config_file, ["method.r=1.5e0"])


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes("model:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"config file '{path}' is not UTF-8 text .*; save it as UTF-8\.$"):
        load_config(path)


def test_the_written_config_is_a_copy_a_change_to_it_leaves_the_run_config_as_it_was(config_file: Path) -> None:
    """`peftkit estimate` builds its suggestions from `to_dict()` plus overrides; they once reached the method."""
    config = load_config(config_file, ["method.name=qlora"])
    written = config.to_dict()
    apply_overrides(written, ["method.quantization.skip_modules=[]", "method.rank_pattern.q_proj=2"])
    assert config.method.config.quantization["skip_modules"] is None and config.method.config.rank_pattern == {}
    assert build_config(written).method.config.quantization["skip_modules"] == []
