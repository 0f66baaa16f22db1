"""The contract every registered method keeps, run over all of them (HF PEFT's table-driven idea)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import model_output, randomize_adapters, tiny_llama

import peftkit

TARGETS = {"target_modules": ["q_proj", "v_proj", "up_proj"]}


@pytest.fixture(params=peftkit.available_methods())
def method(request: pytest.FixtureRequest) -> str:
    return request.param


def test_starts_equal_to_its_base(method: str, ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_llama(), method, **TARGETS)
    if peftkit.get_method(method).trains_in_place:
        with pytest.raises(peftkit.AdapterStateError, match="no base output"):
            peftkit.set_adapters_enabled(model, False)
        base = model_output(tiny_llama(), ids)
    else:  # the base as the method sees it (a quantizing method's base is the quantized one)
        with peftkit.disable_adapters(model):
            base = model_output(model, ids)
    assert torch.equal(model_output(model, ids), base)


def test_only_adapter_state_trains_and_training_moves_the_output(method: str, ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_llama(), method, **TARGETS)
    state = peftkit.adapter_methods(model)["default"].trainable_state(model, "default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, t in state.items() if isinstance(t, torch.nn.Parameter)}
    before = model_output(model, ids).detach()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (model_output(model, ids) - before).abs().max() > 1e-4


def test_save_load_round_trip(method: str, ids: torch.Tensor, tmp_path: Path) -> None:
    model = peftkit.adapt(tiny_llama(), method, **TARGETS)
    randomize_adapters(model)
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    loaded = peftkit.load_adapter(tiny_llama(), tmp_path)
    assert peftkit.adapter_methods(loaded)["default"].name == method
    assert torch.equal(model_output(loaded, ids), expected)
