"""The benchmark's shard writer (benchmarks/scale_model.py) on its tiny shape: tensors, shards, index, tokenizer."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def scale_model(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmark scripts import each other by name
    return importlib.import_module("scale_model")


def test_shards_hold_every_tensor_once_in_bfloat16(scale_model, tmp_path: Path) -> None:
    record = scale_model.write_model("tiny", tmp_path, shard_bytes=8 * 2**20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    expected = dict(scale_model.tensor_shapes(scale_model.SHAPES["tiny"]))
    assert set(index["weight_map"]) == set(expected)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and record["largest_shard_bytes"] <= 8 * 2**20 + 2 * 8192 * 512  # an embedding alone
    seen, total = set(), 0
    for shard in shards:
        with safe_open(tmp_path / shard, framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                assert index["weight_map"][name] == shard and name not in seen
                assert tuple(tensor.shape) == expected[name] and tensor.dtype == torch.bfloat16
                seen.add(name)
                total += tensor.numel() * 2
    assert total == index["metadata"]["total_size"] == record["total_bytes"]
    with safe_open(tmp_path / index["weight_map"]["model.layers.1.mlp.up_proj.weight"], framework="pt") as handle:
        std = handle.get_tensor("model.layers.1.mlp.up_proj.weight").float().std().item()
    assert std == pytest.approx(0.02, rel=0.01)


def test_the_same_seed_gives_the_same_tensor_whatever_the_sharding(scale_model, tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    for shard_bytes in (8 * 2**20, 2**30):
        (tmp_path / str(shard_bytes)).mkdir()
        scale_model.write_model("tiny", tmp_path / str(shard_bytes), shard_bytes=shard_bytes)
    tensors = []
    for shard_bytes in (8 * 2**20, 2**30):
        directory = tmp_path / str(shard_bytes)
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        with safe_open(directory / index["weight_map"][name], framework="pt") as handle:
            tensors.append(handle.get_tensor(name))
    assert torch.equal(*tensors)


def test_the_2_block_shape_is_the_8b_shapes_first_blocks(scale_model) -> None:
    """bench_inits measures 2 of the 8b's blocks and extrapolates: the same names and shapes (and, seeded
    by name, the same tensors)."""
    full = dict(scale_model.tensor_shapes(scale_model.SHAPES["8b"]))
    part = dict(scale_model.tensor_shapes(scale_model.SHAPES["8b-2blocks"]))
    assert len(part) == 2 * 9 + 3 and all(full[name] == dims for name, dims in part.items())
    assert max(int(n.split(".")[2]) for n in part if n.startswith("model.layers.")) == 1
    assert part["model.layers.1.self_attn.k_proj.weight"] == (1024, 4096)  # grouped-query: 8 of 32 heads


def test_transformers_loads_the_checkpoint_and_tokenizer(scale_model, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    scale_model.write_model("tiny", tmp_path, shard_bytes=8 * 2**20)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())  # nothing missing, unexpected or mismatched
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.num_key_value_heads, config.tie_word_embeddings, config.vocab_size) == (2, False, 8192)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer("t5 t9 t8191")["input_ids"] == [5, 9, 8191]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
