"""The output directory holds one run: a new run never mixes with, deletes or resumes another's state."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from tiny_models import make_model_dir
from tiny_run import write_run

import peftkit.saving
import peftkit.training.checkpoint
import peftkit.training.loop
import peftkit.training.rundir as rundir
import peftkit.training.sharded_loading
from peftkit.cli import main
from peftkit.training.checkpoint import list_checkpoints
from peftkit.training.rundir import run_state


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def first_run(tmp_path: Path, model_dir: Path) -> Path:
    """Run A: 4 steps, checkpoints at 2 and 4, in tmp_path/run; returns its config."""
    path = write_run(
        tmp_path / "a", model_dir, training={"max_steps": 4}, output={"save_every": 2, "dir": str(tmp_path / "run")}
    )
    assert main(["train", str(path), "--quiet"]) == 0
    return path


def second_run(tmp_path: Path, model_dir: Path) -> Path:
    """Run B: another learning rate, 2 steps, a checkpoint every step, into the same directory."""
    sections = dict(training={"max_steps": 2, "learning_rate": 0.01}, output={"save_every": 1, "keep_last": 5})
    return write_run(
        tmp_path / "b", model_dir, **{**sections, "output": {**sections["output"], "dir": str(tmp_path / "run")}}
    )


def test_a_new_run_refuses_a_directory_holding_another_run(tmp_path: Path, model_dir: Path, capsys) -> None:
    first_run(tmp_path, model_dir)
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", str(second_run(tmp_path, model_dir))]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"peftkit train: error: output.dir '{tmp_path / 'run'}' already holds a run "
        "(checkpoints, adapter, metrics.jsonl, config.yaml); pass --resume to continue it, "
        "--overwrite to delete it and start again, or choose another output.dir.\n"
    )
    assert snapshot(tmp_path / "run") == before


def test_overwrite_replaces_the_other_run_and_only_it(tmp_path: Path, model_dir: Path) -> None:
    first_run(tmp_path, model_dir)
    (tmp_path / "run" / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["train", str(second_run(tmp_path, model_dir)), "--overwrite", "--quiet"]) == 0
    out = tmp_path / "run"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000001", "step-000002"]
    for checkpoint in list_checkpoints(out / "checkpoints"):
        assert json.loads((checkpoint / "state.json").read_text())["config"]["training"]["learning_rate"] == 0.01
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 2  # none of run A's steps 3 and 4
    assert (out / "notes.txt").read_text() == "mine" and not list(out.glob(".peftkit-*"))


def test_a_crash_while_clearing_leaves_no_mix(tmp_path: Path, model_dir: Path, monkeypatch, capsys) -> None:
    first_run(tmp_path, model_dir)
    out, real_replace, moved = tmp_path / "run", os.replace, []

    def die_on_second_rename(src, dst):
        if moved:
            raise KeyboardInterrupt
        moved.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", die_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(second_run(tmp_path, model_dir)), "--overwrite", "--quiet"])
    monkeypatch.undo()
    # Run A's checkpoints went first, whole; nothing of run B was written.
    assert run_state(out) == ["adapter", "metrics.jsonl", "config.yaml"]
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["learning_rate"] == 0.03  # run A's
    assert main(["train", str(second_run(tmp_path, model_dir)), "--quiet"]) == 2  # still refused, not mixed
    assert "already holds a run (adapter, metrics.jsonl, config.yaml)" in capsys.readouterr().err
    assert main(["train", str(second_run(tmp_path, model_dir)), "--overwrite", "--quiet"]) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000001", "step-000002"]
    assert not list(out.glob(".peftkit-*"))  # the trash of the crashed clearing is gone too


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path: Path, model_dir: Path, capsys) -> None:
    first_run(tmp_path, model_dir)
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", str(second_run(tmp_path, model_dir)), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        f"--resume: '{tmp_path / 'run' / 'checkpoints' / 'step-000004'}' was trained with other options "
        "(data.train: " in err
    )
    assert "training.learning_rate: 0.03 in the checkpoint, 0.01 now)" in err
    assert snapshot(tmp_path / "run") == before


def test_resume_and_overwrite_exclude_each_other(tmp_path: Path, model_dir: Path, capsys) -> None:
    assert main(["train", str(write_run(tmp_path, model_dir)), "--resume", "--overwrite"]) == 2
    assert "--resume continues the run in output.dir and --overwrite deletes it; give one." in capsys.readouterr().err


def test_resume_may_change_cadence_and_train_longer(tmp_path: Path, model_dir: Path, capsys) -> None:
    config = first_run(tmp_path, model_dir)
    changes = ["training.max_steps=6", "eval.every=1", "training.log_every=2", "output.keep_last=3"]
    assert main(["train", str(config), "--resume", *[f"--set={c}" for c in changes]]) == 0
    out = tmp_path / "run"
    said = (
        "eval.every: None in the checkpoint, 1 now; output.keep_last: 2 in the checkpoint, 3 now; "
        "training.log_every: 1 in the checkpoint, 2 now; training.max_steps: 4 in the checkpoint, 6 now"
    )
    assert f"at step 4 with changed options: {said}" in capsys.readouterr().out
    in_force = yaml.safe_load((out / "config.yaml").read_text())
    assert (in_force["training"]["max_steps"], in_force["eval"]["every"], in_force["output"]["keep_last"]) == (6, 1, 3)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    marker = records.index(next(r for r in records if "resumed_from" in r))
    assert records[marker]["changed"] == said
    after = records[marker + 1 :]
    assert [r["step"] for r in after if "loss" in r] == [6] and [r["step"] for r in after if "val_loss" in r] == [
        4,
        5,
        6,
    ]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000002", "step-000004", "step-000006"]
    state = json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["config"] == in_force


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ("method.r=8", "(method.r: 4 in the checkpoint, 8 now)"),
        ("method.target_modules=[q_proj]", "(method.target_modules: 'all-linear' in the checkpoint, ['q_proj'] now)"),
        ("training.learning_rate=1e-3", "(training.learning_rate: 0.03 in the checkpoint, 0.001 now)"),
        ("training.seed=1", "(training.seed: 0 in the checkpoint, 1 now)"),
        ("data.max_length=64", "(data.max_length: 32 in the checkpoint, 64 now)"),
        ("training.max_steps=3", "is at step 4, past the 3 steps this config trains; raise training.max_steps"),
        ("training.batch_size=2", "took 4 sequences, one of this run 2 (training.batch_size x processes x "),
    ],
)
def test_resume_refuses_an_option_that_changes_results(
    tmp_path: Path, model_dir: Path, capsys, change: str, said: str
) -> None:
    config = first_run(tmp_path, model_dir)
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", str(config), "--resume", "--set", change]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and said in captured.err and "Traceback" not in captured.err
    assert snapshot(tmp_path / "run") == before


def no_model_loads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the output directory was checked")

    monkeypatch.setattr(peftkit.training.loop, "load_tokenizer", refuse)
    monkeypatch.setattr(peftkit.training.sharded_loading, "load_model", refuse)


def test_a_full_disk_fails_before_the_model_loads(tmp_path: Path, model_dir: Path, capsys, monkeypatch) -> None:
    config = write_run(tmp_path / "cfg", model_dir, output={"dir": str(tmp_path / "out" / "run")})
    (tmp_path / "out").mkdir()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    no_model_loads(monkeypatch)
    monkeypatch.setattr(rundir.os, "write", full)
    assert main(["train", str(config)]) == 2
    monkeypatch.undo()
    assert re.fullmatch(
        re.escape(
            f"peftkit train: error: cannot write output.dir '{tmp_path / 'out' / 'run'}': No space left on device "
        )
        + r"\(ENOSPC\); [\d.]+ [GM]iB free there; free some space, or choose another destination\.\n",
        capsys.readouterr().err,
    )
    assert list((tmp_path / "out").iterdir()) == []  # no probe file, no run directory


def test_a_read_only_output_dir_fails_before_the_model_loads(
    tmp_path: Path, model_dir: Path, capsys, monkeypatch
) -> None:
    """Simulated: the tests run as root, whom a chmod does not stop."""
    config = write_run(tmp_path, model_dir)

    def read_only(prefix, dir):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    no_model_loads(monkeypatch)
    monkeypatch.setattr(rundir.tempfile, "mkstemp", read_only)
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"peftkit train: error: cannot write output.dir '{tmp_path / 'run'}': Read-only file system (EROFS) "
        f"({tmp_path}); make it writable, or choose another destination.\n"
    )


def test_a_disk_full_at_a_checkpoint_leaves_nothing_half_written(
    tmp_path: Path, model_dir: Path, capsys, monkeypatch
) -> None:
    config = write_run(tmp_path, model_dir, training={"max_steps": 4}, output={"save_every": 2})

    def full(obj, path):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(peftkit.training.checkpoint.torch, "save", full)
    assert main(["train", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"peftkit train: error: cannot write output.dir '{tmp_path / 'run'}': No space left")
    assert err.count("\n") == 1 and "trainer_state.pt" in err
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # the half-written step-000002 is gone


def test_a_disk_full_at_the_final_adapter_leaves_no_half_adapter(
    tmp_path: Path, model_dir: Path, capsys, monkeypatch
) -> None:
    config = write_run(tmp_path, model_dir, training={"max_steps": 1})

    def full(path, data):  # the weights are written, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(peftkit.saving, "atomic_write_json", full)
    assert main(["train", str(config), "--quiet"]) == 2
    assert "cannot write output.dir" in (err := capsys.readouterr().err) and "No space left on device" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_resuming_an_earlier_checkpoint_deletes_the_later_ones(
    tmp_path: Path, model_dir: Path, capsys, monkeypatch
) -> None:
    """Resumed from step 2 and killed after saving step 3, the run's newest must be its step 3,
    not the step 4 of the continuation it replaced."""
    config = first_run(tmp_path, model_dir)
    checkpoints = tmp_path / "run" / "checkpoints"
    real_save = peftkit.training.loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(peftkit.training.loop, "save_checkpoint", save_then_die)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(config), "--resume", str(checkpoints / "step-000002"), "--set", "output.save_every=1"])
    assert "--resume: deleted step-000004, past the resumed step 2." in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000002", "step-000003"]
    assert not list((tmp_path / "run").glob(".peftkit-*"))


def test_resume_refuses_a_checkpoint_that_records_no_config(tmp_path: Path, model_dir: Path, capsys) -> None:
    config = first_run(tmp_path, model_dir)
    state_path = tmp_path / "run" / "checkpoints" / "step-000004" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["method"]
    state_path.write_text(json.dumps(state))
    assert main(["train", str(config), "--resume"]) == 2
    assert (
        f"--resume: '{state_path.parent}' records no whole config, so it cannot be checked" in capsys.readouterr().err
    )


def test_resume_refuses_edited_training_data(tmp_path: Path, model_dir: Path, capsys) -> None:
    config = first_run(tmp_path, model_dir)
    data = tmp_path / "a" / "train.jsonl"
    before = hashlib.sha256(data.read_bytes()).hexdigest()[:12]
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same rows, in another order
    after = hashlib.sha256(data.read_bytes()).hexdigest()[:12]
    assert main(["train", str(config), "--resume"]) == 2
    said = f"(data.train contents: 'sha256 {before}' in the checkpoint, 'sha256 {after}' now)"
    assert said in capsys.readouterr().err
