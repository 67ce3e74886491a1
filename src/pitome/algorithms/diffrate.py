"""DiffRate's inference step with a fixed prune / merge schedule (Chen et al., ICCV 2023).

Tokens are ordered by the attention the class token pays them (mean over heads). Of the r tokens a block
removes, p are pruned: the p least attended are dropped; the other r - p, the least attended of those left,
are each merged into their most similar kept token (cosine of the metric; protected tokens such as the class
token are never destinations). The kept tokens are laid out by attention, as DiffRate re-sorts them.

DiffRate learns the per-block prune and merge counts with a differentiable search; that search is not
implemented. The split of each block's budget r comes from ``prune_fraction`` (one value, or one per block
through ``pitome.patch(..., prune_fraction=[...])``); the default 0 merges everything, as the official
initialisation from a keep-ratio (``init_kept_num_using_ratio``) does.
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import torch
from torch import Tensor

from ..plan import MergePlan, build_plan
from ._attention import attention_ranking
from ._matching import cosine
from .base import MergeAlgorithm, MergeRequest, register

__all__ = ["DiffRate"]


@register
class DiffRate(MergeAlgorithm):
    """prune_fraction: share of each block's budget that is pruned (rounded half up); the rest is merged."""

    name: ClassVar[str] = "diffrate"
    needs_attention: ClassVar[bool] = True
    summary: ClassVar[str] = "DiffRate inference: [CLS]-attention order, prune the least attended, merge the next into kept tokens"

    prune_fraction: float = 0.0

    def __post_init__(self) -> None:
        value = self.prune_fraction
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"prune_fraction must be a number in [0, 1], got {value!r}")

    def max_removable(self, candidates: "Tensor | int") -> "Tensor | int":
        """Everything but one kept token (a merge destination)."""
        return self.all_but_one(candidates)

    def split_budget(self, r: Tensor) -> Tensor:
        """Tokens pruned out of r (the rest is merged)."""
        return torch.floor(r.to(torch.float64) * float(self.prune_fraction) + 0.5).to(torch.long).clamp(max=r)

    def plan(self, request: MergeRequest) -> MergePlan:
        _, cand, positions, _, rank, count, r = attention_ranking(request, self.name)
        tokens = cand.shape[1]
        pruned = self.split_budget(r)
        kept = cand & (rank < count - r)
        dropped = cand & (rank >= count - pruned)
        merging = cand & ~kept & ~dropped
        sim = cosine(request).masked_fill(~kept.unsqueeze(1), float("-inf"))
        pick = sim.argmax(dim=-1)
        target = torch.where(merging, pick, positions)
        target = torch.where(dropped, -1, target)
        key = torch.where(cand, rank.to(torch.float32), 2 * tokens + positions.to(torch.float32))
        return build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors(),
                          min_survivors=request.fewest_survivors())
