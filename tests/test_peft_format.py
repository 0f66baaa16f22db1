"""Adapters on disk in PEFT's format: file contents, both interop directions, bad files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import peft
import pytest
import torch
from conftest import MODEL_BUILDERS, model_output, randomize_adapters, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.errors import AdapterExistsError, AdapterFileError, ShapeMismatchError

LORA_OPTIONS = {"r": 4, "alpha": 8, "target_modules": "all-linear"}


def trained(model_name: str, **options: object) -> torch.nn.Module:
    model = peftkit.adapt(MODEL_BUILDERS[model_name](), "lora", **{**LORA_OPTIONS, **options})
    randomize_adapters(model)
    return model


def test_files_hold_peft_keys_and_config_fields(tmp_path: Path) -> None:
    model = trained("llama", rslora=True, rank_pattern={"v_proj": 2})
    peftkit.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 2  # layers x targets x (A, B): only adapter tensors
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 2)
    live = model.model.layers[1].mlp.up_proj.adapters["default"].lora_B.weight
    assert torch.equal(tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"], live)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["use_dora"]) == (4, 8, True, False)
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["rank_pattern"] == {"v_proj": 2} and config["bias"] == "none"
    assert config["fan_in_fan_out"] is False


def test_conv1d_targets_are_declared_fan_in_fan_out(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores [in, out]; PEFT's config says so, or PEFT warns and patches it on load."""
    peftkit.save_adapter(trained("gpt2"), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_round_trip_gives_identical_logits(model_name: str, ids: torch.Tensor, tmp_path: Path) -> None:
    model = trained(model_name)
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(MODEL_BUILDERS[model_name](), tmp_path)
    assert torch.equal(model_output(fresh, ids), expected)
    assert peftkit.trainable_parameters(fresh)[0] == 0  # loaded for inference, as PEFT does
    again = peftkit.load_adapter(MODEL_BUILDERS[model_name](), tmp_path, trainable=True)
    assert peftkit.trainable_parameters(again)[0] == peftkit.trainable_parameters(model)[0]


@pytest.mark.parametrize("options", [{}, {"rslora": True, "alpha_pattern": {"fc": 3, "dense": 3, "o_proj": 3}}])
def test_peftkit_adapter_loads_in_peft_with_same_logits(
    model_name: str, options: dict, ids: torch.Tensor, tmp_path: Path
) -> None:
    model = trained(model_name, **options)
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODEL_BUILDERS[model_name](), tmp_path).eval()
    torch.testing.assert_close(model_output(theirs, ids), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets", [r".*\.(q|v)_proj", ["q_proj"]])
def test_regex_targets_survive_the_trip_to_peft(targets: object, ids: torch.Tensor, tmp_path: Path) -> None:
    model = trained("llama", target_modules=targets, layers_to_transform=[1])
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert len([m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]) == (
        2 if isinstance(targets, str) else 1
    )
    torch.testing.assert_close(model_output(theirs, ids), expected, atol=1e-6, rtol=0)


def test_peft_adapter_loads_in_peftkit_with_same_logits(model_name: str, ids: torch.Tensor, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True, init_lora_weights=False)
    theirs = peft.get_peft_model(MODEL_BUILDERS[model_name](), config).eval()
    expected = model_output(theirs, ids)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load_adapter(MODEL_BUILDERS[model_name](), tmp_path)
    assert peftkit.adapter_methods(ours)["default"].name == "lora"
    torch.testing.assert_close(model_output(ours, ids), expected, atol=1e-6, rtol=0)


def test_modules_to_save_and_embeddings_interop_with_peft(ids: torch.Tensor, tmp_path: Path) -> None:
    model = peftkit.adapt(tiny_gpt2(), "lora", r=4, target_modules=["c_attn", "wte"], modules_to_save=["lm_head"])
    randomize_adapters(model)
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.lm_head.weight" in keys
    assert "base_model.model.transformer.wte.lora_embedding_A" in keys
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    torch.testing.assert_close(model_output(theirs, ids), expected, atol=1e-6, rtol=0)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = trained("llama")
    peftkit.save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model, seed=7)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("peftkit.saving.save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        peftkit.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_saved_files_get_the_umask_mode_not_the_temp_files_private_one(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        peftkit.save_adapter(trained("llama"), tmp_path)
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o644}


def test_missing_corrupt_and_pickled_weights_are_refused(tmp_path: Path) -> None:
    peftkit.save_adapter(trained("llama"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        peftkit.load_adapter(tiny_llama(), tmp_path)
    weights.unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFileError, match="never unpickles"):
        peftkit.load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        peftkit.load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_config_of_another_method_is_refused(tmp_path: Path) -> None:
    peftkit.save_adapter(trained("llama"), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(tensors, tmp_path / "adapter_model.safetensors")  # drop peftkit's metadata: a PEFT-written file
    with pytest.raises(AdapterFileError) as error:
        peftkit.load_adapter(tiny_llama(), tmp_path)
    assert "peft_type 'IA3'" in str(error.value) and "LORA" in str(error.value)


def test_shape_mismatch_names_module_and_both_shapes(tmp_path: Path, ids: torch.Tensor) -> None:
    peftkit.save_adapter(trained("llama"), tmp_path)
    other = tiny_llama()
    wider = torch.nn.Linear(48, 32, bias=False)
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 48, bias=False)
    other.model.layers[0].self_attn.o_proj = wider
    with pytest.raises(ShapeMismatchError) as error:
        peftkit.load_adapter(other, tmp_path)
    message = str(error.value)
    assert "model.layers.0.self_attn" in message and "(4, 32)" in message or "(48, 4)" in message
    assert peftkit.adapter_methods(other) == {}  # the failed load left the model as it was
    assert type(other.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_loading_under_a_name_in_use_is_refused(tmp_path: Path) -> None:
    model = trained("llama")
    peftkit.save_adapter(model, tmp_path)
    with pytest.raises(AdapterExistsError):
        peftkit.load_adapter(model, tmp_path)
    peftkit.load_adapter(model, tmp_path, name="copy")
    assert sorted(peftkit.adapter_methods(model)) == ["copy", "default"]


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_edited_adapter_config_is_followed_as_peft_does_with_a_warning(ids: torch.Tensor, tmp_path: Path) -> None:
    model = trained("llama", init="gaussian")
    peftkit.save_adapter(model, tmp_path)
    edit_config(tmp_path, lora_alpha=32, use_rslora=True)
    with pytest.warns(UserWarning) as caught:
        ours = peftkit.load_adapter(tiny_llama(), tmp_path)
    (message,) = [str(w.message) for w in caught]
    assert "lora_alpha (json 32, peftkit 8)" in message and "use_rslora (json True, peftkit False)" in message
    assert "following adapter_config.json" in message
    config = peftkit.adapter_methods(ours)["default"].config
    assert (config.alpha, config.rslora) == (32, True)
    assert config.init == "gaussian" and config.target_modules == "all-linear"  # peftkit-only: from the metadata
    assert ours.model.layers[0].self_attn.q_proj.adapters["default"].scaling == pytest.approx(32 / 4**0.5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(model_output(ours, ids), model_output(theirs, ids), atol=1e-6, rtol=0)
    assert not torch.allclose(model_output(ours, ids), model_output(model, ids), atol=1e-3)


def test_unedited_adapter_config_loads_without_a_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    peftkit.save_adapter(trained("llama", rank_pattern={"v_proj": 2}), tmp_path)
    ours = peftkit.load_adapter(tiny_llama(), tmp_path)
    assert not [w for w in recwarn if "adapter_config" in str(w.message)]
    assert peftkit.adapter_methods(ours)["default"].config.rank_pattern == {"v_proj": 2}


def test_edited_use_dora_loads_the_method_the_json_names(tmp_path: Path) -> None:
    peftkit.save_adapter(peftkit.adapt(tiny_llama(), "dora", r=4, target_modules=["q_proj"]), tmp_path)
    edit_config(tmp_path, use_dora=False)  # a LoRA file now, for PEFT: drop DoRA's magnitudes too
    weights = tmp_path / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({k: v for k, v in load_file(weights).items() if "magnitude" not in k}, weights, metadata)
    with pytest.warns(UserWarning, match=r"use_dora \(json False, peftkit True\).*loading as lora"):
        ours = peftkit.load_adapter(tiny_llama(), tmp_path)
    assert peftkit.adapter_methods(ours)["default"].name == "lora"


def test_a_corrupt_adapter_file_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    # 64 bytes overwritten with 0xFF used to load silently: NaN inside q_proj.
    peftkit.save_adapter(trained("llama"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with safe_open(str(weights), framework="pt") as handle:
        first = sorted(handle.keys(), key=lambda k: handle.get_slice(k).get_shape())[0]
    data = bytearray(weights.read_bytes())
    data[header : header + 64] = b"\xff" * 64
    weights.write_bytes(bytes(data))
    model = tiny_llama()
    with pytest.raises(AdapterFileError) as error:
        peftkit.load_adapter(model, tmp_path)
    message = str(error.value)
    assert message.startswith(f"{weights}: tensor 'base_model.model.model.layers.") and "NaN/Inf value(s)" in message
    assert "Nothing was loaded." in message and first  # the file has tensors to corrupt
    assert peftkit.list_adapters(model) == []


def test_saving_an_adapter_the_model_lacks_names_the_ones_it_has(tmp_path: Path) -> None:
    # Both used to raise a bare KeyError.
    with pytest.raises(peftkit.AdapterNotFoundError) as error:
        peftkit.save_adapter(tiny_llama(), tmp_path / "a")
    assert str(error.value) == (
        "LlamaForCausalLM has no peftkit adapters (asked for 'default'); "
        "adapt it (peftkit.adapt) or load one (peftkit.load_adapter) first."
    )
    with pytest.raises(peftkit.AdapterNotFoundError, match=r"^model has no adapter named 'nope'; adapters: default\.$"):
        peftkit.save_adapter(trained("llama"), tmp_path / "b", "nope")
    assert list(tmp_path.iterdir()) == []


def test_tensors_the_config_does_not_target_are_told_apart_from_missing_modules(tmp_path: Path) -> None:
    # They used to be reported as tensors that "name modules this model lacks".
    model = peftkit.adapt(tiny_llama(), "lora", r=2, target_modules=["q_proj", "v_proj"])
    peftkit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.warns(UserWarning, match="changed after peftkit saved it"):
        with pytest.raises(ShapeMismatchError) as error:
            peftkit.load_adapter(tiny_llama(), tmp_path)
    assert "4 tensor(s) belong to modules of this model that adapter_config.json does not target" in str(error.value)
    assert "self_attn.v_proj.lora_A.weight" in str(error.value) and "lacks" not in str(error.value)

    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    extra = "base_model.model.model.layers.0.self_attn.q_proj.lora_extra.weight"
    save_file(
        {**tensors, extra: torch.zeros(2), "base_model.model.model.nowhere.lora_A.weight": torch.zeros(2)},
        tmp_path / "adapter_model.safetensors",
    )
    with pytest.raises(ShapeMismatchError) as error:
        peftkit.load_adapter(tiny_llama(), tmp_path)
    message = str(error.value)
    assert (
        "1 tensor(s) name modules this model lacks (e.g. ['base_model.model.model.nowhere.lora_A.weight'])" in message
    )
    assert f"1 tensor(s) are not part of this method's adapter on modules it does target (e.g. ['{extra}'])" in message
