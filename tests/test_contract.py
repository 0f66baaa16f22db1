"""The contract every registered method keeps, over a matrix of small models (HF PEFT's table-driven idea).

Each method runs on each model: a Llama-like decoder, GPT-2 (Conv1D layers), BERT (a task head),
a plain MLP, a convolutional net and an embedding model. A pair the method cannot adapt must
say so with a typed error, listed in UNSUPPORTED, so a new gap shows up as a failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from tiny_models import tiny_convnet, tiny_embedding_model, tiny_mlp
from torch import nn

import peftkit
from peftkit.injection import hosts
from peftkit.quant import is_quantized, merge_and_dequantize


def _seeded(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


# kind -> (builder, target_modules, input, forward)
MODELS: dict[str, tuple[Callable[[], nn.Module], list[str], Callable[[], Any], Callable[[nn.Module, Any], Any]]] = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "up_proj"], _ids, _logits),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], _ids, _logits),
    "bert": (tiny_bert, ["query", "value"], _ids, _logits),
    "mlp": (tiny_mlp, ["0", "2"], _seeded(3, 64), nn.Module.__call__),
    "convnet": (tiny_convnet, ["0", "3"], _seeded(2, 3, 8, 8), nn.Module.__call__),
    "embedding": (tiny_embedding_model, ["0", "1"], _ids, nn.Module.__call__),
}

# (method, model kind) -> the error adapting raises, and what its message says.
UNSUPPORTED: dict[tuple[str, str], tuple[type[Exception], str]] = {
    ("bottleneck", "convnet"): (peftkit.UnsupportedModuleError, "Conv2d"),
    ("bottleneck", "embedding"): (peftkit.UnsupportedModuleError, "Embedding"),
    ("head", "mlp"): (peftkit.TargetNotFoundError, "no output head"),
    ("head", "convnet"): (peftkit.TargetNotFoundError, "no output head"),
    ("head", "embedding"): (peftkit.TargetNotFoundError, "no output head"),
}
PAIRS = [(method, kind) for method in peftkit.available_methods() for kind in sorted(MODELS)]
SUPPORTED = [pair for pair in PAIRS if pair not in UNSUPPORTED]

Adapted = tuple[str, str, nn.Module, Callable[[nn.Module], Any]]


@pytest.fixture(params=SUPPORTED, ids=lambda pair: f"{pair[0]}-{pair[1]}")
def adapted(request: pytest.FixtureRequest) -> Adapted:
    """(method, model kind, the adapted model, its forward on a fixed input)."""
    method, kind = request.param
    build, targets, make_input, forward = MODELS[kind]
    model = peftkit.adapt(build().eval(), method, target_modules=targets)
    x = make_input()
    return method, kind, model, lambda m: forward(m, x)


@pytest.mark.parametrize(("method", "kind"), sorted(UNSUPPORTED))
def test_an_unsupported_pair_says_so_and_leaves_the_model_alone(method: str, kind: str) -> None:
    build, targets, _, _ = MODELS[kind]
    model = build().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    error, message = UNSUPPORTED[(method, kind)]
    with pytest.raises(error, match=message):
        peftkit.adapt(model, method, target_modules=targets)
    assert peftkit.list_adapters(model) == [] and not list(hosts(model))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_starts_equal_to_its_base(adapted: Adapted) -> None:
    method, kind, model, output = adapted
    if peftkit.get_method(method).trains_in_place:
        with pytest.raises(peftkit.AdapterStateError, match="no base output"):
            peftkit.set_adapters_enabled(model, False)
        base = output(MODELS[kind][0]().eval())
    else:  # the base as the method sees it (a quantizing method's base is the quantized one)
        with peftkit.disable_adapters(model):
            base = output(model)
    assert torch.equal(output(model), base)


def test_only_adapter_state_trains_and_training_moves_the_output(adapted: Adapted) -> None:
    _, _, model, output = adapted
    state = peftkit.adapter_methods(model)["default"].trainable_state(model, "default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, t in state.items() if isinstance(t, nn.Parameter)}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = output(model).detach()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        output(model).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (output(model) - before).abs().max() > 1e-4
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_output_is_base_output_plus_forward(adapted: Adapted) -> None:
    """`Adapter.output` and `Adapter.forward` are two ways to one answer, for every adapter."""
    method, _, model, output = adapted
    randomize_adapters(model)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        host.register_forward_pre_hook(lambda module, args, path=path: inputs.setdefault(path, args[0]))
        for path, host in hosts(model)
        if isinstance(host, peftkit.AdapterLayer)
    ]
    checked = 0
    with torch.no_grad():
        output(model)
        for handle in handles:
            handle.remove()
        for path, host in hosts(model):
            if path not in inputs:
                continue
            x, base_layer = inputs[path], host.base_layer
            base_output = base_layer(x)
            for adapter in host.adapters.values():
                whole = adapter.output(x, base_output, base_layer)
                torch.testing.assert_close(whole, base_output + adapter(x, base_output, base_layer))
                checked += 1
    assert checked == 0 if peftkit.get_method(method).trains_in_place else checked >= 2


def test_save_load_round_trip(adapted: Adapted, tmp_path: Path) -> None:
    method, kind, model, output = adapted
    randomize_adapters(model)
    expected = output(model)
    peftkit.save_adapter(model, tmp_path)
    loaded = peftkit.load_adapter(MODELS[kind][0]().eval(), tmp_path)
    assert peftkit.adapter_methods(loaded)["default"].name == method
    assert torch.equal(output(loaded), expected)


def test_merge_is_the_adapted_model_and_unmerge_the_base(adapted: Adapted) -> None:
    method, _, model, output = adapted
    in_place = peftkit.get_method(method).trains_in_place
    randomize_adapters(model, std=0.05)
    merged_expected = output(model).detach()
    with contextlib.nullcontext() if in_place else peftkit.disable_adapters(model):
        base = output(model).detach()
    adapters = [a for _, host in hosts(model) if isinstance(host, peftkit.AdapterLayer) for a in host.adapters.values()]
    if not all(a.mergeable for a in adapters):
        with pytest.raises(peftkit.MergeError):
            peftkit.merge(model)
        return
    if is_quantized(model):
        # Merging into 4 bits re-quantizes (lossy, measured in tests/variants/test_qlora.py);
        # the dequantizing merge is exact: dequant(Wq) + delta.
        torch.testing.assert_close(output(merge_and_dequantize(model)), merged_expected, atol=1e-4, rtol=0)
        return
    peftkit.merge(model)
    torch.testing.assert_close(output(model), merged_expected, atol=1e-4, rtol=0)
    peftkit.unmerge(model)
    torch.testing.assert_close(output(model), merged_expected, atol=1e-5, rtol=0)
    if not in_place:
        with peftkit.disable_adapters(model):
            torch.testing.assert_close(output(model), base, atol=1e-5, rtol=0)
