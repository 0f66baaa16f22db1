"""The memory meter: live tensor bytes, counted as ops make and free storages, and put in categories.

`LiveBytes` works on real tensors (the loop measures its first steps on CPU) and on
fake ones (`peftkit.training.simulate` runs a whole step on tensors that hold no
data); the loop, the simulation and the estimate's report all read their figures here,
in the categories below:

- `base_weights`: what exists before the step and is not trained (frozen and 4-bit
  weights with their quantization state, buffers);
- `trainable_parameters`, `gradients` (storages that became a `.grad`),
  `optimizer_state` (the optimizer's state tensors);
- `activations`: made by the forward and still alive when it ends, i.e. kept for the
  backward (with checkpointing: the layers' inputs);
- `temporaries`: everything else (logits, dequantized weights, checkpointed layers'
  recomputed activations, the backward's and optimizer's scratch tensors).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from peftkit.units import format_bytes

__all__ = [
    "CATEGORIES",
    "LiveBytes",
    "StepMemory",
    "counting",
    "headline",
    "highest",
    "peak_breakdown",
    "resident",
]

CATEGORIES = (
    "base_weights",
    "trainable_parameters",
    "gradients",
    "optimizer_state",
    "activations",
    "temporaries",
)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """The peak bytes of one simulated step, and what was alive at that moment (sums to `peak_bytes`)."""

    peak_bytes: int
    breakdown: dict[str, int]
    batch_size: int
    max_length: int


class LiveBytes(TorchDispatchMode):
    """A log of tensor storages coming to life and being freed, for every op under the mode.

    Real tensors or fake ones; bitsandbytes' fused 4-bit matmul is charged the weight
    it dequantizes inside (its ops run below the mode, unseen).

    Storages are told apart by their C++ object (`_cdata`, also on fake tensors) and
    given a serial number, since a freed storage's address is reused. A storage resized
    in place (FSDP frees a gathered block by resizing its storage to zero, and gathers
    into it again) is logged as freed and made anew: `UntypedStorage.resize_` is no op
    the mode sees, so it is wrapped while the mode is on. A sharded tensor (DTensor)
    counts its local shard.
    """

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, int]] = []  # (serial, +bytes) when made, (serial, -bytes) when freed
        self._serial: dict[int, int] = {}  # live storage -> its serial
        self._bytes: dict[int, int] = {}  # serial -> its storage's bytes now
        self._next = 0
        self._resize: Any = None

    def serial(self, tensor: torch.Tensor) -> int | None:
        """The serial of `tensor`'s storage, if it is counted."""
        return self._serial.get(_local(tensor).untyped_storage()._cdata)

    def add(self, tensor: torch.Tensor) -> int:
        """Count `tensor`'s storage (once); its serial."""
        return self._add_storage(_local(tensor).untyped_storage())

    def _add_storage(self, storage: torch.UntypedStorage) -> int:
        key = storage._cdata
        if key not in self._serial:
            self._next += 1
            self._serial[key] = serial = self._next
            self._bytes[serial] = storage.nbytes()
            self.log.append((serial, storage.nbytes()))
            weakref.finalize(storage, self._free, key, serial)
        return self._serial[key]

    def _free(self, key: int, serial: int) -> None:
        if self._serial.get(key) == serial:
            del self._serial[key]
        nbytes = self._bytes.pop(serial, 0)
        if nbytes:
            self.log.append((serial, -nbytes))

    def _resized(self, storage: torch.UntypedStorage) -> None:
        """Log a storage's new size: its old bytes freed, its new ones made (counting it from now if it was not)."""
        serial = self._serial.get(storage._cdata)
        if serial is None:
            if storage.nbytes():
                self._add_storage(storage)
            return
        old, new = self._bytes[serial], storage.nbytes()
        if old:
            self.log.append((serial, -old))
        if new:
            self.log.append((serial, new))
        self._bytes[serial] = new

    def __enter__(self) -> LiveBytes:
        original = self._resize = torch.UntypedStorage.resize_

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            out = original(storage, size)
            self._resized(storage)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.UntypedStorage.resize_ = self._resize
        super().__exit__(*exc)

    def alive(self) -> set[int]:
        """The serials of the storages alive now."""
        return set(self._serial.values())

    def transient(self, nbytes: int) -> None:
        """Count `nbytes` made and freed inside one op."""
        self._next += 1
        self.log += [(self._next, nbytes), (self._next, -nbytes)]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        gemm_4bit = getattr(getattr(torch.ops, "bitsandbytes", None), "gemm_4bit", None)
        if gemm_4bit is not None and func is gemm_4bit.default:  # dequantizes the weight, then multiplies
            self.transient(math.prod(args[2]) * args[0].element_size())
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.add(tensor)
        return out

    def peak_bytes(self) -> int:
        """The largest total the log reached."""
        return highest(self.log)[0]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's local shard (what this process holds), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@contextmanager
def counting(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[LiveBytes]:
    """LiveBytes over real tensors under the block, counting the model's and optimizer's tensors from its start."""
    with LiveBytes() as counter:
        for _, tensor in resident(model, optimizer):
            counter.add(tensor)
        yield counter


def resident(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """(category, tensor) for every tensor alive before the step."""
    for param in model.parameters():
        yield ("trainable_parameters" if param.requires_grad else "base_weights"), param
        if getattr(param, "quant_state", None) is not None:
            from peftkit.quant import quant_state_tensors  # the weight is 4-bit: bitsandbytes is loaded

            for tensor in quant_state_tensors(param.quant_state):
                yield "base_weights", tensor
    for buffer in model.buffers():
        yield "base_weights", buffer
    for state in optimizer.state.values():
        for tensor in tree_leaves(state):
            if isinstance(tensor, torch.Tensor):
                yield "optimizer_state", tensor


def highest(log: list[tuple[int, int]]) -> tuple[int, int]:
    """(the largest running total of `log`, the index of the entry that first reached it)."""
    total = peak = at = 0
    for index, (_, nbytes) in enumerate(log):
        total += nbytes
        if total > peak:
            peak, at = total, index
    return peak, at


def peak_breakdown(
    log: list[tuple[int, int]], categories: dict[int, str], batch_size: int, max_length: int
) -> StepMemory:
    """The largest total of `log`, and the bytes alive at that moment by `categories` (the rest: temporaries)."""
    peak, at = highest(log)
    alive: dict[int, int] = {}
    for serial, nbytes in log[: at + 1]:
        if nbytes > 0:
            alive[serial] = nbytes
        else:
            alive.pop(serial, None)
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for serial, nbytes in alive.items():
        breakdown[categories.get(serial, "temporaries")] += nbytes
    return StepMemory(peak, breakdown, batch_size, max_length)


def headline(step: StepMemory) -> str:
    """One line: the peak and its parts."""
    parts = ", ".join(f"{name.replace('_', ' ')} {format_bytes(nbytes)}" for name, nbytes in step.breakdown.items())
    return (
        f"estimated peak memory of a training step: {format_bytes(step.peak_bytes)} "
        f"(batch {step.batch_size} x {step.max_length} tokens: {parts})"
    )
