"""ToMe: bipartite soft matching (Bolya et al., ICLR 2023), written from the paper's description.

As published, the tokens alternate into sets A and B over the *whole* sequence, protected tokens included: the
class token is token 0, so it is in A and the first patch token is in B (a distillation token, token 1, is in B).
Protected tokens neither merge nor receive merges. Each A token draws an edge to its most similar B token
(cosine of the metric); the r most similar edges merge. Concatenating the sets back gives ToMe's output order:
the unmerged A tokens, then B. With a class token ToMe lays the unmerged A tokens out by position (it sorts them
so the class token stays first); without one it leaves them in edge-score order (most similar edge first).
Differences we keep on purpose: protected tokens always keep their leading slots (ToMe's code moves a
distillation token behind the unmerged A tokens), and r is capped at half the mergeable tokens as ToMe does.
With padding, positions count real tokens only, so a padded sequence splits exactly as the same sequence alone.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor

from ..plan import MergePlan, build_plan, layout_plan, stable_argsort
from ._matching import best_edges, inverse_permutation
from .base import MergeAlgorithm, MergeRequest, register, sorted_desc, unit_rows

__all__ = ["ToMe", "bipartite_soft_matching"]


def bipartite_soft_matching(k: Tensor, r: Tensor, cand_sorted: Optional[Tensor],
                            num_protected: int) -> tuple[Tensor, Tensor]:
    """Targets and output keys for unit rows ``k`` (B, T) of the mergeable tokens, candidates first.

    Token i of k is token ``num_protected + i`` of the sequence, so it is in A when that index is even.
    Returns target (B, T) and order key (B, T) in that layout.
    """
    batch, tokens, _ = k.shape
    device = k.device
    first_a = num_protected % 2
    a, b = k[:, first_a::2], k[:, 1 - first_a :: 2]
    scores = a @ b.transpose(1, 2)
    if cand_sorted is not None:
        scores = scores.masked_fill(~cand_sorted[:, 1 - first_a :: 2].unsqueeze(1), float("-inf"))
    node_max, node_arg = scores.max(dim=-1)
    if cand_sorted is not None:
        node_max = node_max.masked_fill(~cand_sorted[:, first_a::2], float("-inf"))
    edge_rank = inverse_permutation(sorted_desc(node_max))
    merged = edge_rank < r.unsqueeze(1)
    positions = torch.arange(tokens, device=device)
    pos_a, pos_b = positions[first_a::2], positions[1 - first_a :: 2]
    target = positions.repeat(batch, 1)
    target[:, first_a::2] = torch.where(merged, pos_b[node_arg], pos_a)
    in_b = (positions % 2 != first_a).to(torch.float32)
    key = (positions.to(torch.float32) + tokens * in_b).repeat(batch, 1)
    if num_protected == 0:  # no class token: unmerged A tokens stay in edge-score order
        key[:, first_a::2] = edge_rank.to(torch.float32)
    return target, key


def _bipartite_layout(k: Tensor, r: int, num_protected: int) -> MergePlan:
    """``bipartite_soft_matching`` + ``build_plan`` when nothing is padded and every sample removes the same r:
    the plan straight from the matching (the A / B split is fixed, so laying it out needs one small sort)."""
    batch, tokens, _ = k.shape
    h = num_protected
    first_a = h % 2
    a, b = k[:, first_a::2], k[:, 1 - first_a :: 2]
    edges, best = best_edges(a @ b.transpose(1, 2), r)
    a_seq = edges * 2 + (h + first_a)  # A tokens by descending best match, as sequence indices
    kept = a_seq[:, r:].sort(dim=1).values if h > 0 else a_seq[:, r:]  # with a class token: by position
    b_seq = torch.arange(h + 1 - first_a, h + tokens, 2, device=k.device).expand(batch, -1)
    head = torch.arange(h, device=k.device).expand(batch, h)
    keep = torch.cat([head, kept, b_seq], dim=1)
    return layout_plan(keep, a_seq[:, :r], best + (h + a.shape[1] - r), h + tokens)


@register
class ToMe(MergeAlgorithm):
    """No options: the budget comes from the schedule (fixed r as ToMe, or a keep-ratio)."""

    name: ClassVar[str] = "tome"
    summary: ClassVar[str] = "ToMe: bipartite soft matching, r best edges, size-weighted average"

    def plan(self, request: MergeRequest) -> MergePlan:
        k = unit_rows(request.mergeable_metric)
        batch, tokens, _ = k.shape
        h = request.num_protected
        cand = request.candidates
        if cand is None and request.r_min == request.r_max:  # no padding, one r: the layout is known
            return _bipartite_layout(k, request.r_max, h)
        if cand is None:
            target, key = bipartite_soft_matching(k, request.r, None, h)
        else:
            # candidates first, in their own order; the rest (padding, frozen) after, never matched
            perm = stable_argsort((~cand).to(torch.int8), dim=1)
            k_sorted = k.gather(1, perm.unsqueeze(-1).expand_as(k))
            target_p, key_p = bipartite_soft_matching(k_sorted, request.r, cand.gather(1, perm), h)
            target = torch.empty_like(target_p)
            target.scatter_(1, perm, perm.gather(1, target_p))
            key = torch.empty_like(key_p)
            key.scatter_(1, perm, key_p)
            positions = torch.arange(tokens, device=k.device, dtype=key.dtype)
            key = torch.where(cand, key, 2 * tokens + positions)
        return build_plan(target, key, h, request.valid, max_survivors=request.survivors(),
                          min_survivors=request.fewest_survivors())
