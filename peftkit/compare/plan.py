"""Planning a comparison: the `compare:` section and the grid of runs it asks for.

Every run is the same `peftkit train` run, differing only in its `method` section, its
seed, and the `training` options its `compare.methods` entry sets (a per-method learning
rate): the same data, steps and batch size, so the same examples and tokens seen.
Each entry runs once per seed; the seed drives adapter init, data order and dropout.
With a `data.test` or a `compare.forgetting` file, the untrained base model is a row too.

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

from torch import nn

from peftkit.anatomy import attention_projections
from peftkit.compare.scoring import check_metric
from peftkit.compare.summary import BASE
from peftkit.errors import ConfigError, did_you_mean
from peftkit.registry import available_methods, get_method
from peftkit.targets import ALL_LINEAR, candidate_modules, distinguishing_suffixes
from peftkit.training.config import TrainingConfig, build_config, build_method
from peftkit.training.models import model_skeleton
from peftkit.validation import check_types, from_options, option_names

__all__ = [
    "CompareConfig",
    "MethodEntry",
    "RunSpec",
    "method_entries",
    "parse_list",
    "compare_settings",
    "target_modules",
    "plan_runs",
]

ATTN = "attn"
_ENTRY_KEYS = ("name", "label")


@dataclasses.dataclass
class CompareConfig:
    """The `compare:` section; the command line's flags override it.

    Args:
        methods: registered method names, or mappings `{name, label?, <method options>, <training options>}`;
            one run per rank, target set and seed each.
        seeds: the training seeds every entry runs with; None: the config's `training.seed` only.
        metric: how the test set is scored: `label`, `exact_match`, `chrf`, `bleu` or `package.module:function`.
        labels: the label metric's allowed answers; None: the distinct references of the test set.
        forgetting: a text file no task data came from: the loss on it, base model against each trained one.
        ranks: values of `r` for the methods that have one; None keeps the config's.
        targets: target sets: `attn`, `all-linear`, or a list of module names; None
            keeps the config's `target_modules`.
        generations: validation prompts completed greedily for the task metric (0: none).
        timeout_s: a run still going after this long is stopped and recorded as failed.
        out: the output directory.
    """

    methods: list[str | dict[str, Any]] = dataclasses.field(default_factory=list)
    seeds: list[int] | None = None
    metric: str = "exact_match"
    labels: list[str] | None = None
    forgetting: str | None = None
    ranks: list[int] | None = None
    targets: list[str | list[str]] | None = None
    generations: int = 0
    timeout_s: float | None = None
    out: str = "runs/compare"

    def __post_init__(self) -> None:
        check_types(self, "compare")
        if not self.methods:
            raise ConfigError("compare.methods is empty: name at least one method, e.g. --methods lora,dora.")
        method_entries(self.methods)  # an unknown name or key fails now, not after an hour of runs
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"compare.seeds must be a non-empty list of distinct ints, got {self.seeds}.")
        check_metric(self.metric)
        if self.labels is not None and self.metric != "label":
            raise ConfigError(f"compare.labels is for metric 'label', but compare.metric is {self.metric!r}.")
        if self.generations < 0:
            raise ConfigError(f"compare.generations must be at least 0, got {self.generations}.")


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One `compare.methods` entry: its row label, method, method options and training options."""

    label: str
    name: str
    options: dict[str, Any]
    training: dict[str, Any]


def _entry(item: Any) -> MethodEntry:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ConfigError(f"compare.methods entries are method names or mappings with a 'name', got {item!r}.")
    cls = get_method(item["name"])  # an unknown name fails naming the close ones
    method_keys, training_keys = option_names(cls.config_class), option_names(TrainingConfig)
    label = item.get("label", item["name"])
    if not isinstance(label, str) or not label or "/" in label:
        raise ConfigError(f"compare.methods entry {item['name']!r}: label must be a non-empty name, got {label!r}.")
    for key in item:
        if key not in (*_ENTRY_KEYS, *method_keys, *training_keys):
            valid = [*_ENTRY_KEYS, *method_keys, *(f"{key} (training)" for key in training_keys)]
            raise ConfigError(
                f"compare.methods entry {label!r} has no option {key!r}."
                f"{did_you_mean(str(key), [*_ENTRY_KEYS, *method_keys, *training_keys])} Valid: {', '.join(valid)}."
            )
    if "seed" in item:
        raise ConfigError(f"compare.methods entry {label!r}: the seed is compare.seeds' (every entry runs each seed).")
    options = {key: value for key, value in item.items() if key in method_keys}
    training = {key: value for key, value in item.items() if key in training_keys and key not in method_keys}
    return MethodEntry(label, item["name"], options, training)


def method_entries(methods: Sequence[str | dict[str, Any]]) -> list[MethodEntry]:
    """The `compare.methods` entries, checked; two with the same label are refused (their rows would merge)."""
    entries = [_entry(item) for item in methods]
    labels = [entry.label for entry in entries]
    for label in labels:
        if labels.count(label) > 1 or label == BASE:
            why = "is the base model's row" if label == BASE else "is given twice"
            raise ConfigError(f"compare.methods: label {label!r} {why}; give each entry its own `label:`.")
    return entries


@dataclasses.dataclass
class RunSpec:
    """One planned run: its name, its group (the runs of one entry over seeds), and its config (or why invalid)."""

    name: str
    method: str
    rank: int | None
    targets: str | None
    config: dict[str, Any]
    error: str | None = None
    group: str = ""
    seed: int = 0
    base: bool = False

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
    seeds: int | None = None,
) -> CompareConfig:
    """The `compare:` section (its `--set compare.key=value` overrides applied), then the flags, validated.

    `seeds` (the `--seeds N` flag) means seeds 0..N-1.
    """
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"compare must be a mapping of options, got {section!r}.")
    values = dict(section or {})
    if methods is not None:
        values["methods"] = parse_list(methods, "--methods")
    if seeds is not None:
        values["seeds"] = list(range(seeds))
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


def _method_options(method: str, base: dict[str, Any]) -> dict[str, Any]:
    """The base method options as `method` takes them: its own, and any no installed method has (to be named
    as unknown), leaving out the options of other methods in the comparison."""
    own = set(option_names(get_method(method).config_class))
    known = {key for name in available_methods() for key in option_names(get_method(name).config_class)}
    return {key: value for key, value in base.items() if key in own or key not in known}


def _at_rank(method: str, options: dict[str, Any], rank: int | None) -> dict[str, Any]:
    """`options` with the method's rank set to `rank` and its scaling per rank kept (`AdapterMethod.at_rank`):
    the options as given plus those the new rank changes, so each run's config says what it chose."""
    if rank is None:
        return options
    built = build_method({"name": method, **options})
    try:
        ranked = built.at_rank(rank).options()
    except ConfigError as error:
        raise ConfigError(f"method {method!r}: {error}") from None
    before = built.options()
    return {**options, **{key: value for key, value in ranked.items() if before[key] != value}}


def plan_runs(raw: dict[str, Any], base_dir: Path | None, settings: CompareConfig) -> list[RunSpec]:
    """Every run of the grid (the base row first, when anything is scored), each with its full config.

    An invalid run carries its error and becomes a failed row; the others still run.
    """
    raw_method = raw.get("method") or {}
    if not isinstance(raw_method, dict):
        raise ConfigError(f"method must be a mapping of options, got {raw_method!r}.")
    entries = method_entries(settings.methods)
    # Everything but the method must be valid for any run to make sense: fail now if not.
    base = build_config({**raw, "method": {"name": entries[0].name}}, base_dir).to_dict()
    base["training"]["log_every"] = 1  # every step's time and loss, for the medians
    base["eval"]["generations"] = settings.generations
    base["output"]["save_every"] = None  # a comparison's runs are short; checkpoints would only cost time
    model = model_skeleton(base["model"]["name"]) if ATTN in (settings.targets or []) else None
    target_sets = [target_modules(t, model) for t in settings.targets or []] or [None]
    base_options = {key: value for key, value in raw_method.items() if key != "name"}
    seeds = settings.seeds if settings.seeds is not None else [base["training"]["seed"]]
    runs = []
    if base["data"]["test"] or settings.forgetting:
        config = copy.deepcopy(base)
        config["output"]["dir"] = str(Path(settings.out) / "runs" / BASE)
        runs.append(RunSpec(BASE, BASE, None, None, config, group=BASE, seed=seeds[0], base=True))
    for entry in entries:
        cls = get_method(entry.name)
        ranks = settings.ranks if settings.ranks and cls.has_rank else [None]
        # full and head train a fixed set of the model's own tensors: targets do not change them
        for rank in ranks:
            for target in [None] if cls.trains_in_place else target_sets:
                options = {**_method_options(entry.name, base_options), **entry.options}
                if target is not None:
                    options["target_modules"] = target[1]
                error = None
                try:
                    options = _at_rank(entry.name, options, rank)
                except ConfigError as invalid:  # the run is reported as failed with this message
                    error = str(invalid)
                group = "-".join(
                    [entry.label] + ([f"r{rank}"] if rank is not None else []) + ([target[0]] if target else [])
                )
                for seed in seeds:
                    name = f"{group}-s{seed}" if len(seeds) > 1 else group
                    config = copy.deepcopy(base)
                    config["method"] = {"name": entry.name, **options}
                    config["training"].update(entry.training, seed=seed)
                    config["output"]["dir"] = str(Path(settings.out) / "runs" / name)
                    spec = RunSpec(
                        name, entry.name, rank, target[0] if target else None, config, group=group, seed=seed
                    )
                    try:
                        build_config(config)
                    except ConfigError as invalid:
                        spec.error = str(invalid)
                    spec.error = error or spec.error
                    runs.append(spec)
    return runs
