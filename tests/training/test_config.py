"""The run config: YAML sections validated by type, --set overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peftkit.errors import ConfigError, UnknownMethodError
from peftkit.training.config import build_config, load_config


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
    assert config.method.name == "lora" and config.method.options == {
        "r": 16,
        "alpha": 32,
        "target_modules": "all-linear",
    }
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
    assert config.method.options["target_modules"] == ["q_proj", "v_proj"] and config.method.options["r"] == 4


def test_resolved_config_round_trips(config_file: Path) -> None:
    config = load_config(config_file, ["eval.every=5"])
    assert build_config(config.to_dict()) == config


@pytest.mark.parametrize(
    ("override", "error", "names"),
    [
        ("training.lerning_rate=0.1", ConfigError, ["lerning_rate", "Did you mean 'learning_rate'"]),
        ("training.batch_size=four", ConfigError, ["training.batch_size", "int", "'four'"]),
        ("data.train=missing.jsonl", ConfigError, ["data.train", "missing.jsonl", "does not exist"]),
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
