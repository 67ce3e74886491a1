"""ToMe's k-th split (Bolya et al., ICLR 2023): every k-th token of the sequence goes to set B, the rest to A.

Indices count the protected tokens in front (as ToMe's split of the whole sequence) but never merge them. Each A
token finds its most similar B token (cosine of the metric); the r A tokens with the most similar match merge
into it. k = 2 is ToMe's alternating split; a larger k makes B smaller, so one step can remove up to
T - ceil(T / k) tokens, whatever the offset (ToMe offers it for removing many tokens at once).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..plan import MergePlan, build_plan
from ._matching import bipartite_key, candidates_or_all, check_int, cosine, kth_split, match_into
from .base import MergeAlgorithm, MergeRequest, register

__all__ = ["KthSplit"]


@register
class KthSplit(MergeAlgorithm):
    """k: every k-th token is a destination (B); k = 2 is ToMe's alternating split."""

    name: ClassVar[str] = "kth"
    summary: ClassVar[str] = "ToMe's k-th split: every k-th token is a destination, best-match merging"

    k: int = 4

    def __post_init__(self) -> None:
        check_int(self.k, "k", 2)

    def max_removable(self, candidates: "Tensor | int") -> "Tensor | int":
        """All of A, T - ceil(T / k) (A's size for any offset of the split), as long as B is not empty."""
        if isinstance(candidates, Tensor):
            return torch.where(candidates >= self.k, candidates - (candidates + self.k - 1) // self.k, 0)
        return candidates - (candidates + self.k - 1) // self.k if candidates >= self.k else 0

    def plan(self, request: MergeRequest) -> MergePlan:
        cand = candidates_or_all(request)
        in_b = kth_split(cand, self.k, request.num_protected)
        target, _ = match_into(cosine(request), cand & ~in_b, in_b, request.r)
        key = bipartite_key(in_b, cand)
        return build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors(),
                          min_survivors=request.fewest_survivors())
