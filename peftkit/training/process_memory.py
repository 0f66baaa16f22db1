"""One process's share of a training step's memory under `training.distributed` (`estimate --num-processes`).

The one-process step is simulated (peftkit.training.simulate); what N processes change is
structural, so it is computed from the simulated model's tensors:

- ddp: every process holds the whole step, plus DDP's gradient buckets (a copy of the
  trainable parameters' gradients, all-reduced in place of them);
- fsdp: the resident tensors (frozen weights, trainable parameters, their gradients, the
  optimizer state) are 1/N each, while a step gathers whole. At the step's own peak (its
  most activations): the root's parameters (embeddings, final norm, head: gathered for the
  whole forward and backward), the all-gather outputs FSDP2 keeps until the next
  all-gather (measured: the root's and the last block's flat buffers, beside the gathered
  copies) and one block's unsharded gradients before their reduce-scatter. At the
  forward's start, before any activation: the root and the first block gathered, each
  beside its all-gather output. The larger of the two is the peak (a model that is mostly
  its embedding and head peaks at the start). The 4-bit quantization state and buffers
  are not parameters: every process keeps them whole.
- fsdp with cpu_offload: the sharded tensors live in host memory, not on the device.
- bitsandbytes' optimizers under fsdp keep their state per shard, as they allocate it for
  the largest process's shard of each tensor (a shard under 4096 elements keeps float32
  state: see peftkit.training.optim.bitsandbytes_state_bytes).

The first moment moves the one-process peak's own breakdown, so it stays at the moment
the simulation found. Against the loop's meter on the 1B shape (`benchmarks/README.md`)
the root's kept all-gather output was the part a first version missed (10.7% under).
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from peftkit.training.config import RunConfig
from peftkit.training.distributed import decoder_blocks, resolve_strategy
from peftkit.training.memory import StepMemory
from peftkit.training.optim import bitsandbytes_state_bytes, is_bitsandbytes

__all__ = ["per_process"]

_SHARDED = ("trainable_parameters", "gradients", "optimizer_state")


def _bytes(params: list[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _units(model: nn.Module) -> tuple[int, int, int]:
    """(the root's own parameter bytes, the largest block's, the largest block's trainable ones): what FSDP gathers."""
    blocks = decoder_blocks(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    root = _bytes([p for p in model.parameters() if id(p) not in in_blocks])
    block = max((_bytes(list(b.parameters())) for b in blocks), default=0)
    block_grads = max((_bytes([p for p in b.parameters() if p.requires_grad]) for b in blocks), default=0)
    return root, block, block_grads


def _largest_shard(param: nn.Parameter, num_processes: int) -> int:
    """Elements of the largest of FSDP's `num_processes` shards of `param` (its rows split as torch.chunk does)."""
    rows = param.shape[0] if param.ndim else 1
    return math.ceil(rows / num_processes) * (param.numel() // max(rows, 1))


def per_process(step: StepMemory, model: nn.Module, config: RunConfig, num_processes: int) -> StepMemory:
    """One-process `step` of the simulated `model` as one of `num_processes` under `config`'s strategy.

    The result's breakdown is device memory; under cpu_offload the sharded tensors are in host memory instead.
    """
    strategy = resolve_strategy(config.training.distributed, num_processes)
    parts = dict(step.breakdown)
    if strategy == "ddp":
        parts["temporaries"] += _bytes([p for p in model.parameters() if p.requires_grad])
    elif strategy == "fsdp":
        frozen = _bytes([p for p in model.parameters() if not p.requires_grad])
        offload = config.training.distributed.cpu_offload
        parts["base_weights"] -= frozen if offload else frozen - math.ceil(frozen / num_processes)
        for name in _SHARDED:
            parts[name] = 0 if offload else math.ceil(parts[name] / num_processes)
        optimizer = config.training.optimizer
        if is_bitsandbytes(optimizer) and not offload:
            shards = [_largest_shard(p, num_processes) for p in model.parameters() if p.requires_grad]
            parts["optimizer_state"] = bitsandbytes_state_bytes(optimizer, shards)
        root, block, block_grads = _units(model)
        at_peak = dict(parts, temporaries=parts["temporaries"] + 2 * root + block + block_grads)
        at_start = dict(parts, gradients=0, activations=0, temporaries=2 * (root + block))
        parts = max(at_peak, at_start, key=lambda moment: sum(moment.values()))
    return dataclasses.replace(step, peak_bytes=sum(parts.values()), breakdown=parts)
