"""Training over several processes: the `training.distributed` section, and FSDP2 on torch's `fully_shard`.

`strategy: ddp` gives every process a whole copy of the model (accelerate's DDP);
`strategy: fsdp` shards it: each repeated decoder block is one `fully_shard` unit
(found by structure, no per-model table), the root last, so a process holds
1/N of the frozen base, the adapter, its gradients and the optimizer state, and
gathers one block at a time to compute. A 4-bit base shards too: its packed codes
are stored in the model's float dtype (`model.quantization.storage_dtype`), which
FSDP flattens like any other weight and never casts (mixed precision is autocast
around the forward, not FSDP's parameter cast).

What leaves the processes is whole: the adapter and the optimizer state are
gathered (collectively, every process calling) into the files a one-process run
writes, so a checkpoint resumes under any number of FSDP processes. bitsandbytes'
optimizers step each process's shards (peftkit.training.sharded_optim): their
blockwise 8-bit state is saved per process and resumes under as many processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.peft_format import adapter_state_dict
from peftkit.quant.config import QuantizationConfig
from peftkit.record import DEFAULT_ADAPTER, adapter_method
from peftkit.training.checkpoint import Checkpoint, restore_checkpoint
from peftkit.training.optim import is_bitsandbytes
from peftkit.training.sharded_optim import LocalShardOptimizer, is_sharded, load_per_process_state, per_process_state
from peftkit.validation import check_types, from_options

__all__ = [
    "DistributedConfig",
    "distributed_from_options",
    "resolve_strategy",
    "check_sharding",
    "check_offload",
    "sharded_quantization",
    "decoder_blocks",
    "shard_model",
    "gathered_adapter",
    "full_optimizer_state",
    "load_full_optimizer_state",
    "sharded_adapter_tensors",
    "restore_sharded",
    "check_resume_strategy",
    "lockstep",
]

T = TypeVar("T")


@dataclasses.dataclass
class DistributedConfig:
    """`training.distributed`: how several processes share the work.

    Args:
        strategy: `auto` (ddp when launched with several processes, nothing with one),
            `ddp` (a whole model per process) or `fsdp` (sharded; one process runs unsharded).
        cpu_offload: fsdp only: parameters, gradients and optimizer state live in host memory,
            a block's parameters are copied to the device for its compute.
        reshard_after_forward: fsdp only: free a block's gathered parameters after its forward
            and gather them again for its backward (less memory, one more all-gather per block).
    """

    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    cpu_offload: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        check_types(self, "training.distributed")
        if self.strategy != "fsdp":
            for key, default in (("cpu_offload", False), ("reshard_after_forward", True)):
                if getattr(self, key) != default:
                    raise ConfigError(
                        f"training.distributed.{key} applies to strategy 'fsdp' only, got strategy "
                        f"{self.strategy!r}; set strategy: fsdp or drop {key}."
                    )


def distributed_from_options(options: Any) -> DistributedConfig:
    """`training.distributed` given as a mapping (or the config) as the checked config."""
    if isinstance(options, DistributedConfig):
        return options
    if not isinstance(options, dict):
        names = ", ".join(f.name for f in dataclasses.fields(DistributedConfig))
        raise ConfigError(f"training.distributed must be a mapping of {names}, got {options!r}.")
    return from_options(DistributedConfig, options, "training.distributed")


def resolve_strategy(config: DistributedConfig, num_processes: int) -> Literal["none", "ddp", "fsdp"]:
    """What this launch runs: `none` with one process, else the configured strategy (auto: ddp)."""
    if num_processes == 1:
        return "none"
    return "ddp" if config.strategy == "auto" else config.strategy


def check_sharding(model_dtype: str, quantization: QuantizationConfig | None, generations: int) -> None:
    """What FSDP cannot run, said before anything loads.

    Sample generations call the model outside the training forward, where FSDP gathers no
    parameters (the loss module is the sharded root). A packed 4-bit weight stored in another
    dtype than the parameters FSDP gathers would be cast as numbers, turning its codes into
    noise.
    """
    storage = quantization.storage_dtype if quantization is not None else None
    if storage is not None and storage != model_dtype:
        raise ConfigError(
            f"model.quantization.storage_dtype {storage!r} differs from model.dtype {model_dtype!r}, the dtype FSDP "
            f"shards and gathers this model's parameters in: the packed 4-bit codes would be cast to it and turn to "
            f"noise. Set storage_dtype: {model_dtype} or leave it unset (the model's dtype under fsdp)."
        )
    if generations:
        raise ConfigError(
            f"eval.generations {generations}: sample generations are not available under strategy fsdp (the model "
            "is sharded outside the training forward); set eval.generations: 0, or generate from the saved adapter."
        )


def check_offload(config: DistributedConfig, device: torch.device) -> None:
    """cpu_offload moves shards from an accelerator to host memory; on a CPU they are there already, and
    torch's CPUOffloadPolicy refuses to run without an accelerator."""
    if config.strategy == "fsdp" and config.cpu_offload and device.type == "cpu":
        raise ConfigError(
            "training.distributed.cpu_offload needs a GPU (it moves the shards from the GPU to host memory); "
            "this run trains on cpu, where they are in host memory already: drop cpu_offload."
        )


def sharded_quantization(quantization: QuantizationConfig | None, model_dtype: str) -> QuantizationConfig | None:
    """The 4-bit config an FSDP run loads with: the packed codes stored in the model's dtype unless set."""
    if quantization is None or quantization.storage_dtype is not None:
        return quantization
    return dataclasses.replace(quantization, storage_dtype=model_dtype)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the largest (by parameters) ModuleList of two or more modules of one class.

    Found by structure, so any transformer (Llama's `model.layers`, GPT-2's `transformer.h`)
    shards without a per-model-type table; [] when the model has no such list.
    """
    best: list[nn.Module] = []
    best_size = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = list(module), size
    return best


def shard_model(model: nn.Module, config: DistributedConfig) -> int:
    """`fully_shard` each decoder block, then the root (embeddings, final norm, head); returns the block count.

    Runs after the adapter is attached, so each block's adapter shards with its base weights and
    a method that reads a base weight inside the block's forward (DoRA's weight norm) reads the
    gathered weight: FSDP's pre-forward hook has all-gathered the block before its forward runs.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    offload = CPUOffloadPolicy() if config.cpu_offload else OffloadPolicy()
    options = {"reshard_after_forward": config.reshard_after_forward, "offload_policy": offload}
    blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return len(blocks)


def gathered_adapter(model: nn.Module, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's sharded tensors gathered whole (model path -> tensor), for `save_adapter(state_dict=...)`.

    Collective: every process calls it, in the same order, and every process gets the whole tensors.
    """
    state = adapter_method(model, name).trainable_state(model, name)
    return {path: t.full_tensor() for path, t in state.items() if is_sharded(t)}


def sharded_adapter_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], name: str = DEFAULT_ADAPTER
) -> dict[str, torch.Tensor]:
    """Saved whole tensors (PEFT key names) laid out as the live adapter's shards, ready to copy in."""
    from torch.distributed.tensor import distribute_tensor

    live = adapter_state_dict(model, name)
    out = dict(tensors)
    for key, target in live.items():
        if is_sharded(target) and key in tensors and tensors[key].shape == target.shape:
            whole = tensors[key].to(device=target.to_local().device, dtype=target.dtype)
            out[key] = distribute_tensor(whole, target.device_mesh, target.placements)
    return out


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The sharded optimizer's state gathered whole on the CPU, keyed by parameter path (collective);
    bitsandbytes' is every process's own, on process 0 (None on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if isinstance(optimizer, LocalShardOptimizer):
        return per_process_state(optimizer)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Shard a whole optimizer state (as `full_optimizer_state` wrote it, under any process count) into place;
    bitsandbytes' per-process state goes to the process that wrote it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if isinstance(optimizer, LocalShardOptimizer):
        load_per_process_state(optimizer, state)
        return

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def restore_sharded(checkpoint: Checkpoint, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
    """`restore_checkpoint` into a sharded model: each process copies in its shards of the whole saved tensors."""
    shards = dataclasses.replace(checkpoint, adapter=sharded_adapter_tensors(model, checkpoint.adapter))
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper, or the optimizer itself
    restore_checkpoint(
        shards, model, optimizer, scheduler, lambda state: load_full_optimizer_state(model, inner, state)
    )


def check_resume_strategy(saved: dict[str, Any], strategy: str, num_processes: int, path: str) -> None:
    """Refuse a checkpoint whose optimizer state this launch cannot read, naming both process counts.

    FSDP checkpoints hold the optimizer state by parameter path (any FSDP process count reads it),
    but bitsandbytes' per process (only as many FSDP processes read it); the others hold torch's
    per-process form (any DDP count, or one process, reads it).
    """
    was = saved.get("distributed") or {"strategy": "none", "num_processes": 1}
    per_process = was["strategy"] == "fsdp" and is_bitsandbytes(saved["config"]["training"]["optimizer"])
    readable = (was["strategy"] == "fsdp") == (strategy == "fsdp")
    if readable and not (per_process and was["num_processes"] != num_processes):
        return
    readers = "2 or more processes under strategy fsdp" if was["strategy"] == "fsdp" else "strategy ddp or 1 process"
    if per_process:
        readers = f"{was['num_processes']} processes under strategy fsdp (bitsandbytes' optimizer state is per process)"
    raise ConfigError(
        f"--resume: checkpoint {path!r} was written by {was['num_processes']} process(es) under strategy "
        f"{was['strategy']!r}; this run has {num_processes} process(es) under strategy {strategy!r}, which cannot "
        f"read its optimizer state. Resume it with {readers}."
    )


def lockstep(batches: Sequence[T], fallback: T, acc: Any) -> Iterator[tuple[T, bool]]:
    """(batch, counts) so that every process runs as many forwards as the busiest one.

    FSDP's forward is collective: a process that ran out of validation batches must keep
    calling it (with a batch that is not counted) until all are done, or the others hang.
    """
    longest = int(acc.gather(torch.tensor([len(batches)], device=acc.device)).max())
    for index in range(longest):
        yield (batches[index], True) if index < len(batches) else (batches[0] if batches else fallback, False)
