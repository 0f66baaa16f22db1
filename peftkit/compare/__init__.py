"""`peftkit compare`: one training run per method x rank x target set, side by side.

`plan` turns the config into runs, `runner` trains each in its own process
(`child`), and `report` turns the rows into files. The only users of matplotlib and
sacrebleu live here.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from peftkit.compare.plan import CompareConfig, RunSpec, compare_settings, plan_runs
from peftkit.compare.report import machine_description, write_report
from peftkit.compare.runner import run_plan
from peftkit.compare.scoring import scoring_spec
from peftkit.errors import ConfigError, PeftkitError
from peftkit.files import check_writable
from peftkit.training.config import apply_overrides, read_yaml, resolve_file
from peftkit.training.models import load_tokenizer

__all__ = ["compare"]


def _meta(runs: Sequence[RunSpec], settings: CompareConfig, config_path: Path) -> dict[str, Any]:
    """What every run shared, for the report's header."""
    shared = runs[0].config
    return {
        "config": str(config_path),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "methods": settings.methods,
        "seeds": sorted({run.seed for run in runs if not run.base}),
        "metric": settings.metric,
        "forgetting": settings.forgetting,
        "generations": settings.generations,
        "shared": {key: shared[key] for key in ("model", "data", "training", "eval")},
    }


def _preparation_hint(config_path: Path, message: str) -> str:
    """For a missing data file, the preparation scripts beside the config that would write it."""
    if "does not exist" not in message or not message.startswith("data."):
        return ""
    scripts = sorted(config_path.parent.glob("prepare_*.py"))
    return f" Prepare the data first: python {' or python '.join(map(str, scripts))}." if scripts else ""


def compare(
    config_path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    methods: str | None = None,
    ranks: str | None = None,
    targets: str | None = None,
    out: str | None = None,
    stream: TextIO | None = sys.stdout,
    seeds: int | None = None,
) -> list[dict[str, Any]]:
    """Plan, run and report a comparison as the config's `compare:` section and the flags say.

    Everything that can be checked is checked before the first run: the config, every run's
    options, the test and forgetting files, the metric and its labels, and that the output
    directory can be written.
    """
    config_path = Path(config_path)
    raw = apply_overrides(read_yaml(config_path), overrides)
    settings = compare_settings(raw.pop("compare", None), methods, ranks, targets, out, seeds)
    if settings.forgetting:
        settings.forgetting = resolve_file(settings.forgetting, config_path.parent, "compare.forgetting")
    try:
        runs = plan_runs(raw, config_path.parent, settings)
    except ConfigError as error:
        raise ConfigError(f"{error}{_preparation_hint(config_path, str(error))}") from None
    shared = runs[-1].config
    tokenizer = load_tokenizer(shared["model"]["name"]) if shared["data"]["test"] else None
    scoring = scoring_spec(settings.metric, settings.labels, shared["data"]["test"], settings.forgetting, tokenizer)
    check_writable(Path(settings.out) / "REPORT.md")
    if stream is not None:
        stream.write(f"peftkit compare: {len(runs)} runs ({', '.join(r.name for r in runs)}) -> {settings.out}\n")
    started = time.monotonic()
    rows = run_plan(runs, settings.timeout_s, stream, scoring)
    meta = {**_meta(runs, settings, config_path), "wall_time_s": round(time.monotonic() - started)}
    report = write_report(rows, Path(settings.out), meta)
    failed = [row["name"] for row in rows if row["status"] != "ok"]
    if stream is not None:
        stream.write(f"peftkit compare: {len(rows) - len(failed)} done, {len(failed)} failed | report: {report}\n")
    if len(failed) == len(rows):
        raise PeftkitError(f"all {len(rows)} runs failed; their messages are in {report}.")
    return rows
