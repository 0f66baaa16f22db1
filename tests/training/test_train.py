"""`peftkit train` on tiny models: it learns, for every method, in one process or two."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_model_dir, tiny_tokenizer
from tiny_run import write_run
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.training.config import load_config
from peftkit.training.data import collate, encode
from peftkit.training.loop import train
from peftkit.training.loss import CausalLMLoss
from peftkit.training.metrics import read_metrics
from variants.lora import LoRA, LoraConfig


@dataclasses.dataclass
class HalfScaleConfig(LoraConfig):
    """A second method for the tests when no other variant is installed: LoRA at half scale."""


@peftkit.register_method
class HalfScaleLoRA(LoRA):
    name = "test-half-lora"
    description = "LoRA with its scale halved (a test double)"
    config_class = HalfScaleConfig
    peft_type = None


SECOND_METHOD = "dora" if "dora" in peftkit.available_methods() else HalfScaleLoRA.name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_selective_logits_loss_equals_the_models_own(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = tiny_tokenizer()
    batch = collate(
        [
            encode({"prompt": "ab", "completion": "cdef"}, tok, "prompt_completion", 32),
            encode({"prompt": "abcd", "completion": "e"}, tok, "prompt_completion", 32),
        ],
        0,
    )
    expected = model(**batch).loss
    assert torch.allclose(CausalLMLoss(model)(**batch), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", SECOND_METHOD])
def test_train_run_learns_and_writes_its_files(tmp_path: Path, model_dir: Path, method: str, capsys) -> None:
    path = write_run(tmp_path, model_dir, method={"name": method}, training={"max_steps": 8}, eval={"generations": 1})
    result = train(load_config(path))
    summary, out = result.summary, tmp_path / "run"
    assert summary["val_loss"] < summary["val_loss_start"] - 0.2  # 5.60 -> ~5.32 in 8 steps on this random model
    printed = capsys.readouterr().out
    assert f"peftkit: {method} on {model_dir}" in printed and "trainable" in printed and "done in" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert records[-1]["summary"]["val_loss"] == summary["val_loss"]
    assert len([r for r in records if "generations" in r]) == 2  # before and after
    metrics = read_metrics(out)  # the typed lines compare reads: every line the loop writes has its record
    assert [line.step for line in metrics.steps] == list(range(1, 9)) and metrics.steps[-1].elapsed_s > 0
    assert [line.step for line in metrics.validations] == [0, 8] and len(metrics.generations) == 2
    assert metrics.summary is not None and dataclasses.asdict(metrics.summary) == summary
    # The saved adapter reproduces the trained model's logits on a fresh base.
    fresh = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(fresh(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-6)
    assert (out / "config.yaml").is_file() and not (out / "checkpoints").exists()


def test_quiet_prints_nothing(tmp_path: Path, model_dir: Path, capsys) -> None:
    train(load_config(write_run(tmp_path, model_dir, training={"max_steps": 2})), quiet=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # nor transformers' weight-loading bars
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is restored


@pytest.mark.multiprocess
def test_two_processes_average_gradients(tmp_path: Path, model_dir: Path) -> None:
    """2 ranks x batch 2 equal 1 rank x batch 4: same global batches, gradients averaged by DDP.

    Every example has the same token count, so the mean of the two ranks' mean losses is the
    mean over the global batch. Tolerance: gloo sums in another order than one process does,
    so the curves agree to float32 rounding (rtol 1e-4 over 6 Adam steps), not bit for bit.
    """
    single = write_run(tmp_path / "single", model_dir, training={"batch_size": 4})
    train(load_config(single), quiet=True)
    double = write_run(tmp_path / "double", model_dir, training={"batch_size": 2})
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(Path(__file__).parent / "mp_train.py"),
        str(double),
        str(tmp_path),
    ]
    # The script's own directory comes first on sys.path; the checkout under test must come next,
    # not whichever peftkit the interpreter has installed.
    root = str(Path(__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command, check=True, timeout=120, capture_output=True, env=env)

    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # every rank holds the same adapter
    losses = {}
    for name in ("single", "double"):
        lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        losses[name] = torch.tensor([json.loads(line)["loss"] for line in lines if '"loss"' in line])
    assert len(losses["double"]) == 6
    assert torch.allclose(losses["double"], losses["single"], rtol=1e-4)
    assert losses["double"][-1] < losses["double"][0]
    single_adapter = load_file(tmp_path / "single" / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(rank0[k], single_adapter[k], atol=1e-4) for k in rank0)
    assert not (tmp_path / "double" / "run" / "checkpoints").exists()


def test_dropped_rows_are_reported_in_the_header_and_metrics(tmp_path: Path, model_dir: Path, capsys) -> None:
    path = write_run(tmp_path, model_dir, training={"max_steps": 1, "batch_size": 5})
    with open(tmp_path / "train.jsonl", "a", encoding="utf-8") as handle:  # 32 good rows, then 2 too long
        handle.write(json.dumps({"prompt": "p" * 40, "completion": "c"}) + "\n")
        handle.write(json.dumps({"prompt": "q" * 33, "completion": "c"}) + "\n")
    train(load_config(path))
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("peftkit:"))
    assert (
        "| 32 train / 8 val examples (dropped from train: 2 record(s) whose prompt fills data.max_length 32, "
        "leaving no token to learn; 2 example(s) of each epoch, short of a whole global batch (others each epoch)) |"
    ) in header
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    kept = {"packing_remainder_tokens": 0}
    assert first == {
        "step": 0,
        "data": {
            "train": {
                "records": 34,
                "examples": 32,
                "dropped": {"prompt_fills_max_length": 2},
                **kept,
                "left_out_per_epoch": 2,
            },
            "validation": {"records": 8, "examples": 8, "dropped": {}, **kept, "left_out_per_epoch": 0},
        },
    }


def test_one_run_builds_its_method_once(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run config carries the built method; the estimate, the loop and the checkpoints use it (it was
    built five times per run, seven with --resume, and qlora resolved its targets three times)."""
    built, resolved = [], []
    original_init, original_find = peftkit.AdapterMethod.__init__, peftkit.method.find_targets
    monkeypatch.setattr(
        peftkit.AdapterMethod, "__init__", lambda self, config: built.append(1) or original_init(self, config)
    )
    monkeypatch.setattr(peftkit.method, "find_targets", lambda *a: resolved.append(1) or original_find(*a))
    path = write_run(tmp_path, model_dir, method={"name": "qlora"}, training={"max_steps": 2}, output={"save_every": 1})
    config = load_config(path)
    train(config, quiet=True)
    train(load_config(path, ["training.max_steps=3"]), resume=True, quiet=True)
    assert len(built) == 3  # one per load_config, and the checkpoint's record of its method, read back on resume
    assert len(resolved) == 4  # one per adapt: the estimate's and the run's, in each of the two runs
