"""Training checkpoints that are whole or absent, and that resume a run exactly.

A checkpoint directory `step-000120/` holds the adapter in PEFT's format, the
optimizer and scheduler state (torch.save, read back with weights_only=True), the
RNG states, and `state.json` (step, data position, resolved config). It is written
under a temporary name and renamed into place, so a crash mid-save leaves the
previous checkpoint as the newest whole one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from peftkit.errors import AdapterFileError
from peftkit.files import atomic_directory
from peftkit.inject import DEFAULT_ADAPTER
from peftkit.serialization import WEIGHTS_NAME, copy_adapter_tensors, save_adapter

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints"]

_NAME = re.compile(r"^step-(\d+)$")
STATE_NAME = "state.json"
TRAINER_NAME = "trainer_state.pt"


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """The whole checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest whole checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


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
) -> Path:
    """Write checkpoint `step` under `root` atomically, then drop all but the newest `keep_last`."""
    root = Path(root)
    final = root / f"step-{step:06d}"
    with atomic_directory(final, replace=True) as tmp:
        save_adapter(model, tmp / "adapter")
        trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
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


def load_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore adapter tensors, optimizer, scheduler and RNGs from `path`; returns its state.json."""
    path = Path(path)
    if not (path / STATE_NAME).is_file():
        raise AdapterFileError(f"{str(path)!r} is not a whole checkpoint (no {STATE_NAME}).")
    copy_adapter_tensors(model, DEFAULT_ADAPTER, load_file(str(path / "adapter" / WEIGHTS_NAME)), path / "adapter")
    trainer = torch.load(path / TRAINER_NAME, weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"]["torch"])
    if trainer["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    random.setstate(_tuples(state.pop("python_rng")))
    return state
