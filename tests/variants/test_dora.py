"""DoRA's numbers: forward and gradients equal the formula and PEFT's; merge, files and training work.

The reference is the paper's formula built densely: W' = m * (W0 + s B A) / ||W0 + s B A||
(norm per output feature, detached), applied as the layer's own op.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, model_output, randomize_adapters, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
import peftkit.injection
import peftkit.peft_format
from peftkit.weights import read_weight
from variants.dora import DoraEmbedding, DoraLinear

ATOL = 1e-5
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc", "c_proj"]}
PEFT_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": TARGETS["gpt2"]}  # PEFT DoRA embeds differ on init


def adapted(model_name: str, targets: list[str] | None = None, seed: int = 1, **options: object) -> nn.Module:
    """A tiny model with DoRA on `targets`: non-zero B and a magnitude moved off its initial norm."""
    model = peftkit.adapt(
        BUILDERS[model_name](), "dora", r=4, alpha=8, target_modules=targets or TARGETS[model_name], **options
    )
    randomize_adapters(model, seed=seed)
    return model


def dense_reference(adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """W' = m * (W0 + s B A) / n with n detached, built as one dense [out, in] matrix."""
    up, down = adapter.low_rank_factors()
    combined = weight + up @ down
    norm = torch.linalg.vector_norm(combined, dim=1).detach()
    return (adapter.lora_magnitude_vector / norm).unsqueeze(1) * combined


def single(layer: nn.Module, **options: object) -> nn.Sequential:
    model = nn.Sequential(layer)
    peftkit.adapt(model, "dora", target_modules=["0"], r=3, alpha=6, **options)
    randomize_adapters(model)
    return model


def reference_output(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The base layer's op with `weight` (canonical [out, in]) in place of its own."""
    if isinstance(layer, nn.Embedding):
        return F.embedding(x, weight.T)
    return F.linear(x, weight, layer.bias)


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(4, 3, 6)),
    "conv1d": (lambda: Conv1D(5, 6), lambda: torch.randn(4, 3, 6)),  # nf=5 outputs, nx=6 inputs
    "embedding": (lambda: nn.Embedding(10, 5), lambda: torch.tensor([[0, 3, 9, 3], [1, 2, 0, 7]])),
}


def adapter_parameters(adapter: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in adapter.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_forward_and_gradients_equal_the_dense_formula(kind: str) -> None:
    torch.manual_seed(0)
    make_layer, make_input = LAYERS[kind]
    model = single(make_layer())
    host = model[0]
    adapter, base = host.adapters["default"], host.base_layer
    assert isinstance(adapter, DoraEmbedding if kind == "embedding" else DoraLinear)
    x = make_input()
    out = model(x)
    expected = reference_output(base, dense_reference(adapter, read_weight(base)), x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)

    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = adapter_parameters(adapter)
    ours = torch.autograd.grad((out * upstream).sum(), list(params.values()))
    theirs = torch.autograd.grad((expected * upstream).sum(), list(params.values()))
    assert set(params) == {"lora_magnitude_vector", *(n for n in params if n != "lora_magnitude_vector")}
    for name, mine, ref in zip(params, ours, theirs, strict=True):
        assert mine.abs().max() > 0, name
        torch.testing.assert_close(mine, ref, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_whole_output_path_equals_base_plus_the_addition(kind: str) -> None:
    """A layer with one adapter uses `output` (one multiply-add); mixed batches use `forward`."""
    torch.manual_seed(0)
    make_layer, make_input = LAYERS[kind]
    host = single(make_layer())[0]
    adapter, base = host.adapters["default"], host.base_layer
    x = make_input().requires_grad_(True)
    base_output = base(x)
    whole = adapter.output(x, base_output, base)
    added = base_output + adapter(x, base_output, base)
    torch.testing.assert_close(whole, added, atol=1e-6, rtol=0)
    upstream = torch.randn(whole.shape, generator=torch.Generator().manual_seed(3))
    inputs = [x, *adapter_parameters(adapter).values()]
    for mine, ref in zip(
        torch.autograd.grad((whole * upstream).sum(), inputs, retain_graph=True),
        torch.autograd.grad((added * upstream).sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(mine, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_starts_equal_to_the_base_with_magnitude_the_weight_norm(kind: str) -> None:
    torch.manual_seed(0)
    make_layer, make_input = LAYERS[kind]
    layer, x = make_layer(), make_input()
    expected = layer(x)
    model = nn.Sequential(layer)
    peftkit.adapt(model, "dora", target_modules=["0"], r=3)
    adapter = model[0].adapters["default"]
    torch.testing.assert_close(adapter.lora_magnitude_vector, torch.linalg.vector_norm(read_weight(layer), dim=1))
    assert adapter.lora_magnitude_vector.shape == (5,)
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("model_name", sorted(BUILDERS))
def test_model_starts_with_the_base_logits(model_name: str, ids: torch.Tensor) -> None:
    expected = model_output(BUILDERS[model_name](), ids)
    model = peftkit.adapt(BUILDERS[model_name](), "dora", r=4, target_modules=TARGETS[model_name])
    assert torch.equal(model_output(model, ids), expected)


def test_dropout_path_recomputes_the_base_term_on_the_dropped_input() -> None:
    """In training with dropout, delta = (m/n - 1) W0 d(x) + (m/n) s B A d(x) with one mask d (PEFT's rule)."""
    torch.manual_seed(0)
    model = single(nn.Linear(6, 5), dropout=0.5).train()
    adapter, base = model[0].adapters["default"], model[0].base_layer
    x = torch.randn(8, 6)
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    dropped = adapter.dropout(x)
    assert (dropped == 0).any() and (dropped != 0).any()
    weight = base.weight
    up, down = adapter.low_rank_factors()
    scale = adapter.lora_magnitude_vector / torch.linalg.vector_norm(weight + up @ down, dim=1).detach()
    expected = base(x) + (scale - 1) * (dropped @ weight.T) + scale * (dropped @ (up @ down).T)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    model.eval()  # no dropout in eval: the formula without a mask
    torch.testing.assert_close(model(x), F.linear(x, dense_reference(adapter, weight), base.bias), atol=ATOL, rtol=0)


def peft_config(model_name: str, **options: object) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=PEFT_TARGETS[model_name],
        use_dora=True,
        fan_in_fan_out=model_name == "gpt2",  # GPT-2's Conv1D stores W transposed
        **options,
    )


def peft_twin(ours: nn.Module, model_name: str, dropout: float = 0.0) -> nn.Module:
    """PEFT's DoRA on an identical base, holding exactly our adapter tensors."""
    theirs = peft.get_peft_model(BUILDERS[model_name](), peft_config(model_name, lora_dropout=dropout))
    result = peft.set_peft_model_state_dict(theirs, peftkit.adapter_state_dict(ours))
    assert not result.unexpected_keys
    return theirs


def peft_key(name: str) -> str:
    """PEFT's parameter name -> the key it saves under (the one peftkit's state dict uses)."""
    return name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(".default.", ".")


def gradients_after(model: nn.Module, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_name", sorted(BUILDERS))
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_outputs_and_gradients_equal_peft(model_name: str, dropout: float, ids: torch.Tensor) -> None:
    ours = adapted(model_name, PEFT_TARGETS[model_name], dropout=dropout)
    theirs = peft_twin(ours, model_name, dropout)
    if dropout:  # same seed before each forward: the same dropout masks in the same order
        ours.train(), theirs.train()
    logits, grads = gradients_after(ours, ids, seed=5)
    peft_logits, peft_grads = gradients_after(theirs, ids, seed=5)
    if dropout:  # the masks mattered
        assert (logits - model_output(ours.eval(), ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits, peft_logits, atol=ATOL, rtol=0)
    state = peftkit.adapter_state_dict(ours)
    peft_grads = {peft_key(n): g for n, g in peft_grads.items()}
    assert peft_grads.keys() == state.keys()
    for key, param in state.items():
        torch.testing.assert_close(param.grad, peft_grads[key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.parametrize("model_name", sorted(BUILDERS))
def test_peftkit_file_loads_in_peft_with_the_same_logits(model_name: str, ids: torch.Tensor, tmp_path: Path) -> None:
    model = adapted(model_name, PEFT_TARGETS[model_name])
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    config = peftkit.peft_format.read_adapter_config(tmp_path)
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(BUILDERS[model_name](), tmp_path)
    assert torch.count_nonzero(theirs.base_model.model.state_dict()[_magnitude_key(model_name)]) > 0
    torch.testing.assert_close(model_output(theirs, ids), expected, atol=ATOL, rtol=0)


def _magnitude_key(model_name: str) -> str:
    layer = "model.layers.0.self_attn.q_proj" if model_name == "llama" else "transformer.h.0.attn.c_attn"
    return f"{layer}.lora_magnitude_vector.default.weight"


@pytest.mark.parametrize("model_name", sorted(BUILDERS))
def test_peft_file_loads_in_peftkit_as_dora(model_name: str, ids: torch.Tensor, tmp_path: Path) -> None:
    theirs = peft.get_peft_model(BUILDERS[model_name](), peft_config(model_name, init_lora_weights=False))
    with torch.no_grad():  # move the magnitudes off their initial norms
        for name, param in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=torch.Generator().manual_seed(4)))
    theirs.save_pretrained(tmp_path)
    expected = model_output(theirs, ids)
    loaded = peftkit.load_adapter(BUILDERS[model_name](), tmp_path)
    assert peftkit.adapter_methods(loaded)["default"].name == "dora"
    torch.testing.assert_close(model_output(loaded, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_name", sorted(BUILDERS))
def test_merge_unmerge_and_merge_and_unload(model_name: str, ids: torch.Tensor) -> None:
    model = adapted(model_name)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    expected = model_output(model, ids)
    peftkit.merge(model)
    changed = [n for n, p in model.named_parameters() if n in base_weights and not torch.equal(p, base_weights[n])]
    assert len(changed) >= len(TARGETS[model_name])  # every targeted weight moved
    torch.testing.assert_close(model_output(model, ids), expected, atol=ATOL, rtol=0)
    peftkit.unmerge(model)
    for name, param in model.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(param, base_weights[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(model_output(model, ids), expected, atol=ATOL, rtol=0)
    plain = peftkit.merge_and_unload(model)
    assert not list(peftkit.injection.hosts(plain))
    torch.testing.assert_close(model_output(plain, ids), expected, atol=ATOL, rtol=0)


def test_unmerging_an_adapter_that_was_not_merged_is_refused() -> None:
    adapter = single(nn.Linear(6, 5))[0].adapters["default"]
    with pytest.raises(peftkit.AdapterStateError, match="DoraLinear was not merged"):
        adapter.unmerged_weight(torch.zeros(5, 6))


def test_only_a_b_and_magnitude_train_and_adamw_moves_the_output(ids: torch.Tensor) -> None:
    model = adapted("llama", ["q_proj", "v_proj"])
    trainable = {n.rpartition(".adapters.default.")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    q_proj, v_proj = 4 * 32 + 32 * 4 + 32, 4 * 32 + 16 * 4 + 16  # A, B, m; v_proj has 16 outputs (2 kv heads)
    assert peftkit.trainable_parameters(model)[0] == 2 * (q_proj + v_proj)
    before = model_output(model, ids).detach()
    magnitude = model.model.layers[0].self_attn.q_proj.adapters["default"].lora_magnitude_vector
    start = magnitude.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    assert (magnitude - start).abs().max() > 1e-3
    assert (model_output(model, ids) - before).abs().max() > 1e-3


def test_bfloat16_base_starts_equal_and_keeps_its_dtype() -> None:
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = model_output(model, ids)
    peftkit.adapt(model, "dora", target_modules=["q_proj", "v_proj"])
    assert torch.equal(model_output(model, ids), expected)
    randomize_adapters(model)
    assert model_output(model, ids).dtype == torch.bfloat16
