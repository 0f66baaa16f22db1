"""The output directory of one run: it holds that run's state only, and a resume belongs to its config.

A run's state is `config.yaml`, `metrics.jsonl`, `checkpoints/` and `adapter/`. A new run
never starts over another run's state (its checkpoints would sort among the old ones,
and `keep_last` or a later `--resume` would pick the wrong run's); `--overwrite` clears
the old state first. A resumed run must have the checkpoint's config, but for the options
that decide only when to evaluate, log and save (`RESUMABLE`), and a longer run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, PeftkitError
from peftkit.registry import get_method

__all__ = [
    "RUN_STATE",
    "RESUMABLE",
    "EXTENDABLE",
    "OutputDirError",
    "run_state",
    "check_new_run",
    "clear_run",
    "resume_differences",
    "check_resume",
]

# Checkpoints first: a clearing cut short must take away what a resume would read before the rest.
RUN_STATE = ("checkpoints", "adapter", "metrics.jsonl", "config.yaml")
_TRASH_PREFIX = ".peftkit-overwritten-"

# Options a resumed run may change: they decide when to evaluate, log and save, not what is learned.
RESUMABLE = (
    "model.gradient_checkpointing",
    "training.log_every",
    "eval.every",
    "eval.generations",
    "eval.max_new_tokens",
    "eval.batch_size",
    "output.dir",
    "output.save_every",
    "output.keep_last",
)
# Options a resumed run may change to train longer: the step reached is checked against the new total.
EXTENDABLE = ("training.max_steps", "training.epochs")


class OutputDirError(PeftkitError, OSError):
    """The output directory holds another run's state, or cannot be written."""


def run_state(out: Path) -> list[str]:
    """The run-state entries present in `out`, in `RUN_STATE` order."""
    return [name for name in RUN_STATE if (out / name).exists()]


def check_new_run(out: Path, overwrite: bool) -> None:
    """Refuse a new run in a directory that holds one, unless `overwrite` (cleared later, by `clear_run`)."""
    found = run_state(out)
    if found and not overwrite:
        raise OutputDirError(
            f"output.dir {str(out)!r} already holds a run ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to delete it and start again, or choose another output.dir."
        )


def clear_run(out: Path) -> None:
    """Delete the run state in `out`, leaving any other file alone.

    Each entry is first renamed into one trash directory (a rename is atomic), then the
    trash is deleted: a crash part way leaves whole entries of the old run and a trash
    directory that the next `--overwrite` removes, never a half-deleted checkpoint. Nothing
    of the new run is written before this returns.
    """
    for stale in out.glob(f"{_TRASH_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    found = run_state(out)
    if not found:
        return
    trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=out))
    for name in found:
        os.replace(out / name, trash / name)
    shutil.rmtree(trash)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """`section.key -> value` of a resolved config; the method's options complete with their defaults."""
    flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}
    method = config["method"]
    options = get_method(method["name"]).from_options(**{k: v for k, v in method.items() if k != "name"}).config
    flat.update({f"method.{key}": value for key, value in dataclasses.asdict(options).items()})
    for key in ("data.train", "data.validation"):  # the same file, however the path was written
        if flat.get(key):
            flat[key] = os.path.abspath(flat[key])
    return flat


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`key -> (checkpoint's value, this config's)` for each option that differs and may not on resume."""
    before, now = _flat(saved), _flat(current)
    differing = {key: (before.get(key), now.get(key)) for key in before.keys() | now.keys()}
    return {
        key: values
        for key, values in sorted(differing.items())
        if values[0] != values[1] and key not in RESUMABLE + EXTENDABLE
    }


def check_resume(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume the checkpoint at `checkpoint` (config `saved`) under a config that changes results."""
    differing = resume_differences(saved, current)
    if differing:
        said = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in differing.items())
        raise ConfigError(
            f"--resume: {str(checkpoint)!r} was trained with other options ({said}). A resume may change only "
            f"{', '.join(RESUMABLE)}, and {' or '.join(EXTENDABLE)} to train longer; start a new run "
            "(another output.dir, or --overwrite) to change the others."
        )
