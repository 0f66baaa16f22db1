"""Option dataclasses reject wrong types and unknown names with a message that helps."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.errors import ConfigError


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 0}, "LoraConfig.r must be a positive integer, got 0"),
        ({"r": -3}, "LoraConfig.r must be a positive integer, got -3"),
        ({"r": 2.5}, "LoraConfig.r must be int, got 2.5"),
        ({"r": True}, "LoraConfig.r must be int, got True"),
        ({"dropout": 1.0}, "LoraConfig.dropout must be in [0, 1)"),
        ({"bias": "some"}, "LoraConfig.bias must be 'none' | 'all' | 'lora_only', got 'some'"),
        ({"target_modules": ["q_proj", 3]}, "LoraConfig.target_modules must be list[str] | str | None"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a positive integer"),
        # Invalid regexes used to escape as re.error from deep inside the matching.
        ({"target_modules": "["}, "LoraConfig.target_modules '[' is not a valid regular expression (unterminated"),
        ({"exclude_modules": "(q"}, "LoraConfig.exclude_modules '(q' is not a valid regular expression (missing )"),
        ({"rank_pattern": {"q_proj[": 2}}, "LoraConfig.rank_pattern key 'q_proj[' is not a valid regular expression"),
        ({"alpha_pattern": {"*": 2}}, "LoraConfig.alpha_pattern key '*' is not a valid regular expression"),
    ],
)
def test_bad_option_values_name_the_field(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        peftkit.get_method("lora").from_options(**options)
    assert message in str(error.value)


def test_unknown_option_lists_valid_ones_and_suggests_closest() -> None:
    with pytest.raises(ConfigError) as error:
        peftkit.get_method("lora").from_options(rank=8)
    message = str(error.value)
    assert "method 'lora' has no option 'rank'. Did you mean 'r'?" in message
    assert "Valid options:" in message and "target_modules" in message and "alpha" in message


@pytest.mark.parametrize(
    ("method", "key", "suggested"),
    [("lora", "lora_alpha", "alpha"), ("lora", "lora_dropout", "dropout"), ("dora", "use_rslora", "rslora")],
)
def test_peft_option_names_suggest_peftkit_ones(method: str, key: str, suggested: str) -> None:
    with pytest.raises(ConfigError, match=rf"no option '{key}'\. Did you mean '{suggested}'\?"):
        peftkit.get_method(method).from_options(**{key: 1})


@pytest.mark.parametrize(
    ("method", "value", "message"),
    [
        ("lora", True, "use method 'dora' instead of 'lora'"),
        ("qlora", True, "use method 'qdora' instead of 'qlora'"),
        ("dora", False, "use method 'lora' instead of 'dora'"),
        ("lora", False, "'lora' already is use_dora=False; drop the option"),
    ],
)
def test_use_dora_names_the_method_to_pick(method: str, value: bool, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        peftkit.get_method(method).from_options(use_dora=value, r=4)
    assert f"method {method!r} has no option 'use_dora': " in str(error.value) and message in str(error.value)


def test_int_is_accepted_where_float_is_declared() -> None:
    method = peftkit.get_method("lora").from_options(alpha=16)
    assert method.config.alpha == 16
