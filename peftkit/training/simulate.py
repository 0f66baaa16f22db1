"""One training step of a run config, simulated on tensors that hold no data, with its live bytes counted.

```
 config.json ──► skeleton on the meta device, in model.dtype ──► 4-bit layers (Linear4bit, codes and
   scales at their exact packed sizes) ──► adapt(method), checkpointing ──► every tensor made fake
   ──► optimizer (its state made by a first step) ──► the measured step: CausalLMLoss over
   batch x max_length tokens, every position labelled ──► backward ──► clip ──► optimizer.step
```

Everything runs through peftkit's own code (the adapters, the chunked loss, the
optimizers, bitsandbytes' 4-bit autograd functions) under torch's `FakeTensorMode`:
each op computes its output's shape and dtype and allocates nothing. `LiveBytes`, a
dispatch mode above it, logs every storage an op creates and when Python frees it;
the peak of that log is the estimate, and each byte alive at the peak is put in one
category:

- `base_weights`: what exists before the step and is not trained (frozen and 4-bit
  weights with their quantization state, buffers);
- `trainable_parameters`, `gradients` (storages that became a `.grad`),
  `optimizer_state` (the optimizer's state tensors);
- `activations`: made by the forward and still alive when it ends, i.e. kept for the
  backward (with checkpointing: the layers' inputs);
- `temporaries`: everything else (logits, dequantized weights, checkpointed layers'
  recomputed activations, the backward's and optimizer's scratch tensors).

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

import dataclasses
import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from peftkit.dtypes import dtype_named
from peftkit.errors import ConfigError
from peftkit.inject import adapt
from peftkit.targets import candidate_modules
from peftkit.training.activations import enable_gradient_checkpointing
from peftkit.training.config import RunConfig
from peftkit.training.loss import CausalLMLoss, loss_chunk_size
from peftkit.training.models import model_config
from peftkit.training.optim import build_optimizer
from peftkit.weights import is_linear

__all__ = [
    "CATEGORIES",
    "StepMemory",
    "LiveBytes",
    "Simulation",
    "counting",
    "layer_count",
    "text_config",
    "with_layers",
]

CATEGORIES = (
    "base_weights",
    "trainable_parameters",
    "gradients",
    "optimizer_state",
    "activations",
    "temporaries",
)

_aten = torch.ops.aten


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
    given a serial number, since a freed storage's address is reused.
    """

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, int]] = []  # (serial, +bytes) when made, (serial, -bytes) when freed
        self._serial: dict[int, int] = {}  # live storage -> its serial
        self._next = 0

    def serial(self, tensor: torch.Tensor) -> int | None:
        """The serial of `tensor`'s storage, if it is counted."""
        return self._serial.get(tensor.untyped_storage()._cdata)

    def add(self, tensor: torch.Tensor) -> int:
        """Count `tensor`'s storage (once); its serial."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._serial:
            self._next += 1
            self._serial[key] = serial = self._next
            self.log.append((serial, storage.nbytes()))
            weakref.finalize(storage, self._free, key, serial, storage.nbytes())
        return self._serial[key]

    def _free(self, key: int, serial: int, nbytes: int) -> None:
        if self._serial.get(key) == serial:
            del self._serial[key]
        self.log.append((serial, -nbytes))

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
        return _highest(self.log)[0]


class _FakeStep(LiveBytes):
    """LiveBytes over fake tensors, supplying what they lack: values and data-dependent shapes.

    `cpu_kernels`: run bitsandbytes' CPU optimizer updates (torch code) under the counter,
    as a CPU run does, instead of their fake implementation, which allocates nothing.
    """

    def __init__(self, cpu_kernels: bool = False) -> None:
        super().__init__()
        self.kernels = _bitsandbytes_cpu_updates() if cpu_kernels else {}

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


def _bitsandbytes_cpu_updates() -> dict[Any, Callable[..., Any]]:
    """bitsandbytes' CPU optimizer-update kernels by op (none without bitsandbytes loaded, or if they moved).

    8-bit AdamW's dequantizes both moments to float32 and computes the update in float32:
    five float32 copies of a parameter at once. On CUDA each update is one fused kernel.
    """
    if "bitsandbytes" not in sys.modules:
        return {}
    from bitsandbytes.backends.cpu import ops

    names = {
        "optimizer_update_8bit_blockwise": "_optimizer_update_8bit_blockwise_cpu",
        "optimizer_update_32bit": "_optimizer_update_32bit_cpu",
    }
    found = {op: getattr(ops, kernel, None) for op, kernel in names.items()}
    return {getattr(torch.ops.bitsandbytes, op).default: kernel for op, kernel in found.items() if kernel}


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
                    made[id(tensor)] = (
                        nn.Parameter(fake(tensor), tensor.requires_grad) if is_parameter else fake(tensor)
                    )
                    if getattr(tensor, "quant_state", None) is not None:
                        for attribute in _PARAMS4BIT_ATTRIBUTES:
                            setattr(made[id(tensor)], attribute, getattr(tensor, attribute))
                        made[id(tensor)].quant_state = _fake_state(tensor.quant_state, fake)
                table[name] = made[id(tensor)]


_PARAMS4BIT_ATTRIBUTES = ("bnb_quantized", "blocksize", "quant_type", "compress_statistics", "quant_storage")


def _fake_state(state: Any, fake: Any) -> Any:
    """A copy of a bitsandbytes QuantState whose tensors are fake."""
    copy = dataclasses.replace(state) if dataclasses.is_dataclass(state) else type(state).__new__(type(state))
    copy.__dict__.update(
        {k: fake(v) if isinstance(v, torch.Tensor) else v for k, v in state.__dict__.items() if k != "state2"}
    )
    copy.state2 = None if state.state2 is None else _fake_state(state.state2, fake)
    return copy


def _quantize_in_place(model: nn.Module, quantization: Any, compute_dtype: torch.dtype, dtype: torch.dtype) -> None:
    """Every linear layer a 4-bit load quantizes, replaced as that load does (the others stay in `dtype`).

    transformers' BitsAndBytesConfig loading uses blocksize 64 (LOAD_BLOCKSIZE)."""
    from peftkit.quant.codec import packed_on_meta
    from peftkit.training.quantized import LOAD_BLOCKSIZE, skipped_modules

    skipped = set(skipped_modules(model, quantization, "model.quantization"))
    for path, module in list(candidate_modules(model)):
        if is_linear(module) and path not in skipped:
            parent, _, child = path.rpartition(".")
            layer = packed_on_meta(module, quantization, compute_dtype, dtype, LOAD_BLOCKSIZE)
            setattr(model.get_submodule(parent), child, layer)


def _compute_dtype(quantization: Any, device_type: str) -> torch.dtype:
    """The 4-bit compute dtype on the target device: as configured, else bfloat16 on a GPU and float32 on CPU."""
    if quantization.compute_dtype:
        return dtype_named(quantization.compute_dtype, "model.quantization.compute_dtype")
    return torch.bfloat16 if device_type == "cuda" else torch.float32


@contextmanager
def counting(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[LiveBytes]:
    """LiveBytes over real tensors under the block, counting the model's and optimizer's tensors from its start."""
    with LiveBytes() as counter:
        for _, tensor in _resident(model, optimizer):
            counter.add(tensor)
        yield counter


def _resident(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """(category, tensor) for every tensor alive before the step."""
    for param in model.parameters():
        yield ("trainable_parameters" if param.requires_grad else "base_weights"), param
        if getattr(param, "quant_state", None) is not None:
            from peftkit.quant.codec import quant_state_tensors

            for tensor in quant_state_tensors(param.quant_state):
                yield "base_weights", tensor
    for buffer in model.buffers():
        yield "base_weights", buffer
    for state in optimizer.state.values():
        for tensor in tree_leaves(state):
            if isinstance(tensor, torch.Tensor):
                yield "optimizer_state", tensor


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


def text_config(config: Any) -> Any:
    """The part of a transformers config that describes the language model (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_count(config: Any) -> int | None:
    """The number of transformer layers a transformers config asks for, if it says."""
    return getattr(text_config(config), "num_hidden_layers", None)


def with_layers(config: Any, num_layers: int) -> Any:
    """A copy of a transformers config with only its first `num_layers` layers.

    Per-layer lists (Gemma's `layer_types`, and the like: any list as long as the layer
    count) are cut to match.
    """
    copy = config.__class__.from_dict(config.to_dict())
    target = text_config(copy)
    old = target.num_hidden_layers
    for key, value in list(vars(target).items()):
        if isinstance(value, list) and len(value) == old:
            setattr(target, key, value[:num_layers])
    target.num_hidden_layers = num_layers
    return copy


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
        from transformers import AutoModelForCausalLM

        self.config, self.device_type = config, device_type
        self.fake = FakeTensorMode()
        self.mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.training.mixed_precision)
        dtype = dtype_named(config.model.dtype, "model.dtype")
        quantization = config.base_quantization()
        transformers_config = model_config(config.model.name)
        self.num_layers = layer_count(transformers_config)
        if num_layers is not None:
            transformers_config = with_layers(transformers_config, num_layers)

        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(transformers_config, dtype=dtype)
        except ValueError as error:  # a config type with no causal-LM class
            raise ConfigError(
                f"model.name {config.model.name!r}: transformers cannot build it as a causal LM: {error}"
            ) from None
        # The adapter is attached on the meta device (FakeTensorMode refuses the tensor swaps of
        # `Module.to`), then every tensor becomes a fake one.
        if quantization is not None:
            _quantize_in_place(model, quantization, _compute_dtype(quantization, device_type), dtype)
        with _FakeStep():  # for the .item() of a check
            adapt(model, config.method.name, **config.method.options)
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
            for category, tensor in _resident(self.model, self.optimizer):
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
        return _peak(counter.log, categories, batch_size, max_length)


def _highest(log: list[tuple[int, int]]) -> tuple[int, int]:
    """(the largest running total of `log`, the index of the entry that first reached it)."""
    total = peak = at = 0
    for index, (_, nbytes) in enumerate(log):
        total += nbytes
        if total > peak:
            peak, at = total, index
    return peak, at


def _peak(log: list[tuple[int, int]], categories: dict[int, str], batch_size: int, max_length: int) -> StepMemory:
    """The largest total of `log`, and the bytes alive at that moment by category."""
    peak, at = _highest(log)
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
