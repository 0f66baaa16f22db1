"""Facts about a model's parts, each found in one place."""

from __future__ import annotations

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from peftkit.anatomy import (
    attention_projections,
    output_head,
    output_head_path,
    task_heads,
    task_type,
    tied_parameters,
)


def test_heads_and_task_types() -> None:
    llama, bert = tiny_llama(), tiny_bert()
    assert output_head(llama) is llama.lm_head and output_head_path(llama) == "lm_head"
    assert task_type(llama) == "CAUSAL_LM" and task_heads(llama) == []
    assert task_type(bert) == "SEQ_CLS" and task_heads(bert) == ["classifier"]
    plain = nn.Sequential(nn.Linear(2, 2))
    assert output_head(plain) is None and output_head_path(plain) is None and task_type(plain) is None


def test_tied_parameters_name_every_path() -> None:
    tied = tiny_llama(tie_word_embeddings=True)
    assert list(tied_parameters(tied).values()) == [["model.embed_tokens.weight", "lm_head.weight"]]
    assert tied_parameters(tiny_llama(tie_word_embeddings=False)) == {}


def test_attention_projections_by_structure() -> None:
    assert attention_projections(tiny_llama()) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "k", "v", "o")
    ]
    assert attention_projections(tiny_gpt2())[:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    assert len(attention_projections(tiny_gpt2())) == 4
    assert attention_projections(nn.Sequential(nn.Linear(2, 2))) == []
