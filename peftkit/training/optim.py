"""`training.optimizer`: torch's AdamW, or bitsandbytes' 8-bit and paged AdamW.

| name               | class                       | state per trained element      |
| ------------------ | --------------------------- | ------------------------------ |
| `adamw` (default)  | torch.optim.AdamW           | 8 bytes (two float32)          |
| `adamw_8bit`       | bitsandbytes AdamW8bit      | ~2 bytes (two blockwise uint8) |
| `paged_adamw_8bit` | bitsandbytes PagedAdamW8bit | ~2 bytes, in paged memory      |
| `paged_adamw`      | bitsandbytes PagedAdamW     | 8 bytes, in paged memory       |

8-bit Adam (Dettmers et al., 2021, https://arxiv.org/abs/2110.02861) stores both
moments as uint8 codes with one float32 scale per 256 elements; bitsandbytes keeps
tensors under 4096 elements (`min_8bit_size`) in float32, where the scales would
cost more than they save. Paged state lives in CUDA unified memory that can spill
to the host under memory pressure; without CUDA, bitsandbytes runs the paged
optimizers unpaged (it warns so), so they run everywhere and save nothing there.

LoRA+ (Hayou et al., 2024, https://arxiv.org/abs/2402.12354; `training.loraplus_lr_ratio`)
gives the up-projection B of each low-rank pair `ratio` times the learning rate of A,
in the four parameter groups of PEFT's `create_loraplus_optimizer` (`loraplus_param_groups`).

Whether an optimizer runs on this machine is measured, not assumed: the config
check takes one step with it on the device the run will use, and refuses it with
the list of those that do run. Their `state_dict` holds only tensors and numbers,
so checkpoints read it back with `torch.load(weights_only=True)` and resume exactly.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError, did_you_mean
from peftkit.training.sharded_optim import LocalShardOptimizer, is_sharded

__all__ = [
    "OPTIMIZERS",
    "check_optimizer",
    "build_optimizer",
    "is_bitsandbytes",
    "bitsandbytes_state_bytes",
    "loraplus_param_groups",
]

_BITSANDBYTES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw": "PagedAdamW"}
OPTIMIZERS = ["adamw", *_BITSANDBYTES]
_MIN_8BIT_SIZE, _BLOCK, _CODES = 4096, 256, 256  # bitsandbytes' defaults, which build_optimizer keeps


def is_bitsandbytes(name: str) -> bool:
    """Whether optimizer `name` is bitsandbytes' (plain tensors only: it steps local shards under FSDP)."""
    return name in _BITSANDBYTES


def bitsandbytes_state_bytes(name: str, numels: Iterable[int]) -> int:
    """The bytes bitsandbytes' optimizer `name` allocates for tensors of `numels` elements.

    An 8-bit optimizer keeps two uint8 moments and a float32 scale per 256 elements each for a
    tensor of at least 4096 elements, and its two 256-entry float32 code maps once; a smaller
    tensor, or any under a 32-bit optimizer, keeps two float32 moments. Under FSDP `numels` are
    one process's shards, so a shard smaller than 4096 elements costs 8 bytes an element.
    """
    eight_bit = name.endswith("8bit")
    total, maps = 0, 0
    for numel in numels:
        if eight_bit and numel >= _MIN_8BIT_SIZE:
            total += 2 * (numel + 4 * math.ceil(numel / _BLOCK))
            maps = 2 * 4 * _CODES
        else:
            total += 2 * 4 * numel
    return total + maps


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes

    return getattr(bitsandbytes.optim, _BITSANDBYTES[name])


def _run_device() -> torch.device:
    """The device `peftkit train` uses: the GPU when there is one (as its Accelerator decides)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def _failure(name: str, device: torch.device) -> str | None:
    """Why `name` cannot take a step on `device` (on a tensor large enough for 8-bit state), or None."""
    try:
        param = torch.nn.Parameter(torch.ones(4096, device=device))
        param.grad = torch.full_like(param, 0.5)
        with warnings.catch_warnings():  # bitsandbytes' "paging falls back" note; the run itself says it
            warnings.simplefilter("ignore")
            _optimizer_class(name)([param], lr=1e-3).step()
    except Exception as error:  # noqa: BLE001 - any failure means the option does not run here
        return f"{type(error).__name__}: {error}"
    return None


def check_optimizer(name: str, device: torch.device | None = None) -> None:
    """Raise ConfigError if `name` is not an optimizer, or cannot run on `device` (default: the run's)."""
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"training.optimizer {name!r} does not exist.{did_you_mean(name, OPTIMIZERS)} "
            f"Optimizers: {', '.join(OPTIMIZERS)}."
        )
    device = device or _run_device()
    failure = _failure(name, device)
    if failure is not None:
        working = [other for other in OPTIMIZERS if _failure(other, device) is None]
        raise ConfigError(
            f"training.optimizer {name!r} cannot run on {device.type} here ({failure}). "
            f"Optimizers that run here: {', '.join(working) or 'none'}."
        )


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer `name` over `params` (tensors, or param groups); every one is AdamW with decoupled weight decay.

    bitsandbytes' optimizers over FSDP's DTensor parameters step their local shards (LocalShardOptimizer).
    """
    params = list(params)
    make = functools.partial(_optimizer_class(name), lr=lr, weight_decay=weight_decay)
    if is_bitsandbytes(name) and any(is_sharded(p) for p in _tensors(params)):
        return LocalShardOptimizer(params, make)
    return make(params)


def _tensors(params: list[Any]) -> Iterable[torch.Tensor]:
    for item in params:
        yield from item["params"] if isinstance(item, dict) else [item]


def _decays(model: nn.Module) -> set[str]:
    """Names of parameters weight decay applies to: not a bias, not inside a LayerNorm (transformers' rule)."""
    norms = {name for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)}
    return {name for name, _ in model.named_parameters() if "bias" not in name and name.rpartition(".")[0] not in norms}


def loraplus_param_groups(
    model: nn.Module,
    roles: dict[str, str],
    lr: float,
    ratio: float,
    weight_decay: float = 0.0,
    lr_embedding: float = 1e-6,
) -> list[dict[str, Any]]:
    """LoRA+'s parameter groups over `model`'s trainable parameters, as PEFT's `create_loraplus_optimizer`.

    `roles` (the method's `parameter_roles`) names the `"up"` factors and the
    `"embedding"` LoRA tensors; any other 1-D tensor (a bias, DoRA's magnitude) joins
    B, as in PEFT. Groups, in PEFT's order: A and the rest at `lr`; embedding LoRA at
    `lr_embedding`; B at `lr * ratio`, with weight decay unless it is a bias (or a norm's).
    """
    decays = _decays(model)
    groups: dict[str, list[nn.Parameter]] = {"down": [], "embedding": [], "up": [], "up_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = roles.get(name, "up" if param.ndim == 1 else "down")
        if role == "up" and name not in decays:
            role = "up_no_decay"
        groups[role].append(param)
    return [
        {"params": groups["down"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["up"], "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": groups["up_no_decay"], "weight_decay": 0.0, "lr": lr * ratio},
    ]
