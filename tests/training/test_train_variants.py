"""`peftkit train` with LoRA's inits and training variants: EVA reads the run's first batches, LoRA+ groups
the optimizer, a PiSSA run saves an adapter for the original base, LoftQ under model.quantization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from tiny_models import make_model_dir
from tiny_run import write_run

import peftkit
from peftkit.errors import ConfigError
from peftkit.training.config import TrainingConfig, load_config
from peftkit.training.loop import _param_groups, train
from peftkit.training.simulate import Simulation


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_eva_loraplus_freeze_a_run(tmp_path: Path, model_dir: Path) -> None:
    method = {"init": "eva", "eva_batches": 2, "target_modules": ["q_proj", "o_proj", "down_proj"]}
    path = write_run(tmp_path, model_dir, method=method, training={"max_steps": 3, "loraplus_lr_ratio": 4})
    result = train(load_config(path, ["method.freeze_a=true"]), quiet=True)  # as --set gives it
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva"
    ranks = {p: h.adapters["default"].r for p, h in peftkit.injection.hosts(result.model)}
    assert sum(ranks.values()) == 4 * 6 and len(set(ranks.values())) > 1
    assert config["rank_pattern"] == {p: r for p, r in ranks.items() if r != 4}
    assert not any(h.adapters["default"].lora_A.weight.requires_grad for _, h in peftkit.injection.hosts(result.model))


def test_pissa_run_saves_for_the_original_base(tmp_path: Path, model_dir: Path) -> None:
    path = write_run(tmp_path, model_dir, method={"init": "pissa"}, training={"max_steps": 2})
    result = train(load_config(path), quiet=True)
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = result.model(input_ids=ids).logits
    from transformers import AutoModelForCausalLM

    loaded = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "run" / "adapter")
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_loftq_under_model_quantization_reads_the_checkpoint(tmp_path: Path, model_dir: Path) -> None:
    path = write_run(
        tmp_path,
        model_dir,
        method={"name": "qlora", "init": "loftq"},
        model={"quantization": {}},
        training={"max_steps": 1},
    )
    result = train(load_config(path), quiet=True)
    assert sum(1 for _ in peftkit.injection.hosts(result.model)) > 0


@pytest.mark.parametrize("value", [0, -1.5])
def test_loraplus_ratio_must_be_positive(value: float) -> None:
    with pytest.raises(ConfigError, match=f"training.loraplus_lr_ratio must be above 0 \\(or null\\), got {value}"):
        TrainingConfig(loraplus_lr_ratio=value)


def test_loraplus_needs_low_rank_pairs() -> None:
    model = peftkit.adapt(tiny_llama(), "bottleneck")
    with pytest.raises(ConfigError, match="loraplus_lr_ratio needs a method of low-rank pairs.*bottleneck has none"):
        _param_groups(model, TrainingConfig(loraplus_lr_ratio=4))


def test_freeze_a_estimate_counts_no_gradient_or_state_for_a(tmp_path: Path, model_dir: Path) -> None:
    """The estimate's simulated model trains B only: A gets no gradient and no AdamW state."""
    trained, states = {}, {}
    for frozen in (False, True):
        path = write_run(tmp_path / str(frozen), model_dir, method={"r": 8, "freeze_a": frozen})
        simulation = Simulation(load_config(path, data_files=False))
        trained[frozen] = sum(p.numel() for p in simulation.model.parameters() if p.requires_grad)
        states[frozen] = len(simulation.optimizer.state)
    pairs = states[False] // 2
    assert states[True] == pairs and trained[True] < trained[False]
