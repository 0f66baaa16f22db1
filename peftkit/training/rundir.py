"""The output directory of one run: it holds that run's state only, and a resume belongs to its config.

A run's state is `config.yaml`, `metrics.jsonl`, `checkpoints/` and `adapter/`. A new run
never starts over another run's state (its checkpoints would sort among the old ones,
and `keep_last` or a later `--resume` would pick the wrong run's); `--overwrite` clears
the old state first. A resumed run must have the checkpoint's config, but for the options
that decide only when to evaluate, log and save (`RESUMABLE`), and a longer run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import ConfigError, OutputDirError
from peftkit.files import atomic_write, destination_errors, probe_write
from peftkit.registry import get_method
from peftkit.training.checkpoint import Checkpoint, checkpoint_step, list_checkpoints
from peftkit.training.config import DataConfig
from peftkit.training.metrics import METRICS_NAME

__all__ = [
    "RUN_STATE",
    "RESUMABLE",
    "EXTENDABLE",
    "writing",
    "probe_output",
    "run_state",
    "check_new_run",
    "clear_run",
    "discard_later_checkpoints",
    "start_writing",
    "resume_differences",
    "check_resume",
    "data_digests",
]

# Checkpoints first: a clearing cut short must take away what a resume would read before the rest.
RUN_STATE = ("checkpoints", "adapter", METRICS_NAME, "config.yaml")
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


_PROBE_BYTES = 1 << 16


def writing(out: Path) -> AbstractContextManager[None]:
    """Writes to the run's directory inside this block fail as one DestinationError naming output.dir."""
    return destination_errors(out, f"output.dir {str(out)!r}")


def probe_output(out: Path) -> None:
    """Write, sync and delete a small file where the run will write, before any model loads.

    A read-only or full disk then fails in a second, not after minutes of loading; the probe
    goes in the nearest existing directory on the way to `out`, so nothing is created.
    """
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output.dir {str(out)!r} is a file, not a directory.")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    with writing(out):
        probe_write(existing, _PROBE_BYTES)


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


def _discard(out: Path, paths: list[Path]) -> None:
    """Delete `paths` (inside `out`) by renaming each into one trash directory, then deleting that.

    A rename is atomic, so a crash part way leaves each entry whole where it was or in the
    trash, which the next call removes: never a half-deleted checkpoint in view.
    """
    for stale in out.glob(f"{_TRASH_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if not paths:
        return
    trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=out))
    for number, path in enumerate(paths):
        os.replace(path, trash / f"{number}-{path.name}")
    shutil.rmtree(trash)


def clear_run(out: Path) -> None:
    """Delete the run state in `out` for `--overwrite`, checkpoints first, leaving any other file alone.

    Nothing of the new run is written before this returns, so a crash leaves old state only.
    """
    _discard(out, [out / name for name in run_state(out)])


def discard_later_checkpoints(out: Path, step: int) -> list[str]:
    """Delete the checkpoints in `out` past `step`, the one resumed: they are of the continuation
    being replaced, and a later `--resume` must not pick one. Returns their names."""
    later = [p for p in list_checkpoints(out / "checkpoints") if checkpoint_step(p) > step]
    _discard(out, later)
    return sorted(p.name for p in later)


def cut_metrics(out: Path, step: int) -> int:
    """Drop what `metrics.jsonl` holds of the attempt after `step`, the one resumed: the resumed run
    logs it again (from its validation at `step` on), so plots and compare read one line per step.
    Kept: lines of earlier steps and the training loss of `step`; dropped: later lines, records at
    `step` the resumed run writes anew, an earlier finish's summary. Rewritten atomically; returns
    how many lines went."""
    path = out / METRICS_NAME
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _before_resume(line, step)]
    if len(kept) < len(lines):
        atomic_write(path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))
    return len(lines) - len(kept)


def _before_resume(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False  # cut short by the crash
    logged = record.get("step") if isinstance(record, dict) else None
    if not isinstance(logged, int):
        return False  # the summary
    return logged < step or (logged == step and "loss" in record)


def start_writing(
    out: Path, config: dict[str, Any], overwrite: bool, resumed_step: int | None
) -> tuple[list[str], int]:
    """Make `out` this run's: clear another run (`overwrite`), or what came after the step resumed
    (later checkpoints, metrics lines); then write the config in force as `config.yaml`.
    Returns the checkpoints deleted and the number of metrics lines dropped."""
    text = yaml.safe_dump(config, sort_keys=False)
    with writing(out):
        if overwrite:
            clear_run(out)
        discarded, dropped = [], 0
        if resumed_step is not None:
            discarded, dropped = discard_later_checkpoints(out, resumed_step), cut_metrics(out, resumed_step)
        atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return discarded, dropped


def _flat(config: dict[str, Any], saved: bool) -> dict[str, Any]:
    """`section.key -> value` of a resolved config. A `saved` one (a checkpoint's record, maybe from a version
    that wrote only the options given) has its method options completed with their defaults; the run's own
    config (`RunConfig.to_dict()`) spells every option out already."""
    flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}
    if saved:
        method = config["method"]
        options = get_method(method["name"]).from_options(**{k: v for k, v in method.items() if k != "name"})
        flat.update({f"method.{key}": value for key, value in options.options().items()})
    for key in ("data.train", "data.validation"):  # the same file, however the path was written
        if flat.get(key):
            flat[key] = os.path.abspath(flat[key])
    return flat


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`key -> (checkpoint's value, this config's)` for every option that differs; `current` is `to_dict()`'s."""
    before, now = _flat(saved, saved=True), _flat(current, saved=False)
    differing = {key: (before.get(key), now.get(key)) for key in sorted(before.keys() | now.keys())}
    return {key: values for key, values in differing.items() if values[0] != values[1]}


def _said(differing: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in differing.items())


def data_digests(data: DataConfig) -> dict[str, str]:
    """`data.train`/`data.validation` -> the SHA-256 of the file's bytes, so a resume sees an edited file."""
    paths = {"data.train": data.train, "data.validation": data.validation}
    return {key: hashlib.sha256(Path(path).read_bytes()).hexdigest() for key, path in paths.items() if path}


def check_resume(
    checkpoint: Checkpoint, config: dict[str, Any], digests: dict[str, str], sequences: int, total_steps: int
) -> str:
    """Refuse to resume `checkpoint` under `config` where that changes results; returns the changes allowed.

    The data files must hold what they held (`digests`, by `data_digests`). The global batch
    (`sequences` per step: batch_size x processes x accumulation) must be the checkpoint's,
    so a per-process batch_size may change with the number of processes; the run may be
    made longer, never shorter than the step the checkpoint reached.
    """
    saved = checkpoint.state.get("config")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(section), dict) for section in config):
        raise ConfigError(
            f"--resume: {str(checkpoint.path)!r} records no whole config, so it cannot be checked to belong to "
            "this run; start a new run (another output.dir, or --overwrite)."
        )
    differing = resume_differences(saved, config)
    refused = {k: v for k, v in differing.items() if k not in RESUMABLE + EXTENDABLE + ("training.batch_size",)}
    saved_digests = checkpoint.state.get("data_sha256", {})
    for key, digest in digests.items():
        if key not in refused and saved_digests.get(key, digest) != digest:
            refused[f"{key} contents"] = (f"sha256 {saved_digests[key][:12]}", f"sha256 {digest[:12]}")
    if refused:
        raise ConfigError(
            f"--resume: {str(checkpoint.path)!r} was trained with other options ({_said(refused)}). A resume may "
            f"change only {', '.join(RESUMABLE)}, and {' or '.join(EXTENDABLE)} to train longer; start a new run "
            "(another output.dir, or --overwrite) to change the others."
        )
    before = checkpoint.state.get("examples_seen", 0) // max(checkpoint.step, 1)
    if checkpoint.step and before != sequences:
        raise ConfigError(
            f"--resume: a step of {str(checkpoint.path)!r} took {before} sequences, one of this run {sequences} "
            "(training.batch_size x processes x gradient_accumulation_steps); resume with the checkpoint's global "
            "batch, e.g. the batch_size and number of processes it had."
        )
    if checkpoint.step > total_steps:
        raise ConfigError(
            f"--resume: {str(checkpoint.path)!r} is at step {checkpoint.step}, past the {total_steps} steps this "
            "config trains; raise training.max_steps (or training.epochs) to train on from it."
        )
    return _said(differing)
