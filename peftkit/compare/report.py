"""The files of a comparison: results.json, results.csv, REPORT.md and the PNG plots it embeds.

A pure function of the rows (`peftkit.compare.runner.collect_run`) and of `meta`, what every
run shared; results.json holds both, so a report can be written again from it alone:
`write_report(**json.load(open("results.json")), out=...)`.
"""

from __future__ import annotations

import csv
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.compare.analysis import analysis_section
from peftkit.compare.figures import save_figure
from peftkit.files import atomic_write, atomic_write_json

__all__ = ["CSV_COLUMNS", "machine_description", "rank_rows", "write_plots", "write_report"]

CSV_COLUMNS = [
    "name",
    "method",
    "rank",
    "targets",
    "status",
    "error",
    "trainable_params",
    "total_params",
    "trainable_pct",
    "adapter_mb",
    "peak_memory_gb",
    "step_time_s",
    "tokens_per_s",
    "time_s",
    "steps",
    "train_loss",
    "val_loss_start",
    "val_loss",
    "val_ppl",
    "exact_match",
    "bleu",
    "chrf",
    "chrf_start",
    "options",
]
# Bar charts: file, title, and the panels (row key, axis label); a panel with no values is left out.
BAR_PLOTS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("memory.png", "Memory", [("peak_memory_gb", "peak memory (GB)"), ("adapter_mb", "adapter file (MB)")]),
    ("time.png", "Time", [("step_time_s", "median step time (s)"), ("tokens_per_s", "tokens/s (median)")]),
    (
        "quality.png",
        "Quality",
        [("val_loss", "validation loss (lower is better)"), ("chrf", "chrF (higher is better)"), ("bleu", "BLEU")],
    ),
]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """CPU, cores, memory, accelerator and software versions of this machine, in one line."""
    import torch

    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        memory = ""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.system()} {platform.machine()}, {_cpu_name()} ({os.cpu_count()} cores{memory}), {device}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def rank_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished runs by final validation loss (lowest first), then the failed ones in their order."""
    done = [row for row in rows if row["status"] == "ok"]
    done.sort(key=lambda row: (row["val_loss"] is None, row["val_loss"] or 0.0))
    return done + [row for row in rows if row["status"] != "ok"]


def _bar_figure(rows: Sequence[dict[str, Any]], title: str, panels: list[tuple[str, str]]) -> Any | None:
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in panels if any(row.get(key) is not None for row in rows)]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(rows) + 1.8), squeeze=False)
    names = [row["name"] for row in rows][::-1]  # the best run on top
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        values = [row.get(key) for row in rows][::-1]
        bars = axis.barh(names, [v if v is not None else 0.0 for v in values], color="tab:blue")
        axis.bar_label(bars, labels=[f"{v:.3g}" if v is not None else "n/a" for v in values], padding=2, fontsize=8)
        axis.set_xlabel(label)
        axis.margins(x=0.2)
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(title)
    return figure


def write_plots(rows: Sequence[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    """PNG plots of the finished runs (ranked order); returns (file name, caption) of each written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rank_rows(rows) if row["status"] == "ok"]
    written: list[tuple[str, str]] = []
    curves = [row for row in done if row.get("curve")]
    if curves:
        figure, axis = plt.subplots(figsize=(8, 4.5))
        for row in curves:
            steps, losses = zip(*row["curve"], strict=True)
            axis.plot(steps, losses, marker="o", markersize=3, label=row["name"])
        axis.set(xlabel="step", ylabel="validation loss", title="Validation loss against step")
        axis.grid(alpha=0.3)
        axis.legend()
        save_figure(figure, out / "val_loss.png")
        plt.close(figure)
        written.append(("val_loss.png", "Validation loss against step"))
    for name, title, panels in BAR_PLOTS:
        figure = _bar_figure(done, title, panels) if done else None
        if figure is not None:
            save_figure(figure, out / name)
            plt.close(figure)
            written.append((name, title))
    return written


def _fmt(value: Any, spec: str = ".3g", unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def _params(row: dict[str, Any]) -> str:
    count = row["trainable_params"]
    text = f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count:,}"
    return f"{text} ({row['trainable_pct']:.2f}%)"


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    header = [
        "#",
        "run",
        "val loss (start → end)",
        "val ppl",
        "chrF (start → end)",
        "BLEU",
        "exact match",
        "train loss",
        "trainable params",
        "adapter",
        "peak memory",
        "step time",
        "tokens/s",
        "total time",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for place, row in enumerate(rows, 1):
        cells = [
            str(place),
            f"`{row['name']}`",
            f"{_fmt(row['val_loss_start'], '.3f')} → **{_fmt(row['val_loss'], '.3f')}**",
            _fmt(row["val_ppl"], ".2f"),
            f"{_fmt(row['chrf_start'], '.1f')} → {_fmt(row['chrf'], '.1f')}",
            _fmt(row["bleu"], ".1f"),
            _fmt(row["exact_match"], ".0f", "%"),
            _fmt(row["train_loss"], ".3f"),
            _params(row),
            _fmt(row["adapter_mb"], ".2f", " MB"),
            _fmt(row["peak_memory_gb"], ".2f", " GB"),
            _fmt(row["step_time_s"], ".3g", " s"),
            _fmt(row["tokens_per_s"], ".0f"),
            _fmt(row["time_s"], ".0f", " s"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _setup(meta: dict[str, Any]) -> list[str]:
    """What every run shared, in words."""
    shared = meta["shared"]
    model, data, training, evaluation = shared["model"], shared["data"], shared["training"], shared["eval"]
    sequences = training["batch_size"] * training["gradient_accumulation_steps"]
    steps = training["max_steps"] or f"{training['epochs']} epoch(s) of"
    validation = f"`{data['validation']}`" if data["validation"] else f"{data['validation_split']:.0%} of train"
    return [
        f"- model `{model['name']}` ({model['dtype']}, mixed precision {training['mixed_precision']})",
        f"- data `{data['train']}`, validation {validation}, max_length {data['max_length']}",
        f"- {steps} steps x {sequences} sequences, learning rate {training['learning_rate']:g} "
        f"({training['schedule']}, {training['warmup_steps']} warmup steps), seed {training['seed']}",
        f"- validation loss every {evaluation['every'] or 'run'} steps (and at start and end); task metric from "
        f"greedy generations on the first {meta['generations']} validation prompts (max {evaluation['max_new_tokens']} "
        "new tokens) against their references: exact match, BLEU and chrF (sacrebleu, corpus level)",
    ]


def _markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any], plots: list[tuple[str, str]]) -> str:
    ranked = rank_rows(rows)
    done = [row for row in ranked if row["status"] == "ok"]
    failed = [row for row in ranked if row["status"] != "ok"]
    lines = [
        f"# peftkit compare: {', '.join(meta['methods'])} on {meta['shared']['model']['name']}",
        "",
        f"Run on {meta['date']} from `{meta['config']}`.  ",
        f"Machine: {meta['machine']}.",
        "",
        "Every run had the same setup, only the method section differing:",
        "",
        *_setup(meta),
        "",
        "## Ranking",
        "",
        "By final validation loss, lowest first. Peak memory is the run's own process: on CPU its peak RSS, "
        "which includes loading the base in full precision (before a 4-bit base is quantized); on GPU "
        "`torch.cuda.max_memory_allocated`. Step time and tokens/s are medians over the steps.",
        "",
    ]
    lines += _table(done) if done else ["No run finished."]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{row['name']}`: {row['error']}" for row in failed]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{caption}]({name})\n" for name, caption in plots]
    lines += ["", "## Runs and their options", "", "| run | method | options |", "|---|---|---|"]
    lines += [f"| `{row['name']}` | {row['method']} | `{json.dumps(row['options'], sort_keys=True)}` |" for row in rows]
    lines += [
        "",
        "Numbers for every run are in `results.csv` and `results.json`; each run's config, log and "
        "`metrics.jsonl` are under `runs/<run>/`.",
    ]
    return "\n".join(lines) + "\n"


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "options": json.dumps(row["options"], sort_keys=True)})

    atomic_write(path, write)


def write_report(runs: Sequence[dict[str, Any]], out: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Write results.json, results.csv, the plots and REPORT.md under `out`; returns REPORT.md's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"meta": meta, "runs": list(runs)})
    _write_csv(runs, out / "results.csv")
    plots = write_plots(runs, out)
    report = out / "REPORT.md"
    text = _markdown(runs, meta, plots)
    text += analysis_section(rank_rows(runs), out / "runs", meta["shared"]["model"]["name"])
    atomic_write(report, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return report
