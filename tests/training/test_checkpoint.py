"""Checkpoints: atomic (a failed save leaves the last one whole), pruned, and an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_model_dir
from tiny_run import write_run
from transformers import AutoModelForCausalLM

import peftkit
import peftkit.training.checkpoint as checkpoint
import peftkit.training.loop
from peftkit.cli import main
from peftkit.errors import ShapeMismatchError
from peftkit.training.checkpoint import list_checkpoints, read_checkpoint, restore_checkpoint, save_checkpoint
from peftkit.training.config import load_config
from peftkit.training.loop import train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def adapted(model_dir: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = peftkit.adapt(AutoModelForCausalLM.from_pretrained(model_dir), "lora", r=2, target_modules=["q_proj"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def take_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
    model(input_ids=torch.tensor([[3, 4, 5, 6]]), labels=torch.tensor([[3, 4, 5, 6]])).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_failed_save_leaves_the_previous_checkpoint_whole(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    model, optimizer, scheduler = adapted(model_dir)
    take_step(model, optimizer, scheduler)
    first = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"note": "one"}, keep_last=2)
    saved = {k: v.clone() for k, v in peftkit.adapter_state_dict(model).items()}
    take_step(model, optimizer, scheduler)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)  # the adapter is written, then the save dies
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"note": "two"}, keep_last=2)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path)[-1] == first and sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]

    fresh, fresh_optimizer, fresh_scheduler = adapted(model_dir)
    resumed = read_checkpoint(first)
    restore_checkpoint(resumed, fresh, fresh_optimizer, fresh_scheduler)
    state = resumed.state
    assert state["step"] == 1 and state["note"] == "one" and fresh_scheduler.last_epoch == 1
    loaded = peftkit.adapter_state_dict(fresh)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1


def test_keeps_the_last_k(tmp_path: Path, model_dir: Path) -> None:
    model, optimizer, scheduler = adapted(model_dir)
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_resumed_run_is_bit_identical(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    """Stop after step 3 of 7 (dropout on, so RNG state matters), resume, compare every tensor."""
    sections = dict(
        method={"dropout": 0.1}, training={"max_steps": 7, "batch_size": 3, "warmup_steps": 2}, output={"save_every": 3}
    )
    whole = train(load_config(write_run(tmp_path / "whole", model_dir, **sections)), quiet=True)

    real_save = peftkit.training.loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the step-3 checkpoint

    config = load_config(write_run(tmp_path / "split", model_dir, **sections))
    monkeypatch.setattr(peftkit.training.loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config, quiet=True)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "split" / "run" / "checkpoints")] == ["step-000003"]
    resumed = train(config, resume=True, quiet=True)

    expected = load_file(tmp_path / "whole" / "run" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "split" / "run" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and len(expected) == 2 * 7 * 2  # layers x linears x (A, B)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed.summary["val_loss"] == whole.summary["val_loss"]


def test_a_checkpoint_tensor_of_another_shape_is_refused(tmp_path: Path, model_dir: Path) -> None:
    """A (1, 32) lora_A would broadcast into the live (2, 32) one; the shape check names it instead."""
    model, optimizer, scheduler = adapted(model_dir)
    saved = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, keep_last=2)
    weights = saved / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:1] + 1.0
    save_file(tensors, str(weights))
    fresh, fresh_optimizer, fresh_scheduler = adapted(model_dir)
    before = {k: v.clone() for k, v in peftkit.adapter_state_dict(fresh).items()}
    with pytest.raises(
        ShapeMismatchError, match=r"saved lora_A\.weight has shape \(1, 32\), but this model needs \(2, 32\)"
    ):
        restore_checkpoint(read_checkpoint(saved), fresh, fresh_optimizer, fresh_scheduler)
    assert all(torch.equal(v, before[k]) for k, v in peftkit.adapter_state_dict(fresh).items())


def finished_run(tmp_path: Path, model_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 4-step run with checkpoints at steps 2 and 4; returns its config and final adapter tensors."""
    path = write_run(tmp_path, model_dir, training={"max_steps": 4}, output={"save_every": 2})
    train(load_config(path), quiet=True)
    return path, load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("damaged", "reason"),
    [
        ("state.json", "state.json is truncated or corrupt"),
        ("adapter/adapter_model.safetensors", "adapter_model.safetensors is missing, truncated or corrupt"),
        ("trainer_state.pt", "trainer_state.pt is missing, truncated or corrupt"),
    ],
)
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(
    tmp_path: Path, model_dir: Path, capsys, damaged: str, reason: str
) -> None:
    path, expected = finished_run(tmp_path, model_dir)
    file = tmp_path / "run" / "checkpoints" / "step-000004" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    capsys.readouterr()
    train(load_config(path), resume=True)
    out = capsys.readouterr().out
    assert f"--resume: skipped checkpoint step-000004: {file} " in out
    assert reason in out and "Falling back to the checkpoint before it." in out
    assert "resumed from " + str(tmp_path / "run" / "checkpoints" / "step-000002") + " at step 2" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    marker = next(r for r in records if "resumed_from" in r)
    assert marker["step"] == 2 and len(marker["skipped"]) == 1 and reason in marker["skipped"][0]
    got = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # steps 3-4 redone exactly


class _Planted:
    """Unpickling this would create a file: the proof that a checkpoint was loaded without weights_only."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickled_trainer_state_is_not_trusted(tmp_path: Path, model_dir: Path, capsys) -> None:
    path, _ = finished_run(tmp_path, model_dir)
    trainer = tmp_path / "run" / "checkpoints" / "step-000004" / "trainer_state.pt"
    state = torch.load(trainer, weights_only=True)
    state["planted"] = _Planted(str(tmp_path / "unpickled"))
    torch.save(state, trainer)
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"error: {trainer} is not trusted: it holds objects that torch.load(weights_only=True) refuses" in err
    assert "Delete step-000004 to resume from an earlier checkpoint" in err
    assert not (tmp_path / "unpickled").exists()


def test_resume_after_a_kill_logs_each_step_once(tmp_path: Path, model_dir: Path) -> None:
    # Killed after logging steps 5 and 6 but before checkpoint 6 was whole: the resumed run logs
    # 5 and 6 again, and used to leave both attempts' lines in metrics.jsonl.
    path = write_run(
        tmp_path, model_dir, training={"max_steps": 6, "log_every": 1}, output={"save_every": 2, "keep_last": 3}
    )
    config = load_config(path)
    config.eval.every = 2
    train(config, quiet=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    uninterrupted = [json.loads(line) for line in metrics.read_text().splitlines()]
    (tmp_path / "run" / "checkpoints" / "step-000006" / "state.json").unlink()  # not whole: the kill
    train(config, resume=True, quiet=True)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]

    def steps(rows: list[dict], key: str) -> list[int]:
        return [r["step"] for r in rows if key in r]

    assert steps(records, "loss") == [1, 2, 3, 4, 5, 6] == steps(uninterrupted, "loss")
    assert steps(records, "val_loss") == [0, 2, 4, 6] == steps(uninterrupted, "val_loss")  # 4's is the resumed run's
    assert sum("summary" in r for r in records) == 1 and steps(records, "resumed_from") == [4]
    assert [r["loss"] for r in records if "loss" in r] == [r["loss"] for r in uninterrupted if "loss" in r]
