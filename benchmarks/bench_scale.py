"""QLoRA at 8B scale, peftkit against HF PEFT: loading memory, peak tensor memory, step time, losses.

A Llama-3-8B-shaped model with random weights (`scale_model.py`: bfloat16 safetensors
shards, cached) is fine-tuned over its 4-bit base (NF4, double quantization, bfloat16
compute), LoRA r=16 alpha=32 on all linear layers, batch 1 x `--seq`, gradient
checkpointing, a bitsandbytes 8-bit AdamW, `--steps` optimizer steps on one fixed
sequence; on the peftkit side by `peftkit train` from a YAML this script writes
(`peftkit.training.train`, the command's own code path), on the PEFT side by
transformers' `BitsAndBytesConfig` + `prepare_model_for_kbit_training` +
`get_peft_model` and a plain loop. Each side runs in its own child process, measured
by the same instruments (so neither sees the other's memory):

- loading: peak RssAnon of the child from its start to the first forward (sampled from
  /proc every 20 ms; not VmHWM, which counts the checkpoint's memory-mapped pages);
- steps: peak bytes of live tensors (`LiveTensors`: every CPU tensor storage an op
  creates, plus every tensor alive when the first step starts - the model's 4-bit
  weights and their quantization state, its other weights and buffers - and the
  optimizer state after each step, each storage counted once until it is freed);
  also the peak RssAnon during the steps;
- step time: from the first forward to the first optimizer step's end, then between
  optimizer step ends (global torch hooks, the same on both sides); the median;
- each step's loss, and the bytes of the 4-bit base weights (`peftkit.quant.weight_nbytes`).

    python benchmarks/bench_scale.py                        # the 8b shape, both sides
    python benchmarks/bench_scale.py --shape tiny           # the whole pipeline in a minute
    python benchmarks/bench_scale.py --sides peft --seq 128 # one side only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import time
import weakref
from functools import partial
from pathlib import Path
from typing import Any

import bitsandbytes
import peft
import torch
import transformers
import yaml
from common import AnonPeak, machine, spawn
from scale_model import SHAPES, ensure_model
from torch._subclasses.fake_tensor import FakeTensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from peftkit.errors import ConfigError
from peftkit.quant import weight_nbytes
from peftkit.training import train
from peftkit.training.config import apply_overrides, load_config
from peftkit.training.optim import check_optimizer

RANK, ALPHA, LR, SEED = 16, 32, 2e-4, 0
# In order of preference: the first that runs on this machine is used by both sides (the classes: PEFT's side).
OPTIMIZERS = {
    "paged_adamw_8bit": bitsandbytes.optim.PagedAdamW8bit,
    "adamw_8bit": bitsandbytes.optim.AdamW8bit,
    "adamw": torch.optim.AdamW,
}
SIDES = ["peftkit", "peft"]
PEAK_TARGET_BYTES = 6.0e9  # Unsloth's published minimum for 8B QLoRA is about 6 GB
LOAD_FACTOR = 1.2  # loading: peak RssAnon <= 1.2 x the 4-bit model's bytes + one shard
GB = 1e9


# ---------------------------------------------------------------- instruments (the same for both sides)


class LiveTensors(TorchDispatchMode):
    """Bytes of live CPU tensor storages, and their peak since `reset_peak`.

    Every storage an op returns is counted once, until Python frees it (a weak
    reference's callback); `sweep` adds the tensors that no op under this mode made
    (those alive before it, memory-mapped ones), `add_state` an optimizer's state
    (bitsandbytes may allocate it outside torch ops).
    Allocations inside a kernel that never reach Python (scratch buffers) are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu" or isinstance(tensor, FakeTensor):  # fake: the estimate's simulated step
            return
        storage = tensor.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        old = self._sizes.get(key)
        if old is None:
            self._refs[key] = weakref.ref(storage, partial(self._drop, key))
        self._sizes[key] = nbytes
        self.current += nbytes - (old or 0)
        self.peak = max(self.peak, self.current)

    def _drop(self, key: int, _: weakref.ref) -> None:
        self.current -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def sweep(self) -> None:
        """Count every tensor the garbage collector knows of."""
        for obj in gc.get_objects():
            # Not isinstance: that reads `__class__`, which some deprecated proxies warn on.
            if issubclass(type(obj), torch.Tensor):
                self.add(obj)

    def add_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Count an optimizer's state tensors."""
        for state in optimizer.state.values():
            tree_map_only(torch.Tensor, self.add, state)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.add, out)
        return out


def _simulated(tree: Any) -> bool:
    """Whether `tree` holds fake or meta tensors: `peftkit train`'s estimate simulating a step, not a step."""
    return any(
        isinstance(t, FakeTensor) or t.device.type == "meta" for t in tree_leaves(tree) if isinstance(t, torch.Tensor)
    )


class StepClock:
    """Step boundaries seen from outside a training loop, by global torch hooks.

    The first forward of any module starts step 1 (and the `on_start` callback: loading
    is over); the end of each outermost optimizer step ends a step. Per step: its wall
    time, and the peak of `live` during it.
    """

    def __init__(self, live: LiveTensors, anon: AnonPeak) -> None:
        self.live, self.anon = live, anon
        self.started: float | None = None
        self.cpu_started = 0.0
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.step_peaks: list[int] = []
        self.start_bytes = 0
        self._depth = 0
        self._handles: list[Any] = []

    def _first_forward(self, module: torch.nn.Module, args: Any) -> None:
        if _simulated((args, next(module.parameters(), None))):  # the inputs may all be keywords
            return
        self._handles.pop(0).remove()
        self.anon.enter("steps")
        self.live.sweep()
        self.start_bytes = self.live.current
        print(f"# loaded: {self.start_bytes / GB:.2f} GB of live tensors", file=sys.stderr, flush=True)
        self.live.reset_peak()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def _pre_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._depth += not _simulated(optimizer.param_groups)

    def _post_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if _simulated(optimizer.param_groups):
            return
        self._depth -= 1
        if self._depth or self.started is None:  # nested, or before training (a config check's probe step)
            return
        now, cpu_now = time.perf_counter(), time.process_time()
        self.live.add_state(optimizer)
        self.seconds.append(now - self.started)
        self.cpu_seconds.append(cpu_now - self.cpu_started)
        self.step_peaks.append(self.live.peak)
        print(
            f"# step {len(self.seconds)}: {self.seconds[-1]:.1f} s ({self.cpu_seconds[-1]:.1f} s of CPU), "
            f"peak tensor memory {self.live.peak / GB:.2f} GB",
            file=sys.stderr,
            flush=True,
        )
        self.started, self.cpu_started = now, cpu_now
        self.live.reset_peak()

    def __enter__(self) -> StepClock:
        self._handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(self._first_forward),
            register_optimizer_step_pre_hook(self._pre_step),
            register_optimizer_step_post_hook(self._post_step),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def pick_optimizer() -> tuple[str, str]:
    """(name, note) of the first of OPTIMIZERS that takes a step on this machine (peftkit's own check)."""
    for name in OPTIMIZERS:
        try:
            check_optimizer(name)
        except ConfigError as error:
            print(f"# {error}", file=sys.stderr)
            continue
        unpaged = name.startswith("paged") and not torch.cuda.is_available()
        return name, "run unpaged: bitsandbytes pages optimizer state only on CUDA" if unpaged else ""
    raise RuntimeError("no optimizer of OPTIMIZERS runs here")


# ---------------------------------------------------------------- the two sides


def _batch(spec: dict[str, Any], tokenizer: Any) -> list[int]:
    """The training sequence as both sides tokenize it: the text's ids, then EOS (what peftkit's data path does)."""
    record = json.loads(Path(spec["data"]).read_text(encoding="utf-8"))
    ids = list(tokenizer(record["text"])["input_ids"]) + [tokenizer.eos_token_id]
    if ids != spec["ids"]:
        raise RuntimeError("the tokenizer does not give the drawn ids back")
    return ids


def peft_4bit_model(checkpoint: str) -> torch.nn.Module:
    """The checkpoint loaded as PEFT's QLoRA recipe loads it: transformers' `BitsAndBytesConfig`, NF4,
    double quantization, bfloat16 compute and dense layers."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=quantization, dtype=torch.bfloat16, device_map="cpu"
    )


def _peft_side(spec: dict[str, Any]) -> tuple[list[float], torch.nn.Module]:
    """HF PEFT's documented QLoRA recipe over transformers' 4-bit load, and a plain loop."""
    torch.manual_seed(SEED)
    model = peft_4bit_model(spec["checkpoint"])
    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    if spec["peft_dense"] == "bfloat16":  # undo the recipe's float32 copies of the dense weights: peftkit's dtypes
        for parameter in model.parameters():
            if parameter.dtype == torch.float32:
                parameter.data = parameter.data.to(torch.bfloat16)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(model, config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[spec["optimizer"]](trainable, lr=LR, weight_decay=0.0)  # peftkit's default decay
    ids = torch.tensor([_batch(spec, AutoTokenizer.from_pretrained(spec["checkpoint"]))])
    losses = []
    for _ in range(spec["steps"]):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def peftkit_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The `peftkit train` YAML of the run (as a mapping)."""
    return {
        "model": {
            "name": spec["checkpoint"],
            "dtype": "bfloat16",
            "gradient_checkpointing": True,
            "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        },
        "method": {"name": "lora", "r": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": spec["data"], "max_length": spec["seq"], "packing": False},
        "training": {
            "learning_rate": LR,
            "schedule": "constant",
            "max_steps": spec["steps"],
            "batch_size": 1,
            "max_grad_norm": None,
            "optimizer": spec["optimizer"],
        },
        "output": {"dir": spec["output"]},
    }


def _peftkit_side(spec: dict[str, Any]) -> tuple[list[float], torch.nn.Module]:
    """`peftkit train CONFIG.yaml`, called in this process so that the instruments see it."""
    config = Path(spec["output"]) / "run.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    raw = apply_overrides(peftkit_config(spec), spec["overrides"])
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    result = train(load_config(config), quiet=True)
    records = [json.loads(line) for line in (Path(spec["output"]) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], result.model


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One side, measured: what the parent reports."""
    with AnonPeak("load") as anon, LiveTensors() as live, StepClock(live, anon) as clock:
        side = _peftkit_side if spec["side"] == "peftkit" else _peft_side
        losses, model = side(spec)
    four_bit, fp16 = weight_nbytes(model)
    return {
        "losses": losses,
        "step_seconds": clock.seconds,
        "median_step_s": statistics.median(clock.seconds),
        "step_cpu_seconds": clock.cpu_seconds,  # all threads: less moved by other processes than wall time
        "step_peak_tensor_bytes": clock.step_peaks,
        "peak_tensor_bytes": max(clock.step_peaks),
        "tensor_bytes_at_start": clock.start_bytes,
        "anon_baseline_bytes": anon.baseline,
        "load_peak_anon_bytes": anon.peaks["load"],
        "steps_peak_anon_bytes": anon.peaks["steps"],
        "base_4bit_bytes": four_bit,
        "base_fp16_bytes": fp16,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


# ---------------------------------------------------------------- parent: run and report


def _write_data(workdir: Path, shape: dict[str, Any], seq: int) -> tuple[str, list[int]]:
    """A one-record JSONL of `seq - 1` random words; (its path, the ids both sides must train on)."""
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, shape["vocab_size"], (seq - 1,), generator=generator).tolist()  # past BOS, EOS, unk
    path = workdir / "train.jsonl"
    path.write_text(json.dumps({"text": " ".join(f"t{i}" for i in ids)}) + "\n", encoding="utf-8")
    return str(path), ids + [1]  # EOS, appended by the data path


def _previous(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The side results kept in `path` by a run with the same settings (so each side can run on its own)."""
    if not path.is_file():
        return {}
    kept = json.loads(path.read_text(encoding="utf-8"))
    return kept["results"] if all(kept.get(k) == v for k, v in settings.items()) else {}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Each side in its own process; the results of both (a side not run now: as last run with these settings)."""
    checkpoint, record = ensure_model(args.shape)
    optimizer, note = (args.optimizer, "") if args.optimizer else pick_optimizer()
    settings = {"shape": args.shape, "seq": args.seq, "steps": args.steps, "optimizer": optimizer}
    workdir = Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    data, ids = _write_data(workdir, SHAPES[args.shape], args.seq)
    results = _previous(workdir / "results.json", settings)
    for side in args.sides:
        overrides = args.set if side == "peftkit" else []
        label = side if not overrides else f"{side} ({args.label or ', '.join(overrides)})"  # a column of its own
        if side == "peft" and args.peft_dense != "float32":
            label = f"peft (dense {args.peft_dense})"
        print(f"# {label}: {args.shape} shape, seq {args.seq}, {optimizer} ...", file=sys.stderr, flush=True)
        output = workdir / f"{side}-run"
        shutil.rmtree(output, ignore_errors=True)  # a run directory holds one run
        spec = dict(
            side=side, checkpoint=str(checkpoint), data=data, ids=ids, optimizer=optimizer, output=str(output),
            seq=args.seq, steps=args.steps, overrides=overrides, peft_dense=args.peft_dense,
        )  # fmt: skip
        started, load_before = time.perf_counter(), os.getloadavg()[0]
        result = spawn(__file__, spec, stream_stderr=True)
        results[label] = {
            **result,
            "wall_s": time.perf_counter() - started,
            "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
            "load_average": [load_before, os.getloadavg()[0]],  # other users of the machine, at start and end
        }
    summary = {
        **settings,
        "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        "machine": machine(),
        "versions": {
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "optimizer_note": note,
        "checkpoint": {k: record[k] for k in ("total_bytes", "largest_shard_bytes")},
        "results": results,
    }
    (workdir / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _gb(key: str) -> Any:
    """A table cell: the result's `key` (bytes, or a list of them) in GB."""
    return lambda r: ", ".join(f"{b / GB:.2f}" for b in (r[key] if isinstance(r[key], list) else [r[key]]))


def report(summary: dict[str, Any]) -> list[str]:
    """The markdown table of a run, and the targets."""
    results = summary["results"]
    ok = {side: r for side, r in results.items() if "error" not in r}
    rows = [
        ("peak anonymous memory while loading (GB)", _gb("load_peak_anon_bytes")),
        ("  of which before loading: the interpreter and imports (GB)", _gb("anon_baseline_bytes")),
        ("live tensors when step 1 starts (GB)", _gb("tensor_bytes_at_start")),
        ("peak tensor memory during the steps (GB)", _gb("peak_tensor_bytes")),
        ("peak tensor memory per step (GB)", _gb("step_peak_tensor_bytes")),
        ("peak anonymous memory during the steps (GB)", _gb("steps_peak_anon_bytes")),
        ("median step (s)", lambda r: f"{r['median_step_s']:.1f}"),
        ("each step (s)", lambda r: ", ".join(f"{x:.1f}" for x in r["step_seconds"])),
        ("each step's CPU time, all threads (s)", lambda r: ", ".join(f"{x:.1f}" for x in r["step_cpu_seconds"])),
        ("each step's loss", lambda r: ", ".join(f"{x:.4f}" for x in r["losses"])),
        ("4-bit base bytes (GB)", _gb("base_4bit_bytes")),
        ("4-bit base bytes / the same weights in fp16", lambda r: f"{r['base_4bit_bytes'] / r['base_fp16_bytes']:.3f}"),
        ("trainable parameters", lambda r: f"{r['trainable']:,}"),
        ("child wall time (s)", lambda r: f"{r['wall_s']:.0f}"),
        (
            "run at; 1-min load average at start, end",
            lambda r: f"{r['date']}; {r['load_average'][0]:.1f}, {r['load_average'][1]:.1f}",
        ),
    ]
    sides = list(results)
    lines = [
        f"# scale benchmark, {summary['date']}, {summary['machine']}, "
        + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
        f"# {summary['shape']} shape, batch 1 x seq {summary['seq']}, {summary['steps']} steps, "
        f"{summary['optimizer']}" + (f" ({summary['optimizer_note']})" if summary["optimizer_note"] else ""),
        "",
        "| measure | " + " | ".join(sides) + " |",
        "| --- |" + " --- |" * len(sides),
    ]
    for label, cell in rows:
        values = [cell(results[s]) if s in ok else f"failed: {results[s]['error'][:100]}" for s in sides]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return lines + ["", *_targets(summary, ok)]


def _targets(summary: dict[str, Any], ok: dict[str, Any]) -> list[str]:
    """The issue's targets, for each peftkit column (the default settings and any `--set` variant)."""
    theirs, shard = ok.get("peft"), summary["checkpoint"]["largest_shard_bytes"]
    lines = []
    for label, ours in ok.items():
        if not label.startswith("peftkit"):
            continue
        peak = ours["peak_tensor_bytes"]
        lines.append(
            f"- {label}: peak tensor memory {peak / GB:.2f} GB <= {PEAK_TARGET_BYTES / GB} GB: "
            f"{_verdict(peak <= PEAK_TARGET_BYTES)} (by {(peak - PEAK_TARGET_BYTES) / GB:+.2f} GB)"
        )
        model, total = ours["tensor_bytes_at_start"], ours["load_peak_anon_bytes"]
        bound, load = LOAD_FACTOR * model + shard, total - ours["anon_baseline_bytes"]
        lines.append(
            f"- {label}: peak anonymous memory while loading, over the interpreter's before it, {load / GB:.2f} GB "
            f"({total / GB:.2f} GB in all) <= 1.2 x the loaded model's {model / GB:.2f} GB + one shard's "
            f"{shard / GB:.2f} GB = {bound / GB:.2f} GB: {_verdict(load <= bound)} ({_verdict(total <= bound)} in all)"
        )
        if theirs:
            memory = peak / theirs["peak_tensor_bytes"]
            time_ratio = ours["median_step_s"] / theirs["median_step_s"]
            lines += [
                f"- {label}: peak tensor memory / PEFT's {memory:.2f} <= 1.0: {_verdict(memory <= 1.0)}",
                f"- {label}: median step / PEFT's {time_ratio:.2f} <= 1.0: {_verdict(time_ratio <= 1.0)}",
            ]
        for other, result in ok.items():
            if other.startswith("peft") and not other.startswith("peftkit"):
                diffs = ", ".join(f"{abs(a - b):.1e}" for a, b in zip(ours["losses"], result["losses"], strict=True))
                lines.append(f"- {label}: loss abs diff from {other}'s, per step: {diffs}")
    return lines


def _verdict(held: bool) -> str:
    return "holds" if held else "misses"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=SIDES)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), help="default: the first that runs here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="an option of the peftkit side's YAML (as `peftkit train --set`); the run is a column of its own",
    )
    parser.add_argument("--label", help="the name of a --set variant's column (default: its settings)")
    parser.add_argument(
        "--peft-dense",
        choices=["float32", "bfloat16"],
        default="float32",
        help="PEFT's dense weights: float32 as prepare_model_for_kbit_training makes them, or cast back to bfloat16 "
        "(peftkit's model.dtype); the latter is a column of its own",
    )
    parser.add_argument("--out", default="runs/bench-scale", help="where the configs, runs and results.json go")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    print("\n".join(report(run(args))))


if __name__ == "__main__":
    main()
