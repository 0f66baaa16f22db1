"""`peftkit.analyze` and truncation against dense references, on tiny seeded models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.analysis import read_low_rank_adapter
from peftkit.errors import ConfigError, ShapeMismatchError
from peftkit.peft_format import CONFIG_NAME, WEIGHTS_NAME
from peftkit.spectrum import amplification, factored_svd, subspace_similarity
from peftkit.truncation import logit_change, truncate_adapter

Q = "model.layers.0.self_attn.q_proj"


def _saved(tmp_path: Path, method: str = "lora", name: str = "a", seed: int = 1, **options: object) -> Path:
    model = tiny_llama()
    peftkit.adapt(model, method, **{"r": 4, "alpha": 8, "target_modules": "all-linear", **options})
    randomize_adapters(model, seed=seed)
    return peftkit.save_adapter(model, tmp_path / name)


def _dense_delta(directory: Path, path: str) -> torch.Tensor:
    model = peftkit.load_adapter(tiny_llama(), directory)
    up, down = model.get_submodule(path).adapters["default"].low_rank_factors()
    return (up @ down).detach().double()


def test_json_shape_and_singular_values_match_a_dense_svd(tmp_path: Path) -> None:
    directory = _saved(tmp_path, rslora=True, rank_pattern={"v_proj": 2})
    result = peftkit.analyze(directory)
    json.dumps(result)  # plain data throughout
    assert len(result["layers"]) == 14 and "similarity" not in result
    for path in (Q, "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        layer = result["layers"][path]
        dense = torch.linalg.svdvals(_dense_delta(directory, path))[: layer["rank"]]
        found = torch.tensor(layer["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(found, dense, rtol=1e-5, atol=0)
        assert layer["frobenius"] == pytest.approx(float(torch.linalg.matrix_norm(dense[None]).item()), rel=1e-9)
        assert layer["amplification"] is None and layer["intruders"] is None
    assert result["layers"]["model.layers.1.self_attn.v_proj"]["rank"] == 2
    assert result["summary"]["by_type"]["v_proj"]["rank"] == 2


def test_effective_ranks_of_a_known_spectrum() -> None:
    # Singular values 3, 2, 1, 0: energies 9, 4, 1 of 14.
    up = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    svd = factored_svd(torch.cat([up, torch.zeros(2, 4)]), torch.eye(4, 6))
    from peftkit.spectrum import effective_rank, entropy_rank

    assert [effective_rank(svd.s, e) for e in (0.5, 0.9, 0.99, 1.0)] == [1, 2, 3, 3]
    p = torch.tensor([3.0, 2.0, 1.0]) / 6
    assert entropy_rank(svd.s) == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert effective_rank(torch.zeros(3), 0.9) == 0 and entropy_rank(torch.zeros(3)) == 0.0


def test_similarity_is_one_against_itself_and_a_rotated_copy(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))[0]
    scale = torch.diag(torch.tensor([2.0, 0.5, 1.0, 3.0]))  # any invertible mix leaves ΔW = BA unchanged
    mix = rotation @ scale
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        b_key = key.replace("lora_A", "lora_B")
        tensors[key], tensors[b_key] = mix @ tensors[key], tensors[b_key] @ torch.linalg.inv(mix)
    rotated = tmp_path / "rotated"
    rotated.mkdir()
    save_file(tensors, str(rotated / WEIGHTS_NAME))
    (rotated / CONFIG_NAME).write_text((directory / CONFIG_NAME).read_text())
    for other in (directory, rotated):
        result = peftkit.analyze(directory, against=other)
        for grid in list(result["similarity"].values()) + list(result["summary"]["similarity_by_type"].values()):
            ones = torch.ones(4, 4, dtype=torch.float64)
            torch.testing.assert_close(torch.tensor(grid, dtype=torch.float64), ones, atol=1e-6, rtol=0)


def test_similarity_of_hand_built_subspaces() -> None:
    eye = torch.eye(6, dtype=torch.float64)
    assert subspace_similarity(eye[:, :2], eye[:, 2:5]).abs().max() == 0  # orthogonal spans
    grid = subspace_similarity(eye[:, [0, 1]], eye[:, [1, 2, 0]])
    # φ(1,1): e0 vs e1 -> 0; φ(2,1): span(e0,e1) holds e1 -> 1; φ(2,2): they share e1 of 2 -> 1/2;
    # φ(1,3): e0 in span(e1,e2,e0) -> 1.
    assert grid.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.5, 1.0]]


def test_amplification_and_intruders_match_dense_computations(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    base = tiny_llama()
    result = peftkit.analyze(directory, base=base, intruder_k=3, intruder_threshold=0.9)
    delta = _dense_delta(directory, Q)
    weight = base.get_submodule(Q).weight.detach().double()
    u, s, vh = torch.linalg.svd(delta)
    expected = float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(u[:, :4].T @ weight @ vh[:4].T))
    layer = result["layers"][Q]
    assert layer["amplification"] == pytest.approx(expected, rel=1e-5)
    tuned_u = torch.linalg.svd(weight + delta)[0][:, :3]
    best = (tuned_u.T @ torch.linalg.svd(weight)[0]).abs().amax(1)
    assert layer["intruder_similarity"] == pytest.approx(best.tolist(), abs=1e-5)
    assert layer["intruders"] == int((best < 0.9).sum())
    assert result["summary"]["intruder_k"] == 3
    svd = factored_svd(u[:, :2], vh[:2])  # directions W barely has: an amplification above 1
    assert amplification(svd, weight) == pytest.approx(
        float(math.sqrt(2) / torch.linalg.matrix_norm(u[:, :2].T @ weight @ vh[:2].T)), rel=1e-9
    )


def test_dora_is_analysed_through_its_direction_with_its_magnitude_change(tmp_path: Path) -> None:
    directory = _saved(tmp_path, "dora")
    result = peftkit.analyze(directory, base=tiny_llama(), intruder_k=0)
    layer = result["layers"][Q]
    model = peftkit.load_adapter(tiny_llama(), directory)
    adapter = model.get_submodule(Q).adapters["default"]
    tuned = model.get_submodule(Q).base_layer.weight + adapter.delta_weight()
    magnitude = adapter.lora_magnitude_vector.detach()
    assert layer["magnitude_change"] == pytest.approx(float((magnitude / tuned.norm(dim=1) - 1).abs().mean()), rel=1e-5)
    assert layer["intruders"] is None and layer["amplification"] > 0
    assert result["summary"]["method"] == "dora"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_truncation_to_the_full_rank_keeps_logits(tmp_path: Path, method: str, ids: torch.Tensor) -> None:
    directory = _saved(tmp_path, method)
    out = truncate_adapter(directory, 4, tmp_path / "full")
    change = logit_change(tiny_llama(), directory, out, list(ids))
    assert change["max_abs"] < 1e-5 and change["top1_agreement"] == 1.0
    config = json.loads((out / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 4, method == "dora")
    assert read_low_rank_adapter(out).method.name == method  # read back as a plain PEFT file


def test_truncation_to_rank_one_is_the_best_rank_one_approximation(tmp_path: Path, ids: torch.Tensor) -> None:
    directory = _saved(tmp_path)
    out = truncate_adapter(directory, 1, tmp_path / "one")
    delta = _dense_delta(directory, Q)
    u, s, vh = torch.linalg.svd(delta)
    torch.testing.assert_close(_dense_delta(out, Q), s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-6, rtol=1e-5)
    base = tiny_llama()
    before = [p.clone() for p in base.parameters()]
    assert logit_change(base, directory, out, list(ids))["max_abs"] > 1e-3
    assert not peftkit.list_adapters(base) and all(
        torch.equal(a, b) for a, b in zip(before, base.parameters(), strict=False)
    )


@pytest.mark.parametrize("rank", [0, -1, 5])
def test_truncation_rank_out_of_range_names_the_range(tmp_path: Path, rank: int) -> None:
    directory = _saved(tmp_path)
    with pytest.raises(ConfigError, match=rf"between 1 and the adapter's rank 4 .*got {rank}"):
        truncate_adapter(directory, rank, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["bottleneck", "full"])
def test_a_non_lora_adapter_says_what_can_be_analysed(tmp_path: Path, method: str) -> None:
    model = tiny_llama()
    peftkit.adapt(model, method, **({"target_modules": "all-linear"} if method == "bottleneck" else {}))
    peftkit.save_adapter(model, tmp_path / "x")
    expected = rf"holds a {method} adapter.*reads LoRA-family adapters: dora, lora, qdora, qlora"
    with pytest.raises(ConfigError, match=expected):
        peftkit.analyze(tmp_path / "x")


def test_against_adapters_of_other_layers_or_bases_names_the_mismatch(tmp_path: Path) -> None:
    first = _saved(tmp_path, target_modules=["q_proj", "v_proj"])
    fewer = _saved(tmp_path, name="b", target_modules=["q_proj"])
    with pytest.raises(ConfigError, match=r"different layers: 2 only in .*/a' .*v_proj"):
        peftkit.analyze(first, against=fewer)
    other = tmp_path / "other"
    other.mkdir()
    (other / WEIGHTS_NAME).write_bytes((first / WEIGHTS_NAME).read_bytes())
    config = json.loads((first / CONFIG_NAME).read_text())
    for directory, base in ((first, "org/a-model"), (other, "org/another-model")):
        (directory / CONFIG_NAME).write_text(json.dumps({**config, "base_model_name_or_path": base}))
    with pytest.raises(ConfigError, match=r"different bases \('org/a-model' and 'org/another-model'\)"):
        peftkit.analyze(first, against=other)
    wide = tiny_llama(hidden_size=48)
    peftkit.adapt(wide, "lora", r=4, target_modules=["q_proj", "v_proj"])
    peftkit.save_adapter(wide, tmp_path / "wide")
    with pytest.raises(ShapeMismatchError, match=r"takes 32 inputs in .* but 48"):
        peftkit.analyze(first, against=tmp_path / "wide")
    with pytest.raises(ShapeMismatchError, match=r"the base weight is \(48, 48\).*another base model"):
        peftkit.analyze(first, base=wide)


def test_an_adapter_written_by_peft_analyses_the_same(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "peft")
    ours = peftkit.load_adapter(tiny_llama(), tmp_path / "peft", trainable=True)
    peftkit.save_adapter(ours, tmp_path / "ours")
    theirs, mine = peftkit.analyze(tmp_path / "peft"), peftkit.analyze(tmp_path / "ours")
    assert theirs["layers"].keys() == mine["layers"].keys() and len(mine["layers"]) == 4
    for path, layer in theirs["layers"].items():
        assert layer["singular_values"] == pytest.approx(mine["layers"][path]["singular_values"], rel=1e-6)
        assert layer["singular_values"][0] > 0


def test_a_qlora_adapter_is_measured_over_the_dequantized_base(tmp_path: Path) -> None:
    from peftkit.quant import dequantize, quantize_model

    directory = _saved(tmp_path, "qlora")
    assert peftkit.analyze(directory)["summary"]["method"] == "qlora"
    base = quantize_model(tiny_llama())
    layer = peftkit.analyze(directory, base=base, intruder_k=0)["layers"][Q]
    weight = dequantize(base.get_submodule(Q)).double()
    u, s, vh = torch.linalg.svd(_dense_delta(directory, Q))
    expected = float(torch.linalg.matrix_norm(s[:4].diag()) / torch.linalg.matrix_norm(u[:, :4].T @ weight @ vh[:4].T))
    assert layer["amplification"] == pytest.approx(expected, rel=1e-4)


def test_left_similarity_sees_the_output_side(tmp_path: Path) -> None:
    first = _saved(tmp_path, target_modules=["q_proj"])
    tensors = load_file(str(first / WEIGHTS_NAME))
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:  # same B (output side), another A
        tensors[key] = torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(7))
    other = tmp_path / "other"
    other.mkdir()
    save_file(tensors, str(other / WEIGHTS_NAME))
    (other / CONFIG_NAME).write_text((first / CONFIG_NAME).read_text())
    result = peftkit.analyze(first, against=other)
    # B's column space is shared, so the full-rank left spans agree; the right spans differ.
    assert result["similarity_left"][Q][3][3] == pytest.approx(1.0, abs=1e-9)
    assert result["similarity"][Q][3][3] < 0.9
    assert result["summary"]["similarity_left_by_type"]["q_proj"][3][3] == pytest.approx(1.0, abs=1e-9)
