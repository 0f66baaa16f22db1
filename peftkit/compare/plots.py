"""The comparison's PNG plots, one point or bar per method with its spread over seeds as error bars.

- quality.png: the task metric (or validation loss), macro-F1 and forgetting per method;
- pareto.png: quality against step peak memory and against step time, the front joined;
- cost.png: step peak memory and step time per method;
- val_loss.png: the validation loss against step, mean over seeds with its spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.compare.figures import save_figure
from peftkit.compare.stats import mean_sd
from peftkit.compare.summary import Comparison, MethodSummary

__all__ = ["quality_label", "write_plots"]

_COSTS = [("memory_gb", "step peak memory (GB)"), ("step_time_s", "median step time (s)")]


def quality_label(comparison: Comparison) -> str:
    """The quality axis' name: the test metric (higher is better) or the validation loss."""
    if comparison.metric is None:
        return "validation loss (lower is better)"
    unit = " (%)" if comparison.metric in ("label", "exact_match") else ""
    name = "accuracy" if comparison.metric == "label" else comparison.metric
    return f"test {name}{unit} (higher is better)"


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    save_figure(figure, path)
    plt.close(figure)


def _bars(axis: Any, methods: Sequence[MethodSummary], key: str, label: str) -> None:
    """Horizontal bars of `key` (mean, sd) per method, best on top, sd as error bars."""
    shown = [m for m in methods if getattr(m, key) is not None][::-1]
    means = [getattr(m, key)[0] for m in shown]
    errors = [getattr(m, key)[1] or 0.0 for m in shown]
    bars = axis.barh([m.name for m in shown], means, xerr=errors, capsize=3, color="tab:blue", ecolor="black")
    texts = [f"{mean:.3g}" + (f" ± {sd:.2g}" if sd else "") for mean, sd in zip(means, errors, strict=True)]
    axis.bar_label(bars, labels=texts, padding=4, fontsize=8)
    axis.set_xlabel(label)
    axis.margins(x=0.3)
    axis.grid(axis="x", alpha=0.3)


def _panel_figure(methods: Sequence[MethodSummary], panels: list[tuple[str, str]], title: str) -> Any | None:
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in panels if any(getattr(m, key) is not None for m in methods)]
    if not panels:
        return None
    height = 0.45 * len(methods) + 1.8
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), height), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        _bars(axis, methods, key, label)
    figure.suptitle(title)
    return figure


def _pareto_figure(comparison: Comparison) -> Any | None:
    import matplotlib.pyplot as plt

    trained = [m for m in comparison.methods if not m.is_base]
    if not any(m.memory_gb or m.step_time_s for m in trained):
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    base = next((m for m in comparison.methods if m.is_base), None)
    for axis, (cost, label) in zip(axes, _COSTS, strict=True):
        shown = [m for m in trained if getattr(m, cost) is not None]
        for m in shown:
            (x, x_sd), (y, y_sd) = getattr(m, cost), m.quality
            axis.errorbar(x, y, xerr=x_sd or 0.0, yerr=y_sd or 0.0, fmt="o", capsize=3)
            axis.annotate(m.name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front = sorted(
            (m for m in shown if m.name in comparison.fronts.get(cost, [])), key=lambda m: getattr(m, cost)[0]
        )
        if len(front) > 1:
            axis.plot([getattr(m, cost)[0] for m in front], [m.quality[0] for m in front], "--", color="gray")
        if base is not None:
            axis.axhline(base.quality[0], color="tab:red", linestyle=":", label=f"base model {base.quality[0]:.3g}")
            axis.legend(fontsize=8)
        axis.set(xlabel=label, ylabel=quality_label(comparison))
        axis.grid(alpha=0.3)
    figure.suptitle("Quality against cost (error bars: sd over seeds; dashed: the Pareto front)")
    return figure


def _curve_figure(rows: Sequence[dict[str, Any]], comparison: Comparison) -> Any | None:
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get("curve"):
            for step, loss in row["curve"]:
                curves.setdefault(row.get("group", row["name"]), {}).setdefault(step, []).append(loss)
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(8, 4.5))
    ranked = [m.name for m in comparison.methods if m.name in curves]
    for name in ranked + [name for name in curves if name not in ranked]:
        steps = sorted(curves[name])
        stats = [mean_sd(curves[name][step]) for step in steps]
        axis.errorbar(
            steps,
            [m for m, _ in stats],
            yerr=[sd or 0.0 for _, sd in stats],
            marker="o",
            markersize=3,
            capsize=2,
            label=name,
        )
    axis.set(xlabel="step", ylabel="validation loss", title="Validation loss against step (mean ± sd over seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def write_plots(rows: Sequence[dict[str, Any]], comparison: Comparison, out: Path) -> list[tuple[str, str]]:
    """Write the plots that have data; returns (file name, caption) of each written."""
    import matplotlib

    matplotlib.use("Agg")
    methods = comparison.methods
    figures = [
        (
            "quality.png",
            "Quality per method (mean ± sd over seeds)",
            _panel_figure(
                methods,
                [
                    ("quality", quality_label(comparison)),
                    ("macro_f1", "test macro-F1 (%)"),
                    ("forgetting", "forgetting: loss change on general text"),
                ],
                "Quality",
            ),
        ),
        ("pareto.png", "Quality against memory and time", _pareto_figure(comparison)),
        (
            "cost.png",
            "Cost per method (mean ± sd over seeds)",
            _panel_figure([m for m in methods if not m.is_base], _COSTS, "Cost"),
        ),
        ("val_loss.png", "Validation loss against step", _curve_figure(rows, comparison)),
    ]
    written = []
    for name, caption, figure in figures:
        if figure is not None:
            _save(figure, out / name)
            written.append((name, caption))
    return written
