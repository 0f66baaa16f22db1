"""An optimizer of plain tensors (bitsandbytes' 8-bit and paged AdamW) stepping FSDP2's sharded parameters.

Under FSDP2 a parameter is a DTensor whose local shard (`to_local()`) is a plain tensor
in FSDP's storage, and its gradient after the reduce-scatter is a DTensor too.
bitsandbytes' optimizers call their own kernels on `p` and `p.grad`, which DTensor
cannot dispatch. `LocalShardOptimizer` gives the inner optimizer one plain proxy per
parameter that aliases the local shard, hands it the gradient's local shard before each
step, and the update lands in FSDP's storage in place: each process steps its own
1/N of every tensor, with its own 1/N of the state.

Blockwise 8-bit state is a process's own: bitsandbytes quantizes each shard in blocks of
256 elements from the shard's first element, so blocks fall elsewhere than one process's
over the whole tensor unless a shard starts on a multiple of 256; and a shard under
bitsandbytes' `min_8bit_size` (4096 elements) keeps float32 state where the whole tensor
had 8-bit state. N processes therefore step as one process does up to 8-bit rounding
(measured in tests/training/test_fsdp_8bit.py), and a checkpoint keeps each process's
state as it is (`per_process_state`): exact to resume with the same number of processes,
refused with another (peftkit.training.distributed.check_resume_strategy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["is_sharded", "LocalShardOptimizer", "per_process_state", "load_per_process_state"]

_PER_PROCESS = "per_process"


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (a parameter or gradient FSDP sharded)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _proxy(param: nn.Parameter) -> nn.Parameter:
    """A plain parameter aliasing `param`'s local shard (no copy)."""
    return nn.Parameter(param.to_local().detach(), requires_grad=param.requires_grad)


class LocalShardOptimizer(torch.optim.Optimizer):
    """`make(groups)`'s optimizer, built over plain proxies of the DTensor parameters in `params`, stepping them.

    Its `param_groups` and `state` are the inner optimizer's (over the proxies), so a learning-rate
    scheduler's changes reach it; like accelerate's AcceleratedOptimizer it is a torch Optimizer by
    delegation and does not run `Optimizer.__init__`.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    ) -> None:
        groups = list(params)
        groups = [dict(g) for g in groups] if groups and isinstance(groups[0], dict) else [{"params": groups}]
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        for group in groups:
            pairs = [(p, _proxy(p)) for p in group["params"]]
            self._pairs += pairs
            group["params"] = [proxy for _, proxy in pairs]
        self.inner = make(groups)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.inner.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, state: Any) -> None:
        self.inner.state = state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Point each proxy at its parameter's current local shard and gradient shard, then step."""
        for sharded, proxy in self._pairs:
            # Re-pointed every step (an alias, no copy): FSDP2 re-makes a local tensor when a
            # state dict is loaded into it, or to pad it at its first forward on older torch.
            proxy.data = sharded.to_local()
            grad = sharded.grad
            # An empty shard (a tensor of fewer rows than processes) has nothing to step.
            proxy.grad = grad.to_local() if grad is not None and proxy.numel() else None
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the sharded gradients (the ones FSDP accumulates into) and drop the proxies' aliases of them."""
        for sharded, proxy in self._pairs:
            proxy.grad = None
            if set_to_none:
                sharded.grad = None
            elif sharded.grad is not None:
                sharded.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """This process's state: the inner optimizer's over its shards."""
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


def per_process_state(optimizer: LocalShardOptimizer) -> dict[str, Any] | None:
    """Every process's state (in process order) on process 0, None on the others (collective).

    Kept as each process holds it: its blockwise 8-bit state has no whole form that another
    number of processes could split without quantizing it again in other blocks. Sent from
    the host: a GPU tensor would be unpickled onto its own process's GPU inside process 0.
    """
    import torch.distributed as dist
    from accelerate.utils import send_to_device

    mine = send_to_device(optimizer.state_dict(), "cpu")
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return {_PER_PROCESS: gathered} if gathered is not None else None


def load_per_process_state(optimizer: LocalShardOptimizer, state: dict[str, Any]) -> None:
    """Load this process's entry of a `per_process_state` (written under the same number of processes)."""
    import torch.distributed as dist

    optimizer.load_state_dict(state[_PER_PROCESS][dist.get_rank()])
