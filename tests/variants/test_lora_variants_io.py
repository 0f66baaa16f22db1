"""Weight-init adapters saved as plain LoRA (rank 2r) for the original base; PEFT's PiSSA/EVA files read back;
LoRA+ param groups as PEFT's helper; LoRA-FA's frozen A.

Tolerance: the converted adapter computes `W + s(B A - B0 A0)` where the trained model
computes `(W - s B0 A0) + s B A`: the same sum in another order, 1e-5 in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import randomize_adapters, tiny_llama, train_steps
from peft.optimizers import create_loraplus_optimizer

import peftkit
from peftkit.errors import ConfigError
from peftkit.record import adapter_methods
from peftkit.training.optim import loraplus_param_groups
from variants.lora_eva import initialize_eva

TARGETS = ["q_proj", "v_proj", "up_proj"]
ATOL = 1e-5


@pytest.mark.parametrize("method, init", [("lora", "pissa"), ("lora", "olora"), ("dora", "pissa")])
def test_weight_init_adapter_loads_on_the_original_base(
    tmp_path: Path, ids: torch.Tensor, method: str, init: str
) -> None:
    model = peftkit.adapt(tiny_llama(), method, target_modules=TARGETS, r=4, alpha=8, init=init)
    train_steps(model, ids, steps=3)
    trained = model(input_ids=ids).logits
    peftkit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)

    ours = peftkit.load_adapter(tiny_llama(), tmp_path)  # the original, unchanged base
    torch.testing.assert_close(ours(input_ids=ids).logits, trained, rtol=ATOL, atol=ATOL)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(theirs(input_ids=ids).logits, trained, rtol=ATOL, atol=ATOL)


def test_peft_pissa_files_load_in_peftkit(tmp_path: Path, ids: torch.Tensor) -> None:
    """PEFT's own PiSSA adapter, both ways it saves one: as is (for its residual base) and converted (for W)."""
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa")
    model = peft.get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path / "initial")
    randomize_adapters(model)
    trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "pissa")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")

    residual = peftkit.load_adapter(model.unload(), tmp_path / "pissa")  # the init is not run again on load
    torch.testing.assert_close(residual(input_ids=ids).logits, trained, rtol=ATOL, atol=ATOL)
    original = peftkit.load_adapter(tiny_llama(), tmp_path / "converted")
    torch.testing.assert_close(original(input_ids=ids).logits, trained, rtol=ATOL, atol=ATOL)


def eva_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 128, (4, 16), generator=generator)} for _ in range(2)]


def test_eva_adapter_round_trips_through_peft(tmp_path: Path, ids: torch.Tensor) -> None:
    targets = ["q_proj", "o_proj", "down_proj"]
    model = peftkit.adapt(tiny_llama(), "lora", target_modules=targets, r=4, alpha=8, init="eva", eva_batches=2)
    ranks = initialize_eva(model, eva_batches())
    randomize_adapters(model)
    expected = model(input_ids=ids).logits
    peftkit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva"
    assert config["rank_pattern"] == {p: r for p, r in ranks.items() if r != 4}
    for loaded in (
        peftkit.load_adapter(tiny_llama(), tmp_path),
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path),
    ):
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=ATOL, atol=ATOL)


def test_loraplus_groups_equal_peft() -> None:
    ours = peftkit.adapt(tiny_llama(), "dora", target_modules=TARGETS + ["embed_tokens"], r=4, lora_bias=False)
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(target_modules=TARGETS + ["embed_tokens"], r=4, use_dora=True)
    )
    roles = adapter_methods(ours)["default"].parameter_roles(ours, "default")
    groups = loraplus_param_groups(ours, roles, lr=1e-4, ratio=16, weight_decay=0.01)
    reference = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16, loraplus_weight_decay=0.01
    ).param_groups
    assert len(groups) == len(reference) == 4
    for mine, peft_group in zip(groups, reference, strict=False):
        assert (mine["lr"], mine["weight_decay"]) == (peft_group["lr"], peft_group["weight_decay"])
        assert sorted(p.shape for p in mine["params"]) == sorted(p.shape for p in peft_group["params"])
    assert [len(g["params"]) for g in groups] == [6, 2, 13, 0]  # A; embedding A, B; B and DoRA magnitudes; no bias


def test_freeze_a_trains_b_only(ids: torch.Tensor) -> None:
    model = peftkit.adapt(tiny_llama(), "lora", target_modules=TARGETS, r=4, freeze_a=True)
    a_before = {p: h.adapters["default"].lora_A.weight.clone() for p, h in peftkit.injection.hosts(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(p.shape[1] == 4 for p in trainable)  # the six B's [out, r]
    train_steps(model, ids, steps=2)
    for path, host in peftkit.injection.hosts(model):
        assert torch.equal(host.adapters["default"].lora_A.weight, a_before[path])
        assert host.adapters["default"].lora_B.weight.abs().sum() > 0
    assert len(peftkit.adapter_state_dict(model)) == 12  # A is still saved


def test_freeze_a_refused_where_there_is_no_a() -> None:
    with pytest.raises(ConfigError, match="method 'bottleneck' has no option 'freeze_a'"):
        peftkit.adapt(tiny_llama(), "bottleneck", freeze_a=True)
