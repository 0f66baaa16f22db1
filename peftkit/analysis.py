"""`peftkit.analyze`: what a LoRA-family adapter learned, as in section 7 of the LoRA paper.

Reads any PEFT-format LoRA file (peftkit's or PEFT's): for every adapted linear layer
the spectrum of its update `ΔW = s·B A` (taken from the factors, see
`peftkit.spectrum`), effective ranks, and with a base model the amplification factor
and intruder dimensions; against a second adapter the subspace similarity φ (over the
right singular vectors as the paper, and over the left ones as an extra key). Results
are plain dicts, lists and floats, ready for `json.dumps`. A DoRA adapter is analysed
through its direction's update, with its magnitude change as extra keys; a QLoRA/QDoRA
adapter over the base it was trained on (give a base loaded in 4 bits to measure
against the dequantized weights). `truncate_adapter` writes an adapter cut to a lower
rank by SVD.
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterFileError, ConfigError, ShapeMismatchError
from peftkit.layer import AdapterLayer, LowRankAdapter
from peftkit.method import AdapterMethod
from peftkit.peft_format import (
    CONFIG_NAME,
    LORA_MAGNITUDE,
    WEIGHTS_NAME,
    lora_layer_tensors,
    method_from_config,
    read_adapter_config,
    read_adapter_tensors,
)
from peftkit.registry import available_methods, get_method
from peftkit.spectrum import (
    LowRankSVD,
    amplification,
    effective_rank,
    entropy_rank,
    factored_svd,
    intruder_dimensions,
    subspace_similarity,
)
from peftkit.weights import read_weight

__all__ = [
    "LayerUpdate",
    "LowRankFile",
    "read_low_rank_adapter",
    "analyze",
    "check_intruder_options",
    "describe_analysis",
    "layer_type",
    "layer_depth",
]


@dataclasses.dataclass
class LayerUpdate:
    """One adapted layer: `ΔW = up @ down` (scaling folded into `down`), and DoRA's magnitude if it has one."""

    svd: LowRankSVD
    rank: int
    magnitude: torch.Tensor | None


@dataclasses.dataclass
class LowRankFile:
    """A LoRA-family adapter read from disk: its method, config, updates by module path, and what was left out."""

    directory: Path
    method: AdapterMethod
    config: dict[str, Any]
    layers: dict[str, LayerUpdate]
    skipped: list[str]


def _analysable() -> list[str]:
    return [name for name in available_methods() if get_method(name).has_rank]


def _update(method: AdapterMethod, path: str, params: dict[str, torch.Tensor], source: Path) -> LayerUpdate:
    """The layer's update as the method computes it: its adapter, built on a stand-in layer of the saved shape.

    The method applies its own scaling rules (alpha / r, rsLoRA, rank and alpha patterns),
    and the stand-in lives on the meta device, so no weight of the base is allocated.
    """
    down, up = params["lora_A.weight"], params["lora_B.weight"]
    stand_in = nn.Linear(down.shape[1], up.shape[0], bias=False, device="meta")
    adapter = method.create_adapter(stand_in, path)
    if not isinstance(adapter, LowRankAdapter):
        raise ConfigError(f"{method.name} builds {type(adapter).__name__} at {path!r}, which is not a low-rank update.")
    try:
        missing, unexpected = adapter.load_state_dict(params, strict=False, assign=True)
    except RuntimeError as error:  # a shape that does not fit the config's rank
        raise ShapeMismatchError(f"{source}: module {path!r} does not fit its adapter_config.json: {error}") from None
    if missing or unexpected:
        raise AdapterFileError(
            f"{source}: module {path!r} has tensors {sorted(params)}, but {method.name} needs "
            f"{sorted(adapter.state_dict())}."
        )
    factors = adapter.low_rank_factors()
    return LayerUpdate(factored_svd(*factors), down.shape[0], params.get(LORA_MAGNITUDE))


def read_low_rank_adapter(directory: str | os.PathLike[str] | LowRankFile) -> LowRankFile:
    """Read a LoRA-family adapter directory (one read already is returned as it is); ConfigError naming what can
    be analysed for any other method."""
    if isinstance(directory, LowRankFile):
        return directory
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors, metadata = read_adapter_tensors(directory / WEIGHTS_NAME)
    method = method_from_config(config, metadata, directory / CONFIG_NAME)
    if not method.has_rank:
        raise ConfigError(
            f"{str(directory)!r} holds a {method.name} adapter, which is no low-rank update ΔW = s·BA to analyse; "
            f"peftkit analyze reads LoRA-family adapters: {', '.join(_analysable())}."
        )
    modules, skipped = lora_layer_tensors(tensors)
    if not modules:
        raise AdapterFileError(
            f"{str(directory)!r} has no LoRA linear layer to analyse (tensors: {sorted(tensors)[:3]}...)."
        )
    layers = {path: _update(method, path, params, directory) for path, params in sorted(modules.items())}
    return LowRankFile(directory, method, config, layers, skipped)


def layer_type(path: str) -> str:
    """The kind of layer a module path names: its last part (`q_proj`)."""
    return path.rpartition(".")[2]


def layer_depth(path: str) -> int | None:
    """The block index in a module path (`model.layers.3.mlp.up_proj` -> 3), or None."""
    match = re.search(r"\.(\d+)\.", f".{path}.")
    return int(match.group(1)) if match else None


def _base_weight(base: nn.Module, path: str, update: LayerUpdate) -> torch.Tensor:
    try:
        layer = base.get_submodule(path)
    except AttributeError:
        raise ShapeMismatchError(
            f"the base model has no module {path!r}; was the adapter trained on another base model?"
        ) from None
    if isinstance(layer, AdapterLayer):  # a base with adapters of its own: its frozen weight
        layer = layer.base_layer
    weight = read_weight(layer).detach().to(torch.float32)
    if tuple(weight.shape) != (update.svd.u.shape[0], update.svd.v.shape[0]):
        raise ShapeMismatchError(
            f"module {path!r}: the base weight is {tuple(weight.shape)}, the adapter's update "
            f"{(update.svd.u.shape[0], update.svd.v.shape[0])}; was the adapter trained on another base model?"
        )
    return weight


def _with_base(update: LayerUpdate, weight: torch.Tensor, intruder_k: int, threshold: float) -> dict[str, Any]:
    """Amplification, intruder dimensions (unless `intruder_k` is 0) and DoRA's magnitude change against W."""
    found: dict[str, Any] = {"amplification": amplification(update.svd, weight)}
    tuned = weight + update.svd.dense().to(weight.dtype) if intruder_k or update.magnitude is not None else None
    if intruder_k:  # two full SVDs: by far the costliest part of an analysis
        base_u = torch.linalg.svd(weight, full_matrices=False)[0]
        tuned_u = torch.linalg.svd(tuned, full_matrices=False)[0]
        found["intruders"], found["intruder_similarity"] = intruder_dimensions(base_u, tuned_u, intruder_k, threshold)
    if update.magnitude is not None:
        magnitude = update.magnitude.detach().flatten().to(torch.float32)
        found["magnitude_change"] = float((magnitude / torch.linalg.vector_norm(tuned, dim=1) - 1).abs().mean())
        base_norm = torch.linalg.vector_norm(weight, dim=1)
        found["magnitude_change_vs_base"] = float((magnitude / base_norm - 1).abs().mean())
    return found


def _layer(update: LayerUpdate, path: str) -> dict[str, Any]:
    s = update.svd.s
    return {
        "rank": update.rank,
        "shape": [update.svd.u.shape[0], update.svd.v.shape[0]],
        "depth": layer_depth(path),
        "singular_values": [float(x) for x in s],
        "frobenius": update.svd.frobenius,
        "effective_rank_90": effective_rank(s, 0.90),
        "effective_rank_99": effective_rank(s, 0.99),
        "entropy_rank": entropy_rank(s),
        "amplification": None,
        "intruders": None,
        **({"magnitude_change": None} if update.magnitude is not None else {}),
    }


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _summary(adapter: LowRankFile, layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path, layer in layers.items():
        by_type[layer_type(path)].append(layer)
    types = {}
    for kind, group in sorted(by_type.items()):
        ranks99 = [layer["effective_rank_99"] for layer in group]
        amplifications = [layer["amplification"] for layer in group if layer["amplification"] is not None]
        intruders = [layer["intruders"] for layer in group if layer["intruders"] is not None]
        types[kind] = {
            "layers": len(group),
            "rank": max(layer["rank"] for layer in group),
            "frobenius_mean": _mean([layer["frobenius"] for layer in group]),
            "effective_rank_90_mean": _mean([layer["effective_rank_90"] for layer in group]),
            "effective_rank_99_mean": _mean(ranks99),
            "effective_rank_99_max": max(ranks99),
            "entropy_rank_mean": _mean([layer["entropy_rank"] for layer in group]),
            "amplification_mean": _mean(amplifications),
            "intruders_total": sum(intruders) if intruders else None,
            # The median layer's rank at 99% energy: what a rank_pattern entry for this type could be.
            "recommended_rank": max(1, round(statistics.median(ranks99))),
        }
    return {
        "adapter": str(adapter.directory),
        "method": adapter.method.name,
        "base_model": adapter.config.get("base_model_name_or_path"),
        "layers": len(layers),
        "skipped_tensors": adapter.skipped,
        "by_type": types,
        "recommended_rank": {kind: row["recommended_rank"] for kind, row in types.items()},
    }


def _check_comparable(first: LowRankFile, second: LowRankFile) -> None:
    bases = [adapter.config.get("base_model_name_or_path") for adapter in (first, second)]
    if all(bases) and bases[0] != bases[1]:
        raise ConfigError(
            f"--against: the adapters were trained on different bases ({bases[0]!r} and {bases[1]!r}); "
            "subspaces of different models do not compare."
        )
    only_first = sorted(first.layers.keys() - second.layers.keys())
    only_second = sorted(second.layers.keys() - first.layers.keys())
    if only_first or only_second:
        raise ConfigError(
            "--against: the adapters adapt different layers: "
            + "; ".join(
                f"{len(paths)} only in {str(adapter.directory)!r} (e.g. {paths[:2]})"
                for paths, adapter in ((only_first, first), (only_second, second))
                if paths
            )
            + "."
        )
    for path, update in first.layers.items():
        if update.svd.v.shape[0] != second.layers[path].svd.v.shape[0]:
            raise ShapeMismatchError(
                f"--against: module {path!r} takes {update.svd.v.shape[0]} inputs in {str(first.directory)!r} "
                f"but {second.layers[path].svd.v.shape[0]} in {str(second.directory)!r}; are they of one base model?"
            )


def _similarity(first: LowRankFile, second: LowRankFile, side: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """φ grids per layer over the `side` ("v": right, "u": left) singular vectors of ΔW, and per layer type
    their mean over layers (for types whose layers share their ranks)."""
    grids = {
        path: subspace_similarity(getattr(first.layers[path].svd, side), getattr(update.svd, side))
        for path, update in second.layers.items()
    }
    by_type: dict[str, list[torch.Tensor]] = defaultdict(list)
    for path, grid in grids.items():
        by_type[layer_type(path)].append(grid)
    means = {
        kind: torch.stack(group).mean(0).tolist()
        for kind, group in sorted(by_type.items())
        if len({grid.shape for grid in group}) == 1
    }
    return {path: grid.tolist() for path, grid in grids.items()}, means


def check_intruder_options(k: int, threshold: float) -> None:
    """ConfigError for an intruder count `k` below 0 or a cosine `threshold` outside (0, 1)."""
    if k < 0:
        raise ConfigError(f"intruder_k must be 0 (no intruder count) or a positive integer, got {k}.")
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"intruder_threshold must be between 0 and 1, got {threshold}.")


def analyze(
    adapter: str | os.PathLike[str] | LowRankFile,
    *,
    base: nn.Module | None = None,
    against: str | os.PathLike[str] | LowRankFile | None = None,
    intruder_k: int = 10,
    intruder_threshold: float = 0.5,
) -> dict[str, Any]:
    """Analyse the LoRA-family adapter in directory `adapter` (or read already); a JSON-ready dict (README: Analysis).

    Args:
        base: the base model (loaded, e.g. `peftkit.training.models.load_model`) for the
            amplification factor and intruder dimensions; a 4-bit base is read dequantized.
        against: a second adapter directory of the same base and layers, for φ.
        intruder_k: how many of the tuned weight's top singular vectors are checked; 0 skips
            intruder dimensions (two full SVDs per layer, the costly part on a large base).
        intruder_threshold: the cosine similarity below which one counts as an intruder.
    """
    check_intruder_options(intruder_k, intruder_threshold)
    first = read_low_rank_adapter(adapter)
    second = read_low_rank_adapter(against) if against is not None else None
    if second is not None:
        _check_comparable(first, second)
    layers = {}
    for path, update in first.layers.items():
        layers[path] = _layer(update, path)
        if base is not None:  # one layer's weights at a time: an 8B base is not copied whole
            with torch.no_grad():
                weight = _base_weight(base, path, update)
                layers[path].update(_with_base(update, weight, intruder_k, intruder_threshold))
    result: dict[str, Any] = {"layers": layers, "summary": _summary(first, layers)}
    if base is not None:
        result["summary"].update(intruder_k=intruder_k, intruder_threshold=intruder_threshold)
    if second is not None:
        # The paper's φ is over the input side (A's row space); the output side (B's column space) is
        # the one training fills from zero, so it shows what was learned when A barely left its init.
        result["similarity"], result["summary"]["similarity_by_type"] = _similarity(first, second, "v")
        result["similarity_left"], result["summary"]["similarity_left_by_type"] = _similarity(first, second, "u")
        result["summary"]["against"] = _summary(second, {p: _layer(u, p) for p, u in second.layers.items()})
    return result


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def describe_analysis(result: dict[str, Any]) -> list[str]:
    """`analyze`'s result in words: a row per layer type, then φ(1, 1) and the truncation, if any."""
    summary = result["summary"]
    lines = [
        f"{summary['adapter']}: {summary['method']}, {summary['layers']} layers"
        + (f", base {summary['base_model']}" if summary["base_model"] else ""),
        "",
        f"{'layer type':<14}{'layers':>7}{'rank':>6}{'eff. rank 90%':>15}{'99%':>7}{'entropy':>9}"
        f"{'|ΔW|_F':>9}{'amplif.':>9}{'intruders':>11}{'suggested r':>13}",
    ]
    for kind, row in summary["by_type"].items():
        lines.append(
            f"{kind:<14}{row['layers']:>7}{row['rank']:>6}{row['effective_rank_90_mean']:>15.1f}"
            f"{row['effective_rank_99_mean']:>7.1f}{row['entropy_rank_mean']:>9.2f}{row['frobenius_mean']:>9.3g}"
            f"{_cell(row['amplification_mean'], '.3g'):>9}{_cell(row['intruders_total'], 'd'):>11}"
            f"{row['recommended_rank']:>13}"
        )
    lines += ["", "Effective rank: the fewest singular values of ΔW with 90% / 99% of its energy (mean over layers)."]
    if "intruder_k" in summary:
        lines.append(
            f"Intruders: of the top {summary['intruder_k']} singular vectors of W + ΔW, those with cosine < "
            f"{summary['intruder_threshold']} to every singular vector of W (summed over layers)."
        )
    if summary.get("skipped_tensors"):
        lines.append(f"Not analysed (not linear LoRA layers): {len(summary['skipped_tensors'])} tensors.")
    if "similarity_by_type" in summary:
        lines += ["", f"Subspace similarity φ(1, 1) with {summary['against']['adapter']} (mean over layers):"]
        sides = (("right (input side, as the paper)", "similarity_by_type"), ("left", "similarity_left_by_type"))
        for side, key in sides:
            lines.append(f"  {side}: " + ", ".join(f"{kind} {grid[0][0]:.2f}" for kind, grid in summary[key].items()))
    if "truncation" in result:
        cut = result["truncation"]
        lines += ["", f"Wrote the adapter truncated to rank {cut['rank']} to {cut['out']}."]
        if "logit_change" in cut:
            change = cut["logit_change"]
            lines.append(
                f"Logit change on {change['prompts']} prompts: max {change['max_abs']:.3g}, mean "
                f"{change['mean_abs']:.3g}; top-1 token agreement {change['top1_agreement']:.1%}."
            )
    return lines
