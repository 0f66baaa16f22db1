"""`peftkit estimate`'s simulated step against the same step run for real: peak live tensor bytes.

For each configuration (methods, checkpointing, 4-bit base, 8-bit optimizer, bfloat16,
on a Llama-shaped model and on Gemma-3-270M) a child process first simulates one
steady-state step with `peftkit.training.simulate.Simulation(config, "cpu")` (timed:
building it, then the step), then builds the run for real on CPU, takes one warm-up
step and measures the next with torch's profiler (`peftkit.training.realstep`: the allocator's
events over the step, plus every tensor storage alive when it starts). The table
gives both peaks, their ratio and the estimate's breakdown.

    python benchmarks/bench_estimate.py                      # every configuration, ~10 minutes on 2 cores
    python benchmarks/bench_estimate.py --configs "llama lora" "gemma lora"
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import bitsandbytes
import torch
import transformers
from common import llama_model, machine, spawn

from peftkit.training.config import build_config
from peftkit.training.memory import CATEGORIES
from peftkit.training.realstep import RealRun, measure_step
from peftkit.training.simulate import Simulation

# A small Llama shape: hidden 512, 4 layers, vocab 32000 (under the chunked loss's threshold).
LLAMA_512 = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
MODELS = {"llama": {"batch_size": 4, "max_length": 256}, "gemma": {"batch_size": 2, "max_length": 128}}
LORA = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
CKPT = {"gradient_checkpointing": True}
BITS4 = {"quantization": {"bits": 4}}
BF16 = {"dtype": "bfloat16"}

# name -> (model, model section, method section, training section)
CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "llama lora": ("llama", {}, LORA, {}),
    "llama lora ckpt": ("llama", CKPT, LORA, {}),
    "llama dora": ("llama", {}, {**LORA, "name": "dora"}, {}),
    "llama qlora": ("llama", {}, {**LORA, "name": "qlora"}, {}),
    "llama full": ("llama", {}, {"name": "full"}, {}),
    "llama full ckpt adamw_8bit": ("llama", CKPT, {"name": "full"}, {"optimizer": "adamw_8bit"}),
    "llama lora bf16 weights": ("llama", BF16, LORA, {}),
    "gemma lora": ("gemma", {}, LORA, {}),
    "gemma lora ckpt": ("gemma", CKPT, LORA, {}),
    "gemma lora 4-bit base": ("gemma", BITS4, LORA, {}),
    "gemma lora autocast bf16 adamw_8bit": ("gemma", {}, LORA, {"mixed_precision": "bf16", "optimizer": "adamw_8bit"}),
    "gemma full ckpt adamw_8bit": ("gemma", CKPT, {"name": "full"}, {"optimizer": "adamw_8bit"}),
}


def raw_config(name: str, model_name: str) -> dict[str, Any]:
    """The run config of configuration `name` over the model `model_name`, as a YAML mapping."""
    shape, model, method, training = CONFIGS[name]
    return {
        "model": {"name": model_name, **model},
        "method": method,
        "data": {"train": "unused.jsonl", "max_length": MODELS[shape]["max_length"]},
        "training": {"batch_size": MODELS[shape]["batch_size"], **training},
    }


# ---------------------------------------------------------------- child: estimate, then measure


def run_child(raw: dict[str, Any]) -> dict[str, Any]:
    """Estimate the step of `raw`, then run and measure it; both peaks and the estimate's breakdown and time."""
    config = build_config(raw, data_files=False)
    start = time.perf_counter()
    simulation = Simulation(config, "cpu")
    built = time.perf_counter()
    estimate = simulation.step()
    stepped = time.perf_counter()
    del simulation
    measured = measure_step(RealRun(config))
    return {
        "estimate_bytes": estimate.peak_bytes,
        "breakdown": estimate.breakdown,
        "build_s": built - start,
        "step_s": stepped - built,
        "measured_bytes": measured.peak_bytes,
        "resident_bytes": measured.resident_bytes,
        "real_step_s": measured.seconds,
    }


# ---------------------------------------------------------------- parent: run and report


def run(names: list[str]) -> dict[str, dict[str, Any]]:
    """Each configuration in its own child process (the Llama checkpoint written to a temporary directory)."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        llama_dir = Path(workdir) / "llama-512"
        llama_model(0, **LLAMA_512).save_pretrained(llama_dir)
        model_names = {"llama": str(llama_dir), "gemma": "gemma-3-270m"}
        for name in names:
            results[name] = spawn(__file__, raw_config(name, model_names[CONFIGS[name][0]]))
            print(f"{name}: {results[name]}", flush=True)
    return results


COLUMNS = [
    "config",
    "batch x seq",
    "estimate MiB",
    "measured MiB",
    "estimate / measured",
    f"estimate breakdown MiB ({' · '.join(CATEGORIES)})",
    "estimate s (build + step)",
    "real step s (profiled)",
]


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def _row(name: str, result: dict[str, Any]) -> str:
    sizes = MODELS[CONFIGS[name][0]]
    if "error" in result:
        return f"| {name} | {sizes['batch_size']} x {sizes['max_length']} | failed: {result['error']} | | | | | |"
    ratio = result["estimate_bytes"] / result["measured_bytes"]
    breakdown = " · ".join(_mib(result["breakdown"][category]) for category in CATEGORIES)
    return (
        f"| {name} | {sizes['batch_size']} x {sizes['max_length']} | {_mib(result['estimate_bytes'])} | "
        f"{_mib(result['measured_bytes'])} | **{ratio:.3f}** | {breakdown} | "
        f"{result['build_s']:.1f} + {result['step_s']:.1f} | {result['real_step_s']:.1f} |"
    )


def report(results: dict[str, dict[str, Any]]) -> list[str]:
    """The markdown table, and which configurations the estimate gets within 10%."""
    versions = f"transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}"
    lines = [
        f"{datetime.date.today()}, {machine()}, {versions}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    lines += [_row(name, result) for name, result in results.items()]
    ratios = {n: r["estimate_bytes"] / r["measured_bytes"] for n, r in results.items() if "error" not in r}
    off = [f"{n} ({ratio:.3f})" for n, ratio in ratios.items() if abs(ratio - 1) > 0.10]
    lines += ["", f"within 10%: {len(ratios) - len(off)} of {len(results)}"]
    return lines + ([f"off by more than 10%: {', '.join(off)}"] if off else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.manual_seed(0)
        print(json.dumps(run_child(json.loads(args.child))))
        return
    results = run(args.configs)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    print("\n".join(report(results)))


if __name__ == "__main__":
    main()
