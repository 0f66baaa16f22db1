"""A call that changes a model either completes or leaves the model exactly as it was.

Each test forces a failure part-way through one public call and compares the model
before and after: every state-dict value, every module's type, which parameters
train, the adapters, and each host's active and merged adapters.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from torch import nn

import peftkit
import peftkit.saving
from peftkit.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    DestinationError,
    MergeError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from peftkit.injection import hosts
from peftkit.quant import QuantizationConfig, merge_and_dequantize, prepare_for_kbit_training, quantize_model

NAMES = ["sql", "chat"]


def two_adapters(method: str = "lora") -> nn.Module:
    model = tiny_llama()
    for seed, name in enumerate(NAMES):
        peftkit.adapt(model, method, name, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
        randomize_adapters(model, seed=seed + 1)
    return model


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    values = {key: value.detach().clone() for key, value in model.state_dict().items()}
    structure = (
        {name: type(module) for name, module in model.named_modules()},
        {name: p.requires_grad for name, p in model.named_parameters()},
        peftkit.list_adapters(model),
        {path: (list(h.active_adapters), list(getattr(h, "merged_adapters", []))) for path, h in hosts(model)},
        [host.routing for _, host in hosts(model)],
    )
    return values, structure


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal values, a NaN equal to a NaN (a poisoned adapter stays poisoned)."""
    if a.is_floating_point() and b.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], Any]) -> None:
    values, structure = snapshot(model)
    assert values.keys() == before[0].keys()
    assert [key for key, value in values.items() if not same(value, before[0][key])] == []
    assert structure == before[1]


def poison(model: nn.Module, name: str, path: str = "model.layers.1.mlp.down_proj") -> None:
    """A NaN in the last adapted layer: the earlier ones would have been merged before it was met."""
    with torch.no_grad():
        model.get_submodule(path).adapters[name].lora_B.weight[0, 0] = float("nan")


def test_adapt_whose_modules_to_save_match_nothing_leaves_no_wrapped_layer() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TargetNotFoundError, match=r"modules_to_save=\['scorer'\] matched no module"):
        peftkit.adapt(model, "lora", r=4, target_modules=["q_proj"], modules_to_save=["scorer"])
    assert_unchanged(model, before)
    assert not any(isinstance(m, peftkit.AdapterHost) for m in model.modules())
    peftkit.adapt(model, "lora", r=4, target_modules=["q_proj"])  # the name is free again
    assert peftkit.list_adapters(model) == ["default"]


def test_adapt_failing_on_a_later_target_unwraps_the_earlier_ones() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, groups=2))
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="groups=2 needs a rank divisible by 2"):
        peftkit.adapt(model, "lora", r=3, target_modules=["0", "1"])
    assert_unchanged(model, before)
    assert type(model[0]) is nn.Linear and not model[0]._forward_pre_hooks


def test_qlora_failing_on_a_later_layer_leaves_the_base_dense() -> None:
    model = tiny_llama(hidden_size=64, intermediate_size=96)  # down_proj's 96 inputs take no 64-blocks
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"'model.layers.0.mlp.down_proj' on CPU with blocksize 64"):
        peftkit.adapt(model, "qlora", r=4, target_modules="all-linear", quantization={"blocksize": 64})
    assert_unchanged(model, before)
    assert not getattr(model, "is_loaded_in_4bit", False)
    with pytest.raises(ConfigError, match="blocksize 64"):
        quantize_model(model, QuantizationConfig(blocksize=64))
    assert_unchanged(model, before)


def test_full_fine_tuning_of_a_quantized_model_is_refused_before_anything_changes() -> None:
    model = quantize_model(tiny_llama())
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="non-floating-point"):
        peftkit.adapt(model, "full")
    assert_unchanged(model, before)


def test_adapter_names_that_cannot_key_a_layer_are_refused_up_front() -> None:
    model = two_adapters()
    before = snapshot(model)
    for bad in ("a.b", "", "__base__"):
        with pytest.raises(ConfigError, match="adapter name"):
            peftkit.adapt(model, "lora", bad, r=4, target_modules=["q_proj"])
        with pytest.raises(ConfigError, match="adapter name"):
            peftkit.rename_adapter(model, "sql", bad)
    with pytest.raises(AdapterExistsError, match="in use"):
        peftkit.rename_adapter(model, "sql", "chat")
    assert_unchanged(model, before)


def test_load_adapter_onto_a_mismatched_base_as_qlora_leaves_it_unquantized(tmp_path: Path) -> None:
    peftkit.save_adapter(peftkit.adapt(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    before = snapshot(model)
    with pytest.raises(ShapeMismatchError, match=r"q_proj.*\(4, 32\).*\(4, 64\)"):
        peftkit.load_adapter(model, tmp_path, method="qlora")
    assert_unchanged(model, before)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear and not hasattr(model, "is_loaded_in_4bit")


def test_hot_swap_of_a_mismatched_file_changes_nothing(tmp_path: Path) -> None:
    donor = peftkit.adapt(tiny_llama(), "lora", "sql", r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peftkit.save_adapter(donor, tmp_path, "sql")
    model = two_adapters()
    before = snapshot(model)
    with pytest.raises(ShapeMismatchError, match="hot-swap needs equal settings"):
        peftkit.hot_swap_adapter(model, tmp_path, "sql")
    assert_unchanged(model, before)


@pytest.mark.parametrize("call", [peftkit.merge, peftkit.merge_and_unload])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_merge_that_meets_nan_in_its_last_layer_writes_no_layer(call: Any, method: str) -> None:
    model = two_adapters(method)
    peftkit.set_active_adapters(model, NAMES)
    poison(model, "chat")
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"'chat' at 'model.layers.1.mlp.down_proj' would write NaN/Inf"):
        call(model)
    assert_unchanged(model, before)


def test_switching_to_an_adapter_with_nan_keeps_serving_the_merged_one() -> None:
    model = two_adapters()
    peftkit.switch_merged_adapter(model, "sql")
    poison(model, "chat")
    before = snapshot(model)
    with pytest.raises(MergeError, match="'chat'.*NaN"):
        peftkit.switch_merged_adapter(model, "chat")
    assert_unchanged(model, before)


def test_unmerge_that_meets_nan_writes_no_layer() -> None:
    model = two_adapters()
    peftkit.merge(model, NAMES)
    poison(model, "chat")
    before = snapshot(model)
    with pytest.raises(MergeError, match="unmerging adapter 'chat'"):
        peftkit.unmerge(model)
    assert_unchanged(model, before)


def test_merging_a_method_that_is_no_weight_delta_writes_no_layer() -> None:
    model = tiny_llama()
    peftkit.adapt(model, "lora", "lora", r=4, target_modules=["q_proj"])
    peftkit.adapt(model, "bottleneck", "bn")
    randomize_adapters(model)
    peftkit.set_active_adapters(model, ["lora", "bn"])
    before = snapshot(model)
    with pytest.raises(MergeError, match="cannot be merged"):
        peftkit.merge_and_unload(model)
    assert_unchanged(model, before)


def test_unknown_names_change_nothing() -> None:
    model = two_adapters()
    peftkit.merge(model, ["sql"])
    before = snapshot(model)
    for call in (
        lambda: peftkit.set_active_adapters(model, ["chat", "nope"]),
        lambda: peftkit.switch_merged_adapter(model, ["chat", "nope"]),
        lambda: peftkit.merge(model, ["chat", "nope"]),
        lambda: peftkit.delete_adapter(model, "nope"),
        lambda: peftkit.rename_adapter(model, "nope", "other"),
        lambda: peftkit.mark_trainable(model, "nope"),
        lambda: peftkit.combine_adapters(model, ["chat", "nope"], [1.0, 1.0], "mix"),
    ):
        with pytest.raises(AdapterNotFoundError, match="'nope'"):
            call()
        assert_unchanged(model, before)
    with pytest.raises(AdapterStateError, match="merged into"):
        peftkit.delete_adapter(model, "sql")
    assert_unchanged(model, before)


def test_combine_failing_part_way_leaves_no_new_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    model = two_adapters()
    before = snapshot(model)
    layer_type = type(model.model.layers[0].self_attn.q_proj.adapters["sql"])
    calls = []

    def fail_on_the_third(self: nn.Module, up: torch.Tensor, down: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        original(self, up, down)

    original = layer_type.set_low_rank_factors
    monkeypatch.setattr(layer_type, "set_low_rank_factors", fail_on_the_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        peftkit.combine_adapters(model, NAMES, [0.5, 0.5], "mix", combination="cat")
    assert_unchanged(model, before)


def test_disabling_an_in_place_method_changes_nothing() -> None:
    model = peftkit.adapt(tiny_llama(), "head")
    before = snapshot(model)
    with pytest.raises(AdapterStateError, match="no base output"):
        peftkit.set_adapters_enabled(model, False)
    assert_unchanged(model, before)


def test_merge_and_dequantize_that_fails_keeps_the_4bit_layers() -> None:
    model = two_adapters("qlora")
    peftkit.set_active_adapters(model, NAMES)
    poison(model, "chat")
    before = snapshot(model)
    with pytest.raises(MergeError, match="NaN"):
        merge_and_dequantize(model)
    assert_unchanged(model, before)
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_kbit_prep_refused_for_checkpointing_leaves_dtypes() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).half()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="gradient checkpointing needs a transformers model"):
        prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert_unchanged(model, before)
    assert model[0].weight.dtype == torch.float16


def test_save_adapter_into_a_read_only_directory_is_a_clear_error(read_only_dir: Path) -> None:
    model = two_adapters()
    with pytest.raises(DestinationError, match=rf"cannot write '{read_only_dir}/adapter/adapter_config.json': "):
        peftkit.save_adapter(model, read_only_dir / "adapter", "sql")
    with pytest.raises(DestinationError, match=rf"cannot write '{read_only_dir}/adapter_config.json': "):
        peftkit.save_adapter(model, read_only_dir, "sql")
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.parametrize("writer", ["save_file", "atomic_write_json"])
def test_save_adapter_onto_a_full_disk_leaves_the_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """Whether the weights or the config (written second) meet the full disk, no file is new."""
    model = two_adapters()
    kept = peftkit.save_adapter(model, tmp_path / "kept", "sql")
    saved = {p.name: p.read_bytes() for p in kept.iterdir()}

    def full_disk(path: str | Path, *_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peftkit.saving, writer, full_disk)
    for directory in (kept, tmp_path / "fresh"):
        with pytest.raises(DestinationError, match=rf"cannot write '{directory}': No space left on device \(ENOSPC\)"):
            peftkit.save_adapter(model, directory, "chat")
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_merge_takes_one_name_as_a_string_like_set_active_adapters() -> None:
    model = two_adapters()
    peftkit.merge(model, "chat")
    assert {tuple(h.merged_adapters) for _, h in hosts(model)} == {("chat",)}


def test_a_refused_adapter_name_leaves_no_record_on_the_model() -> None:
    model = tiny_llama()
    before = set(vars(model))
    with pytest.raises(peftkit.ConfigError, match="adapter name 'base' is reserved"):
        peftkit.adapt(model, "lora", "base", target_modules=["q_proj"])
    assert set(vars(model)) == before and peftkit.list_adapters(model) == []
