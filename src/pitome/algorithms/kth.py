"""ToMe's k-th split (Bolya et al., ICLR 2023): every k-th mergeable token goes to set B, the rest to A.

Each A token finds its most similar B token (cosine of the metric); the r A tokens with the most similar
match merge into it. k = 2 is ToMe's alternating split; a larger k makes B smaller, so one step can remove
up to T - T // k tokens (ToMe offers it for removing many tokens at once).

This file also holds the split-and-match helpers the other bipartite baselines (tofu, random, mctf) share:
they work on the full (B, T, T) score matrix with masks, which keeps padding and frozen tokens out of the
matching without re-laying out the tokens.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..plan import MergePlan, build_plan
from .base import MergeAlgorithm, MergeRequest, sorted_desc, unit_rows
from .pitome import inverse_permutation

__all__ = ["KthSplit", "candidates_or_all", "candidate_rank", "match_into", "bipartite_key", "cosine"]


def candidates_or_all(request: MergeRequest) -> Tensor:
    """(B, T) bool: tokens that may merge or receive merges (not padding, not frozen)."""
    cand = request.candidates
    if cand is None:
        batch, n, _ = request.metric.shape
        cand = torch.ones(batch, n - request.num_protected, dtype=torch.bool, device=request.metric.device)
    return cand


def candidate_rank(cand: Tensor) -> Tensor:
    """Position of each token among the candidates of its sample (0, 1, ...); -1 for non-candidates."""
    return torch.where(cand, torch.cumsum(cand.to(torch.long), dim=1) - 1, -1)


def cosine(request: MergeRequest) -> Tensor:
    """(B, T, T) float32 cosine similarities of the mergeable tokens."""
    k = unit_rows(request.mergeable_metric)
    return k @ k.transpose(1, 2)


def match_into(score: Tensor, src: Tensor, dst: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Every ``src`` token picks its best ``dst`` token by ``score`` (B, T, T); the r sources with the best
    picks merge (ties: lower position first).

    Returns target (B, T): the destination for merged sources, the token itself otherwise; and the merged
    mask. The caller guarantees r <= number of sources and at least one destination per sample.
    """
    tokens = score.shape[1]
    masked = score.masked_fill(~dst.unsqueeze(1), float("-inf"))
    best, pick = masked.max(dim=-1)
    best = best.masked_fill(~src, float("-inf"))
    merged = (inverse_permutation(sorted_desc(best)) < r.unsqueeze(1)) & src
    positions = torch.arange(tokens, device=score.device).expand_as(pick)
    return torch.where(merged, pick, positions), merged


def bipartite_key(in_b: Tensor, cand: Tensor) -> Tensor:
    """Output order as ToMe: unmerged A tokens by position, then B tokens, then non-candidates."""
    tokens = in_b.shape[1]
    positions = torch.arange(tokens, device=in_b.device, dtype=torch.float32).expand(in_b.shape)
    key = positions + tokens * in_b.to(torch.float32)
    return torch.where(cand, key, 2 * tokens + positions)


def kth_split(cand: Tensor, k: int) -> Tensor:
    """(B, T) bool: B = candidates whose rank among candidates is k-1, 2k-1, ... (k = 2: odd ranks, as ToMe)."""
    rank = candidate_rank(cand)
    return cand & (rank % k == k - 1)


def check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass
class KthSplit(MergeAlgorithm):
    """k: every k-th mergeable token is a destination (B); k = 2 is ToMe's alternating split."""

    name: ClassVar[str] = "kth"
    summary: ClassVar[str] = "ToMe's k-th split: every k-th token is a destination, best-match merging"

    k: int = 4

    def __post_init__(self) -> None:
        check_int(self.k, "k", 2)

    def max_removable(self, candidates: "Tensor | int") -> "Tensor | int":
        """All of A (T - T // k), as long as B is not empty."""
        if isinstance(candidates, Tensor):
            return torch.where(candidates >= self.k, candidates - candidates // self.k, 0)
        return candidates - candidates // self.k if candidates >= self.k else 0

    def plan(self, request: MergeRequest) -> MergePlan:
        cand = candidates_or_all(request)
        in_b = kth_split(cand, self.k)
        target, _ = match_into(cosine(request), cand & ~in_b, in_b, request.r)
        key = bipartite_key(in_b, cand)
        return build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors())
