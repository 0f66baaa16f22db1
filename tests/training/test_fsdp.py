"""`training.distributed.strategy: fsdp`: 2 sharded processes train as 1 process does, save whole PEFT files,
checkpoint and resume, and end (not hang) when a process dies; the section's bad inputs fail in one line.

Tolerances: both runs are float32 on the same global batches; gloo sums gradients in another
order than one process, so losses agree to float32 rounding (rtol 1e-5) and the saved adapters
to 1e-6 (learning rate 5e-3 over 4 Adam steps) but for the odd element: where Adam's second
moment is near zero (lora_A, whose gradient is zero at step 1 while B is zero) it divides a
rounding difference by almost nothing; those stay under 1e-5 (seen: 3.5e-6 on one of 0.13).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_model_dir
from tiny_run import write_run

from peftkit.errors import ConfigError
from peftkit.training.config import load_config
from peftkit.training.distributed import decoder_blocks, lockstep
from peftkit.training.loop import train

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
SCRIPT = Path(__file__).parent / "mp_fsdp.py"
WEIGHTS = Path("adapter") / "adapter_model.safetensors"
QUANTIZED = {"quantization": {"quant_type": "nf4", "compute_dtype": "float32"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model", **SHAPE)


def _run(
    root: Path, model_dir: Path, batch_size: int, method: str = "lora", init: dict | None = None, **sections: Any
) -> Path:
    training = {"batch_size": batch_size, "max_steps": 4, "learning_rate": 5e-3, "distributed": {"strategy": "fsdp"}}
    training.update(sections.pop("training", {}))
    return write_run(
        root,
        model_dir,
        method={"name": method, "r": 4, "alpha": 8, "target_modules": "all-linear", **(init or {})},
        training=training,
        **sections,
    )


def _torchrun(config: Path, out: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node 2 mp_fsdp.py CONFIG OUT ARGS`, with this checkout first on the path."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    root = str(Path(__file__).parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [*command, str(SCRIPT), str(config), str(out), *args], timeout=timeout, capture_output=True, text=True, env=env
    )


def _losses(run_dir: Path) -> torch.Tensor:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return torch.tensor([json.loads(line)["loss"] for line in lines if '"loss"' in line], dtype=torch.float64)


def _frozen_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


# case: (method, model section, init). The inits that read the base (PiSSA changes it) or the first
# batches (EVA) run on the main process, whose random sequence is one process's, and are sent: they
# ride on the dora and 4-bit cases, one launch each (the multi-process tests share a 2-minute budget).
CASES = {
    "lora": ("lora", {}, {}),
    "dora-pissa": ("dora", {}, {"init": "pissa"}),
    "lora-4bit-eva": ("lora", QUANTIZED, {"init": "eva"}),
}
# What each case saves: PiSSA the plain LoRA of rank 2r that applies to the original base.
SAVED = {"lora": (False, 4, True), "dora-pissa": (True, 8, True), "lora-4bit-eva": (False, 4, "eva")}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Callable[[str], tuple[Path, int]]:
    """case -> (the directory of its 1-process and 2-process runs, the 1-process frozen base bytes), run once:
    the 2-process run checkpoints every 2 steps, for the resume test to reuse."""
    made: dict[str, tuple[Path, int]] = {}

    def pair(case: str) -> tuple[Path, int]:
        if case not in made:
            method, model, init = CASES[case]
            root = tmp_path_factory.mktemp(case)
            single = train(load_config(_run(root / "one", model_dir, 4, method, init, model=model)), quiet=True)
            double = _run(root / "two", model_dir, 2, method, init, model=model, output={"save_every": 2})
            done = _torchrun(double, root)
            assert done.returncode == 0, done.stderr[-3000:]
            made[case] = root, _frozen_bytes(single.model)
        return made[case]

    return pair


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(CASES))
def test_two_sharded_processes_train_as_one(pairs: Callable[[str], tuple[Path, int]], case: str) -> None:
    root, frozen = pairs(case)
    one, two = _losses(root / "one" / "run"), _losses(root / "two" / "run")
    assert len(two) == 4 and two[-1] < two[0]
    assert torch.allclose(two, one, rtol=1e-5, atol=0), (one, two)
    saved_one, saved_two = load_file(root / "one" / "run" / WEIGHTS), load_file(root / "two" / "run" / WEIGHTS)
    assert saved_two.keys() == saved_one.keys() and len(saved_two) > 0
    differences = torch.cat([(saved_two[k] - saved_one[k]).abs().flatten() for k in saved_one])
    assert (differences > 1e-6).float().mean() < 1e-3 and differences.max() < 1e-5, differences.max()
    config = json.loads((root / "two" / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["use_dora"], config["r"], config["init_lora_weights"]) == SAVED[case]
    # Each process holds half the frozen base (its shards), measured on the live tensors.
    for rank in (0, 1):
        held = json.loads((root / f"rank{rank}.json").read_text())["frozen_bytes"]
        assert abs(held / frozen - 0.5) < 0.03


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(CASES))
def test_only_the_main_process_reads_the_whole_model(pairs: Callable[[str], tuple[Path, int]], case: str) -> None:
    """Rank 1 builds the model on the meta device and receives its shards: while loading, its live tensors
    peak at what it keeps (its shards, buffers, 4-bit quantization states) plus the whole tensors in flight:
    the one arriving and, at times, the one before it, still referenced until the next is assigned (seen
    once: 5.6 kB over one largest tensor on the dora case)."""
    root, _ = pairs(case)
    rank1 = json.loads((root / "rank1.json").read_text())
    assert rank1["held_bytes"] <= rank1["loading_peak"] <= rank1["held_bytes"] + 2 * rank1["largest_bytes"]
    if case != "lora-4bit-eva":  # dense: half the parameters, never the whole model (the 4-bit one is mostly its head)
        assert rank1["loading_peak"] < 0.7 * rank1["whole_bytes"], rank1
    # The loop's meter runs under fsdp too (the main process's share: its shards, the blocks while gathered).
    lines = [json.loads(line) for line in (root / "two" / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = next(line["summary"]["measured_step_peak_bytes"] for line in lines if "summary" in line)
    assert measured > json.loads((root / "rank0.json").read_text())["held_bytes"]


@pytest.mark.multiprocess
def test_a_sharded_checkpoint_resumes_to_the_uninterrupted_losses(
    tmp_path: Path, pairs: Callable[[str], tuple[Path, int]]
) -> None:
    root, _ = pairs("lora")
    config = root / "two" / "run.yaml"
    whole = _losses(root / "two" / "run")
    checkpoint = root / "two" / "run" / "checkpoints" / "step-000002"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["distributed"] == {"strategy": "fsdp", "num_processes": 2}
    # the checkpoint's adapter is the whole one, in the files one process writes
    assert load_file(checkpoint / WEIGHTS).keys() == load_file(root / "two" / "run" / WEIGHTS).keys()

    resumed = _torchrun(config, tmp_path, "--resume", str(checkpoint), "--set", f"output.dir={tmp_path / 'resumed'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.allclose(_losses(tmp_path / "resumed"), whole[2:], rtol=1e-6, atol=0)

    # One unsharded process cannot read the sharded run's optimizer state: refused, naming both counts.
    one = load_config(config, ["training.batch_size=4", f"output.dir={tmp_path / 'one'}"])
    with pytest.raises(ConfigError) as error:
        train(one, resume=str(checkpoint), quiet=True)
    assert "written by 2 process(es) under strategy 'fsdp'; this run has 1 process(es) under strategy 'none'" in str(
        error.value
    )
    assert not (tmp_path / "one").exists()


@pytest.mark.multiprocess
def test_a_killed_process_ends_the_run_without_a_hang(tmp_path: Path, model_dir: Path) -> None:
    config = _run(tmp_path, model_dir, 2, training={"max_steps": 6})
    started = time.monotonic()
    done = _torchrun(config, tmp_path, "--die-at", "3", timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - started < 90
    assert "exitcode  : -9" in done.stderr and "Signal 9 (SIGKILL)" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "run" / WEIGHTS).exists()


def test_cpu_offload_is_refused_on_a_cpu_before_loading(tmp_path: Path, model_dir: Path) -> None:
    config = load_config(
        _run(tmp_path, model_dir, 4, training={"distributed": {"strategy": "fsdp", "cpu_offload": True}})
    )
    with pytest.raises(ConfigError, match=r"^training.distributed.cpu_offload needs a GPU .* drop cpu_offload.$"):
        train(config, quiet=True)
    assert not (tmp_path / "run").exists()


def test_lockstep_keeps_every_process_calling_the_collective_forward() -> None:
    class Counts:  # what accelerate's gather returns: every process's batch count
        device = torch.device("cpu")

        def gather(self, mine: torch.Tensor) -> torch.Tensor:
            return torch.tensor([2, 3])

    assert list(lockstep(["a", "b"], "x", Counts())) == [("a", True), ("b", True), ("a", False)]
    assert list(lockstep([], "x", Counts())) == [("x", False)] * 3


def test_decoder_blocks_are_found_by_structure(model_dir: Path) -> None:
    from tiny_models import tiny_gpt2, tiny_llama

    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert decoder_blocks(llama) == list(llama.model.layers)
    assert decoder_blocks(gpt2) == list(gpt2.transformer.h)
    assert decoder_blocks(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {
                "training": {"distributed": {"strategy": "fsdp"}},
                "model": {"quantization": {"storage_dtype": "bfloat16"}},
            },
            "model.quantization.storage_dtype 'bfloat16' differs from model.dtype 'float32', the dtype FSDP shards "
            "and gathers this model's parameters in",
        ),
        (
            {"training": {"distributed": {"strategy": "ddp", "cpu_offload": True}}},
            "training.distributed.cpu_offload applies to strategy 'fsdp' only, got strategy 'ddp'",
        ),
        (
            {"training": {"distributed": {"strategy": "zero3"}}},
            "training.distributed.strategy must be 'auto' | 'ddp' | 'fsdp', got 'zero3'.",
        ),
        (
            {"training": {"distributed": {"strategy": "fsdp", "offload": True}}},
            "training.distributed has no option 'offload'.",
        ),
    ],
    ids=["storage-dtype", "offload-without-fsdp", "strategy", "unknown-key"],
)
def test_bad_distributed_options_fail_in_one_line(
    tmp_path: Path, model_dir: Path, sections: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write_run(tmp_path, model_dir, **sections))
    assert message in str(error.value) and "\n" not in str(error.value)
