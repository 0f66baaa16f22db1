"""QLoRA and QDoRA: a 4-bit targeted base that trains, merges (exactly or re-quantized) and talks to PEFT.

Tolerances: both sides of a PEFT comparison run the same 4-bit weights through the
same bitsandbytes kernels in float32 compute, so logits agree to 1e-5; what 4-bit
costs against the full-precision model is measured separately (the re-quantization
error of a merge).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
from conftest import model_output, randomize_adapters, tiny_llama, train_steps
from torch import nn

import peftkit
import peftkit.injection
import peftkit.peft_format
from peftkit.errors import ConfigError, LossyMergeWarning
from peftkit.quant import (
    QuantizationConfig,
    dequantize,
    merge_and_dequantize,
    prepare_for_kbit_training,
    quantize_model,
    requantization_errors,
)
from peftkit.weights import read_weight

METHODS = ["qlora", "qdora"]
TARGETS = ["q_proj", "v_proj", "up_proj"]
PATHS = [f"model.layers.{i}.{part}" for i in (0, 1) for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
ATOL = 1e-5


def adapted(method: str, **options: object) -> nn.Module:
    model = peftkit.adapt(tiny_llama(), method, target_modules=TARGETS, r=4, alpha=8, **options)
    randomize_adapters(model)
    return model


def quantized_base(paths: list[str] | None = PATHS) -> nn.Module:
    """The tiny Llama with `paths` (None: every linear layer but the head) in 4-bit, as QLoRA stores them."""
    return quantize_model(tiny_llama(), targets=paths)


def four_bit_paths(model: nn.Module) -> list[str]:
    return sorted(n.removesuffix(".base_layer") for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return request.param


def test_only_targeted_layers_are_quantized(method: str) -> None:
    model = adapted(method)
    assert four_bit_paths(model) == sorted(PATHS)
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    options = peftkit.adapter_methods(model)["default"].config.quantization
    assert options == {
        "bits": 4,
        "quant_type": "nf4",
        "double_quant": True,
        "blocksize": None,
        "compute_dtype": None,
        "skip_modules": None,
        "storage_dtype": None,
    }


def test_quantization_option_takes_a_config_or_a_dict_and_names_bad_keys(method: str) -> None:
    cls = peftkit.get_method(method)
    from_config = cls.from_options(quantization=QuantizationConfig(quant_type="fp4", blocksize=32))
    from_dict = cls.from_options(quantization={"quant_type": "fp4", "blocksize": 32})
    assert from_config.config == from_dict.config
    assert from_dict.config.quantization_config == QuantizationConfig(quant_type="fp4", blocksize=32)
    with pytest.raises(ConfigError, match=r"quantization has no option 'quant'\. Did you mean 'quant_type'\?"):
        cls.from_options(quantization={"quant": "nf4"})
    with pytest.raises(ConfigError, match=r"QuantizationConfig.quant_type must be 'nf4' \| 'fp4', got 'int8'"):
        cls.from_options(quantization={"quant_type": "int8"})


def test_starts_equal_to_the_quantized_base(method: str, ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_llama(), method, target_modules=TARGETS)
    assert torch.equal(model_output(model, ids), model_output(quantized_base(), ids))


def test_loss_falls_and_only_adapters_get_gradients(method: str, ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_llama(), method, target_modules="all-linear", r=8, alpha=16).train()
    losses = train_steps(model, ids, steps=4, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses  # measured: 4.83 -> 4.57
    assert all(".adapters.default." in n for n, p in model.named_parameters() if p.requires_grad)
    assert len(four_bit_paths(model)) == 14


def test_gradient_checkpointing_passes_the_same_gradients(method: str, ids: torch.Tensor) -> None:
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = prepare_for_kbit_training(
            quantized_base(None),
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )
        peftkit.adapt(model, method, target_modules=TARGETS, r=4)
        randomize_adapters(model)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and all(g is not None for g in checkpointed.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)


def test_peftkit_adapter_loads_in_peft_over_a_bnb_4bit_base(method: str, ids: torch.Tensor, tmp_path: Path) -> None:
    model = adapted(method)
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(quantized_base(), tmp_path)
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    torch.testing.assert_close(model_output(theirs, ids), expected, atol=ATOL, rtol=0)


def peft_adapter(method: str, base: nn.Module, directory: Path, ids: torch.Tensor) -> torch.Tensor:
    """Save a PEFT adapter with random (non-zero) weights over `base`; returns its logits."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=method == "qdora"
    )
    theirs = peft.get_peft_model(base, config)
    theirs.save_pretrained(directory)
    return model_output(theirs, ids)


def test_peft_adapter_over_a_bnb_4bit_base_loads_in_peftkit(method: str, ids: torch.Tensor, tmp_path: Path) -> None:
    expected = peft_adapter(method, quantized_base(None), tmp_path, ids)
    # A PEFT file is a plain LoRA/DoRA file: onto a 4-bit base it loads as that method...
    plain = peftkit.load_adapter(quantized_base(None), tmp_path)
    assert peftkit.adapter_methods(plain)["default"].name == method.removeprefix("q")
    torch.testing.assert_close(model_output(plain, ids), expected, atol=ATOL, rtol=0)
    # ...and with method=<q-method> onto a full-precision base it quantizes what it targets.
    expected = peft_adapter(method, quantized_base(), tmp_path / "targeted", ids)
    quantizing = peftkit.load_adapter(tiny_llama(), tmp_path / "targeted", method=method)
    assert four_bit_paths(quantizing) == sorted(PATHS)
    torch.testing.assert_close(model_output(quantizing, ids), expected, atol=ATOL, rtol=0)


def test_merge_and_dequantize_is_exact_in_the_compute_dtype(method: str, ids: torch.Tensor) -> None:
    model = adapted(method)
    expected = model_output(model, ids)
    merged = merge_and_dequantize(model)
    assert four_bit_paths(merged) == [] and not list(peftkit.injection.hosts(merged)) and not merged.is_loaded_in_4bit
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    torch.testing.assert_close(model_output(merged, ids), expected, atol=ATOL, rtol=0)


def test_merge_and_dequantize_gives_the_whole_model_the_bfloat16_compute_dtype(method: str, ids: torch.Tensor) -> None:
    model = adapted(method, quantization={"compute_dtype": "bfloat16"})
    expected = model_output(model, ids)
    merged = merge_and_dequantize(model)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(model_output(merged, ids).float(), expected, atol=0.05, rtol=0.05)


def test_merge_onto_4bit_requantizes_and_warns_with_the_error(method: str, ids: torch.Tensor) -> None:
    model = adapted(method)
    expected = model_output(model, ids)
    hosts = {path: model.get_submodule(path) for path in PATHS}
    wanted = {p: h.adapters["default"].merged_weight(dequantize(h.base_layer).float()) for p, h in hosts.items()}
    with pytest.warns(LossyMergeWarning, match=r"re-quantized 6 4-bit layer\(s\)") as caught:
        peftkit.merge(model)
    errors = requantization_errors(model)
    assert sorted(errors) == sorted(PATHS)
    worst = max(errors, key=errors.get)
    message = str(caught[0].message)
    assert f"by up to {errors[worst]:.3g}" in message and f"{worst} {errors[worst]:.3g}" in message
    assert "peftkit.quant.merge_and_dequantize" in message and "unmerge() restores the model exactly" in message
    for path, host in hosts.items():
        # The error is that of re-quantizing W' = dequant(Wq) + delta (or DoRA's merged weight):
        # at most ~0.16 of the block's largest weight; measured up to 0.039 (qlora) and 0.020
        # (qdora) with merged weights up to ~0.3 (random adapters on weights of std 0.02).
        assert (read_weight(host.base_layer) - wanted[path]).abs().max().item() == pytest.approx(errors[path])
        assert 0 < errors[path] <= 0.16 * wanted[path].abs().max()
    drift = (model_output(model, ids) - expected).abs().max().item()
    assert 0 < drift < 0.1, drift  # what it does to logits of size ~0.4: 0.029 measured, for both methods
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left to merge: no second re-quantization, no warning
        unloaded = peftkit.merge_and_unload(model)
    assert four_bit_paths(unloaded) == sorted(PATHS) and not list(peftkit.injection.hosts(unloaded))
    torch.testing.assert_close(model_output(unloaded, ids), model_output(model, ids))


def packed_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_unmerge_after_a_4bit_merge_restores_the_adapted_model_exactly(method: str, ids: torch.Tensor) -> None:
    # It used to subtract delta and re-quantize again: the base moved by two roundings (0.079 on logits).
    model = adapted(method)
    codes = packed_weights(model)
    expected = model_output(model, ids)
    with peftkit.disable_adapters(model):
        base = model_output(model, ids)
    with pytest.warns(LossyMergeWarning):
        peftkit.merge(model)
    peftkit.unmerge(model)
    assert all(torch.equal(codes[n], w) for n, w in packed_weights(model).items()) and len(codes) == 6
    assert requantization_errors(model) == {}
    assert torch.equal(model_output(model, ids), expected)
    with peftkit.disable_adapters(model):
        assert torch.equal(model_output(model, ids), base)


def test_unmerge_of_two_merges_and_a_switch_stay_exact(ids: torch.Tensor) -> None:
    model = adapted("qlora")
    peftkit.adapt(model, "qlora", target_modules=TARGETS, r=4, alpha=8, adapter_name="other")
    randomize_adapters(model)
    codes = packed_weights(model)
    with peftkit.disable_adapters(model):
        base = model_output(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyMergeWarning)
        peftkit.merge(model, "default")
        peftkit.merge(model, "other")
        peftkit.switch_merged_adapter(model, "other")  # unmerges both, merges one
        peftkit.unmerge(model)
    assert all(torch.equal(codes[n], w) for n, w in packed_weights(model).items())
    with peftkit.disable_adapters(model):
        assert torch.equal(model_output(model, ids), base)


def test_model_loaded_by_transformers_in_4bit_is_adapted_as_is(method: str, ids: torch.Tensor, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    stored = model.model.layers[0].self_attn.q_proj.weight
    base = model_output(model, ids)
    peftkit.adapt(model, method, target_modules=TARGETS)
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight is stored  # not quantized twice
    assert torch.equal(model_output(model, ids), base)
    randomize_adapters(model)
    expected = model_output(model, ids)
    dense = merge_and_dequantize(model)
    assert not hasattr(dense, "hf_quantizer") and four_bit_paths(dense) == []
    torch.testing.assert_close(model_output(dense, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("storage_dtype", [None, "bfloat16", "float32"])
def test_parameter_counts_over_a_4bit_base_equal_peft_whatever_the_storage_dtype(storage_dtype: str | None) -> None:
    """A packed weight counts the weights it holds; it used to be `numel * 2`, a quarter of that in float32 storage."""
    model = peftkit.adapt(
        tiny_llama(), "qlora", target_modules=TARGETS, r=4, quantization={"storage_dtype": storage_dtype}
    )
    dense = sum(p.numel() for p in tiny_llama().parameters())
    trainable, total = peftkit.trainable_parameters(model)
    assert (trainable, total) == peft.PeftModel.get_nb_trainable_parameters(model)  # PEFT's rule, on our model
    assert total == dense + trainable
