"""Shared pieces of the benchmark scripts: the benchmark model shapes and a fair timer."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["LLAMA_BENCH", "llama_model", "run_seconds", "median_seconds", "interleaved_medians", "machine"]

# The Llama-shaped benchmark model of the issues: hidden 1024, 8 layers, vocab 32000.
LLAMA_BENCH = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
)


def llama_model(seed: int = 0, **overrides: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA_BENCH, **overrides})).eval()


def run_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall time of each of `repeats` runs of `fn`, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` runs, after `warmup` untimed runs."""
    return statistics.median(run_seconds(fn, repeats, warmup))


def interleaved_medians(fns: list[Callable[[], object]], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time of each of `fns`, timed in turn (one run of each per round), so that a
    slow spell of a noisy machine falls on all of them rather than on whichever ran then."""
    for fn in fns:
        run_seconds(fn, 0, warmup)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times, strict=True):
            spent.extend(run_seconds(fn, 1, warmup=0))
    return [statistics.median(spent) for spent in times]


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return f"{platform.machine()} {device}, torch {torch.__version__}"
