"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022).

Tokens are ranked by the attention the class token pays them (mean over heads). To remove r tokens the
T - r - 1 most attended stay as they are, and the r + 1 least attended are fused into one token: their
average weighted by that attention. EViT appends the fused token as a new one; a merge plan expresses the same
thing as "all inattentive tokens merge into the most attended of them" with plan weights = attention, laid out
after the kept tokens. With ``size_weighted`` (default) the weights are attention x token size.
``fuse=False`` drops the r least attended tokens instead (EViT's ablation without fusion).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..plan import MergePlan, build_plan
from ._attention import attention_ranking
from ._matching import check_bool
from .base import MergeAlgorithm, MergeRequest, register

__all__ = ["EViT"]


@register
class EViT(MergeAlgorithm):
    """fuse: fuse the inattentive tokens into one (True, EViT) or drop them (False)."""

    fuse: bool = True

    name: ClassVar[str] = "evit"
    needs_attention: ClassVar[bool] = True
    summary: ClassVar[str] = "EViT: keep the tokens the class token attends to, fuse the rest into one"

    def __post_init__(self) -> None:
        check_bool(self.fuse, "fuse")

    def max_removable(self, candidates: "Tensor | int") -> "Tensor | int":
        """Everything but one token (the fused one, or the most attended one without fusion)."""
        return self.all_but_one(candidates)

    def plan(self, request: MergeRequest) -> MergePlan:
        att, cand, positions, order, rank, count, r = attention_ranking(request, self.name)
        tokens = cand.shape[1]
        key = torch.where(cand, rank.to(torch.float32), 2 * tokens + positions.to(torch.float32))
        if not self.fuse:
            target = torch.where(cand & (rank >= count - r), -1, positions)
            return build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors(),
                              min_survivors=request.fewest_survivors())
        kept = (count - r - 1).clamp(0, tokens - 1)
        inattentive = cand & (rank >= kept)
        host = order.gather(1, kept)
        target = torch.where(inattentive, host, positions)
        key = torch.where(positions == host, float(tokens), key)  # the fused token after the kept ones
        weight = att.clamp_min(torch.finfo(torch.float32).tiny)
        return build_plan(target, key, request.num_protected, request.valid, weight=weight,
                          max_survivors=request.survivors(), min_survivors=request.fewest_survivors())
