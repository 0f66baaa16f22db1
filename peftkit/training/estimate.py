"""`peftkit estimate`: a training step's peak memory, whether it fits a GPU, and what would make it fit.

The figure is the simulated step of `peftkit.training.simulate` (peftkit's own code on
tensors that hold no data), never a rule of thumb. The search for the largest batch
and sequence, and the suggested changes, need many more steps: for models deeper
than `FULL_DEPTH` layers those steps are simulated at two small depths and carried to
the model's depth along the straight line through them (the step's memory grows by
the same bytes with each identical layer). That line is first checked against the
full simulation of the config itself; when they differ by more than
`DEPTH_TOLERANCE`, every step is simulated at full depth instead.

A config fits a GPU when its peak is at most `USABLE` of the GPU's memory: the rest
is for what the simulation does not see (the CUDA context, cuBLAS workspaces, the
caching allocator's fragmentation).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

from peftkit.errors import ConfigError
from peftkit.training.config import RunConfig, apply_overrides, build_config
from peftkit.training.distributed import resolve_strategy
from peftkit.training.memory import CATEGORIES, StepMemory
from peftkit.training.models import text_config
from peftkit.training.process_memory import per_process
from peftkit.training.simulate import Simulation
from peftkit.units import GIB, MIB, format_bytes

__all__ = ["GPUS", "USABLE", "Estimate", "Suggestion", "parse_gpu", "estimate", "describe"]
# Memory of common GPUs in GiB: what their makers sell as "GB" (a 24 GB card holds 24 GiB).
GPUS: dict[str, float] = {
    "rtx3060": 12, "rtx3070": 8, "rtx3080": 10, "rtx3090": 24,
    "rtx4060": 8, "rtx4060ti": 16, "rtx4070": 12, "rtx4080": 16, "rtx4090": 24, "rtx5090": 32,
    "t4": 16, "v100": 32, "a10": 24, "a10g": 24, "l4": 24, "l40s": 48, "a6000": 48,
    "a100-40gb": 40, "a100": 80, "a100-80gb": 80, "h100": 80, "h200": 141, "b200": 180,
}  # fmt: skip
USABLE = 0.9
FULL_DEPTH = 8  # models this shallow are always simulated whole
DEPTH_TOLERANCE = 0.01
_SMALL_DEPTHS = (2, 3)
_MAX_BATCH = 4096
_SEQUENCE_UNIT = 128


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """A change to the config (as `--set` overrides) and the step's peak with it."""

    change: str
    peak_bytes: int
    fits: bool


@dataclasses.dataclass
class Estimate:
    """The estimate of one config; the GPU fields are set when a GPU was given."""

    step: StepMemory
    device_type: str
    seconds: float
    num_processes: int = 1
    gpu: str | None = None
    gpu_bytes: int | None = None
    fits: bool | None = None
    largest_batch_size: int | None = None
    largest_max_length: int | None = None
    suggestions: list[Suggestion] = dataclasses.field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.step.peak_bytes

    def to_json(self) -> dict[str, Any]:
        """The `--json` object: bytes throughout."""
        out: dict[str, Any] = {
            "peak_bytes": self.peak_bytes,
            "breakdown": self.step.breakdown,
            "batch_size": self.step.batch_size,
            "max_length": self.step.max_length,
            "device": self.device_type,
            "num_processes": self.num_processes,
        }
        if self.gpu_bytes is not None:
            out.update(
                gpu=self.gpu,
                gpu_bytes=self.gpu_bytes,
                usable_bytes=int(self.gpu_bytes * USABLE),
                fits=self.fits,
                largest_batch_size=self.largest_batch_size,
                largest_max_length=self.largest_max_length,
            )
        out["suggestions"] = [dataclasses.asdict(s) for s in self.suggestions]
        return out


def parse_gpu(text: str) -> tuple[str, int]:
    """(name, bytes) of `--gpu`: a size (24GB, 24GiB, 24, 16000MB; GB are GiB) or a name of GPUS."""
    key = re.sub(r"[\s_]", "", text.lower())
    size = re.fullmatch(r"(\d+(?:\.\d+)?)(gib|gb|g|mib|mb|m)?", key)
    if size:
        unit = MIB if (size.group(2) or "g").startswith("m") else GIB
        if float(size.group(1)) > 0:
            return text, int(float(size.group(1)) * unit)
    if key.replace("nvidia", "").replace("geforce", "") in GPUS:
        name = key.replace("nvidia", "").replace("geforce", "")
        return name, int(GPUS[name] * GIB)
    raise ConfigError(
        f"--gpu {text!r} is neither a memory size (such as 24GB, 24GiB or 16000MB) nor a known GPU; "
        f"known GPUs: {', '.join(GPUS)}."
    )


class _Peaks:
    """The peak of a config's step at any batch size and length: simulated whole, or along the depths' line."""

    def __init__(self, config: RunConfig, simulation: Simulation, full: StepMemory, num_processes: int = 1) -> None:
        """`simulation` is `config`'s, whole; `full` its step at the config's own batch and length (per process)."""
        self.device_type, self.depth = simulation.device_type, simulation.num_layers
        self.num_processes = num_processes
        self._simulations: dict[tuple[str, int | None], Simulation] = {(repr(config.to_dict()), None): simulation}
        self.by_depth = False
        if self.depth is not None and self.depth > FULL_DEPTH:
            line = self._along_depths(config, full.batch_size, full.max_length)
            self.by_depth = abs(line - full.peak_bytes) <= DEPTH_TOLERANCE * full.peak_bytes

    def _simulation(self, config: RunConfig, layers: int | None) -> Simulation:
        key = (repr(config.to_dict()), layers)
        if key not in self._simulations:
            self._simulations[key] = Simulation(config, self.device_type, layers)
        return self._simulations[key]

    def _along_depths(self, config: RunConfig, batch_size: int, max_length: int) -> int:
        low, high = (self._step(self._simulation(config, n), batch_size, max_length) for n in _SMALL_DEPTHS)
        per_layer = (high - low) / (_SMALL_DEPTHS[1] - _SMALL_DEPTHS[0])
        return int(low + per_layer * (self.depth - _SMALL_DEPTHS[0]))

    def peak(self, config: RunConfig, batch_size: int, max_length: int) -> int:
        if self.by_depth:
            return self._along_depths(config, batch_size, max_length)
        return self._step(self._simulation(config, None), batch_size, max_length)

    def _step(self, simulation: Simulation, batch_size: int, max_length: int) -> int:
        """The peak of one of the processes."""
        step = simulation.step(batch_size, max_length)
        return per_process(step, simulation.model, simulation.config, self.num_processes).peak_bytes


def _largest(peak: Callable[[int], int], budget: int, unit: int, limit: int, start: int) -> int | None:
    """The largest multiple of `unit` up to `limit` whose peak is within `budget` (peaks grow with the value).

    From `start` (the config's own value), each probe goes where a line through known
    peaks meets the budget (a step's memory grows nearly linearly with its tokens):
    extended from the two nearest while no value is known not to fit, else the chord
    across the bracket, or its middle when the same end moved twice. A few simulated
    steps, not one per candidate.
    """
    seen: dict[int, int] = {}

    def fits(value: int) -> bool:
        if value not in seen:
            seen[value] = peak(value)
        return seen[value] <= budget

    past = (limit // unit + 1) * unit  # stands for "no value known not to fit"
    start = min(max(start // unit * unit, unit), limit)
    low, high = (start, past) if fits(start) else (unit, start)
    if low == unit and not fits(unit):
        return None
    moved, repeated = "", False
    while high - low > unit:
        if high == past:
            others = [x for x in seen if x != low]
            other = min(others, key=lambda x: abs(x - low)) if others else None
            probe = _crossing(low, seen[low], other, seen.get(other), budget) if other else 2 * low
        elif repeated:
            probe = (low + high) // 2
        else:
            probe = _crossing(low, seen[low], high, seen[high], budget)
        probe = min(max(probe // unit * unit, low + unit), high - unit, limit)
        end = "low" if fits(probe) else "high"
        low, high = (probe, high) if end == "low" else (low, probe)
        moved, repeated = end, end == moved
    return low


def _crossing(x0: int, y0: int, x1: int, y1: int, level: int) -> int:
    """Where the line through (x0, y0) and (x1, y1) reaches `level`; twice x0 if the line does not rise."""
    slope = (y1 - y0) / (x1 - x0)
    return int(x0 + (level - y0) / slope) if slope > 0 else 2 * x0


def _variant(config: RunConfig, overrides: list[str]) -> RunConfig:
    return build_config(apply_overrides(config.to_dict(), overrides), data_files=False)


def _changes(config: RunConfig) -> list[list[str]]:
    """The single changes that save memory on `config` and do not already hold: `--set` overrides each."""
    changes = []
    quantization = config.base_quantization()
    if quantization is None and not config.method.trains_base_weights:
        changes.append(["model.quantization.bits=4"])
    elif quantization is not None and quantization.skip_modules is None:  # the output head is kept dense
        section = "model.quantization" if config.model.quantization else "method.quantization"  # qlora's own
        changes.append([f"{section}.skip_modules=[]"])
    if not config.model.gradient_checkpointing:
        changes.append(["model.gradient_checkpointing=true"])
    if config.training.optimizer in ("adamw", "paged_adamw"):
        changes.append([f"training.optimizer={config.training.optimizer}_8bit"])
    return changes


def _suggestions(
    config: RunConfig, peaks: _Peaks, usable: int, largest_batch: int | None, largest_length: int | None
) -> list[Suggestion]:
    """Changes that lower the peak, each with the changed config's peak: the memory options, alone and
    together, then the longest sequence and the largest batch that fit (the global batch kept by accumulation)."""
    tc, batch, length = config.training, config.training.batch_size, config.data.max_length
    changes = _changes(config)
    if len(changes) > 1:
        changes.append([item for change in changes for item in change])
    if largest_length is not None and largest_length < length:
        changes.append([f"data.max_length={largest_length}"])
    if largest_batch is not None and largest_batch < batch:
        steps = tc.gradient_accumulation_steps * math.ceil(batch / largest_batch)
        changes.append([f"training.batch_size={largest_batch}", f"training.gradient_accumulation_steps={steps}"])
    out = []
    for change in changes:
        changed = _variant(config, change)
        peak = peaks.peak(changed, changed.training.batch_size, changed.data.max_length)
        out.append(Suggestion(" ".join(change), peak, peak <= usable))
    return out


def estimate(config: RunConfig, gpu: str | None = None, device_type: str = "cuda", num_processes: int = 1) -> Estimate:
    """`config`'s training step on `device_type`, per process of `num_processes` under `training.distributed`;
    with `gpu` (see parse_gpu, memory per process): the fit and the changes."""
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}.")
    started = time.perf_counter()
    simulation = Simulation(config, device_type)
    step = per_process(simulation.step(), simulation.model, config, num_processes)
    result = Estimate(step, device_type, 0.0, num_processes=num_processes)
    if gpu is not None:
        result.gpu, result.gpu_bytes = parse_gpu(gpu)
        usable = int(result.gpu_bytes * USABLE)
        result.fits = step.peak_bytes <= usable
        peaks = _Peaks(config, simulation, step, num_processes)
        batch, length = config.training.batch_size, config.data.max_length
        limit = _max_positions(simulation)
        result.largest_batch_size = _largest(lambda b: peaks.peak(config, b, length), usable, 1, _MAX_BATCH, batch)
        result.largest_max_length = _largest(
            lambda n: peaks.peak(config, batch, n), usable, sequence_unit(length), limit, length
        )
        if not result.fits:
            result.suggestions = _suggestions(
                config, peaks, usable, result.largest_batch_size, result.largest_max_length
            )
    result.seconds = time.perf_counter() - started
    return result


def sequence_unit(max_length: int) -> int:
    """The step of sequence lengths searched: 128 tokens, finer (an eighth) for configs under 1024."""
    return min(_SEQUENCE_UNIT, max(1, max_length // 8))


def _max_positions(simulation: Simulation) -> int:
    """The longest sequence the model takes (its max_position_embeddings), at most 1M tokens."""
    positions = getattr(text_config(simulation.model.config), "max_position_embeddings", None)
    return min(positions or 2**20, 2**20)


def _per_process(result: Estimate, config: RunConfig) -> str:
    """The headline's note " per process (N processes, strategy S)" where the estimate is one process's of N."""
    if result.num_processes == 1:
        return ""
    dc = config.training.distributed
    strategy = resolve_strategy(dc, result.num_processes) + (" with cpu_offload" if dc.cpu_offload else "")
    return f" per process ({result.num_processes} processes, strategy {strategy})"


def describe(result: Estimate, config: RunConfig) -> list[str]:
    """The human-readable report of `result`, line by line."""
    step = result.step
    quantized = "4-bit base" if config.base_quantization() is not None else "dense base"
    lines = [
        f"peftkit estimate: {config.method.name} on {config.model.name} ({config.model.dtype}, {quantized}) | "
        f"batch {step.batch_size} x {step.max_length} tokens | optimizer {config.training.optimizer} | "
        f"checkpointing {'on' if config.model.gradient_checkpointing else 'off'} | "
        f"simulated for {result.device_type} in {result.seconds:.1f} s",
        f"peak memory of a training step: {format_bytes(step.peak_bytes)}" + _per_process(result, config),
    ]
    lines += [f"  {name.replace('_', ' '):<22}{format_bytes(step.breakdown[name]):>12}" for name in CATEGORIES]
    if result.gpu_bytes is None:
        return lines
    usable = result.gpu_bytes * USABLE
    lines.append(
        f"GPU {result.gpu} ({format_bytes(result.gpu_bytes)}, {format_bytes(usable)} usable): "
        + ("fits" if result.fits else f"does not fit, by {format_bytes(step.peak_bytes - usable)}")
    )
    lines.append(
        f"  largest batch at {step.max_length} tokens: {result.largest_batch_size or 'none (batch 1 does not fit)'}; "
        f"longest sequence at batch {step.batch_size}: {result.largest_max_length or 'none'}"
    )
    if result.suggestions:
        lines.append("  changes (--set) and the peak with each:")
        lines += [
            f"    {s.change}: {format_bytes(s.peak_bytes)} ({'fits' if s.fits else 'does not fit'})"
            for s in result.suggestions
        ]
    return lines
