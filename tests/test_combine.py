"""New adapters from weighted existing ones: linear, cat and svd, checked against their formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import NAMES, VOCAB, logits_with, three_adapters, tiny_llama
from torch import nn

import peftkit
import peftkit.injection
import peftkit.peft_format
from peftkit.errors import ConfigError


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
