"""Bottleneck adapters' numbers: exact identity at init, h + up(act(down(h))) after training, no merge."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_BUILDERS, model_output, randomize_adapters, tiny_gpt2, tiny_llama
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.injection import hosts

DEFAULT_PATHS = {
    "llama": [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")],
    "gpt2": [f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")],
    "bert": [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output.dense", "output.dense")],
}


def adapted_paths(model: nn.Module) -> list[str]:
    return sorted(path for path, host in hosts(model) if isinstance(host, peftkit.AdapterLayer))


def test_default_targets_are_attention_and_mlp_outputs_and_start_equal(model_name: str, ids: torch.Tensor) -> None:
    base = model_output(MODEL_BUILDERS[model_name](), ids)
    model = peftkit.adapt(MODEL_BUILDERS[model_name](), "bottleneck")
    assert adapted_paths(model) == sorted(DEFAULT_PATHS[model_name])
    assert torch.equal(model_output(model, ids), base)


def test_unknown_model_type_has_no_default() -> None:
    with pytest.raises(
        peftkit.ConfigError, match=r"bottleneck has no default target_modules for model type None.*llama"
    ):
        peftkit.adapt(nn.Sequential(nn.Linear(4, 4)), "bottleneck")


@pytest.mark.parametrize(
    ("options", "width"),
    [({}, 2), ({"reduction_factor": 4}, 8), ({"bottleneck_size": 5}, 5), ({"reduction_factor": 64}, 1)],
)
def test_width_and_trainable_parameter_count(options: dict, width: int) -> None:
    model = peftkit.adapt(tiny_llama(), "bottleneck", **options)
    adapter = model.model.layers[0].self_attn.o_proj.adapters["default"]
    assert adapter.down.weight.shape == (width, 32) and adapter.up.weight.shape == (32, width)
    per_layer = (32 * width + width) + (width * 32 + 32)
    assert peftkit.trainable_parameters(model)[0] == 4 * per_layer


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(peftkit.ConfigError, match="give bottleneck_size or reduction_factor, not both"):
        peftkit.adapt(tiny_llama(), "bottleneck", bottleneck_size=4, reduction_factor=8)
    with pytest.raises(
        peftkit.ConfigError, match=r"BottleneckConfig\.bottleneck_size must be a positive integer, got 0"
    ):
        peftkit.adapt(tiny_llama(), "bottleneck", bottleneck_size=0)
    with pytest.raises(peftkit.ConfigError, match=r"activation must be 'relu' \| 'gelu' \| 'silu' \| 'tanh'"):
        peftkit.adapt(tiny_llama(), "bottleneck", activation="swish")


def test_init_is_zero_up_and_linear_default_down() -> None:
    model = peftkit.adapt(tiny_llama(), "bottleneck", bottleneck_size=4)
    adapter = model.model.layers[1].mlp.down_proj.adapters["default"]
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert adapter.down.weight.abs().max() <= 1 / 32**0.5 and adapter.down.weight.std() > 0.05


@pytest.mark.parametrize(
    ("activation", "fn"), [("relu", torch.relu), ("gelu", F.gelu), ("silu", F.silu), ("tanh", torch.tanh)]
)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_matches_hand_computed_reference(activation: str, fn: Callable, kind: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 10) if kind == "linear" else Conv1D(10, 6)  # Conv1D stores W as [in, out]
    model = peftkit.adapt(
        nn.Sequential(layer), "bottleneck", target_modules=["0"], bottleneck_size=3, activation=activation
    )
    randomize_adapters(model, std=0.5)
    adapter = model[0].adapters["default"]
    x = torch.randn(2, 4, 6)
    h = x @ (layer.weight.T if kind == "linear" else layer.weight) + layer.bias
    expected = h + fn(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    torch.testing.assert_close(model(x), expected)
    assert (model(x) - h).abs().max() > 1e-2


def test_gradient_reaches_only_down_and_up(ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_gpt2(), "bottleneck")
    randomize_adapters(model)
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {
        f"{path}.adapters.default.{lin}.{t}"
        for path in DEFAULT_PATHS["gpt2"]
        for lin in ("down", "up")
        for t in ("weight", "bias")
    }
    assert with_grad == expected
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in expected)


def test_up_is_the_only_tensor_with_a_gradient_at_init(ids: torch.Tensor) -> None:
    """With up = 0 the first step moves up only; down follows from the second step on (as LoRA's A)."""
    model = peftkit.adapt(tiny_llama(), "bottleneck")
    model(input_ids=ids, labels=ids).loss.backward()
    adapter = model.model.layers[0].self_attn.o_proj.adapters["default"]
    assert adapter.up.weight.grad.abs().sum() > 0 and adapter.up.bias.grad.abs().sum() > 0
    assert adapter.down.weight.grad.abs().sum() == 0


def test_save_load_round_trip_with_default_targets(ids: torch.Tensor, tmp_path: Path) -> None:
    model = peftkit.adapt(tiny_llama(), "bottleneck", activation="tanh", reduction_factor=8)
    randomize_adapters(model)
    expected = model_output(model, ids)
    peftkit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] is None and config["target_modules"] == ["down_proj", "o_proj"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        keys, metadata = set(handle.keys()), json.loads(handle.metadata()["peftkit"])
        up = handle.get_tensor("base_model.model.model.layers.1.mlp.down_proj.up.weight")
    assert len(keys) == 16 and metadata["options"]["target_modules"] is None
    assert torch.equal(up, model.model.layers[1].mlp.down_proj.adapters["default"].up.weight)
    loaded = peftkit.load_adapter(tiny_llama(), tmp_path)
    assert loaded.model.layers[0].self_attn.o_proj.adapters["default"].act.__class__ is nn.Tanh
    assert torch.equal(model_output(loaded, ids), expected)


def test_merge_is_refused_with_a_clear_message_and_changes_nothing(ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_llama(), "bottleneck")
    randomize_adapters(model)
    expected = model_output(model, ids)
    weight = model.model.layers[0].self_attn.o_proj.base_layer.weight.detach().clone()
    with pytest.raises(peftkit.MergeError, match="non-linear function of the layer's output.*cannot be merged"):
        peftkit.merge_and_unload(model)
    assert torch.equal(model.model.layers[0].self_attn.o_proj.base_layer.weight, weight)
    assert torch.equal(model_output(model, ids), expected)
    with peftkit.disable_adapters(model):
        assert torch.equal(model_output(model, ids), model_output(tiny_llama(), ids))


def test_half_precision_base_keeps_its_dtype() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8).to(torch.bfloat16)
    model = peftkit.adapt(nn.Sequential(layer), "bottleneck", target_modules=["0"], bottleneck_size=2)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(model(x), layer(x))
    randomize_adapters(model)
    adapter = model[0].adapters["default"]
    assert adapter.up.weight.dtype == torch.float32 and model(x).dtype == torch.bfloat16
    expected = layer(x) + adapter.up(adapter.act(adapter.down(layer(x).float()))).to(torch.bfloat16)
    assert torch.equal(model(x), expected)
