"""`peftkit estimate --num-processes N`: one process's share of the simulated step under ddp and fsdp."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_models import make_model_dir

from peftkit.cli import main
from peftkit.training.config import build_config
from peftkit.training.estimate import estimate
from peftkit.training.process_memory import per_process
from peftkit.training.simulate import Simulation

LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
SHARDED = ("trainable_parameters", "gradients", "optimizer_state")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"), hidden_size=128, intermediate_size=256, vocab_size=8000)


def _raw(model_dir: Path, **distributed: object) -> dict:
    return {
        "model": {"name": str(model_dir)},
        "method": dict(LORA),
        "data": {"train": "not-needed.jsonl", "max_length": 64},
        "training": {"batch_size": 4, "distributed": dict(distributed)},
    }


def _bytes(params: list) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.fixture(scope="module")
def simulated(model_dir: Path) -> tuple[Simulation, object]:
    simulation = Simulation(build_config(_raw(model_dir), data_files=False), "cpu")
    return simulation, simulation.step()


def test_fsdp_shards_resident_tensors_and_adds_the_gathered_blocks(model_dir: Path, simulated: tuple) -> None:
    simulation, one = simulated
    model = simulation.model
    config = build_config(_raw(model_dir, strategy="fsdp"), data_files=False)
    two = per_process(one, model, config, 2)
    frozen = _bytes([p for p in model.parameters() if not p.requires_grad])
    assert two.breakdown["base_weights"] == one.breakdown["base_weights"] - frozen // 2
    for name in SHARDED:
        assert two.breakdown[name] == -(-one.breakdown[name] // 2)
    layers = list(model.model.layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = _bytes([p for p in model.parameters() if id(p) not in in_layers])
    block = _bytes(list(layers[0].parameters()))
    block_grads = _bytes([p for p in layers[0].parameters() if p.requires_grad])
    # At the step's peak: the root gathered, its all-gather output and the last block's kept, one block's gradients.
    assert two.breakdown["temporaries"] == one.breakdown["temporaries"] + 2 * root + block + block_grads
    # This model is mostly its embedding and head (the root, gathered whole for the step): no saving here.
    assert two.peak_bytes == sum(two.breakdown.values()) > one.peak_bytes
    # At the forward's start the root and the first block are gathered beside their all-gather outputs.
    start = sum(two.breakdown[name] for name in ("base_weights", "trainable_parameters", "optimizer_state"))
    assert two.peak_bytes >= start + 2 * (root + block)
    # With one process the same file runs unsharded: the figure is the one-process step's.
    assert per_process(one, model, config, 1) == one


def test_a_short_step_of_a_model_mostly_head_peaks_at_the_forwards_start(model_dir: Path, simulated: tuple) -> None:
    simulation, _ = simulated
    model = simulation.model
    one = simulation.step(batch_size=1, max_length=4)  # almost no activations
    two = per_process(one, model, build_config(_raw(model_dir, strategy="fsdp"), data_files=False), 2)
    layers = list(model.model.layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = _bytes([p for p in model.parameters() if id(p) not in in_layers])
    block = _bytes(list(layers[0].parameters()))
    assert (two.breakdown["activations"], two.breakdown["gradients"]) == (0, 0)
    assert two.breakdown["temporaries"] == 2 * (root + block)
    assert two.peak_bytes > 2 * one.peak_bytes  # the root twice, where one process holds it once


def test_cpu_offload_and_ddp(model_dir: Path, simulated: tuple) -> None:
    simulation, one = simulated
    model = simulation.model
    offload = per_process(
        one, model, build_config(_raw(model_dir, strategy="fsdp", cpu_offload=True), data_files=False), 2
    )
    frozen = _bytes([p for p in model.parameters() if not p.requires_grad])
    assert offload.breakdown["base_weights"] == one.breakdown["base_weights"] - frozen
    assert all(offload.breakdown[name] == 0 for name in SHARDED)
    ddp = per_process(one, model, build_config(_raw(model_dir), data_files=False), 2)  # auto: ddp
    trainable = _bytes([p for p in model.parameters() if p.requires_grad])
    assert ddp.peak_bytes == one.peak_bytes + trainable  # DDP's gradient buckets


def test_estimate_cli_reports_per_process(tmp_path: Path, model_dir: Path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_raw(model_dir, strategy="fsdp")), encoding="utf-8")
    assert main(["estimate", str(path), "--device", "cpu", "--num-processes", "2", "--gpu", "1MB"]) == 0
    out = capsys.readouterr().out
    assert "model.gradient_checkpointing=true" in out and "training.optimizer=adamw_8bit" in out  # shards too
    result = estimate(build_config(_raw(model_dir, strategy="fsdp"), data_files=False), None, "cpu", 2)
    assert "per process (2 processes, strategy fsdp)" in out and result.num_processes == 2
    assert main(["estimate", str(path), "--num-processes", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-processes must be at least 1, got 0." in err
