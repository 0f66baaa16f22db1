"""LoRA inits on Gemma-3-270M: init time and peak memory against HF PEFT, and the 4-bit error table.

All linear layers but the head, r=16, alpha=32, float32 on CPU. For each init the
same loaded model is copied and adapted by peftkit and by PEFT (same init name), one
after the other in this process; time is wall-clock of the adapt call, peak memory
the RssAnon high-water mark during it above the level before (the copy included in
that level). PEFT's LoftQ quantizes on CUDA only (`loftq_utils`), so on a CPU it is
left out.

The error table: for every adapted layer, ||W - (Q + s B A)||_F of a qlora adapter
started with pissa / olora / loftq, against plain QLoRA's ||W - Q||_F (NF4 with double
quantization, blocksize 64), W the full-precision weight.

    python benchmarks/bench_inits.py                 # everything, markdown to stdout
    python benchmarks/bench_inits.py --inits pissa --json out.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from typing import Any

import peft
import torch
from common import AnonPeak, machine
from torch import nn

import peftkit
from peftkit.injection import hosts
from peftkit.training.models import load_model
from peftkit.weights import read_weight

INITS = {  # name -> (peftkit options, PEFT init_lora_weights or None)
    "kaiming": ({"init": "kaiming"}, True),
    "gaussian": ({"init": "gaussian"}, "gaussian"),
    "pissa": ({"init": "pissa"}, "pissa"),
    "pissa_niter_4": ({"init": "pissa", "pissa_niter": 4}, "pissa_niter_4"),
    "olora": ({"init": "olora"}, "olora"),
    "loftq": ({"init": "loftq", "loftq_iter": 1}, None),
}
R, ALPHA = 16, 32


def _measure(fn: Any) -> tuple[float, int]:
    gc.collect()
    with AnonPeak() as peak:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, peak.peak - peak.baseline


def init_costs(base: nn.Module, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        options, peft_init = INITS[name]
        method = "qlora" if name == "loftq" else "lora"
        model = copy.deepcopy(base)
        ours = _measure(lambda: peftkit.adapt(model, method, target_modules="all-linear", r=R, alpha=ALPHA, **options))
        del model
        theirs = (None, None)
        if peft_init is not None:
            model = copy.deepcopy(base)
            config = peft.LoraConfig(target_modules="all-linear", r=R, lora_alpha=ALPHA, init_lora_weights=peft_init)
            theirs = _measure(lambda: peft.get_peft_model(model, config))
            del model
        rows.append({"init": name, "peftkit_s": ours[0], "peftkit_peak": ours[1], "peft_s": theirs[0], "peft_peak": theirs[1]})
    return rows


def layer_errors(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    errors = {}
    for path, host in hosts(model):
        adapter = host.adapters["default"]
        quantized = read_weight(host.base_layer).float()
        delta = adapter.delta_weight().float()  # s B0 A0 at the start; zero for plain QLoRA
        errors[path] = (weights[path] - (quantized + delta)).norm().item()
    return errors


def error_table(base: nn.Module) -> dict[str, dict[str, float]]:
    weights = {p: m.weight.detach().float().clone() for p, m in base.named_modules() if isinstance(m, nn.Linear)}
    table = {}
    for init in ("kaiming", "pissa", "olora", "loftq"):
        model = peftkit.adapt(copy.deepcopy(base), "qlora", target_modules="all-linear", r=R, alpha=ALPHA, init=init)
        table["qlora" if init == "kaiming" else init] = layer_errors(model, weights)
        del model
        gc.collect()
    return table


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def report(costs: list[dict[str, Any]], table: dict[str, dict[str, float]] | None) -> str:
    lines = [f"machine: {machine()}", "", "| init | peftkit time | PEFT time | peftkit peak | PEFT peak |", "| --- | --- | --- | --- | --- |"]
    for row in costs:
        peft_s = "n/a (CUDA only)" if row["peft_s"] is None else f"{row['peft_s']:.2f} s"
        lines.append(
            f"| {row['init']} | {row['peftkit_s']:.2f} s | {peft_s} | {_mb(row['peftkit_peak'])} | {_mb(row['peft_peak'])} |"
        )
    if table:
        plain = table["qlora"]
        lines += ["", "| init | median ratio to plain QLoRA's error | min | max | layers better |", "| --- | --- | --- | --- | --- |"]
        for init in ("pissa", "olora", "loftq"):
            ratios = [table[init][p] / plain[p] for p in plain]
            better = sum(r < 1 for r in ratios)
            lines.append(
                f"| {init} | {statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} | {better}/{len(ratios)} |"
            )
        lines += ["", "| layer | QLoRA ||W-Q|| | pissa | olora | loftq |", "| --- | --- | --- | --- | --- |"]
        for path in plain:
            lines.append(f"| {path} | {plain[path]:.4f} | " + " | ".join(f"{table[i][path]:.4f}" for i in ("pissa", "olora", "loftq")) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_model("gemma-3-270m", "float32")
    costs = init_costs(base, args.inits)
    table = None if args.no_table else error_table(base)
    print(report(costs, table))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine(), "costs": costs, "errors": table}, handle, indent=1)


if __name__ == "__main__":
    main()
