"""LoRA's inits against PEFT's: PiSSA, OLoRA, LoftQ (same quantizer), EVA; and what each refuses.

Tolerances: the deterministic inits run the same float32 LAPACK calls on the same
weights as PEFT, so factors agree to 1e-5 relative (SVD/QR directions are unique up
to sign, and both sides get the same signs from the same call). EVA: PEFT's
incremental, randomized PCA against an exact one here; the rank budget is the same,
each layer's rank within 1 (a component at the budget's edge can fall either side),
and each shared direction agrees to |cos| > 0.98 (PEFT stops at tau = 0.99 between its steps).
"""

from __future__ import annotations

import copy
import inspect

import peft
import peft.utils.loftq_utils
import pytest
import torch
from conftest import tiny_llama
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.weights import read_weight
from variants.lora_eva import initialize_eva

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
RTOL = 1e-5


def peftkit_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Module path -> (A, B, base weight) of the default adapter."""
    return {
        path: (
            host.adapters["default"].lora_A.weight,
            host.adapters["default"].lora_B.weight,
            read_weight(host.base_layer),
        )
        for path, host in peftkit.injection.hosts(model)
    }


def peft_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return {
        name.removeprefix("base_model.model."): (
            m.lora_A["default"].weight,
            m.lora_B["default"].weight,
            m.base_layer.weight,
        )
        for name, m in model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    error = (ours.float() - theirs.float()).norm() / theirs.float().norm()
    assert error < RTOL, f"relative error {error:.2e}"


def assert_same_adapters(ours: nn.Module, theirs: nn.Module) -> None:
    mine, peft_side = peftkit_pairs(ours), peft_pairs(theirs)
    assert sorted(mine) == sorted(peft_side) and len(mine) == 8
    for path in mine:
        for a, b in zip(mine[path], peft_side[path], strict=False):
            assert_close(a, b)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_equal_peft_and_keep_the_model(init: str, ids: torch.Tensor) -> None:
    reference = tiny_llama()(input_ids=ids).logits
    ours = peftkit.adapt(tiny_llama(), "lora", target_modules=TARGETS, r=4, alpha=8, init=init)
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights=init)
    )
    assert_same_adapters(ours, theirs)
    logits = ours(input_ids=ids).logits
    torch.testing.assert_close(logits, theirs(input_ids=ids).logits, rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(logits, reference, rtol=RTOL, atol=1e-5)  # W_res + s B A = W


def test_pissa_top_directions_and_randomized_svd(ids: torch.Tensor) -> None:
    """Exact PiSSA's s B A is W's best rank-r approximation; pissa_niter=4 gets within 2% of its error."""
    base = tiny_llama()
    weights = {p: m.weight.detach().clone() for p, m in base.named_modules() if p.endswith("up_proj")}
    errors = {}
    for niter in (0, 4):
        torch.manual_seed(0)
        model = peftkit.adapt(
            copy.deepcopy(base), "lora", target_modules=["up_proj"], r=8, alpha=16, init="pissa", pissa_niter=niter
        )
        for path, (a, b, residual) in peftkit_pairs(model).items():
            errors.setdefault(niter, []).append(residual.norm().item())
            torch.testing.assert_close(residual + 2 * b @ a, weights[path], rtol=1e-5, atol=1e-5)
    exact = torch.linalg.svdvals(next(iter(weights.values())))[8:].norm().item()
    assert errors[0][0] == pytest.approx(exact, rel=1e-4)
    for exact_error, randomized in zip(errors[0], errors[4], strict=False):
        assert exact_error <= randomized <= 1.02 * exact_error


def _peft_loftq_on_cpu() -> object:
    """PEFT's own `loftq_init`, with its one CUDA-only line (the device bitsandbytes quantizes on) set to the CPU."""
    source = inspect.getsource(peft.utils.loftq_utils.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert line in source
    namespace = dict(vars(peft.utils.loftq_utils))
    exec(source.replace(line, 'compute_device = "cpu"'), namespace)  # noqa: S102 - PEFT's installed source
    return namespace["loftq_init"]


def test_loftq_equals_peft(monkeypatch: pytest.MonkeyPatch, ids: torch.Tensor) -> None:
    """Same bitsandbytes NF4 (blocksize 64, no double quantization), same 3 alternations: same factors and Q."""
    monkeypatch.setattr(peft.tuners.lora.layer, "loftq_init", _peft_loftq_on_cpu())
    shape = {"hidden_size": 64, "intermediate_size": 128}  # rows of whole 64-blocks, as bitsandbytes' CPU kernels need
    # alpha = r: PEFT's LoftQ leaves the scaling out, so the two agree where it is 1.
    ours = peftkit.adapt(
        tiny_llama(**shape),
        "qlora",
        target_modules=TARGETS,
        r=4,
        alpha=4,
        init="loftq",
        loftq_iter=3,
        quantization={"double_quant": False},
    )
    loftq = peft.LoftQConfig(loftq_bits=4, loftq_iter=3)
    config = peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=4, init_lora_weights="loftq", loftq_config=loftq)
    theirs = peft.get_peft_model(tiny_llama(**shape), config)
    assert_same_adapters(ours, theirs)
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_over_a_4bit_base_the_residual_is_quantized(init: str) -> None:
    """||W - (Q + s B A)|| below plain QLoRA's ||W - Q|| on every layer; LoftQ's error falls with iterations.

    (OLoRA's residual is quantized the same way, but its B A is not W's principal part, so on
    random weights its error is plain QLoRA's; the Gemma table in benchmarks/ has all three.)"""
    weights = {p: m.weight.detach().clone() for p, m in tiny_llama().named_modules() if p.endswith(tuple(TARGETS))}
    plain = peftkit_pairs(peftkit.adapt(tiny_llama(), "qlora", target_modules=TARGETS, r=8, alpha=16))
    errors = {}
    for iterations in (1, 4):
        model = peftkit.adapt(
            tiny_llama(), "qlora", target_modules=TARGETS, r=8, alpha=16, init=init, loftq_iter=iterations
        )
        for path, (a, b, q) in peftkit_pairs(model).items():
            errors.setdefault(iterations, {})[path] = (weights[path] - (q + 2 * b @ a)).norm().item()
    for path, (_, _, q) in plain.items():
        assert errors[1][path] < 0.95 * (weights[path] - q).norm().item()
        if init == "loftq":
            assert errors[4][path] < errors[1][path]


def test_dora_starts_from_the_changed_base(ids: torch.Tensor) -> None:
    """DoRA's magnitude is ||W' + s B A|| of the new base: the model starts as the base (PiSSA) in DoRA too."""
    reference = tiny_llama()(input_ids=ids).logits
    model = peftkit.adapt(tiny_llama(), "dora", target_modules=TARGETS, r=4, alpha=8, init="pissa")
    torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)


def batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        input_ids = torch.randint(0, 128, (4, 16), generator=generator)
        mask = torch.ones_like(input_ids)
        mask[0, 12:] = 0
        out.append({"input_ids": input_ids, "attention_mask": mask})
    return out


EVA_TARGETS = ["q_proj", "o_proj", "down_proj"]  # distinct inputs each, so no ties between layers


def test_eva_ranks_and_directions_agree_with_peft() -> None:
    data = batches(2)
    ours = peftkit.adapt(tiny_llama(), "lora", target_modules=EVA_TARGETS, r=4, alpha=8, init="eva", eva_batches=2)
    ranks = initialize_eva(ours, data)
    config = peft.LoraConfig(
        target_modules=EVA_TARGETS, r=4, lora_alpha=8, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0)
    )
    theirs = peft.get_peft_model(tiny_llama(), config)
    peft.initialize_lora_eva_weights(theirs, data, show_progress_bar=False)
    peft_side = peft_pairs(theirs)
    theirs_ranks = {p: peft_side[p][0].shape[0] for p in peft_side}
    assert sum(ranks.values()) == sum(theirs_ranks.values()) == 4 * 6
    assert all(abs(ranks[p] - theirs_ranks[p]) <= 1 for p in ranks)  # a component at the budget's edge may swap
    assert len(set(ranks.values())) > 1  # the ranks were redistributed
    for path, (a, b, _) in peftkit_pairs(ours).items():
        k = min(a.shape[0], theirs_ranks[path])
        cosines = torch.nn.functional.cosine_similarity(a[:k], peft_side[path][0][:k].float(), dim=1).abs()
        assert cosines.min() > 0.98, (path, cosines)
        assert not b.any()
    method = peftkit.record.adapter_methods(ours)["default"]
    assert method.config.rank_pattern == {p: r for p, r in ranks.items() if r != 4}
    assert method.config.alpha_pattern == {p: 8 * r / 4 for p, r in ranks.items() if r != 4}


def test_unknown_init_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="'kaiming' \\| 'gaussian' \\| 'pissa' \\| 'olora' \\| 'loftq' \\| 'eva'"):
        peftkit.adapt(tiny_llama(), "lora", init="corda")


def test_loftq_needs_a_4bit_base() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="init 'loftq' fits the adapter to a 4-bit base.*use method 'qlora'"):
        peftkit.adapt(model, "lora", target_modules=TARGETS, init="loftq")
    assert not list(peftkit.injection.hosts(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.embed = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.linear = nn.Linear(8, 8)


@pytest.mark.parametrize("target, kind", [("conv", "Conv2d"), ("embed", "Embedding"), ("attn", "MultiheadAttention")])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_name_the_layer_they_do_not_define(target: str, kind: str, init: str) -> None:
    model = ConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        UnsupportedModuleError, match=f"init '{init}' is defined for linear layers.*'{target}' is a {kind}"
    ):
        peftkit.adapt(model, "lora", target_modules=["linear", target], init=init)
    assert isinstance(model.linear, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_eva_without_data_says_so() -> None:
    model = peftkit.adapt(tiny_llama(), "lora", target_modules=EVA_TARGETS, init="eva")
    with pytest.raises(ConfigError, match="init 'eva' needs training data"):
        initialize_eva(model, [])
    with pytest.raises(ConfigError, match="EVA needs init 'eva'"):
        initialize_eva(peftkit.adapt(tiny_llama(), "lora", target_modules=EVA_TARGETS), batches(1))


@pytest.mark.parametrize("option, value", [("pissa_niter", -1), ("loftq_iter", 0), ("eva_rho", 0.5)])
def test_init_options_out_of_range(option: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"LoraConfig.{option} must be"):
        peftkit.adapt(tiny_llama(), "lora", **{option: value})
