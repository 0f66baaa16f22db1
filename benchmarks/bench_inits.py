"""LoRA inits: init time and peak memory against HF PEFT's same init, and the 4-bit error table.

Two models, LoRA r=16 alpha=32 on all linear layers but the head:

- Gemma-3-270M (the embedded model), float32 on CPU: every init, peftkit's `adapt`
  against PEFT's `get_peft_model` with the same `init_lora_weights`; `qlora` (plain,
  Kaiming) is the reference for `loftq`, which needs a 4-bit base (peftkit quantizes
  the dense model inside `adapt`, so that row counts the quantization too).
- the Llama-3-8B shape (`scale_model.py`), loaded straight into 4 bits under
  `model.quantization` (NF4, double quantization, bfloat16 compute and dense layers):
  pissa with `pissa_niter: 4` and loftq with 1 iteration, reading each layer's bf16
  weight back from the checkpoint one at a time. LoftQ's exact SVD of a 14336 x 4096
  layer takes ~30 s here, so by default only 2 of the 32 decoder blocks are built
  (`--scale-shape 8b-2blocks`, the same per-layer shapes and tensors); times per
  block are extrapolated to 32, labelled so. PEFT cannot run either init on a 4-bit
  layer (its PiSSA refuses a non-float weight; its LoftQ quantizes on CUDA only): its
  child tries both and records why, and times PiSSA on its documented route, the
  model loaded dense in bf16 (the residual to be quantized afterwards, not timed).

Each (model, library, init) runs in its own process (`common.spawn`), so its peak is its
own: time is the wall clock of the adapt call, memory the RssAnon high-water mark
during it above the level before it (the loaded model), and during the load.

The error table (Gemma): for every adapted layer, ||W - (Q + s B A)||_F of a qlora
adapter started with pissa / olora / loftq, against plain QLoRA's ||W - Q||_F (NF4 with
double quantization, blocksize 64), W the full-precision weight.

    python benchmarks/bench_inits.py --json out.json          # everything (about 20 minutes on 2 cores)
    python benchmarks/bench_inits.py --inits pissa --no-scale --no-table
    python benchmarks/bench_inits.py --inits --no-table --scale-shape 8b --scale-inits pissa_niter_4 \
        --scale-peftkit-only
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import statistics
import sys
import time
from typing import Any

import peft
import torch
import transformers
from bench_scale import peft_4bit_model
from common import AnonPeak, machine, rss_anon_bytes, spawn
from scale_model import SHAPES, ensure_model
from torch import nn
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.injection import hosts
from peftkit.quant import QuantizationConfig
from peftkit.training.models import load_model
from peftkit.weights import read_weight

R, ALPHA = 16, 32
GEMMA = "gemma-3-270m"
# row -> (peftkit method, peftkit options, PEFT's init_lora_weights; None: PEFT has no such row)
GEMMA_ROWS: dict[str, tuple[str, dict[str, Any], Any]] = {
    "kaiming": ("lora", {"init": "kaiming"}, True),
    "gaussian": ("lora", {"init": "gaussian"}, "gaussian"),
    "pissa": ("lora", {"init": "pissa"}, "pissa"),
    "pissa_niter_4": ("lora", {"init": "pissa", "pissa_niter": 4}, "pissa_niter_4"),
    "olora": ("lora", {"init": "olora"}, "olora"),
    "qlora": ("qlora", {"init": "kaiming"}, None),
    "loftq": ("qlora", {"init": "loftq", "loftq_iter": 1}, "loftq"),
}
# The 8B shape is loaded in 4 bits already: plain `lora` over it, as `peftkit train` does under model.quantization.
SCALE_ROWS: dict[str, tuple[str, dict[str, Any], Any]] = {
    "kaiming": ("lora", {"init": "kaiming"}, None),
    "pissa_niter_4": ("lora", {"init": "pissa", "pissa_niter": 4}, "pissa_niter_4"),
    "loftq": ("lora", {"init": "loftq", "loftq_iter": 1}, "loftq"),
}
FOUR_BIT = QuantizationConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
MiB, GB = 2**20, 1e9


# ---------------------------------------------------------------- one (model, library, init) in a child


def _peft_config(init: Any) -> peft.LoraConfig:
    extra = {"loftq_config": peft.LoftQConfig(loftq_bits=4, loftq_iter=1)} if init == "loftq" else {}
    return peft.LoraConfig(target_modules="all-linear", r=R, lora_alpha=ALPHA, init_lora_weights=init, **extra)


def _why_not(fn: Any) -> str | None:
    """None if `fn()` runs, else its error's first line."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - any refusal is the finding
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
    return None


def _load(spec: dict[str, Any]) -> nn.Module:
    if spec["model"] == GEMMA:
        return load_model(GEMMA, "float32")
    if spec["side"] == "peftkit":
        return load_model(spec["checkpoint"], "bfloat16", quantization=FOUR_BIT)
    return AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.bfloat16)  # PEFT's route: dense


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, then adapt with one init: times and RssAnon peaks (and, on the 8B shape, PEFT's 4-bit refusal)."""
    torch.manual_seed(0)
    rows = GEMMA_ROWS if spec["model"] == GEMMA else SCALE_ROWS
    method, options, peft_init = rows[spec["row"]]
    result: dict[str, Any] = {}
    with AnonPeak("load") as anon:
        start = time.perf_counter()
        model = _load(spec)
        result["load_s"] = time.perf_counter() - start
        before = rss_anon_bytes()
        anon.enter("init")
        start = time.perf_counter()
        if spec["side"] == "peftkit":
            peftkit.adapt(model, method, target_modules="all-linear", r=R, alpha=ALPHA, **options)
        else:
            result["error"] = _why_not(lambda: peft.get_peft_model(model, _peft_config(peft_init)))
        result["init_s"] = time.perf_counter() - start
    result.update(
        baseline=anon.baseline, load_peak=anon.peaks["load"], before_init=before, init_peak=anon.peaks["init"]
    )
    if spec["side"] == "peft" and spec["model"] != GEMMA:  # what PEFT does on the model loaded as QLoRA loads it
        del model
        gc.collect()
        four_bit = peft_4bit_model(spec["checkpoint"])
        result["error_4bit"] = _why_not(lambda: peft.get_peft_model(four_bit, _peft_config(peft_init)))
    return result


# ---------------------------------------------------------------- parent: spawn, the error table, report


def costs(
    model: str,
    rows: dict[str, tuple[str, dict[str, Any], Any]],
    names: list[str],
    rounds: int,
    checkpoint: str = "",
    peft: bool = True,
) -> list[dict[str, Any]]:
    """Each row's peftkit and PEFT children (where PEFT has the row and `peft`), `rounds` times in alternating
    order; per side the round with the shortest init is kept (this machine is shared), all times listed."""
    out = []
    for name in names:
        sides = ["peftkit"] + (["peft"] if peft and rows[name][2] is not None else [])
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for round_ in range(rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                print(f"# {model} {name} {side} ...", file=sys.stderr, flush=True)
                spec = {"model": model, "side": side, "row": name, "checkpoint": checkpoint}
                runs[side].append(spawn(__file__, spec))
        entry: dict[str, Any] = {"row": name}
        for side, results in runs.items():
            entry[side] = min(results, key=lambda r: r.get("init_s", float("inf")))
            entry[side]["all_init_s"] = [r.get("init_s") for r in results]
        out.append(entry)
    return out


def layer_errors(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    errors = {}
    for path, host in hosts(model):
        adapter = host.adapters["default"]
        quantized = read_weight(host.base_layer).float()
        delta = adapter.delta_weight().float()  # s B0 A0 at the start; zero for plain QLoRA
        errors[path] = (weights[path] - (quantized + delta)).norm().item()
    return errors


def error_table() -> dict[str, dict[str, float]]:
    base = load_model(GEMMA, "float32")
    weights = {p: m.weight.detach().float().clone() for p, m in base.named_modules() if isinstance(m, nn.Linear)}
    table = {}
    for init in ("kaiming", "pissa", "olora", "loftq"):
        model = peftkit.adapt(copy.deepcopy(base), "qlora", target_modules="all-linear", r=R, alpha=ALPHA, init=init)
        table["qlora" if init == "kaiming" else init] = layer_errors(model, weights)
        del model
        gc.collect()
    return table


def _cell(r: dict[str, Any] | None, key: str, unit: float = 1.0, digits: int = 2) -> str:
    """A table cell: `r[key] / unit` (`init_mib`: the init's peak above the loaded model, MiB)."""
    if r is None:
        return "n/a"
    if r.get("error") and "init_s" not in r:  # the child itself failed
        return f"failed: {r['error'][:80]}"
    if r.get("error"):
        return "refused"
    value = (r["init_peak"] - r["before_init"]) / MiB if key == "init_mib" else r[key] / unit
    return f"{value:.{digits}f}"


def gemma_report(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| init | peftkit s | PEFT s | time ratio | peftkit peak MiB | PEFT peak MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ours, theirs = row["peftkit"], row.get("peft")
        ratio = "" if theirs is None or theirs.get("error") else f"**{ours['init_s'] / theirs['init_s']:.2f}**"
        lines.append(
            f"| {row['row']} | {_cell(ours, 'init_s')} | {_cell(theirs, 'init_s')} | {ratio} "
            f"| {_cell(ours, 'init_mib', digits=0)} | {_cell(theirs, 'init_mib', digits=0)} |"
        )
    return lines + [f"- PEFT {row['row']}: {row['peft']['error']}" for row in rows if row.get("peft", {}).get("error")]


def scale_report(rows: list[dict[str, Any]], blocks: int) -> list[str]:
    """The 8B shape's table; built on fewer than 32 blocks, it adds the init time scaled to 32 (labelled so)."""
    scale = 32 / blocks
    extrapolating = blocks < 32
    head = f" init s, x{scale:g} for 32 blocks (extrapolated) |" if extrapolating else ""
    lines = [
        f"| init | peftkit load s | load peak RssAnon GB | init s ({blocks} blocks) |{head} "
        "init peak above before, MiB | PEFT, dense bf16 load: init s | PEFT load peak GB | PEFT init peak MiB |",
        "| --- " * (8 + extrapolating) + "|",
    ]
    for row in rows:
        ours, theirs = row["peftkit"], row.get("peft")
        extrapolated = f" {_cell(ours, 'init_s', unit=1 / scale, digits=0)} |" if extrapolating else ""
        lines.append(
            f"| {row['row']} | {_cell(ours, 'load_s', digits=1)} | {_cell(ours, 'load_peak', GB)} "
            f"| {_cell(ours, 'init_s', digits=1)} |{extrapolated} {_cell(ours, 'init_mib', digits=0)} "
            f"| {_cell(theirs, 'init_s', digits=1)} | {_cell(theirs, 'load_peak', GB)} "
            f"| {_cell(theirs, 'init_mib', digits=0)} |"
        )
    for row in rows:
        if row.get("peft"):
            lines.append(f"- PEFT {row['row']} on the dense bf16 model: {row['peft'].get('error') or 'runs'}")
            lines.append(f"- PEFT {row['row']} on transformers' 4-bit load: {row['peft'].get('error_4bit') or 'runs'}")
    return lines


def error_report(table: dict[str, dict[str, float]]) -> list[str]:
    plain = table["qlora"]
    lines = [
        "| init | median ratio to plain QLoRA's error | min | max | layers better |",
        "| --- | --- | --- | --- | --- |",
    ]
    for init in ("pissa", "olora", "loftq"):
        ratios = [table[init][p] / plain[p] for p in plain]
        better = sum(r < 1 for r in ratios)
        median, low, high = statistics.median(ratios), min(ratios), max(ratios)
        lines.append(f"| {init} | {median:.3f} | {low:.3f} | {high:.3f} | {better}/{len(ratios)} |")
    lines += ["", "| layer | QLoRA ||W-Q|| | pissa | olora | loftq |", "| --- | --- | --- | --- | --- |"]
    for path in plain:
        cells = " | ".join(f"{table[i][path]:.4f}" for i in ("pissa", "olora", "loftq"))
        lines.append(f"| {path} | {plain[path]:.4f} | {cells} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inits", nargs="*", default=list(GEMMA_ROWS), choices=list(GEMMA_ROWS))
    parser.add_argument("--scale-inits", nargs="+", default=list(SCALE_ROWS), choices=list(SCALE_ROWS))
    parser.add_argument("--scale-shape", default="8b-2blocks", choices=[s for s in SHAPES if s.startswith("8b")])
    parser.add_argument("--no-scale", action="store_true", help="skip the 8B shape")
    parser.add_argument("--no-table", action="store_true", help="skip the error table")
    parser.add_argument(
        "--scale-peftkit-only", action="store_true", help="no PEFT child on the 8B shape (it loads 16 GB dense)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each Gemma child (the 8B shape's: 1)")
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    summary: dict[str, Any] = {
        "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        "machine": machine(),
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__},
        "gemma": costs(GEMMA, GEMMA_ROWS, args.inits, args.rounds),
    }
    lines = [f"# {summary['date']}, {summary['machine']}, peft {peft.__version__}", "", *gemma_report(summary["gemma"])]
    if not args.no_scale:
        directory, _ = ensure_model(args.scale_shape)
        blocks = SHAPES[args.scale_shape]["num_hidden_layers"]
        rows = costs(args.scale_shape, SCALE_ROWS, args.scale_inits, 1, str(directory), not args.scale_peftkit_only)
        summary["scale"] = {"shape": args.scale_shape, "rows": rows}
        lines += ["", *scale_report(summary["scale"]["rows"], blocks)]
    if not args.no_table:
        summary["errors"] = error_table()
        lines += ["", *error_report(summary["errors"])]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
