"""LoRA's `trainable_token_indices` and `target_parameters`, checked against HF PEFT both ways.

Same shape as the layer tests: seeded twins, peftkit's tensors copied into PEFT's
under equal key names, then outputs and gradients (1e-5), merges (1e-4), and files
written by one library and read by the other.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, model_output, randomize_adapters, tiny_llama
from tiny_models import tiny_mixtral
from torch import nn

import peftkit
import peftkit.injection
import peftkit.peft_format
from peftkit.peft_format import read_adapter_config

OUTPUT_ATOL = 1e-5
MERGE_ATOL = 1e-4
TOKENS = [3, 7, 100]
IDS = torch.tensor([[3, 5, 7, 100, 3, 9], [1, 100, 2, 7, 0, 64]])


def twin(ours: nn.Module, fresh: nn.Module, config: peft.LoraConfig) -> nn.Module:
    """PEFT's adapter on `fresh`, holding exactly peftkit's tensors; the key names must be the same."""
    theirs = peft.get_peft_model(fresh, config)
    state = peftkit.adapter_state_dict(ours)
    assert set(peft.get_peft_model_state_dict(theirs)) == set(state)
    assert not peft.set_peft_model_state_dict(theirs, state).unexpected_keys
    return theirs


def gradients(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def peft_key(name: str) -> str:
    """A PEFT parameter name -> its saved key (the name peftkit's state dict uses)."""
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    return "base_model.model." + name.removeprefix("base_model.model.").replace(".default", "")


def assert_same_gradients(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor) -> None:
    logits, _ = gradients(ours, ids)
    peft_logits, peft_grads = gradients(theirs, ids)
    torch.testing.assert_close(logits, peft_logits, atol=OUTPUT_ATOL, rtol=0)
    state = peftkit.adapter_state_dict(ours)
    assert {peft_key(n) for n in peft_grads} == set(state)
    for name, grad in peft_grads.items():
        mine = state[peft_key(name)].grad
        assert mine.abs().max() > 0, name
        torch.testing.assert_close(mine, grad, atol=OUTPUT_ATOL, rtol=0, msg=name)


# --- trainable_token_indices -------------------------------------------------------------


def with_tokens(indices: list[int] | dict[str, list[int]], targets: list[str], method: str = "lora") -> nn.Module:
    model = peftkit.adapt(tiny_llama(), method, r=2, alpha=4, target_modules=targets, trainable_token_indices=indices)
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_trainable_tokens_equal_peft_in_outputs_and_gradients(method: str) -> None:
    ours = with_tokens(TOKENS, ["q_proj"], method)
    rows = ours.model.embed_tokens.adapters["default"].token_adapter.trainable_tokens_delta
    assert rows.shape == (len(TOKENS), 32) and rows.requires_grad
    magnitudes = 2 * 32 if method == "dora" else 0
    assert peftkit.trainable_parameters(ours)[0] == len(TOKENS) * 32 + 2 * (2 * 32 + 32 * 2) + magnitudes
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=TOKENS, use_dora=method == "dora"
    )
    theirs = twin(ours, tiny_llama(), config)
    assert_same_gradients(ours, theirs, IDS)


def test_trainable_tokens_replace_only_their_rows_and_merge_into_the_table() -> None:
    ours = with_tokens(TOKENS, ["q_proj"])
    embedding = ours.model.embed_tokens
    rows = embedding.adapters["default"].token_adapter.trainable_tokens_delta.detach().clone()
    table = embedding.base_layer.weight.detach().clone()
    looked_up = embedding(IDS)
    expected = F.embedding(IDS, table.index_copy(0, torch.tensor(TOKENS), rows))
    torch.testing.assert_close(looked_up, expected, atol=1e-6, rtol=0)
    logits = model_output(ours, IDS)
    peftkit.merge(ours)
    torch.testing.assert_close(embedding.base_layer.weight[TOKENS], rows, atol=MERGE_ATOL, rtol=0)
    torch.testing.assert_close(model_output(ours, IDS), logits, atol=MERGE_ATOL, rtol=0)
    peftkit.unmerge(ours)
    torch.testing.assert_close(embedding.base_layer.weight, table, atol=1e-6, rtol=0)


def test_trainable_tokens_files_cross_between_peft_and_peftkit(tmp_path: Path) -> None:
    indices = {"embed_tokens": TOKENS}
    ours = with_tokens(indices, ["v_proj"])
    expected = model_output(ours, IDS)
    peftkit.save_adapter(ours, tmp_path / "ours")
    config = read_adapter_config(tmp_path / "ours")
    assert config["target_modules"] == ["v_proj"] and config["trainable_token_indices"] == indices
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(model_output(loaded, IDS), expected, atol=OUTPUT_ATOL, rtol=0)

    config = peft.LoraConfig(target_modules=["v_proj"], trainable_token_indices=indices, init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_llama(), config)
    with torch.no_grad():  # PEFT starts the rows at their old values: move them
        for name, param in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
    theirs.save_pretrained(tmp_path / "theirs")
    back = peftkit.load_adapter(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(model_output(back, IDS), model_output(theirs, IDS), atol=OUTPUT_ATOL, rtol=0)


def test_trainable_tokens_on_a_scaled_embedding_equal_peft() -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = Gemma3TextScaledWordEmbedding(VOCAB, 8, padding_idx=0, embed_scale=3.0)
            self.proj = nn.Linear(8, 8)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.proj(self.embed(input_ids))

    options = {"target_modules": ["proj"], "trainable_token_indices": {"embed": TOKENS}}
    ours = peftkit.adapt(Embedder(), "lora", **options)
    randomize_adapters(ours)
    theirs = twin(ours, Embedder(), peft.LoraConfig(**options))
    torch.testing.assert_close(ours(IDS), theirs(IDS), atol=OUTPUT_ATOL, rtol=0)


def test_trainable_tokens_refusals_are_typed_and_leave_the_model_as_it_was() -> None:
    with pytest.raises(peftkit.ConfigError, match=r"distinct ids in \[0, 128\).*got \[3, 128\]"):
        with_tokens([3, 128], ["q_proj"])
    with pytest.raises(peftkit.ConfigError, match="'model.embed_tokens' is a LoRA target of the same adapter"):
        with_tokens(TOKENS, ["q_proj", "embed_tokens"])
    with pytest.raises(peftkit.UnsupportedModuleError, match="needs an nn.Embedding; 'model.layers.0.mlp.up_proj'"):
        with_tokens({"layers.0.mlp.up_proj": [1]}, ["q_proj"])
    with pytest.raises(peftkit.TargetNotFoundError, match="'wte', which matches no module"):
        with_tokens({"wte": [1]}, ["q_proj"])
    model = tiny_llama()
    with pytest.raises(peftkit.ConfigError, match="distinct ids"):
        peftkit.adapt(model, "lora", target_modules=["q_proj"], trainable_token_indices=[1, 1])
    assert not list(peftkit.injection.hosts(model)) and not peftkit.list_adapters(model)
    tied = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(peftkit.UnsupportedModuleError, match="tied to the output head"):
        peftkit.adapt(tied, "lora", target_modules=["q_proj"], trainable_token_indices=TOKENS)


# --- target_parameters ---------------------------------------------------------------


EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def with_experts(targets: list[str], parameters: list[str] = EXPERTS) -> nn.Module:
    model = peftkit.adapt(tiny_mixtral(), "lora", r=2, alpha=4, target_modules=targets, target_parameters=parameters)
    randomize_adapters(model)
    return model


def test_moe_expert_tensors_equal_peft_in_outputs_and_gradients() -> None:
    ours = with_experts(["q_proj"])
    adapter = ours.model.layers[0].mlp.experts.adapters["default"]
    assert adapter.parameter_name == "down_proj" and adapter.base_layer.parameter_name == "gate_up_proj"
    assert adapter.lora_A.weight.shape == (2 * 3, 24)  # rank x experts rows over down_proj's 24 inputs
    theirs = twin(
        ours, tiny_mixtral(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    )
    assert_same_gradients(ours, theirs, IDS)


def test_moe_expert_adapters_merge_and_files_cross(tmp_path: Path) -> None:
    ours = with_experts([])
    expected = model_output(ours, IDS)
    assert (expected - model_output(tiny_mixtral(), IDS)).abs().max() > 1e-3
    peftkit.save_adapter(ours, tmp_path / "ours")
    config = read_adapter_config(tmp_path / "ours")
    assert config["target_modules"] == [] and config["target_parameters"] == EXPERTS
    loaded = peft.PeftModel.from_pretrained(tiny_mixtral(), tmp_path / "ours")
    torch.testing.assert_close(model_output(loaded, IDS), expected, atol=OUTPUT_ATOL, rtol=0)
    theirs = peft.get_peft_model(
        tiny_mixtral(), peft.LoraConfig(target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path / "theirs")
    back = peftkit.load_adapter(tiny_mixtral(), tmp_path / "theirs")
    torch.testing.assert_close(model_output(back, IDS), model_output(theirs, IDS), atol=OUTPUT_ATOL, rtol=0)

    experts = ours.model.layers[1].mlp.experts.base_layer
    before = experts.gate_up_proj.detach().clone()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS)
    peft_merged = twin(ours, tiny_mixtral(), config).merge_and_unload().model.layers[1].mlp.experts
    peftkit.merge(ours)
    torch.testing.assert_close(model_output(ours, IDS), expected, atol=MERGE_ATOL, rtol=0)
    for name in ("gate_up_proj", "down_proj"):
        torch.testing.assert_close(getattr(experts, name), getattr(peft_merged, name), atol=MERGE_ATOL, rtol=0)
    peftkit.unmerge(ours)
    torch.testing.assert_close(experts.gate_up_proj, before, atol=1e-6, rtol=0)
    plain = peftkit.merge_and_unload(ours)
    torch.testing.assert_close(model_output(plain, IDS), expected, atol=MERGE_ATOL, rtol=0)


class BareWeights(nn.Module):
    """A 2-D weight used as `x @ W.T` and a 3-D stack stored [experts, in, out] (`is_transposed`)."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(6, 5))
        self.stack = nn.Parameter(torch.randn(3, 6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.weight)  # (batch, 6)
        return torch.einsum("bi,eio->beo", hidden, self.stack)


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = BareWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_two_d_and_transposed_three_d_parameters_equal_peft() -> None:
    names = ["block.weight", "block.stack"]
    ours = peftkit.adapt(Holder(), "lora", r=2, alpha=4, target_modules=[], target_parameters=names)
    randomize_adapters(ours)
    theirs = twin(ours, Holder(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=names))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    expected = ours(x)
    torch.testing.assert_close(expected, theirs(x), atol=OUTPUT_ATOL, rtol=0)
    peftkit.merge(ours)
    torch.testing.assert_close(ours(x), expected, atol=MERGE_ATOL, rtol=0)
    merged = theirs.merge_and_unload().block
    torch.testing.assert_close(ours.block.base_layer.stack, merged.stack, atol=MERGE_ATOL, rtol=0)
    torch.testing.assert_close(ours.block.base_layer.weight, merged.weight, atol=MERGE_ATOL, rtol=0)


def test_target_parameters_refusals_are_typed() -> None:
    with pytest.raises(peftkit.TargetNotFoundError, match=r"target_parameters=\['experts.up'\] matched no parameter"):
        with_experts([], ["experts.up"])
    with pytest.raises(peftkit.UnsupportedModuleError, match="dropout=0 and lora_bias=False.*got dropout=0.1"):
        peftkit.adapt(tiny_mixtral(), "lora", dropout=0.1, target_modules=[], target_parameters=EXPERTS)
    with pytest.raises(peftkit.ConfigError, match="DoraConfig.target_parameters must be None"):
        peftkit.adapt(tiny_mixtral(), "dora", target_modules=[], target_parameters=EXPERTS)
    with pytest.raises(peftkit.UnsupportedModuleError, match=r"'weight' of LlamaRMSNorm has shape \(32,\)"):
        peftkit.adapt(tiny_llama(), "lora", target_modules=[], target_parameters=["layers.0.input_layernorm.weight"])
    with pytest.raises(peftkit.TargetNotFoundError, match="target_modules=\\[\\] selects no layer"):
        peftkit.adapt(tiny_llama(), "lora", target_modules=[], trainable_token_indices=TOKENS)


class MLP(nn.Module):
    """PEFT's test model "MLP 1 using nn.Parameter LoRA": no config, so no default targets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def test_target_parameters_without_target_modules_as_peft_writes_and_reads(tmp_path: Path) -> None:
    # It used to be refused with "no default target_modules".
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    config = peft.LoraConfig(target_modules=None, target_parameters=["lin0.weight"], init_lora_weights=False)
    theirs = peft.get_peft_model(MLP(), config)
    theirs.save_pretrained(tmp_path)
    assert read_adapter_config(tmp_path)["target_modules"] is None
    loaded = peftkit.load_adapter(MLP(), tmp_path)
    assert [path for path, _ in peftkit.injection.hosts(loaded)] == ["lin0"]
    torch.testing.assert_close(loaded(x), theirs(x), atol=OUTPUT_ATOL, rtol=0)
    ours = peftkit.adapt(MLP(), "lora", target_parameters=["lin0.weight"])
    assert [path for path, _ in peftkit.injection.hosts(ours)] == ["lin0"]
    # A model type with default targets gets them too, as PEFT's does (Mixtral: q_proj, v_proj).
    mixtral = peftkit.adapt(tiny_mixtral(), "lora", target_parameters=EXPERTS)
    adapted_leaves = {path.rsplit(".", 1)[-1] for path, _ in peftkit.injection.hosts(mixtral)}
    assert adapted_leaves == {"q_proj", "v_proj", "experts"}
