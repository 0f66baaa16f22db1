"""`peftkit compare`: one training run per method x rank x target set, side by side.

Every run is the same `peftkit train` run, differing only in its `method` section:
same data, seed, steps, batch size (so the same token budget) and evaluation. Each
runs in its own process, so its peak memory is its own and a crash or an impossible
option becomes a failed row while the others go on. The numbers are read from what
training records anyway (`metrics.jsonl` and its end summary); the child adds only
the parameter counts. `peftkit.report` turns the rows into files.

Options shared by the base `method:` section reach every method that takes them;
one that only other registered methods take (`r` for `full`) is left out for this
one, and one that no method takes is passed on, so a typo fails with its message.
When `ranks` sweeps `r`, `alpha` follows it, keeping the config's `alpha / r`; ranks
apply to methods with an `r`, target sets to all but those that train the model's
own tensors (`full`, `head`), which run once.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
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

from peftkit.config import apply_overrides, build_config, load_config
from peftkit.errors import ConfigError, PeftkitError
from peftkit.files import atomic_write_json
from peftkit.registry import available_methods, get_method
from peftkit.targets import ALL_LINEAR
from peftkit.validation import check_types, from_options, option_names

__all__ = [
    "ATTENTION_TARGETS",
    "CompareConfig",
    "RunSpec",
    "parse_list",
    "compare_settings",
    "target_modules",
    "plan_runs",
    "task_scores",
    "collect_run",
    "run_plan",
    "compare",
]

ATTN = "attn"
# The attention projections (query, key, value, output) of each model type, as suffix names.
ATTENTION_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen2", "qwen3"],
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "phi3": ["qkv_proj", "o_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],  # not mlp.c_proj
    "gpt_neox": ["query_key_value", "attention.dense"],
    "falcon": ["query_key_value", "self_attention.dense"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta"], ["query", "key", "value", "attention.output.dense"]),
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "t5": ["q", "k", "v", "o"],
}
RESULT_NAME = "run.json"  # what the child adds to the run directory: parameter counts


@dataclasses.dataclass
class CompareConfig:
    """The `compare:` section; the command line's flags override it.

    Args:
        methods: registered method names, one run (per rank and target set) each.
        ranks: values of `r` for the methods that have one; None keeps the config's.
        targets: target sets: `attn`, `all-linear`, or a list of module names; None
            keeps the config's `target_modules`.
        generations: validation prompts completed greedily for the task metric (0: none).
        timeout_s: a run still going after this long is stopped and recorded as failed.
        out: the output directory.
    """

    methods: list[str] = dataclasses.field(default_factory=list)
    ranks: list[int] | None = None
    targets: list[str | list[str]] | None = None
    generations: int = 8
    timeout_s: float | None = None
    out: str = "runs/compare"

    def __post_init__(self) -> None:
        check_types(self, "compare")
        if not self.methods:
            raise ConfigError("compare.methods is empty: name at least one method, e.g. --methods lora,dora.")
        for name in self.methods:
            get_method(name)  # an unknown name fails now, naming the close ones, not after an hour of runs
        if self.generations < 0:
            raise ConfigError(f"compare.generations must be at least 0, got {self.generations}.")


@dataclasses.dataclass
class RunSpec:
    """One planned run: its name, what varies, and the full run config (or why it is invalid)."""

    name: str
    method: str
    rank: int | None
    targets: str | None
    config: dict[str, Any]
    error: str | None = None

    @property
    def dir(self) -> Path:
        return Path(self.config["output"]["dir"])


def parse_list(text: str, flag: str, kind: type = str) -> list[Any]:
    """`a,b,c` from the command line as a list of `kind`; ConfigError names the flag."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise ConfigError(f"{flag} expects a comma-separated list of {kind.__name__}, got {text!r}.") from None


def compare_settings(
    section: Any,
    methods: str | None = None,
    ranks: str | None = None,
    targets: str | None = None,
    out: str | None = None,
    overrides: Sequence[str] = (),
) -> CompareConfig:
    """The `compare:` section, then its `--set compare.key=value` overrides, then the flags, validated."""
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"compare must be a mapping of options, got {section!r}.")
    values = dict(section or {})
    for item in overrides:
        key, _, text = item.removeprefix("compare.").partition("=")
        values[key] = yaml.safe_load(text)
    if methods is not None:
        values["methods"] = parse_list(methods, "--methods")
    if ranks is not None:
        values["ranks"] = parse_list(ranks, "--ranks", int)
    if targets is not None:  # `q_proj+v_proj` is one explicit set of module names
        values["targets"] = [t if t in (ATTN, ALL_LINEAR) else t.split("+") for t in parse_list(targets, "--targets")]
    if out is not None:
        values["out"] = out
    return from_options(CompareConfig, values, where="compare")


def target_modules(target: str | list[str], model_type: str | None) -> tuple[str, list[str] | str]:
    """(label, `target_modules` value) of a target set: `attn`, `all-linear` or module names."""
    if target == ALL_LINEAR:
        return ALL_LINEAR, ALL_LINEAR
    if target == ATTN:
        if model_type not in ATTENTION_TARGETS:
            raise ConfigError(
                f"--targets attn: no attention module names known for model type {model_type!r}; "
                f"give module names instead (e.g. q_proj+v_proj). Known types: {', '.join(sorted(ATTENTION_TARGETS))}."
            )
        return ATTN, ATTENTION_TARGETS[model_type]
    names = [target] if isinstance(target, str) else list(target)
    return "+".join(names), names


def _model_type(name: str) -> str | None:
    from transformers import AutoConfig

    from peftkit.models import resolve_model_path

    return getattr(AutoConfig.from_pretrained(resolve_model_path(name)), "model_type", None)


def _default(config_class: type, key: str) -> Any:
    return next(f.default for f in dataclasses.fields(config_class) if f.name == key)


def _method_options(method: str, base: dict[str, Any], rank: int | None) -> dict[str, Any]:
    """The base method options as `method` takes them, with `r` (and `alpha` along) set to `rank`."""
    config_class = get_method(method).config_class
    own = set(option_names(config_class))
    known = {key for name in available_methods() for key in option_names(get_method(name).config_class)}
    options = {key: value for key, value in base.items() if key in own or key not in known}
    if rank is not None:
        alpha, r = base.get("alpha", _default(config_class, "alpha")), base.get("r", _default(config_class, "r"))
        if "alpha" in own and _positive_number(alpha) and _positive_number(r):  # else the method says what is wrong
            scaled = alpha / r * rank
            options["alpha"] = int(scaled) if float(scaled).is_integer() else scaled
        options["r"] = rank
    return options


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def plan_runs(raw: dict[str, Any], base_dir: Path | None, settings: CompareConfig) -> list[RunSpec]:
    """Every run of the grid, each with its full config; an invalid one carries its error."""
    raw_method = raw.get("method") or {}
    if not isinstance(raw_method, dict):
        raise ConfigError(f"method must be a mapping of options, got {raw_method!r}.")
    # Everything but the method must be valid for any run to make sense: fail now if not.
    base = build_config({**raw, "method": {"name": settings.methods[0]}}, base_dir).to_dict()
    base["training"]["log_every"] = 1  # every step's time and loss, for the medians
    base["eval"]["generations"] = settings.generations
    base["output"]["save_every"] = None  # a comparison's runs are short; checkpoints would only cost time
    types = {ATTN: _model_type(base["model"]["name"])} if ATTN in (settings.targets or []) else {}
    target_sets = [target_modules(t, types.get(ATTN)) for t in settings.targets or []] or [None]
    base_options = {key: value for key, value in raw_method.items() if key != "name"}
    runs = []
    for method in settings.methods:
        cls = get_method(method)
        ranks = settings.ranks if settings.ranks and "r" in option_names(cls.config_class) else [None]
        # full and head train a fixed set of the model's own tensors: targets do not change them
        for rank in ranks:
            for target in [None] if cls.trains_in_place else target_sets:
                options = _method_options(method, base_options, rank)
                if target is not None:
                    options["target_modules"] = target[1]
                name = "-".join([method] + ([f"r{rank}"] if rank is not None else []) + ([target[0]] if target else []))
                config = copy.deepcopy(base)
                config["method"] = {"name": method, **options}
                config["output"]["dir"] = str(Path(settings.out) / "runs" / name)
                spec = RunSpec(name, method, rank, target[0] if target else None, config)
                try:
                    build_config(config)
                except ConfigError as error:
                    spec.error = str(error)
                runs.append(spec)
    return runs


def task_scores(samples: Sequence[dict[str, str]]) -> dict[str, float | None]:
    """Exact match, BLEU and chrF (sacrebleu, corpus level), in percent, of outputs vs references."""
    if not samples:
        return {"exact_match": None, "bleu": None, "chrf": None}
    from sacrebleu.metrics import BLEU, CHRF

    outputs = [sample["output"].strip() for sample in samples]
    references = [sample["reference"].strip() for sample in samples]
    return {
        "exact_match": 100 * sum(o == r for o, r in zip(outputs, references, strict=True)) / len(samples),
        "bleu": BLEU().corpus_score(outputs, [references]).score,
        "chrf": CHRF().corpus_score(outputs, [references]).score,
    }


def collect_run(spec: RunSpec) -> dict[str, Any]:
    """The row of a finished run, from its metrics.jsonl, adapter file and the child's counts."""
    from peftkit.serialization import WEIGHTS_NAME

    records = [json.loads(line) for line in (spec.dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    summary = next(r["summary"] for r in reversed(records) if "summary" in r)
    steps = [r for r in records if "loss" in r]
    counts = json.loads((spec.dir / RESULT_NAME).read_text(encoding="utf-8"))
    # Step times from consecutive steps' clocks; the median leaves out the first step's warm-up
    # and the steps that include a validation pass.
    step_times = [
        b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:], strict=False) if b["step"] == a["step"] + 1
    ]
    generated = [r["generations"] for r in records if "generations" in r]
    curve = [[r["step"], r["val_loss"]] for r in records if "val_loss" in r]
    val_loss = summary["val_loss"]
    adapter = Path(summary["adapter"]) / WEIGHTS_NAME
    return {
        **_row_head(spec, "ok"),
        "trainable_params": counts["trainable_params"],
        "total_params": counts["total_params"],
        "trainable_pct": 100 * counts["trainable_params"] / counts["total_params"],
        "adapter_mb": adapter.stat().st_size / 1e6,
        "peak_memory_gb": summary["peak_memory_gb"],
        "step_time_s": median(step_times) if step_times else None,
        "tokens_per_s": median(r["tokens_per_s"] for r in steps) if steps else None,
        "time_s": summary["time_s"],
        "steps": summary["steps"],
        "train_loss": summary["train_loss"],
        "val_loss_start": summary["val_loss_start"],
        "val_loss": val_loss,
        "val_ppl": None if val_loss is None else math.exp(val_loss),
        **task_scores(generated[-1] if generated else []),
        "chrf_start": task_scores(generated[0])["chrf"] if len(generated) > 1 else None,
        "curve": curve,
    }


def _row_head(spec: RunSpec, status: str, error: str | None = None) -> dict[str, Any]:
    method = spec.config["method"]
    options = {key: value for key, value in method.items() if key != "name"}
    return {
        "name": spec.name,
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


def _run_one(spec: RunSpec, index: int, progress: _Progress, timeout_s: float | None) -> dict[str, Any]:
    """Train `spec` in a child process and return its row (failed, with the message, if it did not finish)."""
    if spec.error is not None:
        progress.show(index, f"{spec.name}: FAILED: {spec.error}", final=True)
        return _row_head(spec, "failed", spec.error)
    shutil.rmtree(spec.dir, ignore_errors=True)  # metrics.jsonl appends: start each run clean
    spec.dir.mkdir(parents=True)
    run_yaml, log = spec.dir / "run.yaml", spec.dir / "log.txt"
    run_yaml.write_text(yaml.safe_dump(spec.config, sort_keys=False), encoding="utf-8")
    progress.show(index, f"{spec.name}: running", final=not progress.live)
    command = [sys.executable, "-m", "peftkit.compare", str(run_yaml), str(spec.dir / RESULT_NAME)]
    total_steps = spec.config["training"]["max_steps"]
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
    row = collect_run(spec)
    quality = f" | chrF {row['chrf']:.1f}" if row["chrf"] is not None else ""
    progress.show(index, f"{spec.name}: done in {row['time_s']:.0f} s | val loss {row['val_loss']:.4f}{quality}", True)
    return row


def run_plan(
    runs: Sequence[RunSpec], timeout_s: float | None = None, stream: TextIO | None = None
) -> list[dict[str, Any]]:
    """Run every planned run in turn, each in its own process; one row per run, in plan order."""
    progress = _Progress(len(runs), stream)
    return [_run_one(spec, index, progress, timeout_s) for index, spec in enumerate(runs, 1)]


def _meta(runs: Sequence[RunSpec], settings: CompareConfig, config_path: Path) -> dict[str, Any]:
    """What every run shared, for the report's header."""
    from peftkit.report import machine_description

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
    from peftkit.report import write_report

    config_path = Path(config_path)
    if not config_path.is_file():
        raise ConfigError(f"config file {str(config_path)!r} does not exist.")
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path} must hold a mapping of sections, got {type(raw).__name__}.")
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


def _child_main(argv: Sequence[str]) -> int:
    """A run in its own process: train as the YAML says, then write the parameter counts."""
    from peftkit.inject import trainable_parameters
    from peftkit.train import train

    config_path, result_path = argv
    try:
        result = train(load_config(config_path))
    except PeftkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    trainable, total = trainable_parameters(result.model)
    atomic_write_json(result_path, {"trainable_params": trainable, "total_params": total})
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
