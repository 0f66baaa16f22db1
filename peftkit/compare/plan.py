"""Planning a comparison: the `compare:` section and the grid of runs it asks for.

Every run is the same `peftkit train` run, differing only in its `method` section:
same data, seed, steps, batch size (so the same token budget) and evaluation.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from peftkit.anatomy import attention_projections
from peftkit.errors import ConfigError
from peftkit.registry import available_methods, get_method
from peftkit.targets import ALL_LINEAR, candidate_modules, distinguishing_suffixes
from peftkit.training.config import build_config
from peftkit.training.models import model_skeleton
from peftkit.validation import check_types, from_options, option_names

__all__ = [
    "CompareConfig",
    "RunSpec",
    "parse_list",
    "compare_settings",
    "target_modules",
    "plan_runs",
]

ATTN = "attn"


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


def target_modules(target: str | list[str], model: nn.Module | None) -> tuple[str, list[str] | str]:
    """(label, `target_modules` value) of a target set: `attn` (of `model`), `all-linear` or module names."""
    if target == ALL_LINEAR:
        return ALL_LINEAR, ALL_LINEAR
    if target == ATTN:
        projections = attention_projections(model) if model is not None else []
        if not projections:
            raise ConfigError(
                f"--targets attn: {type(model).__name__} has no attention block (a module class named ...Attention) "
                "with linear layers; give module names instead (e.g. q_proj+v_proj)."
            )
        return ATTN, distinguishing_suffixes(projections, [name for name, _ in candidate_modules(model)])
    names = [target] if isinstance(target, str) else list(target)
    return "+".join(names), names


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
    model = model_skeleton(base["model"]["name"]) if ATTN in (settings.targets or []) else None
    target_sets = [target_modules(t, model) for t in settings.targets or []] or [None]
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
