"""The files of a comparison: results.json, results.csv, REPORT.md and the PNG plots it embeds.

REPORT.md opens with the verdict (per method: quality mean ± sd over seeds, forgetting,
step peak memory, step time, trainable parameters; the Pareto front and the differences
that are and are not significant, in words), then the paired differences, the plots, the
shared setup and every run.

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
from peftkit.compare.plots import quality_label, write_plots
from peftkit.compare.stats import ALPHA
from peftkit.compare.summary import Comparison, MethodSummary, step_peak_gb, summarise
from peftkit.files import atomic_write, atomic_write_json

__all__ = ["CSV_COLUMNS", "machine_description", "rank_rows", "write_report"]

CSV_COLUMNS = [
    "name",
    "group",
    "seed",
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
    "measured_step_peak_bytes",
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
    "test_score",
    "macro_f1",
    "forgetting_loss",
    "options",
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
    """Finished runs best first (highest test score, else lowest validation loss), then the failed ones."""
    done = [row for row in rows if row["status"] == "ok"]
    if any(row.get("test_score") is not None for row in done):
        done.sort(key=lambda row: (row.get("test_score") is None, -(row.get("test_score") or 0.0)))
    else:
        done.sort(key=lambda row: (row.get("val_loss") is None, row.get("val_loss") or 0.0))
    return done + [row for row in rows if row["status"] != "ok"]


def _fmt(value: Any, spec: str = ".3g", unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def _spread(stat: tuple[float, float | None] | None, spec: str, unit: str = "") -> str:
    """`mean ± sd` (or the one value) of a (mean, sd) pair."""
    if stat is None:
        return "–"
    mean, sd = stat
    return f"{mean:{spec}}" + (f" ± {sd:{spec.lstrip('+')}}" if sd is not None else "") + unit


def _scale(comparison: Comparison) -> tuple[float, str]:
    """Paired differences in the unit the verdict shows: percentage points for 0/1 scores."""
    return (100.0, " (in percentage points)") if comparison.metric in ("label", "exact_match") else (1.0, "")


def _count(count: int | None) -> str:
    if count is None:
        return "–"
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count:,}"


def _verdict_table(comparison: Comparison) -> list[str]:
    header = [
        "method",
        "seeds",
        quality_label(comparison),
        "macro-F1 (%)",
        "forgetting (Δ loss)",
        "step peak memory",
        "step time",
        "trainable params",
    ]
    spec = ".3f" if comparison.metric is None else ".1f"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in comparison.methods:
        cells = [
            f"`{m.name}`" + ("" if m.is_base else f" ({m.method})"),
            "–" if m.is_base else str(len(m.seeds)),
            f"**{_spread(m.quality, spec)}**",
            _spread(m.macro_f1, ".1f"),
            _spread(m.forgetting, "+.3f"),
            _spread(m.memory_gb, ".3f", " GB"),
            _spread(m.step_time_s, ".2f", " s"),
            _count(m.trainable_params),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cheaper(m: MethodSummary, best: MethodSummary) -> list[str]:
    """How `m` is cheaper than `best`, in words ([] if it is not)."""
    ways = []
    for key, name, unit in (("memory_gb", "memory", " GB"), ("step_time_s", "step time", " s")):
        mine, theirs = getattr(m, key), getattr(best, key)
        if mine is not None and theirs is not None and mine[0] < theirs[0]:
            ways.append(f"{name} {mine[0]:.3g}{unit} against {theirs[0]:.3g}{unit}")
    return ways


def _verdict_words(comparison: Comparison) -> list[str]:
    """Best quality; within noise of it and cheaper; the fronts; every method against the base model."""
    trained = [m for m in comparison.methods if not m.is_base]
    if not trained:
        return []
    best = trained[0]
    spec = ".3f" if comparison.metric is None else ".1f"
    lines = [f"- **Best quality: `{best.name}`** ({_spread(best.quality, spec)})."]
    scale, _ = _scale(comparison)
    close = []
    for m in trained[1:]:
        difference = comparison.pair(best.name, m.name)
        ways = _cheaper(m, best)
        if difference is not None and not difference.significant and ways:
            close.append(
                f"`{m.name}` ({scale * difference.mean:+.2f}, p = {difference.p_value:.2g}; {', '.join(ways)})"
            )
    if comparison.metric is None:
        lines.append("- No test set was scored, so no paired test: quality is the validation loss.")
    elif close:
        lines.append(f"- **Within noise of it and cheaper:** {'; '.join(close)}.")
    else:
        lines.append(
            f"- No cheaper method is within noise of it (every paired test against it has p < {ALPHA}, "
            "or costs no less)."
        )
    for key, name in (("memory_gb", "memory"), ("step_time_s", "step time")):
        if comparison.fronts.get(key):
            front = ", ".join(f"`{n}`" for n in comparison.fronts[key])
            lines.append(f"- Pareto front, quality against {name} (no method both better and cheaper): {front}.")
    base = next((m for m in comparison.methods if m.is_base), None)
    if base is not None:
        above = [(m, comparison.pair(m.name, base.name)) for m in trained]
        significant = [f"`{m.name}`" for m, d in above if d is not None and d.significant and d.mean > 0]
        others = [f"`{m.name}`" for m, d in above if d is not None and not (d.significant and d.mean > 0)]
        lines.append(
            f"- Significantly above the base model ({_spread(base.quality, spec)}): "
            + (", ".join(significant) or "none")
            + (f"; not: {', '.join(others)}." if others else ".")
        )
    return lines


def _pairs_section(comparison: Comparison) -> list[str]:
    if not comparison.pairs:
        return []
    scale, unit = _scale(comparison)
    lines = [
        "## Paired differences",
        "",
        f"A − B on the same test examples and seeds (the base model pairs with every seed): the mean difference{unit}, "
        "its 95% percentile bootstrap interval over test examples (20,000 resamples, seeds pooled), and a "
        "two-sided paired test: McNemar's exact test on the discordant (seed, example) pairs for 0/1 scores, "
        "a sign-flip permutation test on the per-example differences otherwise.",
        "",
        "| A − B | difference | 95% interval | test | p | significant at 0.05 |",
        "|---|---|---|---|---|---|",
    ]
    for a, b, d in comparison.pairs:
        lines.append(
            f"| `{a}` − `{b}` | {scale * d.mean:+.2f} | [{scale * d.low:+.2f}, {scale * d.high:+.2f}] | {d.test} | "
            f"{d.p_value:.2g} | {'yes' if d.significant else 'no'} |"
        )
    yes = [
        f"`{a}` − `{b}` ({scale * d.mean:+.2f}, p = {d.p_value:.2g})" for a, b, d in comparison.pairs if d.significant
    ]
    no = [
        f"`{a}` − `{b}` ({scale * d.mean:+.2f}, p = {d.p_value:.2g})"
        for a, b, d in comparison.pairs
        if not d.significant
    ]
    lines += [
        "",
        f"Significant at {ALPHA}: {', '.join(yes) or 'none'}.  ",
        f"Not significant (within noise): {', '.join(no) or 'none'}.",
    ]
    return lines


def _runs_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    header = [
        "#",
        "run",
        "seed",
        "test score",
        "val loss (start → end)",
        "chrF of samples (start → end)",
        "train loss",
        "trainable params",
        "adapter",
        "step peak",
        "step time",
        "tokens/s",
        "total time",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for place, row in enumerate(rows, 1):
        cells = [
            str(place),
            f"`{row['name']}`",
            "–" if row.get("group", row["name"]) == "base" else str(row.get("seed", "–")),
            _fmt(row.get("test_score"), ".1f"),
            f"{_fmt(row.get('val_loss_start'), '.3f')} → {_fmt(row.get('val_loss'), '.3f')}",
            f"{_fmt(row.get('chrf_start'), '.1f')} → {_fmt(row.get('chrf'), '.1f')}",
            _fmt(row.get("train_loss"), ".3f"),
            _count(row.get("trainable_params")),
            _fmt(row.get("adapter_mb"), ".2f", " MB"),
            _fmt(step_peak_gb(row), ".3f", " GB"),
            _fmt(row.get("step_time_s"), ".3g", " s"),
            _fmt(row.get("tokens_per_s"), ".0f"),
            _fmt(row.get("time_s"), ".0f", " s"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _setup(meta: dict[str, Any]) -> list[str]:
    """What every run shared, in words, and the budget rule."""
    shared = meta["shared"]
    model, data, training = shared["model"], shared["data"], shared["training"]
    sequences = training["batch_size"] * training["gradient_accumulation_steps"]
    steps = training["max_steps"] or f"{training['epochs']} epoch(s) of"
    validation = f"`{data['validation']}`" if data["validation"] else f"{data['validation_split']:.0%} of train"
    lines = [
        f"- model `{model['name']}` ({model['dtype']}, mixed precision {training['mixed_precision']})",
        f"- data `{data['train']}`, validation {validation}, test `{data.get('test')}`, "
        f"max_length {data['max_length']}",
        f"- budget: every run takes the same {steps} steps x {sequences} sequences in the same order for a seed "
        f"(so the same examples and tokens), learning rate {training['learning_rate']:g} unless its entry sets "
        f"its own ({training['schedule']}, {training['warmup_steps']} warmup steps)",
        f"- seeds {meta.get('seeds')}: each drives adapter init, data order and dropout",
    ]
    if meta.get("metric") and data.get("test"):
        lines.append(
            f"- task metric `{meta['metric']}` on every example of the test set, after training "
            "(and for the untrained base model)"
        )
    if meta.get("forgetting"):
        lines.append(
            f"- forgetting: the loss on `{meta['forgetting']}` (text no task data came from), trained minus "
            "base: positive means worse elsewhere"
        )
    if meta.get("wall_time_s"):
        lines.append(f"- wall time of the whole comparison: {meta['wall_time_s'] / 60:.1f} min")
    return lines


def _markdown(
    rows: Sequence[dict[str, Any]], meta: dict[str, Any], comparison: Comparison, plots: list[tuple[str, str]]
) -> str:
    ranked = rank_rows(rows)
    done = [row for row in ranked if row["status"] == "ok"]
    failed = [row for row in ranked if row["status"] != "ok"]
    names = [m if isinstance(m, str) else m.get("label", m.get("name")) for m in meta["methods"]]
    lines = [
        f"# peftkit compare: {', '.join(map(str, names))} on {meta['shared']['model']['name']}",
        "",
        f"Run on {meta['date']} from `{meta['config']}`.  ",
        f"Machine: {meta['machine']}.",
        "",
        "## Verdict",
        "",
    ]
    lines += _verdict_table(comparison) if comparison.methods else ["No run finished."]
    lines += ["", *_verdict_words(comparison)]
    lines += [
        "",
        "Step peak memory: live tensor bytes over training steps 1-2 on CPU, `torch.cuda.max_memory_allocated` on "
        "GPU. Step time: the median over the steps. Mean ± sd over seeds.",
    ]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{row['name']}`: {row['error']}" for row in failed]
    lines += ["", *_pairs_section(comparison)]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{caption}]({name})\n" for name, caption in plots]
    lines += ["", "## Setup", "", *_setup(meta), "", "## Runs", ""]
    lines += _runs_table(done) if done else ["No run finished."]
    lines += ["", "## Runs and their options", "", "| run | method | options |", "|---|---|---|"]
    lines += [f"| `{row['name']}` | {row['method']} | `{json.dumps(row['options'], sort_keys=True)}` |" for row in rows]
    lines += [
        "",
        "Numbers for every run, with each run's per-example test scores, are in `results.json` (and `results.csv`); "
        "each run's config, log and `metrics.jsonl` are under `runs/<run>/`.",
    ]
    return "\n".join(lines) + "\n"


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "options": json.dumps(row.get("options"), sort_keys=True)})

    atomic_write(path, write)


def write_report(runs: Sequence[dict[str, Any]], out: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Write results.json, results.csv, the plots and REPORT.md under `out`; returns REPORT.md's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"meta": meta, "runs": list(runs)})
    _write_csv(runs, out / "results.csv")
    comparison = summarise(runs, meta.get("metric"))
    plots = write_plots(runs, comparison, out)
    report = out / "REPORT.md"
    text = _markdown(runs, meta, comparison, plots)
    text += analysis_section(rank_rows(runs), out / "runs", meta["shared"]["model"]["name"])
    atomic_write(report, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return report
