"""Shared pieces of the benchmark scripts: the benchmark model shapes, a fair timer, memory
sampling and running one configuration in its own process."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = [
    "LLAMA_BENCH",
    "llama_model",
    "run_seconds",
    "median_seconds",
    "interleaved_medians",
    "machine",
    "rss_anon_bytes",
    "AnonPeak",
    "spawn",
]

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


def rss_anon_bytes(pid: int | str = "self") -> int:
    """A process's resident anonymous memory now (RssAnon, Linux).

    Not RSS or VmHWM: those count the pages of memory-mapped checkpoint files, which the
    kernel can drop and re-read at will, so they are not memory a load needs.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no RssAnon line")


class AnonPeak:
    """Peak RssAnon of this process per phase, sampled by a thread every `interval` seconds.

    `with AnonPeak() as peak:` samples until the block ends; `peak.enter("steps")` starts a
    new phase, so `peak.peaks` holds the peak of each phase and `peak.baseline` the value
    at the start. The GIL is released by the long torch and bitsandbytes kernels, so the
    thread samples during them too.
    """

    def __init__(self, phase: str = "all", interval: float = 0.02) -> None:
        self.interval = interval
        self.phase = phase
        self.baseline = rss_anon_bytes()
        self.peaks: dict[str, int] = {phase: self.baseline}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.peaks[phase] = rss_anon_bytes()

    def sample(self) -> None:
        self.peaks[self.phase] = max(self.peaks[self.phase], rss_anon_bytes())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def spawn(script: str, spec: dict[str, Any], stream_stderr: bool = False) -> dict[str, Any]:
    """Run `script --child SPEC` in a fresh interpreter; the JSON of its last stdout line, or {"error": ...}.

    With `stream_stderr`, the child's stderr (its progress) goes to ours as it runs.
    """
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    # glibc then hands freed blocks back at once, so peak RSS follows the live tensors; with its
    # default adaptive thresholds it varied by ~5% between identical runs.
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    command = [sys.executable, script, "--child", json.dumps(spec)]
    stderr = None if stream_stderr else subprocess.PIPE
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or "").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"error": tail[0]}
    return json.loads(lines[-1])
