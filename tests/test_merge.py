"""Merge, unmerge and merge_and_unload: the same function, with and without the adapter modules."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    MODEL_BUILDERS,
    NAMES,
    VOCAB,
    logits_with,
    model_output,
    randomize_adapters,
    three_adapters,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn

import peftkit
from peftkit.errors import AdapterStateError, MergeError


def adapted(model_name: str) -> nn.Module:
    model = peftkit.adapt(MODEL_BUILDERS[model_name](), "lora", r=4, alpha=8, target_modules="all-linear")
    randomize_adapters(model)
    return model


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}


def test_merge_then_unmerge_restores_outputs_and_weights(model_name: str, ids: torch.Tensor) -> None:
    model = adapted(model_name)
    original = base_weights(model)
    expected = model_output(model, ids)
    peftkit.merge(model)
    changed = base_weights(model)
    assert any((changed[k] - original[k]).abs().max() > 1e-3 for k in original)
    torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=0)
    peftkit.unmerge(model)
    for key, value in base_weights(model).items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=0)


def test_merge_and_unload_leaves_plain_model_with_same_logits(model_name: str, ids: torch.Tensor) -> None:
    model = adapted(model_name)
    expected = model_output(model, ids)
    plain_types = [type(m) for m in MODEL_BUILDERS[model_name]().modules()]
    plain = peftkit.merge_and_unload(model)
    assert [type(m) for m in plain.modules()] == plain_types  # forward costs what the base's costs
    assert not any(isinstance(m, peftkit.AdapterHost) for m in plain.modules())
    assert not hasattr(plain, "peftkit_methods")
    torch.testing.assert_close(model_output(plain, ids), expected, atol=1e-5, rtol=0)


def test_merge_writes_exactly_the_low_rank_delta() -> None:
    model = adapted("llama")
    layer = model.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    expected = layer.base_layer.weight + adapter.lora_B.weight @ adapter.lora_A.weight * (8 / 4)
    peftkit.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, expected, atol=1e-6, rtol=0)


def test_merged_adapter_is_not_applied_twice_and_cannot_be_disabled(ids: torch.Tensor) -> None:
    model = adapted("llama")
    expected = model_output(model, ids)
    peftkit.merge(model)
    peftkit.merge(model)  # a second merge is a no-op
    torch.testing.assert_close(model_output(model, ids), expected, atol=1e-5, rtol=0)
    with pytest.raises(AdapterStateError, match="unmerge them before disabling"):
        with peftkit.disable_adapters(model):
            model_output(model, ids)


def test_merge_refuses_nan_and_names_the_module() -> None:
    model = adapted("llama")
    before = model.model.layers[1].mlp.up_proj.base_layer.weight.clone()
    model.model.layers[1].mlp.up_proj.adapters["default"].lora_B.weight.data[0, 0] = float("nan")
    with pytest.raises(MergeError, match="'model.layers.1.mlp.up_proj' would write NaN/Inf"):
        peftkit.merge(model)
    assert torch.equal(model.model.layers[1].mlp.up_proj.base_layer.weight, before)


def test_merge_refuses_tied_weights() -> None:
    model = tiny_gpt2()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    peftkit.adapt(model, "lora", target_modules=["wte"])
    randomize_adapters(model)
    with pytest.raises(MergeError, match="'transformer.wte' is tied to lm_head.weight"):
        peftkit.merge(model)


def test_merge_and_unload_without_adapters_is_an_error() -> None:
    with pytest.raises(AdapterStateError, match="no peftkit adapters"):
        peftkit.merge_and_unload(tiny_llama())


def test_an_adapter_that_declares_itself_unmergeable_is_refused_with_its_reason_before_anything_is_computed() -> None:
    """merge reads `mergeable`; it used to find out by calling `delta_weight()` and catching its error."""
    calls = []

    class Gate(peftkit.Adapter):
        mergeable = False
        merge_refusal = "a gate scales the output by a learned sigmoid, which no weight change can express"

        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
            return base_output * torch.sigmoid(self.gate)

        def delta_weight(self) -> torch.Tensor:
            calls.append("delta_weight")
            return torch.zeros(())

    class Gated(peftkit.AdapterMethod):
        name = "gated-test"

        def adaptable_types(self) -> tuple[type[nn.Module], ...]:
            return (nn.Linear,)

        def create_adapter(self, base_layer: nn.Module, module_name: str) -> peftkit.Adapter:
            return Gate()

    model = peftkit.adapt(tiny_llama(), Gated(peftkit.MethodConfig(target_modules=["q_proj"])))
    before = base_weights(model)
    with pytest.raises(MergeError, match=r"\(Gate\) cannot be merged: a gate scales the output.*Nothing was merged"):
        peftkit.merge(model)
    assert calls == []
    assert all(torch.equal(value, before[key]) for key, value in base_weights(model).items())


def test_twenty_merged_switches_leave_base_weights_intact() -> None:
    model = three_adapters()
    original = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = {name: logits_with(model, name, ids) for name in NAMES}
    for i in range(20):
        name = NAMES[i % 3]
        peftkit.switch_merged_adapter(model, name)
        torch.testing.assert_close(model(input_ids=ids).logits, expected[name], atol=1e-4, rtol=0)
    peftkit.unmerge(model)
    for key, value in original.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-5, rtol=0)
