"""Loading under fsdp: the main process reads the checkpoint, the others build the model on the meta device.

```
 main process:  load_model (whole, host memory) ─► adapt (its init may read the weights or data) ─┐
 the others:    model_on_meta (no data) ─► adapt(the main process's adapter, as it is rebuilt) ◄──┘ its options
 every process: same structure? ─► fully_shard per block, the root ─► the others: to_empty (their shards only)
                ─► set_model_state_dict(broadcast_from_rank0): each tensor broadcast whole, one at a time, each
                   process keeping its shard ─► the tensors no state dict holds: non-persistent buffers
                   (rotary inv_freq) and the 4-bit layers' quantization state (module.quant_state)
```

accelerate's `cpu_ram_efficient_loading` for FSDP2 does the same for dense models (and
leaves 4-bit ones out): a process other than the main one holds its shards plus one
whole tensor in flight (two at a hand-over), never the model. The main process holds the
whole model until its tensors are sent, then its shards. Everything the adapter's init computes (PiSSA,
OLoRA, LoftQ from the weights, EVA from the data, and the Kaiming draws of A) is computed
there, on the random sequence a one-process run follows, and sent: every process starts
from the values one process would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftkit.adapters import adapt
from peftkit.dtypes import dtype_named
from peftkit.method import AdapterMethod
from peftkit.quant.config import resolve_compute_dtype
from peftkit.record import DEFAULT_ADAPTER, adapter_methods
from peftkit.training.config import RunConfig
from peftkit.training.distributed import DistributedConfig, shard_model, sharded_quantization
from peftkit.training.models import load_model, model_on_meta

__all__ = ["base_model", "attach_adapter", "shard_from_main"]


def _on_main() -> bool:
    return dist.get_rank() == 0


def base_model(config: RunConfig, device: torch.device, sharded: bool) -> nn.Module:
    """The run's base model: loaded, or under fsdp on a process other than the main one, built on the meta
    device (the same modules, no data), to be sharded and filled by `shard_from_main`."""
    quantization = config.base_quantization()
    if config.training.distributed.strategy == "fsdp":  # one process loads as several do: same numbers
        quantization = sharded_quantization(quantization, config.model.dtype)
    if not sharded:
        return load_model(config.model.name, config.model.dtype, quantization, device)
    if _on_main():  # host memory: FSDP moves each block to the device as it shards it
        return load_model(config.model.name, config.model.dtype, quantization, "cpu", compute_device=device)
    dtype = dtype_named(config.model.dtype, "model.dtype")
    compute = resolve_compute_dtype(quantization.compute_dtype, device) if quantization else None
    return model_on_meta(config.model.name, dtype, quantization, compute)


def attach_adapter(
    model: nn.Module, method: AdapterMethod, sharded: bool, initialize: Callable[[nn.Module], None]
) -> None:
    """`adapt(model, method)`, then `initialize(model)` (a data-driven init); collective when `sharded`.

    Under fsdp the main process does both; the others attach the adapter it made, as it is rebuilt.
    """
    if sharded and not _on_main():
        adapt(model, _main_adapter(None, method))
        return
    adapt(model, method)
    initialize(model)
    if sharded:
        _main_adapter(model, method)


def _main_adapter(model: nn.Module | None, method: AdapterMethod) -> AdapterMethod:
    """The adapter the main process made, as the others rebuild it (collective; `model` on the main process).

    Its options are sent, not its init: an init can change them (EVA's per-layer ranks), and
    the values it computed arrive with the shards.
    """
    options = [adapter_methods(model)[DEFAULT_ADAPTER].options() if model is not None else None]
    dist.broadcast_object_list(options, src=0)
    return type(method).from_options(**options[0]).for_loading()


def shard_from_main(wrapper: nn.Module, config: DistributedConfig, device: torch.device) -> int:
    """`shard_model`, each process's shards filled from the main process's whole model; returns the block count.

    Collective. Refuses, naming the first difference, a model the other processes built otherwise
    than the main process loaded it (a check that costs one small all-gather).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    main = _on_main()
    unsaved = _agreed_unsaved(wrapper)
    whole = _state(wrapper) if main else {}  # references to the whole tensors, kept past fully_shard
    blocks = shard_model(wrapper, config)
    if not main:
        wrapper.to_empty(device=device)
    _place_quant_states(wrapper, device, main)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(wrapper, whole, options=options)
    whole.clear()
    for tensor in unsaved():
        dist.broadcast(tensor, src=0)
    return blocks


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What `set_model_state_dict` loads: parameters (tied ones under each name) and persistent buffers."""
    state = {name: p.detach().as_subclass(torch.Tensor) for name, p in model.named_parameters(remove_duplicate=False)}
    for name, buffer in _buffers(model, persistent=True):
        state[name] = buffer
    return state


def _buffers(model: nn.Module, persistent: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for path, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if (name not in module._non_persistent_buffers_set) == persistent:
                yield f"{path}.{name}" if path else name, buffer


def _quant_states(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """(path, state) of each 4-bit layer: bitsandbytes keeps the state on the module for FSDP, whose
    gathered weight is a plain tensor."""
    for path, module in model.named_modules():
        if getattr(module, "quant_state", None) is not None:
            yield path, module.quant_state


def _place_quant_states(model: nn.Module, device: torch.device, filled: bool) -> None:
    """Put each 4-bit layer's quantization state on `device`: moved there on the main process (`filled`:
    `fully_shard` moves parameters and buffers, not this module attribute), allocated to receive it elsewhere."""
    from peftkit.quant.meta import remade_state  # the model has 4-bit layers: bitsandbytes is loaded

    make = (lambda t: t.to(device)) if filled else (lambda t: torch.empty_like(t, device=device))
    for path, state in list(_quant_states(model)):
        model.get_submodule(path).quant_state = remade_state(state, make)


def _signature(model: nn.Module) -> tuple[list[tuple[Any, ...]], list[str]]:
    """(what must be the same on every process, the non-persistent buffers' names).

    The main process may hold more non-persistent buffers than the others: an init's own
    (PiSSA's starting factors, kept for saving), which the others never need.
    """
    same: list[tuple[Any, ...]] = [
        (name, tuple(p.shape), str(p.dtype), p.requires_grad) for name, p in model.named_parameters()
    ]
    same += [(name, tuple(b.shape), str(b.dtype)) for name, b in _buffers(model, persistent=True)]
    states = list(_quant_states(model))
    if states:
        from peftkit.quant import quant_state_tensors  # the model has 4-bit layers: bitsandbytes is loaded

        for path, state in states:
            shapes = [(tuple(t.shape), str(t.dtype)) for t in quant_state_tensors(state)]
            same.append((path, state.blocksize, state.quant_type, str(state.dtype), shapes))
    return same, [name for name, _ in _buffers(model, persistent=False)]


def _agreed_unsaved(model: nn.Module) -> Callable[[], Iterator[torch.Tensor]]:
    """Check that every process built the main process's model; what else to broadcast, in one order.

    Returns a function that lists, once the model is sharded and allocated, the non-persistent
    buffers every process has and the 4-bit quantization states' tensors.
    """
    same, unsaved = _signature(model)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (same, unsaved))
    for rank, (theirs, _) in enumerate(everyone[1:], start=1):
        if theirs != everyone[0][0]:
            first = next((pair for pair in zip(everyone[0][0], theirs, strict=False) if pair[0] != pair[1]), None)
            raise RuntimeError(
                f"fsdp loading: process {rank} built the model otherwise than the main process loaded it "
                f"(first difference: {first or f'{len(theirs)} entries against {len(everyone[0][0])}'}); "
                "this model cannot be loaded by the main process alone."
            )
    common = set.intersection(*(set(names) for _, names in everyone))
    names = [name for name in everyone[0][1] if name in common]

    def tensors() -> Iterator[torch.Tensor]:
        buffers = dict(_buffers(model, persistent=False))
        yield from (buffers[name] for name in names)
        states = [state for _, state in _quant_states(model)]
        if states:
            from peftkit.quant import quant_state_tensors  # the model has 4-bit layers: bitsandbytes is loaded

            for state in states:
                yield from quant_state_tensors(state)

    return tensors
