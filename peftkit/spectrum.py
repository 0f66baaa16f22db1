"""The linear algebra of a low-rank weight update: what `peftkit.analysis` measures, on plain tensors.

For `ΔW = up @ down` (`up` out x r, `down` r x in, LoRA's `s·B` and `A`) the SVD comes
from the factors, never from the dense out x in matrix:

    up = Q1 R1,  down^T = Q2 R2   (thin QR)   =>   ΔW = Q1 (R1 R2^T) Q2^T,
    R1 R2^T = U' S V'^T  (r x r)              =>   ΔW = (Q1 U') S (Q2 V')^T,

which costs O((out + in) r^2) instead of O(out · in · min(out, in)). The measures follow
Hu et al., 2021 (https://arxiv.org/abs/2106.09685), section 7: the subspace similarity
φ and the amplification factor; Roy & Vetterli, 2007 for the entropy-based effective
rank; Shuttleworth et al., 2024 (https://arxiv.org/abs/2410.21228), Algorithm 1, for
intruder dimensions.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "LowRankSVD",
    "factored_svd",
    "effective_rank",
    "entropy_rank",
    "subspace_similarity",
    "amplification",
    "intruder_dimensions",
]


@dataclasses.dataclass(frozen=True)
class LowRankSVD:
    """`ΔW = u @ diag(s) @ v.T`: `u` out x r and `v` in x r with orthonormal columns, `s` descending."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor

    @property
    def frobenius(self) -> float:
        return float(torch.linalg.vector_norm(self.s))

    def dense(self) -> torch.Tensor:
        return (self.u * self.s) @ self.v.T

    def truncated(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) of the best rank-`rank` approximation (Eckart-Young), the singular values split evenly."""
        root = self.s[:rank].sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.v[:, :rank].T


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> LowRankSVD:
    """The thin SVD of `up @ down` through QR of the factors (float64, so it matches a dense SVD to ~1e-12)."""
    q_up, r_up = torch.linalg.qr(up.detach().to(torch.float64))
    q_down, r_down = torch.linalg.qr(down.detach().to(torch.float64).T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return LowRankSVD(q_up @ u, s, q_down @ vh.T)


def effective_rank(s: torch.Tensor, energy: float) -> int:
    """The fewest singular values whose squares hold `energy` (e.g. 0.99) of `sum s^2`; 0 for a zero update."""
    power = s.to(torch.float64) ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0
    held = torch.cumsum(power, 0) / total
    # The tolerance keeps a rank-k update at k when rounding leaves its cumulative share at 0.99999...
    return int(torch.searchsorted(held, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def entropy_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: `exp(H(p))`, `p = s / sum(s)`; between 1 and the count of nonzero values."""
    s = s.to(torch.float64)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def subspace_similarity(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ||V1[:, :i]^T V2[:, :j]||_F^2 / min(i, j) for every i <= r1, j <= r2 (Hu et al., eq. 4).

    1 where one span holds the other, 0 for orthogonal spans. Entry `[i-1, j-1]` is φ(i, j).
    """
    overlap = (v1.to(torch.float64).T @ v2.to(torch.float64)) ** 2
    summed = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, v1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, v2.shape[1] + 1, dtype=torch.float64)[None, :]
    return summed / torch.minimum(i, j)


def amplification(delta: LowRankSVD, weight: torch.Tensor) -> float:
    """||ΔW||_F / ||U^T W V||_F, U and V the singular directions of ΔW (Hu et al., section 7.3).

    How much ΔW amplifies the directions W already has in ΔW's subspace: large when the
    update emphasises directions W barely uses. Infinite when W has nothing there.
    """
    projected = delta.u.T.to(weight.dtype) @ weight @ delta.v.to(weight.dtype)
    norm = float(torch.linalg.matrix_norm(projected.to(torch.float64)))
    return delta.frobenius / norm if norm > 0 else float("inf")


def intruder_dimensions(
    base_u: torch.Tensor, tuned_u: torch.Tensor, k: int, threshold: float
) -> tuple[int, list[float]]:
    """How many of the top-`k` left singular vectors of the tuned weight are intruders, and each one's best match.

    A tuned singular vector is an intruder when its cosine similarity with every
    singular vector of the base weight (the columns of `base_u`) is below `threshold`
    (Shuttleworth et al., Algorithm 1).
    """
    best = (tuned_u[:, :k].T.to(base_u.dtype) @ base_u).abs().amax(dim=1)
    return int((best < threshold).sum()), [float(x) for x in best]
