"""The simulated step (`peftkit.training.simulate`) against the same step run for real, on tiny models.

The real step is measured by torch's profiler (`peftkit.training.realstep`, which
`benchmarks/bench_estimate.py` runs at larger scale): the CPU allocator's events over
the step plus the tensor storages alive when it starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make_model_dir

from peftkit.training import realstep
from peftkit.training.config import RunConfig, build_config
from peftkit.training.simulate import Simulation

LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"), hidden_size=64, intermediate_size=128)


def run_config(
    model_dir: Path, method: dict[str, Any], batch: int = 4, length: int = 32, **sections: dict[str, Any]
) -> RunConfig:
    raw = {
        "model": {"name": str(model_dir), **sections.get("model", {})},
        "method": method,
        "data": {"train": "unused.jsonl", "max_length": length},
        "training": {"batch_size": batch, **sections.get("training", {})},
    }
    return build_config(raw, data_files=False)


def test_the_measure_counts_a_temporary_freed_inside_the_step_and_what_was_alive_before() -> None:
    x = torch.ones(1000, 1000)

    def step() -> None:
        y = x * 2
        y.exp()  # made while y is alive, then both freed

    measured = realstep.measure(step, {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()})
    assert (measured.resident_bytes, measured.peak_bytes) == (4_000_000, 12_000_000)


@pytest.mark.parametrize(
    ("method", "model"),
    [
        (LORA, {}),
        ({"name": "full"}, {}),
        (LORA, {"gradient_checkpointing": True}),
        (LORA, {"quantization": {"bits": 4}}),
    ],
    ids=["lora", "full", "lora-checkpointing", "lora-4bit-base"],
)
def test_the_estimate_is_within_10_percent_of_the_measured_step(
    model_dir: Path, method: dict[str, Any], model: dict[str, Any]
) -> None:
    config = run_config(model_dir, method, model=model)
    estimate = Simulation(config, "cpu").step()
    measured = realstep.measure_step(realstep.RealRun(config))
    assert sum(estimate.breakdown.values()) == estimate.peak_bytes
    held = sum(estimate.breakdown[c] for c in ("base_weights", "trainable_parameters", "optimizer_state"))
    assert held == pytest.approx(measured.resident_bytes, rel=0.01)  # what exists before the step
    assert 0.9 <= estimate.peak_bytes / measured.peak_bytes <= 1.1


def test_the_estimate_of_an_8bit_optimizer_step_on_cpu_counts_its_float32_copies(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, hidden_size=256, intermediate_size=512)  # weights outweigh activations
    config = run_config(model_dir, {"name": "full"}, batch=1, length=8, training={"optimizer": "adamw_8bit"})
    estimate = Simulation(config, "cpu").step()
    measured = realstep.measure_step(realstep.RealRun(config))
    assert 0.9 <= estimate.peak_bytes / measured.peak_bytes <= 1.1
