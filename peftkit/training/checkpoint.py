"""Training checkpoints that are whole or absent, and that resume a run exactly.

A checkpoint directory `step-000120/` holds the adapter in PEFT's format, the
optimizer and scheduler state (torch.save, read back with weights_only=True), the
RNG states, and `state.json` (step, data position, resolved config). It is written
under a temporary name and renamed into place, so a crash mid-save leaves the
previous checkpoint as the newest whole one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from peftkit.errors import CheckpointError, ConfigError, UntrustedCheckpointError
from peftkit.files import atomic_directory, read_json
from peftkit.loading import copy_adapter_tensors
from peftkit.peft_format import WEIGHTS_NAME
from peftkit.record import DEFAULT_ADAPTER
from peftkit.saving import save_adapter

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "read_checkpoint",
    "restore_checkpoint",
    "find_resume_checkpoint",
    "checkpoint_step",
    "list_checkpoints",
]

_NAME = re.compile(r"^step-(\d+)$")
STATE_NAME = "state.json"
TRAINER_NAME = "trainer_state.pt"


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """The whole checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory `step-000120` was saved at."""
    match = _NAME.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (step-NNNNNN)")
    return int(match.group(1))


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int,
    *,
    adapter_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically, then drop all but the newest `keep_last`.

    `adapter_state` and `optimizer_state` are the whole tensors gathered from sharded ones (FSDP),
    written in place of the live, partial ones.
    """
    root = Path(root)
    final = root / f"step-{step:06d}"
    with atomic_directory(final, replace=True) as tmp:
        save_adapter(model, tmp / "adapter", state_dict=adapter_state)
        optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        trainer = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": _rng_state()}
        torch.save(trainer, tmp / TRAINER_NAME)
        # state.json goes last: its presence is what marks a checkpoint whole.
        own = {**state, "step": step, "python_rng": _jsonable(random.getstate())}
        (tmp / STATE_NAME).write_text(json.dumps(own, indent=2) + "\n", encoding="utf-8")
    for old in list_checkpoints(root)[: -max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read whole into memory and checked, not yet applied to a model."""

    path: Path
    state: dict[str, Any]  # state.json: step, data position, resolved config, Python's RNG
    adapter: dict[str, torch.Tensor]
    trainer: dict[str, Any]  # optimizer, scheduler, torch RNG states

    @property
    def step(self) -> int:
        return int(self.state["step"])


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read every file of the checkpoint at `path`; CheckpointError says which one is bad.

    Everything is read before anything is applied, so a bad file leaves the model as it was.
    """
    path = Path(path)
    state_path, trainer_path = path / STATE_NAME, path / TRAINER_NAME
    if not state_path.is_file():
        raise CheckpointError(f"{str(path)!r} is not a whole checkpoint (no {STATE_NAME}).")
    state = read_json(state_path, CheckpointError, "is truncated or corrupt")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "python_rng" not in state:
        raise CheckpointError(f"{state_path} lacks the step and RNG state a checkpoint records.")
    weights = path / "adapter" / WEIGHTS_NAME
    try:
        adapter = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights} is missing, truncated or corrupt ({error}).") from None
    try:
        trainer = torch.load(trainer_path, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1].strip()
        raise UntrustedCheckpointError(
            f"{trainer_path} is not trusted: it holds objects that torch.load(weights_only=True) refuses "
            f"({reason}), and peftkit never loads it otherwise. Delete {path.name} to resume from an earlier "
            "checkpoint, or start again."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{trainer_path} is missing, truncated or corrupt ({error}).") from None
    if not isinstance(trainer, dict) or not {"optimizer", "scheduler", "rng"} <= trainer.keys():
        raise CheckpointError(f"{trainer_path} lacks the optimizer, scheduler and RNG states a checkpoint records.")
    return Checkpoint(path, state, adapter, trainer)


def restore_checkpoint(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    load_optimizer: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Put the checkpoint's adapter tensors (shape-checked), optimizer, scheduler and RNGs in place.

    `load_optimizer` loads the optimizer state instead of `optimizer.load_state_dict` (FSDP's sharding loader).
    """
    copy_adapter_tensors(model, DEFAULT_ADAPTER, checkpoint.adapter, checkpoint.path / "adapter")
    (load_optimizer or optimizer.load_state_dict)(checkpoint.trainer["optimizer"])
    scheduler.load_state_dict(checkpoint.trainer["scheduler"])
    torch.set_rng_state(checkpoint.trainer["rng"]["torch"])
    if checkpoint.trainer["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint.trainer["rng"]["cuda"])
    random.setstate(_tuples(checkpoint.state["python_rng"]))


def find_resume_checkpoint(
    resume: str | bool, output_dir: Path, say: Callable[[str], None]
) -> tuple[Checkpoint, list[str]]:
    """The checkpoint `--resume [DIR]` means, read: DIR itself, else the newest readable one under
    DIR (or the run's own); an unreadable newer one is skipped, said through `say` and returned
    among the skipped. A checkpoint that is not trusted stops the resume: it is never stepped over."""
    base = output_dir if resume is True else Path(str(resume))
    if (base / STATE_NAME).is_file():
        return read_checkpoint(base), []
    found = list_checkpoints(base) or list_checkpoints(base / "checkpoints")
    if not found:
        raise ConfigError(f"--resume: no whole checkpoint in {str(base)!r}.")
    skipped: list[str] = []
    for path in reversed(found):
        try:
            return read_checkpoint(path), skipped
        except UntrustedCheckpointError:
            raise
        except CheckpointError as error:
            skipped.append(f"skipped checkpoint {path.name}: {error}")
            say(f"--resume: {skipped[-1]} Falling back to the checkpoint before it.")
    raise CheckpointError(f"--resume: no checkpoint in {str(base)!r} is readable: {'; '.join(skipped)}")
