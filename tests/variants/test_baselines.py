"""Full fine-tuning and linear probing: what trains, what is saved, and what disable/merge mean."""

from __future__ import annotations

import json
from pathlib import Path

import conftest
import pytest
import torch
from conftest import MODEL_BUILDERS, VOCAB, model_output, randomize_adapters, tiny_bert, tiny_llama
from safetensors import safe_open
from torch import nn
from transformers import LlamaForCausalLM, LlamaModel

import peftkit
from peftkit.injection import hosts


def tied_llama(seed: int = 0) -> LlamaForCausalLM:
    """conftest's tiny llama with its output head tied to the input embedding (as Gemma's)."""
    config = tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def train_steps(model: nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    labels = torch.tensor([0, 2]) if model.config.model_type == "bert" else None
    conftest.train_steps(model, ids, steps, labels=labels)


def saved(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, json.loads((directory / "adapter_config.json").read_text())


# --- full -----------------------------------------------------------------------------------


def test_full_trains_every_parameter_in_place(model_name: str) -> None:
    model = peftkit.adapt(MODEL_BUILDERS[model_name](), "full", target_modules=["q_proj"])
    trainable, total = peftkit.trainable_parameters(model)
    assert trainable == total == sum(p.numel() for p in MODEL_BUILDERS[model_name]().parameters())
    assert list(hosts(model)) == []  # nothing injected: a task head trains in place, not as a copy


def test_full_training_moves_every_layer_and_disable_cannot_undo_it(ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_llama(), "full")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = model_output(model, ids).detach()
    train_steps(model, ids)
    tuned = model_output(model, ids).detach()
    assert (tuned - base).abs().max() > 1e-3
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(peftkit.AdapterStateError, match="no base output to fall back to"):
        with peftkit.disable_adapters(model):
            pass
    with pytest.raises(peftkit.AdapterStateError, match="no other adapter can join it"):
        peftkit.adapt(model, "lora", "extra", target_modules=["q_proj"])
    assert torch.equal(model_output(model, ids), tuned)


def test_full_round_trip_and_file_holds_every_weight(ids: torch.Tensor, tmp_path: Path) -> None:
    model = peftkit.adapt(tiny_llama(), "full")
    train_steps(model, ids)
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    tensors, config = saved(tmp_path)
    assert tensors.keys() == {f"base_model.model.{n}" for n, _ in model.named_parameters()}
    assert all(torch.equal(tensors[f"base_model.model.{n}"], p) for n, p in model.named_parameters())
    assert config["peft_type"] is None and config["target_modules"] == []
    loaded = peftkit.load_adapter(tiny_llama(seed=5), tmp_path)
    assert peftkit.adapter_methods(loaded)["default"].name == "full"
    assert torch.equal(model_output(loaded, ids), expected)
    assert peftkit.trainable_parameters(loaded)[0] == 0  # loaded for inference by default


def test_full_saves_tied_weights_once_and_batchnorm_statistics(ids: torch.Tensor, tmp_path: Path) -> None:
    model = peftkit.adapt(tied_llama(), "full")
    randomize_adapters(model)
    keys = peftkit.adapter_state_dict(model).keys()
    assert "base_model.model.model.embed_tokens.weight" in keys and "base_model.model.lm_head.weight" not in keys
    peftkit.save_adapter(model, tmp_path / "tied")
    loaded = peftkit.load_adapter(tied_llama(seed=3), tmp_path / "tied")
    assert torch.equal(model_output(loaded, ids), model_output(model, ids))

    def convnet() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))

    net = peftkit.adapt(convnet().train(), "full")
    net(torch.randn(4, 2, 5, 5))  # a training forward updates the running statistics
    running = net[1].running_mean.clone()
    assert running.abs().sum() > 0
    peftkit.save_adapter(net, tmp_path / "bn")
    tensors, _ = saved(tmp_path / "bn")
    assert torch.equal(tensors["base_model.model.1.running_mean"], running)
    assert "base_model.model.1.num_batches_tracked" not in tensors  # an integer, not trained
    other = peftkit.load_adapter(convnet(), tmp_path / "bn")
    x = torch.randn(2, 2, 5, 5)
    assert torch.equal(other.eval()(x), net.eval()(x))


def test_full_merge_is_a_no_op_and_merge_and_unload_returns_the_trained_model(ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_llama(), "full")
    randomize_adapters(model)
    expected = model_output(model, ids)
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peftkit.merge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weight)
    plain = peftkit.merge_and_unload(model)
    assert plain is model and peftkit.adapter_methods(plain) == {}
    assert torch.equal(model_output(plain, ids), expected)


@pytest.mark.parametrize("method", ["full", "head"])
def test_baselines_refuse_other_adapters_and_options_they_cannot_honour(method: str) -> None:
    model = peftkit.adapt(tiny_llama(), "lora", target_modules=["q_proj"])
    with pytest.raises(
        peftkit.AdapterStateError, match=rf"{method} trains the model's own tensors.*'default' \(lora\)"
    ):
        peftkit.adapt(model, method, adapter_name="other")
    with pytest.raises(peftkit.ConfigError, match=r"BaselineConfig\.layers_to_transform must be None"):
        peftkit.adapt(tiny_llama(), method, layers_to_transform=[0])


def test_full_refuses_quantized_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(peftkit.UnsupportedModuleError, match=r"non-floating-point .*\['0\.weight'\]"):
        peftkit.adapt(model, "full")


# --- head -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "head", "count"),
    [
        ("llama", ["lm_head.weight"], VOCAB * 32),
        ("gpt2", ["lm_head.weight"], VOCAB * 32),
        ("bert", ["classifier.weight", "classifier.bias"], 3 * 32 + 3),
    ],
)
def test_head_trains_only_the_head_in_place(name: str, head: list[str], count: int, ids: torch.Tensor) -> None:
    model = peftkit.adapt(MODEL_BUILDERS[name](), "head", target_modules=["q_proj"])
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(head)
    assert peftkit.trainable_parameters(model)[0] == count
    assert list(hosts(model)) == []
    train_steps(model, ids, steps=1)
    assert {n for n, p in model.named_parameters() if p.grad is not None} <= set(head)
    assert sorted(k.removeprefix("base_model.model.") for k in peftkit.adapter_state_dict(model)) == sorted(head)


def test_head_training_changes_the_logits_but_not_the_features(ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_llama(), "head")
    features = model.model(input_ids=ids).last_hidden_state.detach()
    before = model_output(model, ids).detach()
    train_steps(model, ids)
    assert (model_output(model, ids) - before).abs().max() > 1e-3
    assert torch.equal(model.model(input_ids=ids).last_hidden_state, features)
    expected = features @ model.lm_head.weight.T
    torch.testing.assert_close(model_output(model, ids), expected)


def test_head_unties_a_tied_head_and_leaves_the_input_embedding_alone(ids: torch.Tensor, tmp_path: Path) -> None:
    model = tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    base = model_output(model, ids).detach()
    peftkit.adapt(model, "head")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, embedding) and model.config.tie_word_embeddings is False
    assert torch.equal(model_output(model, ids), base)
    train_steps(model, ids)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert not torch.equal(model.lm_head.weight, embedding)
    model.tie_weights()  # transformers must not tie it again
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    tensors, config = saved(tmp_path)
    assert tensors.keys() == {"base_model.model.lm_head.weight"} and config["peft_type"] is None
    assert torch.equal(tensors["base_model.model.lm_head.weight"], model.lm_head.weight)
    loaded = peftkit.load_adapter(tied_llama(), tmp_path)
    assert torch.equal(model_output(loaded, ids), expected)
    assert torch.equal(loaded.model.embed_tokens.weight, embedding)


def test_head_round_trip_on_a_task_model(tmp_path: Path, ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_bert(), "head")
    randomize_adapters(model)
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    assert saved(tmp_path)[0].keys() == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    loaded = peftkit.load_adapter(tiny_bert(), tmp_path)  # the same base: only the head was saved
    assert torch.equal(model_output(loaded, ids), expected)


def test_head_needs_a_head() -> None:
    body = LlamaModel(tiny_llama().config)
    with pytest.raises(peftkit.TargetNotFoundError, match="LlamaModel has no output head to probe"):
        peftkit.adapt(body, "head")
