"""ToMe: bipartite soft matching (Bolya et al., ICLR 2023), written from the paper.

Mergeable tokens alternate into sets A (even positions) and B (odd positions); each A token finds its most
similar B token; the r A tokens with the most similar match merge into it. Protected tokens never merge
and r is capped at half the mergeable tokens. With padding, positions count real tokens only, so a
padded sequence splits exactly as the same sequence alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..plan import MergePlan, build_plan, stable_argsort
from .base import MergeAlgorithm, MergeRequest, sorted_desc, unit_rows
from .pitome import inverse_permutation

__all__ = ["ToMe", "bipartite_soft_matching"]


def bipartite_soft_matching(k: Tensor, r: Tensor, cand_sorted: Tensor | None) -> tuple[Tensor, Tensor]:
    """Targets and output keys for unit rows ``k`` (B, T, d) laid out with candidates first.

    Returns target (B, T) and order key (B, T) in that layout: unmerged A tokens by position, then B.
    """
    batch, tokens, _ = k.shape
    device = k.device
    a, b = k[:, 0::2], k[:, 1::2]
    scores = a @ b.transpose(1, 2)
    if cand_sorted is not None:
        scores = scores.masked_fill(~cand_sorted[:, 1::2].unsqueeze(1), float("-inf"))
    node_max, node_arg = scores.max(dim=-1)
    if cand_sorted is not None:
        node_max = node_max.masked_fill(~cand_sorted[:, 0::2], float("-inf"))
    merged = inverse_permutation(sorted_desc(node_max)) < r.unsqueeze(1)
    positions = torch.arange(tokens, device=device)
    pos_a, pos_b = positions[0::2], positions[1::2]
    target = positions.repeat(batch, 1)
    target[:, 0::2] = torch.where(merged, pos_b[node_arg], pos_a)
    key = positions.to(torch.float32) + tokens * (positions % 2).to(torch.float32)
    return target, key.expand(batch, tokens)


@dataclass
class ToMe(MergeAlgorithm):
    """No options: the budget comes from the schedule (fixed r as ToMe, or a keep-ratio)."""

    name: ClassVar[str] = "tome"
    summary: ClassVar[str] = "ToMe: bipartite soft matching, r best edges, size-weighted average"

    def plan(self, request: MergeRequest) -> MergePlan:
        k = unit_rows(request.mergeable_metric)
        batch, tokens, _ = k.shape
        cand = request.candidates
        if cand is None:
            target, key = bipartite_soft_matching(k, request.r, None)
        else:
            # candidates first, in their own order; the rest (padding, frozen) after, never matched
            perm = stable_argsort((~cand).to(torch.int8), dim=1)
            k_sorted = k.gather(1, perm.unsqueeze(-1).expand_as(k))
            target_p, key_p = bipartite_soft_matching(k_sorted, request.r, cand.gather(1, perm))
            target = torch.empty_like(target_p)
            target.scatter_(1, perm, perm.gather(1, target_p))
            key = torch.empty_like(key_p)
            key.scatter_(1, perm, key_p)
            positions = torch.arange(tokens, device=k.device, dtype=key.dtype)
            key = torch.where(cand, key, 2 * tokens + positions)
        return build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors())
