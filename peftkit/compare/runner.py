"""Running a planned comparison: each run in its own process, then its row of results.

Each run is a child process (`peftkit.compare.child`), so its peak memory is its own
and a crash or an impossible option becomes a failed row while the others go on.
The training numbers are read from what training records anyway (`metrics.jsonl` and its
end summary); the child adds the parameter counts and the test scores. The base row's
child only loads and scores the model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any, TextIO

import yaml
from sacrebleu.metrics import BLEU, CHRF

from peftkit.compare.child import RESULT_NAME, SCORING_NAME
from peftkit.compare.plan import RunSpec
from peftkit.compare.scoring import macro_f1
from peftkit.peft_format import WEIGHTS_NAME
from peftkit.training.metrics import read_metrics

__all__ = ["task_scores", "test_summary", "collect_run", "run_plan"]


def task_scores(samples: Sequence[dict[str, str]]) -> dict[str, float | None]:
    """Exact match, BLEU and chrF (sacrebleu, corpus level), in percent, of outputs vs references."""
    if not samples:
        return {"exact_match": None, "bleu": None, "chrf": None}
    outputs = [sample["output"].strip() for sample in samples]
    references = [sample["reference"].strip() for sample in samples]
    return {
        "exact_match": 100 * sum(o == r for o, r in zip(outputs, references, strict=True)) / len(samples),
        "bleu": BLEU().corpus_score(outputs, [references]).score,
        "chrf": CHRF().corpus_score(outputs, [references]).score,
    }


def test_summary(result: dict[str, Any], references: Sequence[str] | None) -> dict[str, Any]:
    """The test-set fields of a row: the metric's mean (percent for 0/1 and per-example percent scores),
    macro-F1 for labels, per-example scores and predictions, and the forgetting loss."""
    test = result.get("test")
    row: dict[str, Any] = {"forgetting_loss": result.get("forgetting_loss"), "test_score": None, "macro_f1": None}
    if test is None:
        return {**row, "test_scores": None, "predictions": None}
    scores = test["scores"]
    percent = 100 if test["metric"] in ("label", "exact_match") else 1
    row["test_score"] = percent * sum(scores) / len(scores)
    if test["metric"] == "label" and references is not None:
        row["macro_f1"] = 100 * macro_f1(test["predictions"], references)
    return {**row, "test_scores": scores, "predictions": test["predictions"]}


def _base_row(spec: RunSpec, references: Sequence[str] | None) -> dict[str, Any]:
    counts = json.loads((spec.dir / RESULT_NAME).read_text(encoding="utf-8"))
    return {
        **_row_head(spec, "ok"),
        "total_params": counts["total_params"],
        "trainable_params": 0,
        "trainable_pct": 0.0,
        **test_summary(counts, references),
    }


def collect_run(spec: RunSpec, references: Sequence[str] | None = None) -> dict[str, Any]:
    """The row of a finished run, from its metrics.jsonl, adapter file and the child's result."""
    if spec.base:
        return _base_row(spec, references)
    metrics = read_metrics(spec.dir)
    summary, steps = metrics.summary, metrics.steps
    counts = json.loads((spec.dir / RESULT_NAME).read_text(encoding="utf-8"))
    # Step times from consecutive steps' clocks; the median leaves out the first step's warm-up
    # and the steps that include a validation pass.
    step_times = [b.elapsed_s - a.elapsed_s for a, b in zip(steps, steps[1:], strict=False) if b.step == a.step + 1]
    generated = [line.generations for line in metrics.generations]
    curve = [[line.step, line.val_loss] for line in metrics.validations]
    val_loss = summary.val_loss
    adapter = Path(summary.adapter) / WEIGHTS_NAME
    return {
        **_row_head(spec, "ok"),
        "trainable_params": counts["trainable_params"],
        "total_params": counts["total_params"],
        "trainable_pct": 100 * counts["trainable_params"] / counts["total_params"],
        "adapter_mb": adapter.stat().st_size / 1e6,
        "peak_memory_gb": summary.peak_memory_gb,
        "measured_step_peak_bytes": summary.measured_step_peak_bytes,
        "step_time_s": median(step_times) if step_times else None,
        "tokens_per_s": median(line.tokens_per_s for line in steps) if steps else None,
        "time_s": summary.time_s,
        "steps": summary.steps,
        "train_loss": summary.train_loss,
        "val_loss_start": summary.val_loss_start,
        "val_loss": val_loss,
        "val_ppl": None if val_loss is None else math.exp(val_loss),
        **task_scores(generated[-1] if generated else []),
        "chrf_start": task_scores(generated[0])["chrf"] if len(generated) > 1 else None,
        "curve": curve,
        **test_summary(counts, references),
    }


def _row_head(spec: RunSpec, status: str, error: str | None = None) -> dict[str, Any]:
    method = spec.config["method"]
    options = {key: value for key, value in method.items() if key != "name"}
    return {
        "name": spec.name,
        "group": spec.group or spec.name,
        "seed": spec.seed,
        "method": spec.method,
        "rank": spec.rank,
        "targets": spec.targets,
        "options": options,
        "status": status,
        "error": error,
    }


def _failure(returncode: int, log: Path) -> str:
    """Why a child failed: its last line of output (peftkit's error, or the exception), or the signal."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {returncode} with no output"
    return last.removeprefix("error: ")


class _Progress:
    """The overall progress line: rewritten in place on a terminal, a line per event otherwise."""

    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream, self.started = total, stream, time.monotonic()
        self.live = stream is not None and stream.isatty()

    def show(self, index: int, text: str, final: bool = False) -> None:
        if self.stream is None or not (final or self.live):
            return
        elapsed = _clock(time.monotonic() - self.started)
        line = f"[{index}/{self.total} | {elapsed}] {text}"
        self.stream.write(("\r\033[K" if self.live else "") + line + ("\n" if final else ""))
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def _steps_done(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return sum('"loss"' in line for line in metrics.read_text(encoding="utf-8").splitlines())


def _run_one(
    spec: RunSpec, index: int, progress: _Progress, timeout_s: float | None, scoring: dict[str, Any]
) -> dict[str, Any]:
    """Train `spec` in a child process and return its row (failed, with the message, if it did not finish)."""
    if spec.error is not None:
        progress.show(index, f"{spec.name}: FAILED: {spec.error}", final=True)
        return _row_head(spec, "failed", spec.error)
    shutil.rmtree(spec.dir, ignore_errors=True)  # metrics.jsonl appends: start each run clean
    spec.dir.mkdir(parents=True)
    run_yaml, log = spec.dir / "run.yaml", spec.dir / "log.txt"
    run_yaml.write_text(yaml.safe_dump(spec.config, sort_keys=False), encoding="utf-8")
    scoring_json = spec.dir / SCORING_NAME
    scoring_json.write_text(json.dumps({**scoring, "base": spec.base}), encoding="utf-8")
    progress.show(index, f"{spec.name}: running", final=not progress.live)
    command = [sys.executable, "-m", "peftkit.compare.child", str(run_yaml), str(spec.dir / RESULT_NAME)]
    command.append(str(scoring_json))
    total_steps = spec.config["training"]["max_steps"] if not spec.base else None
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as output:
        child = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        try:
            while child.poll() is None:
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    child.kill()
                    child.wait()
                    error = f"timed out after {timeout_s:g} s"
                    progress.show(index, f"{spec.name}: FAILED: {error}", final=True)
                    return _row_head(spec, "failed", error)
                if progress.live:
                    done = _steps_done(spec.dir / "metrics.jsonl")
                    progress.show(index, f"{spec.name}: step {done}" + (f"/{total_steps}" if total_steps else ""))
                time.sleep(0.5)
        finally:
            if child.poll() is None:  # interrupted: leave no orphan training behind
                child.kill()
                child.wait()
    if child.returncode != 0:
        error = _failure(child.returncode, log)
        progress.show(index, f"{spec.name}: FAILED: {error}", final=True)
        return _row_head(spec, "failed", error)
    row = collect_run(spec, scoring.get("references"))
    parts = [f"{spec.name}: done in {time.monotonic() - started:.0f} s"]
    if row.get("val_loss") is not None:
        parts.append(f"val loss {row['val_loss']:.4f}")
    if row["test_score"] is not None:
        parts.append(f"test {scoring['metric']} {row['test_score']:.1f}")
    if row["forgetting_loss"] is not None:
        parts.append(f"forgetting-text loss {row['forgetting_loss']:.4f}")
    progress.show(index, " | ".join(parts), True)
    return row


def run_plan(
    runs: Sequence[RunSpec],
    timeout_s: float | None = None,
    stream: TextIO | None = None,
    scoring: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run every planned run in turn, each in its own process; one row per run, in plan order.

    `scoring` tells each child what to score after training (metric, labels, forgetting file).
    """
    progress = _Progress(len(runs), stream)
    scoring = scoring or {"metric": "exact_match"}
    return [_run_one(spec, index, progress, timeout_s, scoring) for index, spec in enumerate(runs, 1)]
