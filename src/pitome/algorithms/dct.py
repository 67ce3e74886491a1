"""DCT token reduction, as the Fourier Transformer does it (He et al., ACL 2023).

The mergeable tokens are a sequence: take its DCT-II along the token axis (orthonormal), keep the T - r lowest
frequencies and apply the inverse DCT of that length, which gives T - r tokens that follow the sequence's
low-frequency content. This is a fixed linear map M = C_{T-r}^T C_T[:T-r] (C_n: orthonormal DCT-II matrix of
size n), not an assignment, so the plan carries it as a dense ``mix`` (see ``MergePlan``): features = M x,
sizes are shared out in proportion to |M| (totals preserved), source maps record for each input token the output
it contributes most to. Protected tokens pass through; so do frozen and padding tokens, laid out after the
transformed ones (frozen first), and each sample of a padded batch is transformed over its own real tokens.

``norm='ortho'`` (default) uses the orthonormal pair as described, which scales a constant sequence by
sqrt(T / (T - r)); ``norm='mean'`` multiplies by sqrt((T - r) / T) so a constant sequence stays constant
(a plain resampling, kinder to pretrained models used off the shelf). The dtype of the features is kept
(the official PiToMe code casts the output to float16, and counts DCT's FLOPs after the block; neither is copied).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
from torch import Tensor

from ..plan import MergePlan
from ._matching import candidates_or_all, check_choice
from .base import MergeAlgorithm, MergeRequest, register

__all__ = ["DCT", "dct_matrix", "reduction_matrix"]

NORMS = ("ortho", "mean")


def dct_matrix(n: int) -> Tensor:
    """(n, n) float64 orthonormal DCT-II: row k is the k-th cosine basis vector (C @ C.T = I)."""
    i = torch.arange(n, dtype=torch.float64)
    k = i.unsqueeze(1)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


@functools.lru_cache(maxsize=256)
def reduction_matrix(n: int, m: int, norm: str = "ortho") -> Tensor:
    """(m, n) float32 map from n tokens to m <= n: inverse DCT (length m) of the m lowest DCT (length n) coefficients."""
    if not 1 <= m <= n:
        raise ValueError(f"DCT reduction needs 1 <= kept <= tokens, got kept={m}, tokens={n}")
    if m == n:
        return torch.eye(n)
    mat = dct_matrix(m).T @ dct_matrix(n)[:m]
    if norm == "mean":
        mat = mat * math.sqrt(m / n)
    return mat.to(torch.float32)


@register
class DCT(MergeAlgorithm):
    """norm: 'ortho' (orthonormal DCT pair, as described) or 'mean' (rescaled so constants stay constant)."""

    name: ClassVar[str] = "dct"
    summary: ClassVar[str] = "DCT (Fourier Transformer): keep the low frequencies along the token axis"

    norm: str = "ortho"

    def __post_init__(self) -> None:
        check_choice(self.norm, "norm", NORMS)

    def max_removable(self, candidates: "Tensor | int") -> "Tensor | int":
        """Down to a single (DC) coefficient."""
        return self.all_but_one(candidates)

    def plan(self, request: MergeRequest) -> MergePlan:
        head = request.num_protected
        device = request.metric.device
        batch, n_in, _ = request.metric.shape
        tokens = n_in - head
        if request.candidates is None and request.r_min == request.r_max:
            core = reduction_matrix(tokens, tokens - request.r_max, self.norm).to(device)
            mix = torch.zeros(1, n_in - request.r_max, n_in, device=device)
            mix[0, :head, :head] = torch.eye(head, device=device)
            mix[0, head:, head:] = core
            return _plan_from_mix(mix.expand(batch, -1, -1))
        return _plan_from_mix(self._padded_mix(request))

    def _padded_mix(self, request: MergeRequest) -> Tensor:
        """One map per sample: DCT over its candidates, the other tokens passed through after them."""
        head = request.num_protected
        cand = candidates_or_all(request)
        batch, tokens = cand.shape
        real = request.valid if request.valid is not None else torch.ones_like(cand)
        rows = []
        for b, (mask, is_real, r) in enumerate(zip(cand.cpu(), real.cpu(), request.r.cpu().tolist())):
            cols = mask.nonzero().flatten().tolist()
            others = sorted((~mask).nonzero().flatten().tolist(), key=lambda i: (not bool(is_real[i]), i))
            kept = len(cols) - r
            m = torch.zeros(head + kept + len(others), head + tokens)
            m[:head, :head] = torch.eye(head)
            if cols:
                block = reduction_matrix(len(cols), kept, self.norm)
                m[head : head + kept, [head + c for c in cols]] = block
            for j, i in enumerate(others):
                m[head + kept + j, head + i] = 1.0
            rows.append(m)
        width = max(m.shape[0] for m in rows)
        mix = torch.zeros(batch, width, head + tokens)
        for b, m in enumerate(rows):
            mix[b, : m.shape[0]] = m
        return mix.to(request.metric.device)


def _plan_from_mix(mix: Tensor) -> MergePlan:
    """A mix plan whose ``assign`` is the output each input contributes most to (-1 for unused inputs)."""
    mass = mix.abs()
    best, assign = mass.max(dim=1)
    assign = torch.where(best > 0, assign, -1)
    return MergePlan(assign=assign, num_out=mix.shape[1], mix=mix)
