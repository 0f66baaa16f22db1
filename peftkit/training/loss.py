"""Cross-entropy over the output head in chunks of positions, so `tokens x vocabulary` logits never exist at once.

```
 hidden h (N x d) ──► split into chunks of C positions
   chunk k: h_k ──► head(h_k) (C x V) ──► [softcap] ──► sum of CE(z_k, y_k) ──┐
            (the logits are freed at once; recomputed from h_k in backward)   + ──► L = (1/N) sum_k
```

For the positions i of chunk k, with logits z_i = cap(head(h_i)) and cap(u) =
c tanh(u / c) (Gemma's final_logit_softcapping; the identity without it),

    L = (1/N) sum_i [logsumexp(z_i) - z_i[y_i]]
    dL/dz_i = (softmax(z_i) - onehot(y_i)) / N
    dL/du_i = dL/dz_i * (1 - (z_i / c)^2)
    dL/dh_i = J_head(h_i)^T dL/du_i,   dL/dtheta_head = sum_i J_theta(h_i)^T dL/du_i

Every term of the gradient belongs to one position, so it is exact chunk by
chunk: each chunk runs under non-reentrant `torch.utils.checkpoint`, which keeps
only h_k and recomputes z_k in backward with the same RNG and autocast state
(adapter dropout on an adapted head gets the same mask). The head module is
always called, never its weight read, so a LoRA-adapted, TrainableCopy-wrapped,
tied or 4-bit head works as it does in the model's own forward; a bare frozen
4-bit head is called through `peftkit.quant.codec.sliced_forward`, which computes
the same logits but dequantizes a slice of its rows at a time (bitsandbytes would
rebuild the whole head, 1 GB at 128k words, for every chunk). The peak cost of
the loss falls from about 3 N V float32 (logits, log-softmax and its gradient)
to 3 C V, for one more head forward per chunk.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftkit.anatomy import output_head
from peftkit.training.data import IGNORE_INDEX

__all__ = ["AUTO_CHUNK_MIN_VOCAB", "AUTO_CHUNK_ELEMENTS", "CausalLMLoss", "loss_chunk_size", "head_cross_entropy"]

Head = Callable[[torch.Tensor], torch.Tensor]  # an output head module, or a function computing what it does

# `training.loss_chunk_size: null` chunks the loss when the vocabulary has at least this many
# entries, in chunks of AUTO_CHUNK_ELEMENTS // vocabulary positions (128 MiB of float32 logits).
AUTO_CHUNK_MIN_VOCAB = 32768
AUTO_CHUNK_ELEMENTS = 2**25


def loss_chunk_size(configured: int | None, vocab_size: int) -> int:
    """Positions per loss chunk (0 = unchunked): `configured` as given, else the automatic rule."""
    if configured is not None:
        return configured
    return max(1, AUTO_CHUNK_ELEMENTS // vocab_size) if vocab_size >= AUTO_CHUNK_MIN_VOCAB else 0


def _head_call(head: nn.Module) -> Head:
    """The head itself, or for a bare 4-bit head its slice-by-slice forward (a 4-bit head implies bitsandbytes)."""
    if "bitsandbytes" in sys.modules:
        from peftkit.quant.codec import Linear4bit, sliced_forward

        if isinstance(head, Linear4bit):
            return partial(sliced_forward, head)
    return head


def _logits(head: Head, hidden: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = head(hidden)
    if cap:  # Gemma's soft cap, as its own forward applies it
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def _chunk_loss(head: Head, hidden: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    return F.cross_entropy(_logits(head, hidden, cap), targets, reduction="sum")


def head_cross_entropy(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, cap: float | None = None, chunk_size: int = 0
) -> torch.Tensor:
    """Mean cross-entropy of `head(hidden)` (N x d positions) against `targets` (N), in chunks of `chunk_size`.

    `chunk_size` 0 computes the logits of all N positions at once.
    """
    head = _head_call(head)
    if not chunk_size:
        return F.cross_entropy(_logits(head, hidden, cap), targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        stop = start + chunk_size
        total = total + checkpoint(_chunk_loss, head, hidden[start:stop], targets[start:stop], cap, use_reentrant=False)
    return total / targets.numel()


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy over labelled positions.

    Logits are computed only where a label is: with Gemma's 262k-word vocabulary the
    output layer over every position (prompt and padding included) would cost more
    than the rest of the model. Wrapping the model in a module keeps DDP's forward
    hooks on the call that does the work.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 0) -> None:
        super().__init__()
        self.model, self.chunk_size = model, chunk_size  # chunk_size: see peftkit.training.loss

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        body, head = getattr(self.model, "base_model", self.model), output_head(self.model)
        if body is self.model or head is None:  # no separate head: take the model's own logits
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep]
        else:
            hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            return head_cross_entropy(head, hidden[:, :-1][keep], targets[keep], cap, self.chunk_size)
        return F.cross_entropy(logits.float(), targets[keep])
