"""LoRA's numbers: the forward equals W0 x + s B A x on every layer type, with the promised init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit


def single(layer: nn.Module, **options: object) -> nn.Sequential:
    model = nn.Sequential(layer)
    peftkit.adapt(model, "lora", target_modules=["0"], **options)
    randomize_adapters(model)
    return model


def test_linear_forward_matches_formula_and_scaling() -> None:
    torch.manual_seed(0)
    model = single(nn.Linear(6, 5), r=3, alpha=12)
    adapter, base = model[0].adapters["default"], model[0].base_layer
    x = torch.randn(4, 6)
    expected = base(x) + (12 / 3) * x @ adapter.lora_A.weight.T @ adapter.lora_B.weight.T
    torch.testing.assert_close(model(x), expected)


def test_rslora_and_patterns_set_per_module_rank_and_scale() -> None:
    model = peftkit.adapt(
        tiny_llama(),
        "lora",
        r=8,
        alpha=16,
        rslora=True,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 4},
    )
    layers = model.model.layers
    assert layers[0].self_attn.v_proj.adapters["default"].lora_A.weight.shape == (2, 32)
    assert layers[0].self_attn.q_proj.adapters["default"].scaling == pytest.approx(16 / math.sqrt(8))
    assert layers[0].self_attn.v_proj.adapters["default"].scaling == pytest.approx(16 / math.sqrt(2))
    assert layers[1].self_attn.q_proj.adapters["default"].scaling == pytest.approx(4 / math.sqrt(8))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_pattern_keys_that_match_no_target_are_named_in_a_warning(method: str) -> None:
    with pytest.warns(RuntimeWarning) as caught:
        model = peftkit.adapt(
            tiny_llama(),
            method,
            r=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2, "k_proj": 4},  # k_proj is not targeted
            alpha_pattern={"o_prj": 3.0},
        )
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "alpha_pattern keys ['o_prj'] match no targeted module" in messages[0]
    assert "rank_pattern keys ['k_proj'] match no targeted module" in messages[1] and "q_proj, v_proj" in messages[1]
    assert model.model.layers[0].self_attn.v_proj.adapters["default"].r == 2  # the matching key still applies


def test_init_a_is_random_and_b_is_zero() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    peftkit.adapt(model, "lora", r=8, target_modules=["0"])
    adapter = model[0].adapters["default"]
    assert torch.count_nonzero(adapter.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert adapter.lora_A.weight.abs().max() <= bound and adapter.lora_A.weight.std() > bound / 3
    model = nn.Sequential(nn.Linear(64, 64))
    peftkit.adapt(model, "lora", r=8, init="gaussian", target_modules=["0"])
    assert model[0].adapters["default"].lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.15)


def test_conv1d_matches_linear_formula_on_transposed_weight() -> None:
    torch.manual_seed(0)
    model = single(Conv1D(5, 6), r=2, alpha=4)  # nf=5 outputs, nx=6 inputs, weight (6, 5)
    adapter, base = model[0].adapters["default"], model[0].base_layer
    x = torch.randn(3, 6)
    delta = 2 * adapter.lora_B.weight @ adapter.lora_A.weight
    torch.testing.assert_close(model(x), x @ (base.weight + delta.T) + base.bias)
    torch.testing.assert_close(adapter.delta_weight(), delta)


def test_embedding_forward_matches_delta_and_starts_at_zero() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0))
    ids = torch.tensor([[0, 3, 9, 3]])
    expected = model(ids)
    peftkit.adapt(model, "lora", r=2, alpha=2, target_modules=["0"])
    torch.testing.assert_close(model(ids), expected)  # A starts at zero for embeddings
    randomize_adapters(model)
    adapter = model[0].adapters["default"]
    merged_table = model[0].base_layer.weight + adapter.delta_weight().T
    torch.testing.assert_close(model(ids), F.embedding(ids, merged_table))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_scaled_embedding_delta_is_scaled_like_the_table(method: str) -> None:
    """Gemma multiplies looked-up rows by sqrt(hidden); the adapter's rows must be too, or merging changes outputs."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    torch.manual_seed(0)
    model = nn.Sequential(Gemma3TextScaledWordEmbedding(10, 4, padding_idx=0, embed_scale=3.0))
    peftkit.adapt(model, method, r=2, alpha=2, target_modules=["0"])
    randomize_adapters(model)
    ids = torch.tensor([[1, 3, 9, 3]])
    adapted = model(ids)
    peftkit.merge(model)
    torch.testing.assert_close(model(ids), adapted)
    if method == "lora":
        table = model[0].base_layer.weight.clone()
        peftkit.unmerge(model)
        torch.testing.assert_close(adapted, 3.0 * F.embedding(ids, table))


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv2d_forward_matches_merged_kernel(kernel: int) -> None:
    torch.manual_seed(0)
    model = single(nn.Conv2d(3, 4, kernel, padding=kernel // 2), r=2, alpha=4)
    x = torch.randn(2, 3, 5, 5)
    adapted = model(x)
    base = model[0].base_layer
    merged = F.conv2d(x, base.weight + model[0].adapters["default"].delta_weight(), base.bias, padding=kernel // 2)
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=0)


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = single(nn.Linear(16, 16), r=4, dropout=0.5)
    x = torch.randn(8, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_gradients_reach_only_a_and_b() -> None:
    model = peftkit.adapt(tiny_gpt2(), "lora", r=4, target_modules=["c_attn"])
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {
        f"transformer.h.{i}.attn.c_attn.adapters.default.lora_{m}.weight" for i in (0, 1) for m in "AB"
    }
