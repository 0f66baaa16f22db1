"""Many adapters on one base: mixed batches, switching, deleting, renaming, combining, hot-swap."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_llama
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
import peftkit.injection
import peftkit.peft_format
from peftkit.errors import AdapterExistsError, AdapterStateError, ConfigError, ShapeMismatchError

NAMES = ["sql", "chat", "math"]


def three_adapters(method: str = "lora", **options: object) -> nn.Module:
    model = tiny_llama()
    for seed, name in enumerate(NAMES):
        peftkit.adapt(model, method, name, r=4, target_modules=["q_proj", "v_proj", "down_proj"], **options)
        randomize_adapters(model, seed=seed + 1)  # only `name` is trainable right now
    return model


def logits_with(model: nn.Module, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    if adapter == "base":
        with peftkit.disable_adapters(model):
            return model(input_ids=ids).logits
    peftkit.set_active_adapters(model, adapter)
    return model(input_ids=ids).logits


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


def deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {
        path: host.adapters[name].delta_weight().detach()
        for path, host in model.named_modules()
        if isinstance(host, peftkit.AdapterLayer) and name in host.adapters
    }


def test_cat_combination_is_exactly_the_weighted_delta() -> None:
    model = three_adapters()
    peftkit.combine_adapters(model, ["sql", "chat"], [0.7, -0.3], "mix", combination="cat")
    sql, chat, mix = deltas(model, "sql"), deltas(model, "chat"), deltas(model, "mix")
    assert model.model.layers[0].self_attn.q_proj.adapters["mix"].r == 8
    for path in sql:
        torch.testing.assert_close(mix[path], 0.7 * sql[path] - 0.3 * chat[path], atol=1e-6, rtol=0)


def test_linear_combination_follows_its_formula() -> None:
    model = three_adapters()
    peftkit.combine_adapters(model, ["sql", "chat"], [0.5, 2.0], "mix", combination="linear")
    layer = model.model.layers[1].mlp.down_proj
    ups, downs = zip(*(layer.adapters[n].low_rank_factors() for n in ("sql", "chat")), strict=True)
    up = 0.5**0.5 * ups[0] + 2.0**0.5 * ups[1]
    down = 0.5**0.5 * downs[0] + 2.0**0.5 * downs[1]
    torch.testing.assert_close(layer.adapters["mix"].delta_weight(), up @ down, atol=1e-6, rtol=0)
    single = three_adapters()
    peftkit.combine_adapters(single, ["sql"], [0.25], "quarter", combination="linear")
    for path, delta in deltas(single, "sql").items():
        torch.testing.assert_close(deltas(single, "quarter")[path], 0.25 * delta, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="equal rank"):
        peftkit.adapt(model, "lora", "wide", r=8, target_modules=["q_proj"])
        peftkit.combine_adapters(model, ["sql", "wide"], [1, 1], "bad", combination="linear")


def test_svd_combination_is_the_best_rank_k_approximation(tmp_path: Path) -> None:
    model = three_adapters()
    peftkit.combine_adapters(model, NAMES, [1.0, 0.5, 0.25], "svd", combination="svd", rank=3)
    parts = [deltas(model, n) for n in NAMES]
    for path, delta in deltas(model, "svd").items():
        target = parts[0][path] + 0.5 * parts[1][path] + 0.25 * parts[2][path]
        u, s, vh = torch.linalg.svd(target)
        torch.testing.assert_close(delta, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=0)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    expected = logits_with(model, "svd", ids)
    peftkit.save_adapter(model, tmp_path, "svd")
    reloaded = peftkit.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-6, rtol=0)


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


def test_merged_adapter_refuses_mixed_batch() -> None:
    model = three_adapters()
    peftkit.merge(model)
    with pytest.raises(AdapterStateError, match="merged"):
        with peftkit.mixed_batch(model, ["sql", "chat"]):
            model(input_ids=torch.zeros(2, 3, dtype=torch.long))
