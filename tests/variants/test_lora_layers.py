"""LoRA and DoRA on convolutions, dtypes and `lora_bias`, checked against HF PEFT both ways.

Each case builds the same seeded layer twice, gives peftkit's adapter non-zero values,
copies them into PEFT's (the state-dict keys must be PEFT's), and compares outputs
(1e-5), merges (1e-4), and files written by one and read by the other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from conftest import randomize_adapters
from torch import nn

import peftkit
import peftkit.injection
import peftkit.peft_format

# PEFT's own warnings on layouts these tests use on purpose (grouped convs, a 1-D lora_B.bias).
pytestmark = [
    pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
]

OUTPUT_ATOL = 1e-5
MERGE_ATOL = 1e-4


class Net(nn.Module):
    """One layer under a name PEFT and peftkit can both target."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# name -> (layer factory, input shape)
CONVS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7)),
    "conv2d-1x1": (lambda: nn.Conv2d(4, 6, 1), (2, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(4, 6, (3, 2, 3), padding=1), (2, 4, 5, 4, 5)),
}
GROUPED = (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 6, 6))


def net(make_layer: Callable[[], nn.Module], seed: int = 0, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net(make_layer()).to(dtype)


def inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)


def ours(
    make_layer: Callable[[], nn.Module], method: str, dtype: torch.dtype = torch.float32, **options: object
) -> Net:
    """peftkit's adapter (r=4, alpha=8) on the seeded layer, every trainable tensor moved off its init."""
    model = peftkit.adapt(net(make_layer, dtype=dtype), method, r=4, alpha=8, target_modules=["layer"], **options)
    randomize_adapters(model)
    return model


def peft_config(method: str, **options: object) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["layer"], use_dora=method == "dora", **options)


def peft_twin(model: Net, make_layer: Callable[[], nn.Module], method: str, **options: object) -> nn.Module:
    """PEFT's adapter on an identical base, holding exactly peftkit's tensors (same key names)."""
    dtype = model.layer.base_layer.weight.dtype
    theirs = peft.get_peft_model(net(make_layer, dtype=dtype), peft_config(method, **options))
    state = peftkit.adapter_state_dict(model)
    assert set(peft.get_peft_model_state_dict(theirs)) == set(state)
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    return theirs


CASES = [(name, method) for name in CONVS for method in ("lora", "dora")]


@pytest.mark.parametrize(("name", "method"), CASES)
def test_conv_output_keys_and_merge_equal_peft(name: str, method: str) -> None:
    make_layer, shape = CONVS[name]
    model = ours(make_layer, method)
    theirs = peft_twin(model, make_layer, method)
    x = inputs(shape)
    expected = model(x)
    torch.testing.assert_close(expected, theirs(x), atol=OUTPUT_ATOL, rtol=0)
    peftkit.merge(model)
    torch.testing.assert_close(model(x), expected, atol=MERGE_ATOL, rtol=0)
    torch.testing.assert_close(
        model.layer.base_layer.weight, theirs.merge_and_unload().layer.weight, atol=MERGE_ATOL, rtol=0
    )
    peftkit.unmerge(model)
    torch.testing.assert_close(model.layer.base_layer.weight, net(make_layer).layer.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), expected, atol=OUTPUT_ATOL, rtol=0)


@pytest.mark.parametrize(("name", "method"), CASES)
def test_conv_files_cross_between_peft_and_peftkit(name: str, method: str, tmp_path: Path) -> None:
    make_layer, shape = CONVS[name]
    x = inputs(shape)
    model = ours(make_layer, method)
    peftkit.save_adapter(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(net(make_layer), tmp_path / "ours")
    torch.testing.assert_close(loaded(x), model(x), atol=OUTPUT_ATOL, rtol=0)

    theirs = peft.get_peft_model(net(make_layer), peft_config(method, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "theirs")
    back = peftkit.load_adapter(net(make_layer), tmp_path / "theirs")
    assert peftkit.adapter_methods(back)["default"].name == method
    torch.testing.assert_close(back(x), theirs(x), atol=OUTPUT_ATOL, rtol=0)


def test_dora_conv_magnitude_has_peft_shape_and_starts_at_the_kernel_norm() -> None:
    model = peftkit.adapt(net(CONVS["conv2d"][0]), "dora", r=4, target_modules=["layer"])
    magnitude = model.layer.adapters["default"].lora_magnitude_vector
    assert magnitude.shape == (1, 6, 1, 1)
    torch.testing.assert_close(magnitude.flatten(), model.layer.base_layer.weight.flatten(1).norm(dim=1))


def test_dora_conv_dropout_path_equals_peft_in_training() -> None:
    make_layer, shape = CONVS["conv2d"]
    model = ours(make_layer, "dora", dropout=0.3)
    theirs = peft_twin(model, make_layer, "dora", lora_dropout=0.3)
    model.train(), theirs.train()
    x = inputs(shape)
    torch.manual_seed(5)
    mine = model(x)
    torch.manual_seed(5)
    torch.testing.assert_close(mine, theirs(x), atol=OUTPUT_ATOL, rtol=0)
    assert (mine - model.eval()(x)).abs().max() > 1e-3  # the dropout masks mattered


def test_grouped_conv_lora_equals_peft_and_refuses_to_merge(tmp_path: Path) -> None:
    make_layer, shape = GROUPED
    model = ours(make_layer, "lora")
    assert model.layer.adapters["default"].lora_B.weight.shape == (6, 2, 1, 1)  # B grouped like the base
    theirs = peft_twin(model, make_layer, "lora")
    x = inputs(shape)
    torch.testing.assert_close(model(x), theirs(x), atol=OUTPUT_ATOL, rtol=0)
    with pytest.raises(peftkit.MergeError, match="groups=2"):
        peftkit.merge(model)
    peftkit.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(net(make_layer), tmp_path)
    torch.testing.assert_close(loaded(x), model(x), atol=OUTPUT_ATOL, rtol=0)


def test_grouped_conv_bad_rank_and_dora_are_typed_errors() -> None:
    with pytest.raises(peftkit.UnsupportedModuleError, match="rank divisible by 2.*got r=3"):
        peftkit.adapt(net(GROUPED[0]), "lora", r=3, target_modules=["layer"])
    with pytest.raises(peftkit.UnsupportedModuleError, match="DoRA cannot adapt a Conv2d with groups=2"):
        peftkit.adapt(net(GROUPED[0]), "dora", r=4, target_modules=["layer"])


LINEAR = (lambda: nn.Linear(6, 5), (3, 6))
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Half precision rounds differently in each library's order of operations: a few ulps.
DTYPE_ATOL = {torch.float64: 1e-10, torch.float32: OUTPUT_ATOL, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_adapters_compute_in_the_base_dtype_as_peft_does(method: str, dtype: torch.dtype, layer: str) -> None:
    make_layer, shape = LINEAR if layer == "linear" else CONVS["conv2d"]
    model = ours(make_layer, method, dtype=dtype)
    adapter_dtype = dtype if dtype in (torch.float64, torch.float32) else torch.float32
    assert {p.dtype for p in model.layer.adapters["default"].parameters()} == {adapter_dtype}
    theirs = peft_twin(model, make_layer, method)
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {adapter_dtype}
    x = inputs(shape, dtype)
    out = model(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, theirs(x), atol=DTYPE_ATOL[dtype], rtol=0)


def test_dora_on_a_float64_base_with_bias_runs_in_float64() -> None:
    """The bug: `(1 - f) * bias` promoted to float64 while the adapter computed in float32."""
    model = ours(LINEAR[0], "dora", dtype=torch.float64)
    x = inputs(LINEAR[1], torch.float64)
    weight, bias = model.layer.base_layer.weight, model.layer.base_layer.bias
    adapter = model.layer.adapters["default"]
    up, down = adapter.low_rank_factors()
    combined = weight + up @ down
    dense = (adapter.lora_magnitude_vector / combined.norm(dim=1)).unsqueeze(1) * combined
    torch.testing.assert_close(model(x), x @ dense.T + bias, atol=1e-12, rtol=0)


BIASED = {"linear": LINEAR, "conv1d": CONVS["conv1d"], "conv2d": CONVS["conv2d"]}


@pytest.mark.parametrize("name", sorted(BIASED))
def test_lora_bias_equals_peft_and_merges_into_the_base_bias(name: str, tmp_path: Path) -> None:
    make_layer, shape = BIASED[name]
    model = ours(make_layer, "lora", lora_bias=True)
    adapter = model.layer.adapters["default"]
    assert adapter.lora_B.bias is not None and adapter.lora_B.bias.requires_grad
    theirs = peft_twin(model, make_layer, "lora", lora_bias=True)
    assert "base_model.model.layer.lora_B.bias" in peftkit.adapter_state_dict(model)
    x = inputs(shape)
    expected = model(x)
    torch.testing.assert_close(expected, theirs(x), atol=OUTPUT_ATOL, rtol=0)
    peftkit.save_adapter(model, tmp_path)
    assert peftkit.peft_format.read_adapter_config(tmp_path)["lora_bias"] is True
    loaded = peft.PeftModel.from_pretrained(net(make_layer), tmp_path)
    torch.testing.assert_close(loaded(x), expected, atol=OUTPUT_ATOL, rtol=0)
    base_bias = model.layer.base_layer.bias.detach().clone()
    peftkit.merge(model)
    torch.testing.assert_close(model(x), expected, atol=MERGE_ATOL, rtol=0)
    merged_bias = theirs.merge_and_unload().layer.bias
    torch.testing.assert_close(model.layer.base_layer.bias, merged_bias, atol=MERGE_ATOL, rtol=0)
    peftkit.unmerge(model)
    torch.testing.assert_close(model.layer.base_layer.bias, base_bias, atol=1e-6, rtol=0)


def test_lora_bias_starts_at_zero() -> None:
    model = peftkit.adapt(net(LINEAR[0]), "lora", r=4, lora_bias=True, target_modules=["layer"])
    assert torch.count_nonzero(model.layer.adapters["default"].lora_B.bias) == 0
    x = inputs(LINEAR[1])
    torch.testing.assert_close(model(x), net(LINEAR[0])(x))


def test_lora_bias_without_a_base_bias_trains_but_refuses_to_merge() -> None:
    model = ours(lambda: nn.Linear(6, 5, bias=False), "lora", lora_bias=True)
    with pytest.raises(peftkit.MergeError, match="lora_bias.*'layer' has none"):
        peftkit.merge(model)
    assert not model.layer.merged_adapters


def test_lora_bias_is_refused_where_peft_refuses_it() -> None:
    with pytest.raises(peftkit.ConfigError, match="lora_bias must be False"):
        peftkit.adapt(net(LINEAR[0]), "dora", lora_bias=True, target_modules=["layer"])
    with pytest.raises(peftkit.UnsupportedModuleError, match="lora_bias=True is not supported on Embedding"):
        peftkit.adapt(net(lambda: nn.Embedding(10, 4)), "lora", lora_bias=True, target_modules=["layer"])


class Attention(nn.Module):
    """Self-attention through nn.MultiheadAttention, returning only the attended values."""

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x)[0]


def attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention()


def adapted_attention(zero_out_proj: bool = False) -> Attention:
    model = peftkit.adapt(attention(), "lora", r=2, alpha=4, target_modules=["mha"])
    randomize_adapters(model)
    if zero_out_proj:
        with torch.no_grad():
            model.mha.adapters["default"].base_layer["out_proj"].lora_B.weight.zero_()
    return model


def peft_attention(model: Attention) -> nn.Module:
    theirs = peft.get_peft_model(attention(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["mha"]))
    state = peftkit.adapter_state_dict(model)
    assert set(peft.get_peft_model_state_dict(theirs)) == set(state)  # mha.lora_A/B, mha.base_layer.out_proj.lora_A/B
    assert not peft.set_peft_model_state_dict(theirs, state).unexpected_keys
    return theirs


ATTENTION_INPUT = (2, 5, 8)


def test_mha_is_the_dense_formula_and_merges_exactly() -> None:
    model = adapted_attention()
    adapter = model.mha.adapters["default"]
    x = inputs(ATTENTION_INPUT)
    out = model(x)
    reference = attention()
    with torch.no_grad():
        reference.mha.in_proj_weight += 2 * adapter.lora_B.weight @ adapter.lora_A.weight
        out_pair = adapter.base_layer["out_proj"]
        reference.mha.out_proj.weight += 2 * out_pair.lora_B.weight @ out_pair.lora_A.weight
    torch.testing.assert_close(out, reference(x), atol=OUTPUT_ATOL, rtol=0)
    assert (out - attention()(x)).abs().max() > 1e-2
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adapter.parameters())
    peftkit.merge(model)
    merged_in = model.mha.base_layer.in_proj_weight
    torch.testing.assert_close(merged_in, reference.mha.in_proj_weight, atol=MERGE_ATOL, rtol=0)
    torch.testing.assert_close(model(x), out, atol=MERGE_ATOL, rtol=0)
    peftkit.unmerge(model)
    torch.testing.assert_close(model.mha.base_layer.out_proj.weight, attention().mha.out_proj.weight, atol=1e-6, rtol=0)
    plain = peftkit.merge_and_unload(model)
    assert type(plain.mha) is nn.MultiheadAttention
    torch.testing.assert_close(plain(x), out, atol=MERGE_ATOL, rtol=0)


def test_mha_equals_peft_on_the_in_projection_and_files_cross(tmp_path: Path) -> None:
    model = adapted_attention(zero_out_proj=True)
    theirs = peft_attention(model)
    x = inputs(ATTENTION_INPUT)
    expected = model(x)
    torch.testing.assert_close(expected, theirs(x), atol=OUTPUT_ATOL, rtol=0)
    torch.testing.assert_close(theirs.merge_and_unload()(x), expected, atol=MERGE_ATOL, rtol=0)
    peftkit.save_adapter(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(attention(), tmp_path / "ours")
    torch.testing.assert_close(loaded(x), expected, atol=OUTPUT_ATOL, rtol=0)
    peft_attention(model).save_pretrained(tmp_path / "theirs")
    back = peftkit.load_adapter(attention(), tmp_path / "theirs")
    torch.testing.assert_close(back(x), expected, atol=OUTPUT_ATOL, rtol=0)


def test_peft_0_21_applies_the_mha_out_projection_update_twice() -> None:
    """PEFT's MultiheadAttention.merge adds out_proj's delta by hand and again through the nested layer's merge
    (huggingface/peft#3774, open). peftkit applies it once; this pins the difference, so a fixed PEFT shows here."""
    model = adapted_attention()
    theirs = peft_attention(model)
    x = inputs(ATTENTION_INPUT)
    assert (model(x) - theirs(x)).abs().max() > 1e-3
    with torch.no_grad():
        model.mha.adapters["default"].base_layer["out_proj"].lora_B.weight.mul_(2)
    torch.testing.assert_close(model(x), theirs(x), atol=OUTPUT_ATOL, rtol=0)


def test_mha_refusals_are_typed() -> None:
    torch.manual_seed(0)
    with pytest.raises(peftkit.UnsupportedModuleError, match="kdim=4, vdim=4, embed_dim=8"):
        peftkit.adapt(Attention(kdim=4, vdim=4), "lora", target_modules=["mha"])
    with pytest.raises(peftkit.UnsupportedModuleError, match="dropout=0.1"):
        peftkit.adapt(attention(), "lora", dropout=0.1, target_modules=["mha"])
    with pytest.raises(peftkit.UnsupportedModuleError, match="MultiheadAttention, which this method cannot adapt"):
        peftkit.adapt(attention(), "dora", target_modules=["mha"])  # PEFT has no DoRA on it either
    model = adapted_attention()
    with pytest.raises(peftkit.AdapterStateError, match="cannot be routed apart in a mixed batch"):
        with peftkit.mixed_batch(model, ["default", "base"]):
            model(inputs(ATTENTION_INPUT))
