"""Run by torchrun in test_fsdp: train one config, then write this rank's measurements.

torchrun --nproc_per_node N tests/training/mp_fsdp.py RUN.yaml OUT_DIR [--die-at STEP] [--resume CHECKPOINT] [--set ...]

OUT_DIR/rankR.json: the live bytes of this process's frozen base tensors (its shards under
fsdp); the peak live bytes of the real (not meta) tensors it made while loading, from reading
or building the base to holding its shards; what it holds then (shards, buffers, 4-bit
quantization states), the whole model's parameter bytes and its largest tensor's.
`--die-at STEP` kills rank 1 (SIGKILL) as it starts optimizer step STEP, the way an
out-of-memory kill ends a process.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from torch.distributed.tensor import DTensor

from peftkit.training import assembly, loop
from peftkit.training.config import load_config
from peftkit.training.memory import LiveBytes


def _frozen_bytes(model) -> int:
    local = (p.to_local() if isinstance(p, DTensor) else p for p in model.parameters() if not p.requires_grad)
    return sum(t.numel() * t.element_size() for t in local)


class _Allocated(LiveBytes):
    """Live bytes of real storages: a meta tensor holds none."""

    def add(self, tensor):  # noqa: ANN001, ANN201
        return 0 if tensor.is_meta else super().add(tensor)


def _measure_loading() -> _Allocated:
    """Count live bytes from the base model's loading (or building) until the model is sharded and filled."""
    counter = _Allocated()
    base_model, shard_from_main = assembly.base_model, assembly.shard_from_main

    def loading(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        counter.__enter__()
        return base_model(*args, **kwargs)

    def sharding(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        try:
            return shard_from_main(*args, **kwargs)
        finally:
            counter.__exit__(None, None, None)

    assembly.base_model, assembly.shard_from_main = loading, sharding
    return counter


def _held_bytes(model) -> tuple[int, int, int]:
    """(bytes this process holds: its shards, buffers and 4-bit quantization states; the whole model's
    parameters; its largest tensor, whole)."""
    tensors = [*model.parameters(), *model.buffers()]
    states = [m.quant_state for m in model.modules() if getattr(m, "quant_state", None) is not None]
    if states:
        from peftkit.quant import quant_state_tensors

        tensors += [t for state in states for t in quant_state_tensors(state)]
    storages = {}
    for tensor in tensors:
        storage = (tensor._local_tensor if isinstance(tensor, DTensor) else tensor).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    whole = [p.numel() * p.element_size() for p in model.parameters()]
    return sum(storages.values()), sum(whole), max(t.numel() * t.element_size() for t in tensors)


def _die_at(step: int) -> None:
    real = loop._Run.train_step

    def train_step(self, wrapper, optimizer, scheduler, train_set, index):  # noqa: ANN001, ANN202
        if self.acc.process_index == 1 and index + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, wrapper, optimizer, scheduler, train_set, index)

    loop._Run.train_step = train_step


if __name__ == "__main__":
    config_path, out, *rest = sys.argv[1:]
    resume = rest[rest.index("--resume") + 1] if "--resume" in rest else None
    if "--die-at" in rest:
        _die_at(int(rest[rest.index("--die-at") + 1]))
    overrides = rest[rest.index("--set") + 1 :] if "--set" in rest else []
    loading = _measure_loading()
    result = loop.train(load_config(config_path, overrides), resume=resume, quiet=True)
    rank = os.environ.get("RANK", "0")
    held, whole, largest = _held_bytes(result.model)
    measured = {
        "frozen_bytes": _frozen_bytes(result.model),
        "loading_peak": loading.peak_bytes(),
        "held_bytes": held,
        "whole_bytes": whole,
        "largest_bytes": largest,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(measured, handle)
