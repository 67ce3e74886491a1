"""Split-and-match helpers shared by the bipartite algorithms (tome, kth, tofu, random, mctf, crossget, ...).

They work on (B, T) masks over the mergeable tokens (those after the protected ones), which keeps padding and
frozen tokens out of the matching without re-laying out the tokens. Option checks shared by several
algorithms live here too.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .base import MergeRequest, sorted_desc, unit_rows

__all__ = ["inverse_permutation", "best_edges", "candidates_or_all", "candidate_rank", "cosine", "match_into", "bipartite_key",
           "kth_split", "check_int", "check_bool"]


def inverse_permutation(perm: Tensor) -> Tensor:
    """rank[b, perm[b, k]] = k."""
    rank = torch.empty_like(perm)
    rank.scatter_(1, perm, torch.arange(perm.shape[1], device=perm.device).expand_as(perm))
    return rank


def best_edges(scores: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Bipartite soft matching on scores (B, A, B'): A tokens by descending best score (ties: lower index
    first), and the best B' token of the first r of them (ties: lower index). The best score of every row is
    an amax (vectorised; ``max`` with indices is ~10x slower on CPU); arguments only for the r merged rows."""
    edges = sorted_desc(scores.amax(dim=-1))
    merged_rows = scores.gather(1, edges[:, :r].unsqueeze(-1).expand(-1, -1, scores.shape[-1]))
    return edges, merged_rows.argmax(dim=-1)


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
    """Output order: unmerged A tokens by position, then B tokens, then non-candidates."""
    tokens = in_b.shape[1]
    positions = torch.arange(tokens, device=in_b.device, dtype=torch.float32).expand(in_b.shape)
    key = positions + tokens * in_b.to(torch.float32)
    return torch.where(cand, key, 2 * tokens + positions)


def kth_split(cand: Tensor, k: int, num_protected: int) -> Tensor:
    """(B, T) bool: set B = candidates whose index in the sequence is k-1, 2k-1, ..., counting the protected
    tokens in front and real tokens only (padding and frozen tokens take no index). As ToMe, which splits the
    whole sequence: with k = 2 and a class token, the first mergeable token is in B."""
    rank = candidate_rank(cand)
    return cand & ((rank + num_protected) % k == k - 1)


def check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(value: object, name: str, allowed: tuple) -> object:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
