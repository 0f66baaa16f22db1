"""`peftkit analyze`'s plots, and the short analysis section of `peftkit compare`'s report.

The plots follow the LoRA paper's section 7 figures: the spectrum of ΔW per layer type,
the subspace similarity φ as a heatmap, and the effective rank by layer depth.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.analysis import LowRankFile, analyze, read_low_rank_adapter
from peftkit.compare.figures import save_figure
from peftkit.errors import PeftkitError
from peftkit.training.models import load_model

__all__ = ["write_analysis_plots", "analysis_section"]


def _spectrum(result: dict[str, Any], plt: Any) -> Any:
    by_type: dict[str, list[list[float]]] = defaultdict(list)
    for path, layer in result["layers"].items():
        by_type[path.rpartition(".")[2]].append(layer["singular_values"])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for kind, spectra in sorted(by_type.items()):
        width = min(len(s) for s in spectra)
        mean = [statistics.fmean(s[i] for s in spectra) for i in range(width)]
        axis.plot(range(1, width + 1), mean, marker="o", markersize=3, label=kind)
    axis.set(xlabel="i", ylabel="σ_i of ΔW (mean over layers)", yscale="log", title="Spectrum of ΔW by layer type")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def _similarity(sides: dict[str, dict[str, list[list[float]]]], plt: Any) -> Any:
    """One row of heatmaps per side (right, left singular vectors), one panel per layer type."""
    kinds = sorted(next(iter(sides.values())))
    figure, axes = plt.subplots(
        len(sides), len(kinds), figsize=(2.6 * len(kinds) + 1, 2.8 * len(sides) + 0.6), squeeze=False
    )
    for row, (side, grids) in zip(axes, sides.items(), strict=True):
        for axis, kind in zip(row, kinds, strict=True):
            grid = grids[kind]
            image = axis.imshow(
                grid,
                vmin=0,
                vmax=1,
                cmap="viridis",
                aspect="auto",
                origin="lower",
                extent=(0.5, len(grid[0]) + 0.5, 0.5, len(grid) + 0.5),
            )
            axis.set_title(f"{kind} ({side})", fontsize=9)
        row[0].set_ylabel("i (adapter)")
        figure.colorbar(image, ax=row[-1], label="φ(i, j)")  # beside the last panel: tight_layout keeps working
    for axis in axes[-1]:
        axis.set_xlabel("j (--against)")
    figure.suptitle("Subspace similarity φ(i, j) of the singular vectors of ΔW, mean over layers")
    return figure


def _depth(result: dict[str, Any], plt: Any) -> Any | None:
    by_type: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for path, layer in result["layers"].items():
        if layer["depth"] is not None:
            by_type[path.rpartition(".")[2]].append((layer["depth"], layer["effective_rank_99"]))
    if not by_type:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for kind, points in sorted(by_type.items()):
        depths, ranks = zip(*sorted(points), strict=True)
        axis.plot(depths, ranks, marker="o", markersize=3, label=kind)
    axis.set(xlabel="layer (depth)", ylabel="effective rank at 99% energy", title="Effective rank of ΔW by depth")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def write_analysis_plots(result: dict[str, Any], out: Path) -> list[str]:
    """PNG plots of an `analyze` result under `out`; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {"spectrum.png": _spectrum(result, plt), "effective_rank.png": _depth(result, plt)}
    summary = result["summary"]
    if summary.get("similarity_by_type"):
        sides = {"right": summary["similarity_by_type"], "left": summary["similarity_left_by_type"]}
        figures["similarity.png"] = _similarity(sides, plt)
    written = []
    for name, figure in figures.items():
        if figure is not None:
            save_figure(figure, out / name)
            plt.close(figure)
            written.append(str(out / name))
    return written


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _lora_adapters(rows: Sequence[dict[str, Any]], runs_dir: Path) -> dict[str, LowRankFile]:
    """Run name -> its adapter, for the finished runs of a LoRA-family method."""
    found = {}
    for row in rows:
        if row["status"] == "ok":
            try:
                found[row["name"]] = read_low_rank_adapter(runs_dir / row["name"] / "adapter")
            except PeftkitError:  # not a LoRA-family method (bottleneck, full, head): nothing to say
                continue
    return found


def analysis_section(rows: Sequence[dict[str, Any]], runs_dir: Path, base_name: str) -> str:
    """The report's "What the adapters learned" section: a row per finished LoRA-family run, "" if none.

    The base `base_name` is loaded once, dense, for the amplification factor (over the
    dense weights for a 4-bit run too; intruder dimensions are left to `peftkit analyze`).
    """
    adapters = _lora_adapters(rows, runs_dir)
    if not adapters:
        return ""
    base = load_model(base_name).eval()
    lines = []
    for row in rows:
        if row["name"] not in adapters:
            continue
        result = analyze(adapters[row["name"]], base=base, intruder_k=0)
        means = {
            key: statistics.fmean(layer[key] for layer in result["layers"].values())
            for key in ("effective_rank_90", "effective_rank_99", "entropy_rank", "frobenius", "amplification")
        }
        suggested = ", ".join(f"{kind} {r}" for kind, r in result["summary"]["recommended_rank"].items())
        cells = [f"`{row['name']}`", str(row["rank"]), *map(_cell, means.values()), suggested]
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "\n".join(
            [
                "",
                "## What the adapters learned",
                "",
                "Per LoRA-family run, the update ΔW = s·BA of each adapted layer (DoRA: its direction), "
                "mean over layers: the effective rank (fewest singular values holding 90% / 99% of the energy), "
                "the entropy-based effective rank, ||ΔW||_F, the amplification factor ||ΔW||_F / ||U^T W V||_F "
                "(Hu et al., section 7.3) and the 99% rank per layer type as a suggested rank. "
                "`peftkit analyze runs/<run>/adapter --base MODEL` gives them per layer, with intruder dimensions.",
                "",
                "| run | r | eff. rank 90% | eff. rank 99% | entropy rank | mean ‖ΔW‖_F | amplification "
                "| suggested r by type |",
                "|---|---|---|---|---|---|---|---|",
                *lines,
            ]
        )
        + "\n"
    )
