"""A run's model, loss module and optimizer, put together as the launch's strategy needs them.

One process or ddp: the model is loaded whole, adapted and wrapped in the loss module;
accelerate prepares the wrapper (DDP with several processes) and the optimizer. fsdp:
only the main process loads the weights (`sharded_loading`), the loss module is the
sharded root (its forward is the one every step calls) and the optimizer is built over
the shards; accelerate prepares only the optimizer, and mixed precision is autocast
around the forward, so FSDP never casts the packed 4-bit codes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from peftkit.activations import enable_gradient_checkpointing
from peftkit.adapters import trainable_parameters
from peftkit.training.config import RunConfig
from peftkit.training.loss import CausalLMLoss, loss_chunk_size
from peftkit.training.sharded_loading import attach_adapter, base_model, shard_from_main

__all__ = ["Assembled", "assemble"]


@dataclasses.dataclass
class Assembled:
    """The adapted model (unwrapped), the loss module as prepared, the optimizer and its schedule, and sizes
    taken before sharding: the base weights' bytes, the trainable and total parameter counts."""

    model: nn.Module
    wrapper: nn.Module
    optimizer: Any
    scheduler: Any
    base_bytes: int
    trainable: int
    total: int


def assemble(
    config: RunConfig,
    acc: Any,
    sharded: bool,
    initialize: Callable[[nn.Module], None],
    make_optimizer: Callable[[nn.Module], tuple[Any, Any]],
) -> Assembled:
    """Load, adapt (`initialize(model)`: a data-driven init), checkpoint the activations if asked, wrap in the
    loss, shard under fsdp, then `make_optimizer(model)` -> (optimizer, scheduler) and accelerate's prepare."""
    model = base_model(config, acc.device, sharded)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    attach_adapter(model, config.method, sharded, initialize)
    if config.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = trainable_parameters(model)
    tc = config.training
    wrapper = CausalLMLoss(model, loss_chunk_size(tc.loss_chunk_size, getattr(model.config, "vocab_size", 0)))
    if sharded:
        shard_from_main(wrapper, tc.distributed, acc.device)
    optimizer, scheduler = make_optimizer(model)
    if sharded:
        optimizer = acc.prepare(optimizer)
        wrapper.forward = acc.autocast()(wrapper.forward)
    else:
        wrapper, optimizer = acc.prepare(wrapper, optimizer)
    return Assembled(acc.unwrap_model(wrapper).model, wrapper, optimizer, scheduler, base_bytes, trainable, total)
