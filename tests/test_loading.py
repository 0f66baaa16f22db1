"""Loading adapter files onto a model: hot-swapping their tensors into a live adapter, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, logits_with, three_adapters, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
import peftkit.injection
import peftkit.peft_format
from peftkit.errors import AdapterExistsError, ShapeMismatchError


def test_hot_swap_changes_outputs_without_replacing_modules(tmp_path: Path) -> None:
    donor = three_adapters()
    peftkit.save_adapter(donor, tmp_path, "chat")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    target = logits_with(donor, "chat", ids)
    model = three_adapters()
    peftkit.set_active_adapters(model, "sql")
    before = model(input_ids=ids).logits
    modules = {name: id(m) for name, m in model.named_modules()}
    peftkit.hot_swap_adapter(model, tmp_path, "sql")
    after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, target, atol=1e-6, rtol=0)
    assert {name: id(m) for name, m in model.named_modules()} == modules


def test_hot_swap_and_load_refuse_mismatches(tmp_path: Path) -> None:
    donor = peftkit.adapt(tiny_llama(), "lora", r=4, alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])
    peftkit.save_adapter(donor, tmp_path)
    model = three_adapters()
    with pytest.raises(ShapeMismatchError, match="scaling"):
        peftkit.hot_swap_adapter(model, tmp_path, "sql")
    with pytest.raises(AdapterExistsError, match="'sql'"):
        peftkit.load_adapter(model, tmp_path, name="sql")
    wider = LlamaForCausalLM(LlamaConfig(**{**tiny_llama().config.to_dict(), "hidden_size": 48}))
    with pytest.raises(ShapeMismatchError, match=r"model.layers.0.self_attn.q_proj.*\(4, 32\).*\(4, 48\)"):
        peftkit.load_adapter(wider, tmp_path, name="other")
    assert peftkit.list_adapters(wider) == []
