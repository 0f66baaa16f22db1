"""`peftkit compare`: one training run per method x rank x target set, side by side.

`plan` turns the config into runs, `runner` trains each in its own process
(`child`), and `report` turns the rows into files. The only users of matplotlib and
sacrebleu live here.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from peftkit.compare.plan import CompareConfig, RunSpec, compare_settings, plan_runs
from peftkit.compare.report import machine_description, write_report
from peftkit.compare.runner import run_plan
from peftkit.errors import PeftkitError
from peftkit.training.config import apply_overrides, read_yaml

__all__ = ["compare"]


def _meta(runs: Sequence[RunSpec], settings: CompareConfig, config_path: Path) -> dict[str, Any]:
    """What every run shared, for the report's header."""
    shared = runs[0].config
    return {
        "config": str(config_path),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "methods": settings.methods,
        "generations": settings.generations,
        "shared": {key: shared[key] for key in ("model", "data", "training", "eval")},
    }


def compare(
    config_path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    methods: str | None = None,
    ranks: str | None = None,
    targets: str | None = None,
    out: str | None = None,
    stream: TextIO | None = sys.stdout,
) -> list[dict[str, Any]]:
    """Plan, run and report a comparison as the config's `compare:` section and the flags say."""
    config_path = Path(config_path)
    raw = read_yaml(config_path)
    ours = [item for item in overrides if item.startswith("compare.")]
    settings = compare_settings(raw.pop("compare", None), methods, ranks, targets, out, ours)
    rest = [item for item in overrides if item not in ours]
    runs = plan_runs(apply_overrides(raw, rest), config_path.parent, settings)
    if stream is not None:
        stream.write(f"peftkit compare: {len(runs)} runs ({', '.join(r.name for r in runs)}) -> {settings.out}\n")
    rows = run_plan(runs, settings.timeout_s, stream)
    report = write_report(rows, Path(settings.out), _meta(runs, settings, config_path))
    failed = [row["name"] for row in rows if row["status"] != "ok"]
    if stream is not None:
        stream.write(f"peftkit compare: {len(rows) - len(failed)} done, {len(failed)} failed | report: {report}\n")
    if len(failed) == len(rows):
        raise PeftkitError(f"all {len(rows)} runs failed; their messages are in {report}.")
    return rows
