"""From rows of runs to what a user decides with: one line per method over its seeds, the paired
differences between methods, the Pareto front and the verdict in words.

A method's quality is its test-set score (higher is better) when the runs were scored on a
test set, else its final validation loss (lower is better). Its costs are the training
step's peak memory and the median step time. Forgetting is the change in loss on the
forgetting text from the base model to the trained one (positive: worse elsewhere).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from peftkit.compare.stats import PairedDifference, mean_sd, paired_difference

__all__ = ["BASE", "MethodSummary", "Comparison", "summarise", "pareto_front", "step_peak_gb"]

BASE = "base"  # the untrained model's row


def step_peak_gb(row: dict[str, Any]) -> float | None:
    """The training step's peak (live tensor bytes measured over steps 1-2), else the process peak, in GB."""
    measured = row.get("measured_step_peak_bytes")
    return measured / 1e9 if measured else row.get("peak_memory_gb")


@dataclasses.dataclass
class MethodSummary:
    """One group of runs (a compare.methods entry at one rank and target set) over its seeds."""

    name: str
    method: str
    seeds: list[int]
    quality: tuple[float, float | None] | None
    macro_f1: tuple[float, float | None] | None
    val_loss: tuple[float, float | None] | None
    forgetting: tuple[float, float | None] | None
    memory_gb: tuple[float, float | None] | None
    step_time_s: tuple[float, float | None] | None
    trainable_params: int | None
    scores: dict[int, list[float]]  # seed -> per-example test scores

    @property
    def is_base(self) -> bool:
        return self.name == BASE


@dataclasses.dataclass
class Comparison:
    """Everything the report states: the methods best first, the paired differences, the fronts."""

    metric: str | None  # None: quality is the validation loss
    methods: list[MethodSummary]
    pairs: list[tuple[str, str, PairedDifference]]  # (A, B, A - B), A the better on average
    fronts: dict[str, list[str]]  # cost -> methods on the quality/cost Pareto front

    def pair(self, a: str, b: str) -> PairedDifference | None:
        for first, second, difference in self.pairs:
            if (first, second) == (a, b):
                return difference
        return None


def _stat(rows: Sequence[dict[str, Any]], value: Any) -> tuple[float, float | None] | None:
    values = [v for v in (value(row) for row in rows) if v is not None]
    return mean_sd(values) if values else None


def _summaries(rows: Sequence[dict[str, Any]], use_test: bool) -> list[MethodSummary]:
    base = next((row for row in rows if row.get("group", row["name"]) == BASE and row["status"] == "ok"), None)
    base_forgetting = base.get("forgetting_loss") if base else None
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(row.get("group", row["name"]), []).append(row)
    summaries = []
    for name, members in groups.items():
        forgetting = (
            None
            if base_forgetting is None or name == BASE
            else _stat(
                members, lambda r: None if r.get("forgetting_loss") is None else r["forgetting_loss"] - base_forgetting
            )
        )
        summaries.append(
            MethodSummary(
                name=name,
                method=members[0]["method"],
                seeds=[row.get("seed", 0) for row in members],
                quality=_stat(members, lambda r: r.get("test_score"))
                if use_test
                else _stat(members, lambda r: r.get("val_loss")),
                macro_f1=_stat(members, lambda r: r.get("macro_f1")),
                val_loss=_stat(members, lambda r: r.get("val_loss")),
                forgetting=forgetting,
                memory_gb=_stat(members, step_peak_gb),
                step_time_s=_stat(members, lambda r: r.get("step_time_s")),
                trainable_params=members[0].get("trainable_params"),
                scores={
                    row.get("seed", 0): row["test_scores"] for row in members if row.get("test_scores") is not None
                },
            )
        )
    return summaries


def _paired(a: MethodSummary, b: MethodSummary) -> PairedDifference | None:
    """A - B over the seeds both ran (the base model's one row pairs with every seed)."""
    if not a.scores or not b.scores:
        return None
    if a.is_base or b.is_base:
        a_rows, b_rows = list(a.scores.values()), list(b.scores.values())
    else:
        common = sorted(set(a.scores) & set(b.scores))
        if not common:
            return None
        a_rows, b_rows = [a.scores[s] for s in common], [b.scores[s] for s in common]
    return paired_difference(a_rows, b_rows)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (quality, cost) no other point beats: at least as good and as cheap, better in one."""
    front = []
    for name, (quality, cost) in points.items():
        dominated = any(
            q >= quality and c <= cost and (q > quality or c < cost)
            for other, (q, c) in points.items()
            if other != name
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: -points[n][0])


def summarise(rows: Sequence[dict[str, Any]], metric: str | None) -> Comparison:
    """The comparison of the finished rows; `metric` None (or no scored run) ranks by validation loss."""
    use_test = metric is not None and any(row.get("test_scores") for row in rows if row["status"] == "ok")
    methods = [m for m in _summaries(rows, use_test) if m.quality is not None]
    sign = 1.0 if use_test else -1.0  # higher is better, or lower loss is
    methods.sort(key=lambda m: -sign * m.quality[0])
    pairs = []
    for a, b in itertools.combinations(methods, 2):
        difference = _paired(a, b)
        if difference is not None:
            pairs.append((a.name, b.name, difference))
    fronts = {}
    for cost in ("memory_gb", "step_time_s"):
        points = {
            m.name: (sign * m.quality[0], getattr(m, cost)[0])
            for m in methods
            if not m.is_base and getattr(m, cost) is not None
        }
        fronts[cost] = pareto_front(points)
    return Comparison(metric if use_test else None, methods, pairs, fronts)
