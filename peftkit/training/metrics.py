"""The lines of a run's `metrics.jsonl`, typed: the loop writes them, compare and `--resume` read them.

One JSON object a line. Each kind of line is one record below, told apart by its keys;
lines of other kinds (the data report, a resume's notes) pass through untyped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_NAME",
    "GenerationsLine",
    "RunMetrics",
    "StepLine",
    "Summary",
    "ValidationLine",
    "read_metrics",
]

METRICS_NAME = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class StepLine:
    """One optimizer step: its loss (mean over processes), learning rate, throughput and clock."""

    step: int
    loss: float
    lr: float
    tokens_per_s: float
    elapsed_s: float


@dataclasses.dataclass(frozen=True)
class ValidationLine:
    """The validation loss at `step` (0: before training)."""

    step: int
    val_loss: float
    val_ppl: float


@dataclasses.dataclass(frozen=True)
class GenerationsLine:
    """Greedy samples at `step`: prompt, reference and output each."""

    step: int
    generations: list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Summary:
    """The run's end: what `peftkit train` says in its last line, in bytes and seconds."""

    steps: int
    time_s: float
    peak_memory_bytes: int
    peak_memory_gb: float
    estimated_step_peak_bytes: int | None
    measured_step_peak_bytes: int | None
    train_loss: float | None
    val_loss_start: float | None
    val_loss: float | None
    adapter: str

    def line(self) -> dict[str, Any]:
        return {"summary": dataclasses.asdict(self)}


@dataclasses.dataclass
class RunMetrics:
    """A metrics.jsonl read back, by kind of line, in the order written."""

    steps: list[StepLine]
    validations: list[ValidationLine]
    generations: list[GenerationsLine]
    summary: Summary | None


_KINDS: list[tuple[type, str]] = [(StepLine, "loss"), (ValidationLine, "val_loss"), (GenerationsLine, "generations")]


def read_metrics(run_dir: str | Path) -> RunMetrics:
    """The typed lines of `run_dir/metrics.jsonl`; the last summary when the run finished (None if not)."""
    found: dict[type, list[Any]] = {cls: [] for cls, _ in _KINDS}
    summary = None
    for text in (Path(run_dir) / METRICS_NAME).read_text(encoding="utf-8").splitlines():
        record = json.loads(text)
        if "summary" in record:
            summary = Summary(**record["summary"])
            continue
        for cls, key in _KINDS:
            if key in record:
                names = {f.name for f in dataclasses.fields(cls)}
                found[cls].append(cls(**{k: v for k, v in record.items() if k in names}))
    return RunMetrics(found[StepLine], found[ValidationLine], found[GenerationsLine], summary)
