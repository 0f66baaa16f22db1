"""Sharded QLoRA with FSDP2 on 2 CPU processes (gloo): a 1B-class Llama shape with a 4-bit base.

For fsdp, fsdp + cpu_offload, ddp (2 processes each, batch 1 per process) and 1 process (batch 2):
peak RssAnon of each process while loading (until the model is adapted and, under fsdp, sharded
and filled) and while training (above its RssAnon before loading), the loop's live tensor bytes
of steps 1-2 (rank 0's; under fsdp its shards and the blocks it has gathered, resized storages
counted), the median step time and the per-step losses; beside each, the per-process peak
`peftkit estimate --num-processes` gives. PEFT's own FSDP QLoRA recipe is
tried on the same shape and its reason for not running on CPU is reported.

    flock /tmp/peftkit-cpu.lock .venv/bin/python benchmarks/bench_fsdp.py [--steps 3] [--seq 64] [--runs fsdp ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from common import AnonPeak, machine
from scale_model import ensure_model

RUNS = {  # name: (processes, training.distributed)
    "1 process": (1, {"strategy": "fsdp"}),
    "fsdp": (2, {"strategy": "fsdp"}),
    "fsdp + cpu_offload": (2, {"strategy": "fsdp", "cpu_offload": True}),
    "ddp": (2, {"strategy": "ddp"}),
}


def _config(root: Path, model: Path, processes: int, distributed: dict[str, Any], steps: int, seq: int) -> Path:
    # Text records longer than `seq` tokens: every sequence is cut to `seq` and every token is labelled,
    # the step `peftkit estimate` simulates (its worst case), so the two figures are of the same step.
    words = [f"w{i}" for i in range(50)]
    records = [{"text": " ".join(words[(i + j) % 50] for j in range(seq))} for i in range(16)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = {
        "model": {"name": str(model), "dtype": "bfloat16", "quantization": {"compute_dtype": "float32"}},
        "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": str(root / "train.jsonl"), "max_length": seq, "packing": False},
        "training": {
            "max_steps": steps,
            "batch_size": 2 // processes,
            "learning_rate": 1e-4,
            "distributed": distributed,
        },
        "output": {"dir": str(root / "run")},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def child(config: str, out: str) -> None:
    """One process of a run: train, sampling RssAnon while the model loads; write rankR.json."""
    from peftkit.training import loop
    from peftkit.training.config import load_config

    with AnonPeak("loading") as peak:
        real = loop._optimizer

        def optimizer(*args: Any, **kwargs: Any) -> Any:  # built once the model is loaded, adapted and sharded
            peak.enter("training")
            return real(*args, **kwargs)

        loop._optimizer = optimizer
        loop.train(load_config(config), quiet=True)
    rank = os.environ.get("RANK", "0")
    phases = {
        "baseline_anon": peak.baseline,
        "loading_anon": peak.peaks["loading"],
        "training_anon": peak.peaks["training"],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(phases), encoding="utf-8")


def _run(name: str, model: Path, steps: int, seq: int) -> dict[str, Any]:
    from peftkit.training.config import load_config
    from peftkit.training.estimate import estimate

    processes, distributed = RUNS[name]
    root = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    config = _config(root, model, processes, distributed, steps, seq)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29551"
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)])}
    done = subprocess.run(
        [*launcher, __file__, "--child", str(config), str(root)], capture_output=True, text=True, env=env
    )
    estimated = estimate(load_config(config, data_files=False), None, "cpu", processes).peak_bytes
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
        return {
            "run": name,
            "error": (errors or done.stderr.splitlines()[-1:])[-1].strip()[:300],
            "estimated": estimated,
        }
    lines = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_ = [line for line in lines if "loss" in line and "step" in line]
    summary = next(line["summary"] for line in lines if "summary" in line)
    elapsed = [line["elapsed_s"] for line in steps_]
    step_times = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]  # the first step's warm-up left out
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(processes)]
    return {
        "run": name,
        "losses": [round(line["loss"], 5) for line in steps_],
        "step_s": statistics.median(step_times) if step_times else None,
        "measured_step_peak": summary["measured_step_peak_bytes"],  # rank 0's live tensors, steps 1-2
        "estimated": estimated,
        # per rank: under fsdp only rank 0 reads the checkpoint, the others receive their shards
        "loading_anon_peak": [r["loading_anon"] for r in ranks],
        "loading_anon_above_start": [r["loading_anon"] - r["baseline_anon"] for r in ranks],
        # the steps' RssAnon peak above the process's RssAnon before anything loaded (torch, Python, gloo)
        "training_anon_above_start": [r["training_anon"] - r["baseline_anon"] for r in ranks],
    }


def peft_recipe() -> str:
    """Why PEFT's FSDP QLoRA recipe (BitsAndBytesConfig(bnb_4bit_quant_storage) + accelerate's FSDP plugin) does not
    run here: accelerate picks the FSDP distributed type only for accelerators (read from its own source)."""
    import inspect

    import accelerate
    from accelerate import state

    source = inspect.getsource(state.PartialState.__init__) + inspect.getsource(state.AcceleratorState.__init__)
    gated = "DistributedType.MULTI_GPU," in source and "self.distributed_type = DistributedType.FSDP" in source
    return (
        f"accelerate {accelerate.__version__} sets DistributedType.FSDP (ACCELERATE_USE_FSDP or an fsdp_plugin) only "
        "when the processes are MULTI_GPU/XPU/NPU/HPU/...; CPU processes stay MULTI_CPU and are wrapped in DDP, so "
        "the recipe trains a whole copy per process on CPU"
        + ("" if gated else " (check: this accelerate's source no longer shows that gate; run the recipe)")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (default all)")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "OUT"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    model, record = ensure_model(args.shape)
    print(f"# {machine()} | shape {record['shape']} | {args.steps} steps x batch 2 x {args.seq} tokens", flush=True)
    for name in args.runs:
        print(json.dumps(_run(name, model, args.steps, args.seq)), flush=True)
    print(json.dumps({"run": "PEFT FSDP QLoRA recipe", "error": peft_recipe()}), flush=True)


if __name__ == "__main__":
    main()
