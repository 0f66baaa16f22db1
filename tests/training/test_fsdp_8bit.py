"""bitsandbytes' 8-bit AdamW under `training.distributed.strategy: fsdp`: each process steps its own shards
(LocalShardOptimizer), 2 processes train as 1 does up to 8-bit rounding, a checkpoint keeps each process's
8-bit state and resumes exactly under as many processes (refused under another count), and the
per-process estimate counts the state each shard allocates.

The model is sized so that the 8-bit state is really sharded: LoRA r=70 on hidden 128 gives tensors of
8960 elements whose 2 shards of 4480 (17.5 blocks of 256) are quantized in blocks that fall elsewhere than
one process's, and k/v's up-projections (64 x 70) whose shards of 2240 elements are under
bitsandbytes' min_8bit_size and keep float32 state where one process keeps 8-bit state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_fsdp import WEIGHTS, _losses, _torchrun
from tiny_models import VOCAB, make_model_dir, tiny_llama
from tiny_run import write_run

from peftkit.errors import ConfigError
from peftkit.training.config import build_config, load_config
from peftkit.training.distributed import check_resume_strategy
from peftkit.training.loop import train
from peftkit.training.optim import bitsandbytes_state_bytes, build_optimizer
from peftkit.training.process_memory import per_process
from peftkit.training.sharded_optim import LocalShardOptimizer
from peftkit.training.simulate import Simulation

SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
LORA = {"name": "lora", "r": 70, "alpha": 140, "target_modules": "all-linear"}
# Measured (4 steps, lr 5e-3, float32): 2 processes against 1, losses differ by up to 4.2e-5 relative and the
# adapters by up to 3.3e-3 (elements up to 0.094; most on k/v's B, float32 state in 2 processes). For scale,
# 8-bit AdamW against torch's AdamW on 1 process: 8.3e-5 and 4.4e-3. The tolerances stay within the latter.
LOSS_RTOL, ADAPTER_ATOL = 1e-4, 5e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny8") / "model", **SHAPE)


def _config(root: Path, model_dir: Path, batch_size: int, **output: Any) -> Path:
    training = {
        "batch_size": batch_size,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "optimizer": "adamw_8bit",
        "distributed": {"strategy": "fsdp"},
    }
    return write_run(root, model_dir, method=LORA, training=training, output={"dir": str(root / "run"), **output})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """One process (batch 4) and 2 sharded processes (batch 2 each, checkpoints every 2 steps), run once."""
    root = tmp_path_factory.mktemp("fsdp8")
    train(load_config(_config(root / "one", model_dir, 4)), quiet=True)
    done = _torchrun(_config(root / "two", model_dir, 2, save_every=2), root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.multiprocess
def test_two_sharded_processes_step_8bit_state_as_one_up_to_its_rounding(runs: Path) -> None:
    one, two = _losses(runs / "one" / "run"), _losses(runs / "two" / "run")
    assert len(two) == 4 and two[-1] < two[0]
    assert torch.allclose(two, one, rtol=LOSS_RTOL, atol=0), (one, two)
    saved_one, saved_two = load_file(runs / "one" / "run" / WEIGHTS), load_file(runs / "two" / "run" / WEIGHTS)
    assert saved_two.keys() == saved_one.keys() and len(saved_two) == 28  # 7 targets x 2 layers x (A, B)
    differences = torch.cat([(saved_two[k] - saved_one[k]).abs().flatten() for k in saved_one])
    assert 1e-5 < differences.max() < ADAPTER_ATOL, differences.max()  # not AdamW's 1e-6: blocks fall elsewhere

    # The checkpoint keeps each process's own state: 8-bit codes over its 4480-element shard of
    # layer 0's q_proj A (70 x 128), float32 over its 2240-element shard of k_proj's B (64 x 70).
    trainer = torch.load(runs / "two" / "run" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    processes = trainer["optimizer"]["per_process"]
    assert len(processes) == 2
    for state in processes:
        by_size = {}
        for entry in state["state"].values():
            codes = entry["__bnb_optimizer_quant_state__"]
            by_size.setdefault(codes["state1"].numel(), set()).add(codes["state1"].dtype)
        assert by_size[4480] == {torch.uint8} and by_size[2240] == {torch.float32}, by_size


@pytest.mark.multiprocess
def test_an_8bit_sharded_checkpoint_resumes_to_the_uninterrupted_losses(runs: Path, tmp_path: Path) -> None:
    config, checkpoint = runs / "two" / "run.yaml", runs / "two" / "run" / "checkpoints" / "step-000002"
    resumed = _torchrun(config, tmp_path, "--resume", str(checkpoint), "--set", f"output.dir={tmp_path / 'resumed'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.allclose(_losses(tmp_path / "resumed"), _losses(runs / "two" / "run")[2:], rtol=1e-6, atol=0)
    resumed_adapter, whole = load_file(tmp_path / "resumed" / WEIGHTS), load_file(runs / "two" / "run" / WEIGHTS)
    assert all(torch.equal(resumed_adapter[k], whole[k]) for k in whole)


def _saved(optimizer: str, processes: int) -> dict[str, Any]:
    return {
        "distributed": {"strategy": "fsdp", "num_processes": processes},
        "config": {"training": {"optimizer": optimizer}},
    }


def test_a_per_process_8bit_state_is_refused_under_another_process_count() -> None:
    with pytest.raises(ConfigError) as error:
        check_resume_strategy(_saved("adamw_8bit", 2), "fsdp", 3, "ckpt")
    message = str(error.value)
    assert "written by 2 process(es) under strategy 'fsdp'; this run has 3 process(es) under strategy 'fsdp'" in (
        message
    )
    assert message.endswith(
        "Resume it with 2 processes under strategy fsdp (bitsandbytes' optimizer state is per process)."
    )
    assert "\n" not in message
    check_resume_strategy(_saved("paged_adamw_8bit", 2), "fsdp", 2, "ckpt")  # the same count reads it
    check_resume_strategy(_saved("adamw", 2), "fsdp", 3, "ckpt")  # AdamW's gathered state: any count


@pytest.fixture
def one_process_group() -> Any:
    """A gloo group of one process in this one, so that fully_shard makes DTensors."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw"])
def test_local_shards_step_as_the_optimizer_over_plain_parameters(one_process_group: None, optimizer: str) -> None:
    """In a group of one process each shard is the whole tensor: the steps must be bit-identical."""
    from torch.distributed.fsdp import fully_shard

    plain, sharded = (tiny_llama(hidden_size=64, intermediate_size=128) for _ in range(2))
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    optimizers = [
        build_optimizer(
            [{"params": list(m.model.layers.parameters()), "lr": 1e-2}, {"params": list(m.lm_head.parameters())}],
            optimizer,
            1e-3,
            0.0,
        )
        for m in (plain, sharded)
    ]
    assert isinstance(optimizers[1], LocalShardOptimizer) and not isinstance(optimizers[0], LocalShardOptimizer)
    assert optimizers[1].param_groups[0]["lr"] == 1e-2 and optimizers[1].param_groups[1]["lr"] == 1e-3
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    storage = [p.to_local().untyped_storage().data_ptr() for p in sharded.parameters()]
    for _ in range(3):
        for model, stepper in zip((plain, sharded), optimizers, strict=True):
            model(input_ids=ids, labels=ids).loss.backward()
            stepper.step()
            stepper.zero_grad(set_to_none=True)
    stepped = [*sharded.model.layers.parameters(), *sharded.lm_head.parameters()]
    assert all(p.grad is None for p in stepped) and sharded.model.norm.weight.grad is not None  # not its to clear
    # FSDP2 kept each shard's storage across steps: the proxies aliased it, and the updates landed there.
    assert [p.to_local().untyped_storage().data_ptr() for p in sharded.parameters()] == storage
    for (name, p), q in zip(plain.named_parameters(), sharded.parameters(), strict=True):
        assert torch.equal(p, q.full_tensor()), name
    state = optimizers[1].state_dict()
    assert sum(1 for entry in state["state"].values() if entry["step"] == 3) == len(state["state"]) > 0


def _raw(model_dir: Path, **training: Any) -> dict[str, Any]:
    return {
        "model": {"name": str(model_dir)},
        "method": LORA,
        "data": {"train": "not-needed.jsonl", "max_length": 32},
        "training": {"batch_size": 2, "optimizer": "adamw_8bit", "distributed": {"strategy": "fsdp"}, **training},
    }


def test_the_estimate_counts_each_shards_8bit_state(model_dir: Path) -> None:
    config = build_config(_raw(model_dir), data_files=False)
    simulation = Simulation(config, "cpu")
    step = simulation.step()
    trainable = [p for p in simulation.model.parameters() if p.requires_grad]
    # The rule is bitsandbytes' own: over the whole tensors it is what the simulated step allocated.
    whole = step.breakdown["optimizer_state"]
    assert bitsandbytes_state_bytes("adamw_8bit", [p.numel() for p in trainable]) == whole
    two = per_process(step, simulation.model, config, 2)
    halves = [-(-p.shape[0] // 2) * p.shape[1] for p in trainable]
    assert two.breakdown["optimizer_state"] == bitsandbytes_state_bytes("adamw_8bit", halves)
    # k/v's up-projections (64 x 70) shard into 2240 elements, under min_8bit_size: float32 state, 8 bytes an
    # element where one process keeps ~2, so a process holds more than half the one-process state.
    small = sum(n for n in halves if n < 4096)
    assert small == 4 * 32 * 70
    assert two.breakdown["optimizer_state"] - whole / 2 == pytest.approx(small * (8 - 2), rel=0.05)
