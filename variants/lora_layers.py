"""LoRA's adapters, one per kind of base layer: linear maps, convolutions, embeddings.

Each keeps PEFT's parameter names (`lora_A`, `lora_B`, `lora_embedding_A/B`), so the
state-dict keys are PEFT's once the adapter-name level is dropped. An adapter lives
on the base layer's device and computes in its dtype when that is float32 or float64;
a half-precision base (bfloat16, float16) gets float32 adapters, as PEFT's default
`autocast_adapter_dtype` gives, and outputs are cast back to the base's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.authoring import LowRankAdapter, MergeError, ParameterAdapter, UnsupportedModuleError, layer_features

__all__ = [
    "adapter_placement",
    "LoraLinear",
    "LoraConv",
    "LoraEmbedding",
    "LoraMultiheadAttention",
    "LoraParameter",
]

_CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def adapter_placement(base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) an adapter of `base_layer` computes in: its device; its dtype unless half precision."""
    tensor = next(base_layer.parameters(), None)
    if tensor is None:
        return torch.device("cpu"), torch.float32
    dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
    return tensor.device, dtype


class LoraLinear(LowRankAdapter):
    """The low-rank path for any layer that acts as `x @ W.T + b` (Linear, Conv1D, 4-bit Linear).

    `h = s (B A x + b_B)`: with `bias=True` (PEFT's `lora_bias`), B has a trained bias
    `b_B` (zero at the start) that merges into the base layer's bias as `s b_B`.
    """

    stackable = True

    def __init__(
        self, base_layer: nn.Module, r: int, scaling: float, dropout: float, init: str, bias: bool = False
    ) -> None:
        super().__init__()
        self.r = r
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.build(base_layer, r, bias)
        self.reset_parameters(init)
        # Initialised in float32 (PEFT's random stream), then placed: a magnitude or norm
        # computed after this (DoRA) is then in the base's own precision.
        device, dtype = adapter_placement(base_layer)
        self.to(device=device, dtype=dtype)

    def build(self, base_layer: nn.Module, r: int, bias: bool) -> None:
        in_features, out_features = layer_features(base_layer)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=bias)

    def reset_parameters(self, init: str) -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    def start_from(self, down: torch.Tensor, up: torch.Tensor, base_layer: nn.Module) -> None:
        """Start from the factors of a weight init (PiSSA, OLoRA, LoftQ) made for `base_layer`'s new weight.

        The factors are also kept (`initial_A`, `initial_B`, not saved with the adapter):
        the delta trained since is `s (B A - B0 A0)` on the original weight, which is how
        such an adapter is saved as a plain LoRA (`conversion_factors`).
        """
        with torch.no_grad():
            self.lora_A.weight.copy_(down.reshape(self.lora_A.weight.shape))
            self.lora_B.weight.copy_(up.reshape(self.lora_B.weight.shape))
        self.register_buffer("initial_A", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("initial_B", self.lora_B.weight.detach().clone(), persistent=False)

    def conversion_factors(self, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A', B') of rank 2r with `B' A' = B A - B0 A0`, for trained factors (`down`, `up`) = (A, B); None
        unless the adapter started from a weight init. PEFT's `path_initial_model_for_weight_conversion`."""
        if getattr(self, "initial_A", None) is None:
            return None
        initial_down = self.initial_A.to(device=down.device, dtype=down.dtype)
        initial_up = self.initial_B.to(device=up.device, dtype=up.dtype)
        return torch.cat([down, initial_down], dim=0), torch.cat([up, -initial_up], dim=1)

    def project_up(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """B's operation on rank-r activations with the given weight and bias (DoRA passes rescaled ones)."""
        return F.linear(hidden, weight, bias)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """`s (B A x + b_B)` for an input that has already been through dropout.

        `s` scales the rank-r activations, not the full-width output: one pass over
        `tokens x r` values instead of `tokens x out` in the forward and the backward.
        """
        hidden = self.lora_A(x.to(self.lora_A.weight.dtype)) * self.scaling
        return self.project_up(hidden, self.lora_B.weight, self.delta_bias())

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.low_rank(self.dropout(x)).to(base_output.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.lora_B.bias is None else self.lora_B.bias * self.scaling

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with the delta `up @ down` (kernels flattened), for combining adapters."""
        return self.lora_B.weight.reshape(-1, self.r), self.lora_A.weight.reshape(self.r, -1) * self.scaling

    def set_low_rank_factors(self, up: torch.Tensor, down: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_B.weight.copy_(up.reshape(self.lora_B.weight.shape) / self.scaling)
            self.lora_A.weight.copy_(down.reshape(self.lora_A.weight.shape))


class LoraConv(LoraLinear):
    """LoRA for `nn.Conv1d/2d/3d`: A is a conv with the base's kernel, B a 1x1 conv (PEFT's layout).

    A (`r` channels, groups=1) takes the base's kernel size, stride, padding, dilation
    and padding mode, so `B * A` composes into one kernel of the base's shape:
    `delta[o, i, k...] = s sum_r B[o, r] A[r, i, k...]`. With `groups = g > 1`, B is
    grouped like the base (rank divisible by g), as in PEFT; since A mixes all input
    channels, that update has no kernel in the base's grouped layout, so such an
    adapter trains, saves and loads but cannot be merged.
    """

    stackable = False  # its delta acts through a convolution, not `x @ (up @ down).T`

    def build(self, base_layer: nn.Module, r: int, bias: bool) -> None:
        groups = base_layer.groups
        if r % groups:
            raise UnsupportedModuleError(
                f"LoRA on a {type(base_layer).__name__} with groups={groups} needs a rank divisible by {groups} "
                f"(B is grouped like the base layer), got r={r}."
            )
        conv = _CONV_TYPES[base_layer.weight.dim() - 2]
        self.lora_A = conv(
            base_layer.in_channels,
            r,
            base_layer.kernel_size,
            base_layer.stride,
            base_layer.padding,
            base_layer.dilation,
            bias=False,
            padding_mode=base_layer.padding_mode,
        )
        self.lora_B = conv(r, base_layer.out_channels, 1, groups=groups, bias=bias)

    def project_up(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The conv module's own functional form (its stride, padding and groups) with another kernel.
        return self.lora_B._conv_forward(hidden, weight, bias)

    def _require_ungrouped(self) -> None:
        if self.lora_B.groups > 1:
            raise MergeError(
                f"LoRA on a convolution with groups={self.lora_B.groups} is not a change of its grouped kernel "
                "(A mixes every input channel), so it cannot be merged or combined; keep it unmerged."
            )

    def delta_weight(self) -> torch.Tensor:
        self._require_ungrouped()
        up, down = super().low_rank_factors()
        return (up @ down).view(self.lora_B.out_channels, *self.lora_A.weight.shape[1:])

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_ungrouped()
        return super().low_rank_factors()


class LoraEmbedding(LowRankAdapter):
    """LoRA for `nn.Embedding`: a low-rank lookup table `A[:, ids]` mapped up by B."""

    def __init__(
        self, base_layer: nn.Embedding, r: int, scaling: float, dropout: float, init: str, bias: bool = False
    ) -> None:
        super().__init__()
        if bias:
            raise UnsupportedModuleError(
                f"lora_bias=True is not supported on {type(base_layer).__name__} (as in PEFT); "
                "use it on linear or convolution layers only."
            )
        self.r = r
        self.scaling = scaling
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base_layer.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.empty(base_layer.embedding_dim, r))
        nn.init.normal_(self.lora_embedding_B)
        device, dtype = adapter_placement(base_layer)
        self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, base_output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        rows = F.embedding(
            x,
            self.lora_embedding_A.T,
            base_layer.padding_idx,
            base_layer.max_norm,
            base_layer.norm_type,
            base_layer.scale_grad_by_freq,
            base_layer.sparse,
        )
        # Scaled embeddings (Gemma's) multiply the looked-up rows, so a merged delta is scaled too.
        # Both factors are scalars: applied once, to the rank-r rows rather than the full width.
        embed_scale = getattr(base_layer, "embed_scale", None)
        factor = self.scaling if embed_scale is None else self.scaling * embed_scale.to(rows.dtype)
        return ((rows * factor) @ self.lora_embedding_B.T).to(base_output.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A) * self.scaling

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_B, self.lora_embedding_A * self.scaling

    def set_low_rank_factors(self, up: torch.Tensor, down: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_embedding_B.copy_(up / self.scaling)
            self.lora_embedding_A.copy_(down)


class LoraMultiheadAttention(ParameterAdapter, LoraLinear):
    """LoRA for `nn.MultiheadAttention` (query, key and value of one width): both of its projections.

        in_proj_weight  [3E, E] -> in_proj_weight + s B A
        out_proj.weight [E, E]  -> out_proj.weight + s B' A'

    The attention reads both weights itself (it never calls `out_proj`), so the update
    is a change of parameters for the call (PEFT merges before each forward and
    unmerges after). A and B train the packed q/k/v projection; the out projection's
    pair sits at `base_layer.out_proj`, where PEFT's wrapper keeps it, so the
    state-dict keys are PEFT's. PEFT 0.21 adds the out-projection update twice
    (huggingface/peft#3774, open); it is added once here, so the two agree on the
    in-projection and differ by that factor on the out-projection. Dropout has no
    input to act on here and a bias on B none to sit in, so they are refused.
    """

    stackable = False  # it changes parameters for the call: no output of its own to stack

    def __init__(
        self, base_layer: nn.Module, r: int, scaling: float, dropout: float, init: str, bias: bool = False
    ) -> None:
        if base_layer.in_proj_weight is None or dropout or bias:
            raise UnsupportedModuleError(
                "LoRA on nn.MultiheadAttention needs query, key and value of the embedding width (one packed "
                "in_proj_weight), dropout=0 and lora_bias=False; got "
                f"kdim={base_layer.kdim}, vdim={base_layer.vdim}, embed_dim={base_layer.embed_dim}, "
                f"dropout={dropout}, lora_bias={bias}."
            )
        super().__init__(base_layer, r, scaling, dropout, init, bias)
        self.base_layer = nn.ModuleDict({"out_proj": LoraLinear(base_layer.out_proj, r, scaling, 0.0, init)})

    def build(self, base_layer: nn.Module, r: int, bias: bool) -> None:
        self.lora_A = nn.Linear(base_layer.embed_dim, r, bias=False)
        self.lora_B = nn.Linear(r, 3 * base_layer.embed_dim, bias=False)

    def parameter_deltas(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        return {"in_proj_weight": self.delta_weight(), "out_proj.weight": self.base_layer["out_proj"].delta_weight()}


class LoraParameter(ParameterAdapter, LoraLinear):
    """LoRA on one bare `nn.Parameter` of a module (PEFT's `target_parameters`), e.g. fused MoE experts.

    A 2-D parameter `[out, in]` gets `W + s B A`. A 3-D one stacks `E` experts,
    `[E, out, in]` (or `[E, in, out]` when its module says `is_transposed`, as
    transformers' expert modules do); A `[E r, in]` and B `[out, E r]` hold one rank-r
    pair per expert, laid out as PEFT lays them out:

        delta[e] = s B[:, (j, e)] A[(e, j), :]   (j over the rank; B's columns expert-minor)

    Several parameters of one module nest as PEFT nests its wrappers: the one targeted
    later holds the earlier one's adapter at `base_layer`, so the keys are PEFT's
    (`experts.lora_A.weight`, `experts.base_layer.lora_A.weight`, ...).
    """

    stackable = False  # it changes parameters for the call: no output of its own to stack

    selected_by_target_modules = False

    def __init__(
        self,
        module: nn.Module,
        parameter_name: str,
        r: int,
        scaling: float,
        init: str,
        inner: LoraParameter | None = None,
    ) -> None:
        shape = module.get_parameter(parameter_name).shape
        if len(shape) not in (2, 3):
            raise UnsupportedModuleError(
                f"target_parameters needs a 2-D [out, in] or 3-D [experts, ...] parameter; "
                f"{parameter_name!r} of {type(module).__name__} has shape {tuple(shape)}."
            )
        self.parameter_name = parameter_name
        self.transposed = len(shape) == 3 and bool(getattr(module, "is_transposed", False))
        super().__init__(module, r, scaling, 0.0, init)
        if inner is not None:
            self.base_layer = inner

    def build(self, base_layer: nn.Module, r: int, bias: bool) -> None:
        shape = base_layer.get_parameter(self.parameter_name).shape
        self.experts = shape[0] if len(shape) == 3 else 1
        out_features, in_features = (shape[-1], shape[-2]) if self.transposed else (shape[-2], shape[-1])
        self.lora_A = nn.Linear(in_features, r * self.experts, bias=False)
        self.lora_B = nn.Linear(r * self.experts, out_features, bias=False)

    def delta_weight(self) -> torch.Tensor:
        if self.experts == 1:
            return super().delta_weight()
        down = self.lora_A.weight.view(self.experts, self.r, -1)  # (expert, rank, in)
        up = self.lora_B.weight.view(-1, self.r, self.experts)  # (out, rank, expert)
        layout = "e i o" if self.transposed else "e o i"
        return torch.einsum(f"o r e, e r i -> {layout}", up, down) * self.scaling

    def parameter_deltas(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        inner = self._modules.get("base_layer")
        return {**(inner.parameter_deltas(base_layer) if inner else {}), self.parameter_name: self.delta_weight()}
