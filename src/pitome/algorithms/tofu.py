"""ToFu: token fusion, pruning early and norm-preserving merging late (Kim et al., WACV 2024).

Both modes use ToMe's bipartite soft matching (alternating split, cosine of the metric, the r best edges).
In the early blocks, where a model reacts badly to averaged tokens, the r matched A tokens are pruned (dropped);
in the later blocks they are merged with MLERP: the (size-weighted) average, rescaled to the largest norm among
the tokens it combines, so merging does not shrink the token norms the following layers expect.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from ..plan import MergePlan, build_plan
from ._matching import bipartite_key, candidates_or_all, check_choice, check_int, cosine, kth_split, match_into
from .base import MergeAlgorithm, MergeRequest, register

__all__ = ["ToFu"]

MODES = ("auto", "prune", "mlerp")


@register
class ToFu(MergeAlgorithm):
    """Options.

    mode:       'auto' (prune before ``merge_from``, MLERP from it on), 'prune' or 'mlerp' in every block.
    merge_from: first block that merges with MLERP in 'auto' mode; None = num_layers // 2 (ToFu: prune in
                the first half). The official PiToMe code prunes up to and including block L // 2
                (``merge_from = L // 2 + 1``).
    """

    name: ClassVar[str] = "tofu"
    summary: ClassVar[str] = "ToFu: ToMe matching; prune in early blocks, norm-preserving merge (MLERP) later"

    mode: str = "auto"
    merge_from: Optional[int] = None

    def __post_init__(self) -> None:
        check_choice(self.mode, "mode", MODES)
        if self.merge_from is not None:
            check_int(self.merge_from, "merge_from", 0)

    def prunes(self, layer: int, num_layers: int) -> bool:
        if self.mode != "auto":
            return self.mode == "prune"
        switch = num_layers // 2 if self.merge_from is None else self.merge_from
        return layer < switch

    def plan(self, request: MergeRequest) -> MergePlan:
        cand = candidates_or_all(request)
        in_b = kth_split(cand, 2, request.num_protected)
        target, merged = match_into(cosine(request), cand & ~in_b, in_b, request.r)
        key = bipartite_key(in_b, cand)
        if self.prunes(request.layer, request.num_layers):
            target = target.masked_fill(merged, -1)
            return build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors(),
                              min_survivors=request.fewest_survivors())
        plan = build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors(),
                          min_survivors=request.fewest_survivors())
        return dataclasses.replace(plan, norm="max")
