"""Steering the adapters of one model: training only the active one, deleting, renaming."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import VOCAB, three_adapters

import peftkit
import peftkit.injection
import peftkit.peft_format
from peftkit.errors import AdapterExistsError, ConfigError


def test_training_touches_only_the_active_adapter() -> None:
    model = three_adapters()
    peftkit.set_active_adapters(model, "chat")
    peftkit.mark_trainable(model, "chat")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters.chat." in k for k in changed)


def test_delete_frees_parameters_and_rename_keeps_them() -> None:
    model = three_adapters()
    ref = weakref.ref(model.model.layers[0].self_attn.q_proj.adapters["math"].lora_A.weight)
    peftkit.delete_adapter(model, "math")
    gc.collect()
    assert ref() is None and peftkit.list_adapters(model) == ["sql", "chat"]
    weight = model.model.layers[0].self_attn.q_proj.adapters["chat"].lora_A.weight
    peftkit.rename_adapter(model, "chat", "dialogue")
    assert peftkit.list_adapters(model) == ["sql", "dialogue"]
    assert model.model.layers[0].self_attn.q_proj.adapters["dialogue"].lora_A.weight is weight
    with pytest.raises(AdapterExistsError):
        peftkit.rename_adapter(model, "sql", "dialogue")
    with pytest.raises(ConfigError, match="reserved"):
        peftkit.adapt(model, "lora", "base", target_modules=["q_proj"])
