"""One training step of a run config, simulated on tensors that hold no data, with its live bytes counted.

```
 config.json ──► skeleton on the meta device, in model.dtype ──► 4-bit layers (Linear4bit, codes and
   scales at their exact packed sizes) ──► adapt(method), checkpointing ──► every tensor made fake
   ──► optimizer (its state made by a first step) ──► the measured step: CausalLMLoss over
   batch x max_length tokens, every position labelled ──► backward ──► clip ──► optimizer.step
```

Everything runs through peftkit's own code (the adapters, the chunked loss, the
optimizers, bitsandbytes' 4-bit autograd functions) under torch's `FakeTensorMode`:
each op computes its output's shape and dtype and allocates nothing. The memory meter
(`peftkit.training.memory.LiveBytes`), a dispatch mode above it, logs every storage an
op creates and when Python frees it; the peak of that log is the estimate, each byte
alive at the peak put in one of the meter's categories.

Three things the fake tensors cannot do are supplied: a data-dependent scalar
(`.item()`, a Python `if` on a tensor) reads as 1; a boolean mask selects every
position (the worst case: every token labelled); and bitsandbytes' fused 4-bit
matmul, one op that dequantizes its weight internally, is charged that dequantized
weight for the op's duration, as its reference implementation allocates it. On CPU,
bitsandbytes' optimizer updates (one op per parameter whose fake implementation
allocates nothing) run as their CPU kernel, torch code, under the counter: 8-bit
AdamW there holds five float32 copies of the parameter at once; on CUDA each update is
one fused kernel that allocates nothing.
Allocations inside a kernel that never reach Python (cuBLAS workspaces) are not
seen; nor is the CUDA context.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves

from peftkit.activations import enable_gradient_checkpointing
from peftkit.adapters import adapt
from peftkit.dtypes import dtype_named
from peftkit.quant.config import COMPUTE_DTYPES, default_compute_dtype
from peftkit.training.config import RunConfig
from peftkit.training.loss import CausalLMLoss, loss_chunk_size
from peftkit.training.memory import LiveBytes, StepMemory, peak_breakdown, resident
from peftkit.training.models import layer_count, model_config, model_on_meta
from peftkit.training.optim import build_optimizer

__all__ = ["Simulation"]

_aten = torch.ops.aten


class _FakeStep(LiveBytes):
    """LiveBytes over fake tensors, supplying what they lack: values and data-dependent shapes.

    `cpu_kernels`: run bitsandbytes' CPU optimizer updates (torch code) under the counter,
    as a CPU run does, instead of their fake implementation, which allocates nothing.
    """

    def __init__(self, cpu_kernels: bool = False) -> None:
        super().__init__()
        self.kernels = _cpu_optimizer_kernels() if cpu_kernels else {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in self.kernels:  # its temporaries are counted as it runs
            with self:
                return self.kernels[func](*args, **(kwargs or {}))
        if func is _aten._local_scalar_dense.default:  # `.item()`, or `if tensor:`
            return 1
        if func is _aten.index.Tensor and any(_is_mask(i) for i in args[1]):
            args = (args[0], _every_position(args[1]))
        elif func is _aten.nonzero.default:
            return torch.stack(_all_true(args[0].shape), dim=1)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


def _all_true(shape: torch.Size) -> list[torch.Tensor]:
    """For each dimension, the coordinates of every element of a `shape` tensor, in row-major order."""
    grids = torch.meshgrid(*[torch.arange(size) for size in shape], indexing="ij")
    return [grid.reshape(-1) for grid in grids]


def _every_position(indices: list[Any]) -> list[Any]:
    """Boolean masks as the long indices of an all-true mask: every position selected."""
    out: list[Any] = []
    for index in indices:
        out += _all_true(index.shape) if _is_mask(index) else [index]
    return out


# ---------------------------------------------------------------- the model, on fake tensors


def _fake_parameters(model: nn.Module, device: torch.device) -> None:
    """Replace every parameter and buffer by a fake tensor of its shape and dtype, keeping ties.

    A 4-bit weight becomes a plain Parameter carrying Params4bit's attributes, its
    quantization state's tensors fake too (Params4bit itself cannot wrap a fake tensor).
    """
    made: dict[int, torch.Tensor] = {}

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=device)

    for module in model.modules():
        for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in list(table.items()):
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    if getattr(tensor, "quant_state", None) is not None:
                        from peftkit.quant.meta import fake_packed  # the weight is 4-bit: bitsandbytes is loaded

                        made[id(tensor)] = fake_packed(tensor, fake)
                    else:
                        made[id(tensor)] = (
                            nn.Parameter(fake(tensor), tensor.requires_grad) if is_parameter else fake(tensor)
                        )
                table[name] = made[id(tensor)]


def _cpu_optimizer_kernels() -> dict[Any, Callable[..., Any]]:
    """bitsandbytes' CPU optimizer-update kernels, when bitsandbytes is loaded (an 8-bit optimizer loads it)."""
    if "bitsandbytes" not in sys.modules:
        return {}
    from peftkit.quant.meta import cpu_optimizer_kernels

    return cpu_optimizer_kernels()


@contextmanager
def _apart() -> Iterator[None]:
    """The simulated run leaves no trace on the real one: the random state is restored (its adapters'
    initialisation draws from it), and it says nothing (bitsandbytes' paging on CPU, transformers' use_cache)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


class Simulation:
    """A run config's model, adapter and optimizer on fake tensors; `step` measures one training step.

    Built once (a few seconds even for a 70B shape: no weight exists) and stepped at any
    batch size and sequence length.
    """

    def __init__(self, config: RunConfig, device_type: str = "cuda", num_layers: int | None = None) -> None:
        """`device_type`: the device the run will train on (it picks the 4-bit compute dtype's default);
        `num_layers`: build the model with only its first `num_layers` layers (see `with_layers`)."""
        with _apart():
            self._build(config, device_type, num_layers)

    def _build(self, config: RunConfig, device_type: str, num_layers: int | None) -> None:
        self.config, self.device_type = config, device_type
        self.fake = FakeTensorMode()
        self.mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.training.mixed_precision)
        dtype = dtype_named(config.model.dtype, "model.dtype")
        quantization = config.base_quantization()
        self.num_layers = layer_count(model_config(config.model.name))
        compute = None
        if quantization is not None:
            compute = COMPUTE_DTYPES[quantization.compute_dtype or default_compute_dtype(device_type)]
        # The adapter is attached on the meta device (FakeTensorMode refuses the tensor swaps of
        # `Module.to`), then every tensor becomes a fake one.
        model = model_on_meta(config.model.name, dtype, quantization, compute, num_layers)
        with _FakeStep():  # for the .item() of a check
            adapt(model, config.method)
        if config.model.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        with self.fake:
            _fake_parameters(model, torch.device("cpu"))
            tc = config.training
            params = [p for p in model.parameters() if p.requires_grad]
            with _FakeStep():  # for the .item() calls; a first step makes the state a steady step holds
                self.optimizer = build_optimizer(params, tc.optimizer, tc.learning_rate, tc.weight_decay)
                for param in params:
                    param.grad = torch.empty_like(param)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.model = model
        self.chunk_size = loss_chunk_size(tc.loss_chunk_size, getattr(model.config, "vocab_size", 0))

    def step(self, batch_size: int | None = None, max_length: int | None = None) -> StepMemory:
        """The peak of one optimizer step over `batch_size` sequences of `max_length` tokens (default: the config's)."""
        with _apart():
            return self._step(batch_size or self.config.training.batch_size, max_length or self.config.data.max_length)

    def _step(self, batch_size: int, max_length: int) -> StepMemory:
        tc = self.config.training
        categories: dict[int, str] = {}
        counter = _FakeStep(cpu_kernels=self.device_type == "cpu")
        with self.fake, counter:
            for category, tensor in resident(self.model, self.optimizer):
                categories.setdefault(counter.add(tensor), category)
            hooks = [
                param.register_post_accumulate_grad_hook(
                    lambda p: categories.__setitem__(counter.serial(p.grad), "gradients")
                )
                for param in self.model.parameters()
                if param.requires_grad
            ]
            loss_module = CausalLMLoss(self.model, self.chunk_size)
            ids = torch.zeros(batch_size, max_length, dtype=torch.long)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            micro_batches = min(tc.gradient_accumulation_steps, 2)  # the second sees the first's gradients
            for _ in range(micro_batches):
                forward_start = len(counter.log)
                autocast = torch.autocast("cpu", self.mixed) if self.mixed else nullcontext()
                with autocast:
                    loss = loss_module(**batch) / micro_batches
                alive = counter.alive()
                for serial, nbytes in counter.log[forward_start:]:
                    if nbytes > 0 and serial in alive:  # made by the forward, kept for the backward
                        categories.setdefault(serial, "activations")
                loss.backward()
                del loss
            if tc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], tc.max_grad_norm
                )
            self.optimizer.step()
            for state in self.optimizer.state.values():  # state made in this step (a first step's)
                for tensor in tree_leaves(state):
                    if isinstance(tensor, torch.Tensor):
                        categories.setdefault(counter.add(tensor), "optimizer_state")
            self.optimizer.zero_grad(set_to_none=True)
            for hook in hooks:
                hook.remove()
        return peak_breakdown(counter.log, categories, batch_size, max_length)
