"""`peftkit analyze` on a Llama-3-8B-shaped adapter (r=16 on every linear layer of 32 blocks).

Random adapters are written in PEFT's format (no 8B model exists here), then timed:
`peftkit.analyze` alone and with `--against`, against the dense route a script without the
factored SVD takes (`torch.linalg.svdvals(B @ A)` per layer; PEFT has no analysis
function, and its SVD-based tools form the dense ΔW too) on one block, times 32. With a
base (random weights of the 8B shapes, made one layer at a time as analyze asks for them),
the whole adapter with the amplification factor alone, and one block with intruder
dimensions (two full SVDs per layer), times 32.

    .venv/bin/python benchmarks/bench_analyze.py            # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import machine
from torch import nn

import peftkit
from peftkit.analysis import read_low_rank_adapter
from peftkit.peft_format import PEFT_PREFIX
from peftkit.saving import write_adapter_files

# Llama-3-8B: hidden 4096, intermediate 14336, 32 heads of 128, 8 KV heads, 32 blocks.
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (14336, 4096),
    "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}
BLOCKS = 32


class RandomBase(nn.Module):
    """Stands in for an 8B base: each linear layer is made (random, float32) when it is asked for."""

    def get_submodule(self, target: str) -> nn.Module:
        out, inp = SHAPES[target.split(".", 3)[3]]
        layer = nn.Linear(inp, out, bias=False, device="meta")
        generator = torch.Generator().manual_seed(hash(target) % 2**31)
        layer.weight = nn.Parameter(torch.randn(out, inp, generator=generator) / inp**0.5, requires_grad=False)
        return layer


def write_adapter(directory: Path, rank: int, seed: int, blocks: int = BLOCKS) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(blocks):
        for module, (out, inp) in SHAPES.items():
            key = f"{PEFT_PREFIX}model.layers.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=generator) / inp**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.01
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted({m.rpartition(".")[2] for m in SHAPES}),
        "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
        "task_type": "CAUSAL_LM",
    }
    return write_adapter_files(directory, config, tensors)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-base", action="store_true", help="skip the runs with a (random) base")
    args = parser.parse_args()
    print(f"# {machine()}", file=sys.stderr)
    layers = BLOCKS * len(SHAPES)
    with tempfile.TemporaryDirectory() as tmp:
        first = write_adapter(Path(tmp) / "a", args.rank, 0)
        second = write_adapter(Path(tmp) / "b", args.rank, 1)
        alone = timed(lambda: peftkit.analyze(first))
        against = timed(lambda: peftkit.analyze(first, against=second))
        source = read_low_rank_adapter(first)

        def dense_block() -> None:
            for module in SHAPES:
                svd = source.layers[f"model.layers.0.{module}"].svd
                torch.linalg.svdvals((svd.u * svd.s).float() @ svd.v.T.float())

        dense = timed(dense_block) * BLOCKS
        print(f"{layers} layers (r={args.rank}, Llama-3-8B shapes)")
        print(f"analyze, no base (factored SVD):            {alone:7.2f} s")
        print(f"analyze --against (plus the φ grids):       {against:7.2f} s")
        print(f"dense svdvals(B @ A), 1 block x {BLOCKS}:          {dense:7.1f} s")
        print(f"factored / dense:                           {alone / dense:7.1e}")
        if args.no_base:
            return
        base = RandomBase()
        making = timed(lambda: [base.get_submodule(f"model.layers.0.{m}") for m in SHAPES]) * BLOCKS
        amplification = timed(lambda: peftkit.analyze(first, base=base, intruder_k=0))
        one_block = write_adapter(Path(tmp) / "block", args.rank, 0, blocks=1)
        intruders = timed(lambda: peftkit.analyze(one_block, base=base)) * BLOCKS
        print(f"analyze --base --intruder-k 0 (amplification):   {amplification:7.1f} s")
        print(f"  of which making the random base weights:        {making:7.1f} s")
        print(f"analyze --base (with intruders), 1 block x {BLOCKS}: {intruders / 60:7.1f} min")


if __name__ == "__main__":
    main()
