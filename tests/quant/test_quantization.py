"""The 4-bit base: what quantize_model stores, how it computes, its weight access, and its errors."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

import peftkit
from peftkit.errors import ConfigError, MergeError, UnsupportedModuleError
from peftkit.quant import (
    QuantizationConfig,
    default_compute_dtype,
    dequantize,
    dequantized_copy,
    is_quantized,
    prepare_for_kbit_training,
    quantize_model,
    requantize,
    resolve_compute_dtype,
    weight_nbytes,
)
from peftkit.weights import layer_features, read_weight


def llama_128(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Big enough that bitsandbytes' per-layer code tables (~1.1 KB) do not dominate the bytes."""
    return tiny_llama(seed, hidden_size=128, intermediate_size=256).to(dtype)


def linear_paths(model: nn.Module, kind: type[nn.Module]) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, kind)]


def block_error(layer: nn.Module, original: torch.Tensor) -> float:
    """The largest quantization error in a block, relative to that block's largest weight."""
    size = layer.weight.quant_state.blocksize
    error = (dequantize(layer) - original).reshape(-1, size).abs().max(1).values
    return (error / original.reshape(-1, size).abs().max(1).values).max().item()


def test_linear_layers_become_4bit_in_under_030_of_the_fp16_bytes() -> None:
    dense = llama_128()
    model = quantize_model(copy.deepcopy(dense))
    quantized = linear_paths(model, bnb.nn.Linear4bit)
    assert len(quantized) == 2 * 7 and "lm_head" not in quantized  # the head stays, by default
    assert type(model.lm_head) is nn.Linear and model.is_loaded_in_4bit and is_quantized(model)
    held, fp16 = weight_nbytes(model)
    assert fp16 == 2 * sum(dense.get_submodule(p).weight.numel() for p in quantized)
    # Measured: 167,432 / 589,824 bytes = 0.284 (NF4 codes, 8-bit scales, code tables).
    assert held / fp16 <= 0.30
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 128 * 256 // 2
    assert not any(p.requires_grad for p in model.parameters() if p.dtype == torch.uint8)


def test_4bit_layer_computes_with_its_dequantized_weight_in_train_and_eval() -> None:
    dense = llama_128()
    model = quantize_model(copy.deepcopy(dense))
    layer, original = model.model.layers[1].mlp.up_proj, dense.model.layers[1].mlp.up_proj.weight
    weight = dequantize(layer)
    assert weight.shape == (256, 128) and layer_features(layer) == (128, 256)
    assert torch.equal(read_weight(layer), weight)
    # NF4: each weight lands on one of 16 levels times its block's scale; half the widest
    # gap (-1 to -0.696) is 0.152 of the scale, and the 8-bit scale adds a little (0.156 here).
    assert 0.1 < block_error(layer, original) <= 0.16
    x = torch.randn(3, 5, 128)
    model.train()
    trained = layer(x)
    torch.testing.assert_close(trained, F.linear(x, weight), atol=1e-5, rtol=0)
    model.eval()
    with torch.no_grad():  # bitsandbytes' CPU bf16 repacking is off: same numbers as in training
        assert torch.equal(layer(x), trained.detach())
        torch.testing.assert_close(layer(x[0, :1]), trained[0, :1], atol=1e-5, rtol=0)  # the one-token kernel


def test_cpu_blocks_never_straddle_rows() -> None:
    model = quantize_model(tiny_llama())  # in_features 32 (attention, gate/up) and 64 (down)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert (attention.q_proj.weight.quant_state.blocksize, mlp.down_proj.weight.quant_state.blocksize) == (32, 64)
    assert block_error(attention.q_proj, tiny_llama().model.layers[0].self_attn.q_proj.weight) <= 0.16
    message = r"'model.layers.0.self_attn.q_proj' on CPU with blocksize 64.*in_features \(32\); valid here: 32"
    with pytest.raises(ConfigError, match=message):
        quantize_model(tiny_llama(), QuantizationConfig(blocksize=64))


def test_options_reach_the_stored_layers() -> None:
    config = QuantizationConfig(quant_type="fp4", double_quant=False, blocksize=128, skip_modules=["down_proj"])
    model = quantize_model(llama_128(), config)
    state = model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == ("fp4", 128, False)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear  # the head stays dense beside an explicit skip list
    assert isinstance(quantize_model(llama_128(), QuantizationConfig(skip_modules=[])).lm_head, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32  # the CPU default


def test_explicit_targets_only_and_conv1d_is_converted() -> None:
    model = quantize_model(tiny_llama(), targets=["model.layers.0.self_attn.q_proj"])
    assert linear_paths(model, bnb.nn.Linear4bit) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(UnsupportedModuleError, match=r"'model.norm'.*LlamaRMSNorm.*Linear, Conv1D"):
        quantize_model(model, targets=["model.norm"])
    gpt2 = tiny_gpt2()
    attention = copy.deepcopy(gpt2.transformer.h[0].attn.c_attn)  # Conv1D: y = x W + b, W is [in, out]
    quantize_model(gpt2)
    layer = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(layer, bnb.nn.Linear4bit) and layer_features(layer) == (32, 96)
    x = torch.randn(2, 32)
    torch.testing.assert_close(layer(x), F.linear(x, dequantize(layer), attention.bias), atol=1e-5, rtol=0)
    assert block_error(layer, attention.weight.T) <= 0.16


def test_bfloat16_compute_dtype_is_used_on_cpu() -> None:
    model = quantize_model(tiny_llama(), QuantizationConfig(compute_dtype="bfloat16"))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 32)
    out = layer(x)
    assert layer.compute_dtype == torch.bfloat16 and out.dtype == torch.float32
    reference = F.linear(x.bfloat16(), dequantize(layer).bfloat16()).float()
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)
    assert not torch.equal(out, F.linear(x, dequantize(layer)))


def test_requantize_reports_the_error_it_adds_and_dequantized_copy_is_exact() -> None:
    model = quantize_model(tiny_llama())
    layer = model.model.layers[0].mlp.gate_proj
    target = dequantize(layer) + 0.01 * torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    requantize(layer, target)
    error = (dequantize(layer) - target).abs().max().item()
    assert layer.requantization_error == pytest.approx(error) and 0 < error < 0.15 * target.abs().max()
    dense = dequantized_copy(layer)
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32 and not dense.weight.requires_grad
    x = torch.randn(3, 32)
    torch.testing.assert_close(dense(x), layer(x), atol=1e-5, rtol=0)
    assert dequantized_copy(layer, torch.float16).weight.dtype == torch.float16


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks only on AVX512-BF16 CPUs")
def test_layer_repacked_by_bitsandbytes_for_cpu_inference_still_reads_right() -> None:
    model = quantize_model(tiny_llama())
    layer = model.model.layers[0].mlp.up_proj
    before = dequantize(layer)
    layer.support_avx512bf16_for_cpu = True  # what a transformers-loaded layer has
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 32))
    assert layer.weight.quant_state.packing_format_for_cpu
    # Unpacking re-quantizes the scales, which bitsandbytes kept in bfloat16 meanwhile.
    torch.testing.assert_close(read_weight(layer), before, atol=2e-3, rtol=0)


def test_prepare_for_kbit_training_upcasts_and_enables_checkpointing() -> None:
    model = quantize_model(llama_128(dtype=torch.bfloat16), targets=["model.layers.0.mlp.up_proj"])
    layer = model.model.layers[0].mlp.up_proj
    stored = layer.weight
    prepare_for_kbit_training(model, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    floats = {p.dtype for p in model.parameters() if p.dtype != torch.uint8}
    assert floats == {torch.float32} and layer.weight is stored
    assert model.is_gradient_checkpointing and model.lm_head.weight.dtype == torch.float32
    embedded = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embedded.requires_grad  # so reentrant checkpoints pass gradients on to the adapters
    with pytest.raises(ConfigError, match="Sequential has no gradient_checkpointing_enable"):
        prepare_for_kbit_training(nn.Sequential(nn.Linear(2, 2)), gradient_checkpointing=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quant_type": "int4"}, r"QuantizationConfig.quant_type must be 'nf4' \| 'fp4', got 'int4'"),
        ({"bits": 8}, r"bits must be 4 \(only 4-bit NF4/FP4 is supported for now\), got 8"),
        ({"blocksize": 100}, r"blocksize must be one of 32, 64, .* 4096 \(what bitsandbytes accepts\), got 100"),
        ({"compute_dtype": "float64"}, r"compute_dtype must be 'float32' \| 'bfloat16' \| 'float16' \| None"),
    ],
)
def test_bad_options_name_the_field_and_the_valid_values(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantizationConfig(**options)


def test_compute_dtype_the_device_cannot_use_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_compute_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    # With no GPU here (estimating for one elsewhere) a GPU with native bfloat16 is assumed.
    assert default_compute_dtype("cuda") == "bfloat16" and default_compute_dtype("cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a pre-Ampere GPU
    assert resolve_compute_dtype(None, torch.device("cuda")) == torch.float32
    assert default_compute_dtype("cuda") == "float32"  # the one rule: loading and the estimate agree (T4, V100)
    with pytest.raises(ConfigError, match=r"'bfloat16' cannot be used on device 'cuda'.*supports: float32, float16"):
        resolve_compute_dtype("bfloat16", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_compute_dtype(None, torch.device("cuda")) == torch.bfloat16


def test_meta_weights_are_refused() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ConfigError, match="'0': its weight is on the meta device"):
        quantize_model(model)


def test_without_bitsandbytes_configs_build_and_adapting_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    quant = importlib.import_module("peftkit.quant")
    for name in ("codec", "convert", "meta"):  # as if never imported
        monkeypatch.delitem(sys.modules, f"peftkit.quant.{name}", raising=False)
        monkeypatch.delattr(quant, name, raising=False)
    config = quant.QuantizationConfig(quant_type="fp4")  # the settings need no bitsandbytes
    method = peftkit.get_method("qlora").from_options(quantization=config, target_modules=["0"])
    assert method.base_quantization() == config
    with pytest.raises(ImportError, match="needs bitsandbytes, which is not installed: pip install bitsandbytes"):
        importlib.import_module("peftkit.quant.codec")
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quant.quantize_model  # noqa: B018  (the codec's names load it on first use)
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        peftkit.adapt(model, method)
    assert isinstance(model[0], nn.Linear)  # nothing changed


def test_merging_into_an_8bit_layer_is_refused_but_lora_trains_on_it() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    layer.load_state_dict(dense.state_dict())
    model = peftkit.adapt(nn.Sequential(layer.to("cpu")), "lora", target_modules=["0"])
    randomize_adapters(model)
    x = torch.randn(3, 64)
    model(x).sum().backward()
    assert model[0].adapters["default"].lora_B.weight.grad.abs().sum() > 0
    with pytest.raises(MergeError, match="Linear8bitLt is an 8-bit bitsandbytes layer"):
        peftkit.merge(model)


def test_import_peftkit_and_method_discovery_do_not_import_bitsandbytes() -> None:
    code = (
        "import peftkit, sys, warnings; warnings.simplefilter('ignore'); peftkit.available_methods(); "
        "import variants.lora, variants.qlora; print('bitsandbytes' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_skip_pattern_that_matches_nothing_is_refused_and_nothing_is_quantized() -> None:
    # It used to quantize the output head without a word.
    model = tiny_llama()
    with pytest.raises(ConfigError) as error:
        quantize_model(model, QuantizationConfig(skip_modules=["nonexistent_layer"]))
    assert str(error.value) == (
        "QuantizationConfig.skip_modules entry 'nonexistent_layer' matches no module of LlamaForCausalLM; "
        "its linear layers are named: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj."
    )
    assert linear_paths(model, bnb.nn.Linear4bit) == []
    with pytest.raises(ConfigError, match=r"entry 'nothing_.\*' matches no module"):
        quantize_model(model, QuantizationConfig(skip_modules="nothing_.*"))
    with pytest.raises(ConfigError, match=r"QuantizationConfig.skip_modules '\[' is not a valid regular expression"):
        QuantizationConfig(skip_modules="[")
