"""One training step of a run config run for real on CPU, its peak of live tensor bytes measured by torch's profiler:
what the estimate (`peftkit.training.simulate`) is checked against, by the tests and `benchmarks/bench_estimate.py`.

The step is built from peftkit's own pieces (`load_model`, `adapt`, checkpointing,
`build_optimizer`, `CausalLMLoss`) and is the step `peftkit.training.simulate.Simulation`
simulates: a first, small step (1 x 8 tokens) makes the optimizer state, then the
measured one runs the loss over `batch x max_length` zeros (every position labelled,
an all-ones attention mask), backward, gradient clipping, `optimizer.step()` and
`zero_grad(set_to_none=True)`.

How the peak is measured, independently of the meter the estimate uses (`memory.LiveBytes`; torch 2.13):

- `torch.profiler.profile(activities=[CPU], profile_memory=True)` records one event per
  block the CPU allocator hands out or takes back during the step. `prof.events()` and
  `key_averages()` do not serve: an op's allocations are folded into its
  `cpu_memory_usage`, a net sum that loses a temporary made and freed inside the op,
  and only allocations outside any op stay events of their own. The raw events are in
  `prof.profiler.kineto_results.experimental_event_tree()` (what `prof._memory_profile()`
  reads; that one also needs `record_shapes` and `with_stack`, a Python trace of the
  whole step, to sort bytes by tensor, which is not needed here): every node of type
  `Allocation` has `extra_fields.ptr`, `alloc_size` (negative when freed) and
  `start_time_ns`. Sorted by time over all threads they give the running total of the
  blocks allocated during the step.
- The allocator reports no free of a block allocated before the profiler started, so
  what is alive when the step starts is counted apart: every CPU tensor storage a
  Python object holds then (`gc.get_objects()`, each storage once by its `data_ptr`),
  less those that existed before the run was built. That is the weights, 4-bit codes
  and quantization state, buffers and optimizer state, found without asking the model
  what it holds. A free of one of those during the step is subtracted.

The measured peak is the resident bytes plus the running total's maximum. It counts
what the CPU allocator gives to tensors (and to kernels' scratch buffers made with it);
not Python objects, the allocator's slack, or oneDNN's own caches.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.profiler import ProfilerActivity, profile

from peftkit.activations import enable_gradient_checkpointing
from peftkit.adapters import adapt
from peftkit.training.config import RunConfig
from peftkit.training.loss import CausalLMLoss, loss_chunk_size
from peftkit.training.models import load_model
from peftkit.training.optim import build_optimizer

__all__ = ["MeasuredStep", "RealRun", "live_storages", "allocation_peak", "measure", "measure_step"]


@dataclasses.dataclass(frozen=True)
class MeasuredStep:
    """The profiler-measured peak of one real step: resident bytes plus the peak of what the step allocated."""

    peak_bytes: int
    resident_bytes: int
    seconds: float


def live_storages() -> dict[int, torch.UntypedStorage]:
    """Every CPU tensor storage a Python object holds now, by data pointer."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on a deprecated alias (torch.distributed.reduce_op) warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    found: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        if not isinstance(tensor, FakeTensor) and tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr():
            found.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage())
    return found


class RealRun:
    """A run config's model, adapter and optimizer on CPU, as `peftkit train` builds them, after one warm-up step."""

    def __init__(self, config: RunConfig) -> None:
        self.before = live_storages()  # held, so no storage of the run can take one of their addresses
        self.config = config
        tc = config.training
        model = load_model(config.model.name, config.model.dtype, config.base_quantization(), "cpu")
        adapt(model, config.method)
        if config.model.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, tc.optimizer, tc.learning_rate, tc.weight_decay)
        self.loss = CausalLMLoss(model, loss_chunk_size(tc.loss_chunk_size, getattr(model.config, "vocab_size", 0)))
        self.mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision)
        self.step(1, 8)  # makes the optimizer state

    def step(self, batch_size: int, max_length: int) -> None:
        """One optimizer step, as `peftkit train` takes it, over `batch_size` x `max_length` labelled zeros."""
        tc = self.config.training
        ids = torch.zeros(batch_size, max_length, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        accum = tc.gradient_accumulation_steps
        for _ in range(accum):
            with torch.autocast("cpu", self.mixed) if self.mixed else nullcontext():
                loss = self.loss(**batch) / accum
            loss.backward()
            del loss
        if tc.max_grad_norm:
            nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def resident(self) -> dict[int, int]:
        """Bytes of each storage alive now that was not before the run was built, by data pointer."""
        return {ptr: s.nbytes() for ptr, s in live_storages().items() if ptr not in self.before}


def _allocations(prof: profile) -> list[tuple[int, int, int]]:
    """(time, data pointer, bytes; negative when freed) of every CPU allocator event the profiler recorded."""
    events: list[tuple[int, int, int]] = []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if str(node.tag) == "_EventType.Allocation" and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
    return sorted(events)


def allocation_peak(events: list[tuple[int, int, int]], resident: dict[int, int]) -> int:
    """The largest total of `resident` plus the blocks allocated in `events`, as they come and go.

    A free of a block neither allocated in `events` nor resident (garbage from before) is ignored.
    """
    resident, inside = dict(resident), {}
    live = peak = sum(resident.values())
    for _, ptr, nbytes in events:
        if nbytes > 0:
            inside[ptr] = nbytes
            live += nbytes
        elif ptr in inside:
            live -= inside.pop(ptr)
        elif ptr in resident:
            live -= resident.pop(ptr)
        peak = max(peak, live)
    return peak


def measure(fn: Callable[[], Any], resident: dict[int, int]) -> MeasuredStep:
    """Run `fn` under the profiler; its peak over `resident` bytes."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return MeasuredStep(allocation_peak(_allocations(prof), resident), sum(resident.values()), seconds)


def measure_step(run: RealRun) -> MeasuredStep:
    """The measured peak of one steady-state step of `run`, at its config's batch size and length."""
    batch_size, max_length = run.config.training.batch_size, run.config.data.max_length
    return measure(lambda: run.step(batch_size, max_length), run.resident())
