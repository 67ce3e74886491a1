"""CrossGET's complete-graph soft matching (Shi et al., ICML 2024), without the cross-modal guidance.

Unlike bipartite matching, every token may be a source or a destination. With S the cosine similarities and
the diagonal removed (S - I), tokens are ranked by their best similarity to any other token; a token may only
merge into a token ranked after it (CrossGET's triangular mask, which also stops both members of a mutually
most-similar pair from leaving). The r tokens with the best such match become sources, and each merges into
its most similar later-ranked token that is not itself a source, so no token is both (no chains) and every
merge is scored and applied on the same tokens (the official PiToMe copy scores a permuted order but indexes
the unpermuted tokens).

Not implemented: the "cross-guided" part (importance from the other modality's learnable tokens, which needs
a dual encoder wired through the adapter); the matching here is CrossGET's single-modality step.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..plan import MergePlan, build_plan
from ._matching import candidates_or_all, cosine, inverse_permutation
from .base import MergeAlgorithm, MergeRequest, register, sorted_desc

__all__ = ["CrossGET"]


@register
class CrossGET(MergeAlgorithm):
    """No options: the budget comes from the schedule."""

    name: ClassVar[str] = "crossget"
    summary: ClassVar[str] = "CrossGET complete-graph soft matching (single modality), no chains"

    def plan(self, request: MergeRequest) -> MergePlan:
        cand = candidates_or_all(request)
        batch, tokens = cand.shape
        positions = torch.arange(tokens, device=cand.device)
        sim = cosine(request)
        pairs = cand.unsqueeze(2) & cand.unsqueeze(1) & ~torch.eye(tokens, dtype=torch.bool, device=cand.device)
        sim = sim.masked_fill(~pairs, float("-inf"))
        best = sim.max(dim=-1).values.masked_fill(~cand, float("-inf"))
        rank = inverse_permutation(sorted_desc(best))
        sim = sim.masked_fill(rank.unsqueeze(1) <= rank.unsqueeze(2), float("-inf"))  # only later-ranked tokens
        score = sim.max(dim=-1).values.masked_fill(~cand, float("-inf"))
        source = cand & (inverse_permutation(sorted_desc(score)) < request.r.unsqueeze(1))
        pick = sim.masked_fill(source.unsqueeze(1), float("-inf")).argmax(dim=-1)
        target = torch.where(source, pick, positions.expand(batch, tokens))
        key = positions.to(torch.float32).expand(batch, tokens)
        key = torch.where(cand, key, 2 * tokens + key)
        return build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors(),
                          min_survivors=request.fewest_survivors())
