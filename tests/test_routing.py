"""Mixed batches: each row through its own adapter (grouped and stacked), and PEFT's adapter_names keyword."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import VOCAB, logits_with, three_adapters

import peftkit
import peftkit.injection
import peftkit.peft_format
from peftkit.errors import AdapterStateError, ConfigError


@pytest.mark.parametrize("grad", [True, False], ids=["grouped", "stacked"])
@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_each_mixed_batch_row_equals_its_single_adapter_batch(method: str, grad: bool) -> None:
    """With grad on, rows are grouped per adapter; in inference LoRA factors are stacked."""
    model = three_adapters(method)
    rows = ["sql", "base", "chat", "sql", "math", "base"]
    ids = torch.randint(0, VOCAB, (len(rows), 10), generator=torch.Generator().manual_seed(0))
    with peftkit.mixed_batch(model, rows), torch.set_grad_enabled(grad):
        mixed = model(input_ids=ids).logits
    for name in set(rows):
        expected = logits_with(model, name, ids)
        for i in (i for i, row in enumerate(rows) if row == name):
            torch.testing.assert_close(mixed[i], expected[i], atol=1e-5, rtol=0)
    assert len({tuple(mixed[i, 0, :4].tolist()) for i in (0, 1, 2, 4)}) == 4  # the adapters differ


def test_mixed_batch_cost_grows_with_distinct_adapters_not_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    model = three_adapters()
    calls = []
    adapter_type = type(model.model.layers[0].self_attn.q_proj.adapters["sql"])
    original = adapter_type.forward
    monkeypatch.setattr(adapter_type, "forward", lambda self, *a: calls.append(a[0].shape[0]) or original(self, *a))
    rows = ["sql", "chat"] * 4
    with peftkit.mixed_batch(model, rows):
        model(input_ids=torch.zeros(8, 5, dtype=torch.long))
    assert len(calls) == 2 * 2 * 3  # 2 distinct adapters x 2 layers x 3 targets, not 8 rows
    assert set(calls) == {4}


def test_mixed_batch_generate_follows_beams_and_rejects_unknown_names() -> None:
    model = three_adapters()
    prompt = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    with peftkit.mixed_batch(model, ["sql", "chat"]):
        mixed = model.generate(prompt, max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
    for i, name in enumerate(["sql", "chat"]):
        peftkit.set_active_adapters(model, name)
        alone = model.generate(prompt[i : i + 1], max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
        assert torch.equal(mixed[i], alone[0])
    with pytest.raises(peftkit.AdapterNotFoundError, match="'nope'"):
        with peftkit.mixed_batch(model, ["nope", "sql"]):
            pass


def test_peft_adapter_names_keyword_routes_rows_of_a_forward() -> None:
    model = three_adapters()
    peftkit.set_active_adapters(model, "math")
    rows = ["sql", "__base__", "chat", "base"]  # PEFT's and peftkit's spelling of the base model
    ids = torch.randint(0, VOCAB, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    keyword = model(input_ids=ids, adapter_names=rows).logits
    with peftkit.mixed_batch(model, ["sql", "base", "chat", "base"]):
        torch.testing.assert_close(keyword, model(input_ids=ids).logits, atol=0, rtol=0)
    for i, name in enumerate(["sql", "base", "chat", "base"]):
        torch.testing.assert_close(keyword[i], logits_with(model, name, ids)[i], atol=1e-5, rtol=0)
    peftkit.set_active_adapters(model, "math")
    torch.testing.assert_close(model(input_ids=ids).logits, logits_with(model, "math", ids))  # routing ended
    with pytest.raises(peftkit.AdapterNotFoundError, match="'nope'.*adapters: sql, chat, math"):
        model(input_ids=ids, adapter_names=["sql", "nope", "chat", "sql"])
    assert all(host.routing is None for _, host in peftkit.injection.hosts(model))


def test_peft_adapter_names_keyword_on_generate_follows_beams() -> None:
    model = three_adapters()
    prompt = torch.randint(1, VOCAB, (3, 4), generator=torch.Generator().manual_seed(3))
    settings = {"max_new_tokens": 5, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    mixed = model.generate(prompt, adapter_names=["chat", "base", "sql"], **settings)
    for i, name in enumerate(["chat", "base", "sql"]):
        if name == "base":
            with peftkit.disable_adapters(model):
                alone = model.generate(prompt[i : i + 1], **settings)
        else:
            peftkit.set_active_adapters(model, name)
            alone = model.generate(prompt[i : i + 1], **settings)
        assert torch.equal(mixed[i], alone[0])
    with pytest.raises(peftkit.AdapterNotFoundError, match="'nope'"):
        model.generate(prompt, adapter_names=["nope", "sql", "sql"], **settings)
    merged = peftkit.merge_and_unload(model)  # a plain model again: the class's generate, no hooks
    assert "generate" not in vars(merged) and not merged._forward_pre_hooks and not merged._forward_hooks


def test_adapter_names_keyword_survives_copies_and_refuses_checkpointed_training() -> None:
    model = three_adapters()
    prompt = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    settings = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, "adapter_names": ["sql", "math"]}
    expected = model.generate(prompt, **settings)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.generate.model is copied and torch.equal(copied.generate(prompt, **settings), expected)
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ConfigError, match="gradient checkpointing: the backward pass recomputes layers"):
        model(input_ids=prompt, adapter_names=["sql", "math"])


def test_mixed_batch_needs_one_name_per_row_or_one_for_all() -> None:
    model = three_adapters()
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    for names in (["sql", "chat"], ["sql", "chat", "math"]):
        with pytest.raises(
            ConfigError, match=rf"{len(names)} adapter names for a batch of 4 rows; give one name per row"
        ):
            with peftkit.mixed_batch(model, names):
                model(input_ids=ids)
        with pytest.raises(ConfigError, match=rf"{len(names)} adapter names for a batch of 4 rows"):
            model(input_ids=ids, adapter_names=names)
    with pytest.raises(ConfigError, match="list of names, one per row; got 'sql'"):
        model(input_ids=ids, adapter_names="sql")
    with peftkit.mixed_batch(model, ["chat"]):  # one name: every row
        torch.testing.assert_close(model(input_ids=ids).logits, logits_with(model, "chat", ids), atol=1e-5, rtol=0)


def test_generate_repeats_names_with_its_rows_and_still_checks_the_count() -> None:
    model = three_adapters()
    prompt = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    settings = {"max_new_tokens": 3, "do_sample": False, "num_beams": 2, "num_return_sequences": 2, "pad_token_id": 0}
    mixed = model.generate(prompt, adapter_names=["math", "sql"], **settings)  # 2 prompts -> 4 rows per step
    for i, name in enumerate(["math", "sql"]):
        peftkit.set_active_adapters(model, name)
        alone = model.generate(prompt[i : i + 1], **settings)
        assert torch.equal(mixed[2 * i : 2 * i + 2], alone)
    three = torch.randint(1, VOCAB, (3, 4), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ConfigError, match="2 adapter names for 3 prompt rows; give one name per row"):
        model.generate(three, adapter_names=["math", "sql"], max_new_tokens=2, num_beams=2, pad_token_id=0)


def test_merged_adapter_refuses_mixed_batch() -> None:
    model = three_adapters()
    peftkit.merge(model)
    with pytest.raises(AdapterStateError, match="merged"):
        with peftkit.mixed_batch(model, ["sql", "chat"]):
            model(input_ids=torch.zeros(2, 3, dtype=torch.long))
