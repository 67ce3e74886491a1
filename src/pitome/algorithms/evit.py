"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022).

Tokens are ranked by the attention the class token pays them (mean over heads). To remove r tokens the
T - r - 1 most attended stay as they are, and the r + 1 least attended are fused into one token: their
average weighted by that attention. EViT appends the fused token as a new one; a merge plan expresses the same
thing as "all inattentive tokens merge into the most attended of them" with plan weights = attention, laid out
after the kept tokens. With ``size_weighted`` (default) the weights are attention x token size.
``fuse=False`` drops the r least attended tokens instead (EViT's ablation without fusion).

This file also holds ``mergeable_attention``, the shared check for algorithms that need attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from ..plan import MergePlan, build_plan
from .base import MergeAlgorithm, MergeRequest, sorted_desc
from .kth import candidates_or_all
from .pitome import inverse_permutation

__all__ = ["EViT", "mergeable_attention", "attention_ranking"]


def mergeable_attention(request: MergeRequest, name: str) -> Tensor:
    """(B, T) float32 attention of the mergeable tokens; a clear error when the adapter did not supply it."""
    att = request.attention
    batch, tokens, _ = request.metric.shape
    if att is None:
        raise ValueError(
            f"algorithm '{name}' needs attention probabilities (request.attention, (B, N) attention received "
            f"from the class token), but none were given. Patched models get them from their adapter (timm ViT "
            f"and Hugging Face adapters supply them for algorithms with needs_attention); when calling plan() "
            f"directly, pass MergeRequest(attention=...)"
        )
    if tuple(att.shape) != (batch, tokens):
        raise ValueError(f"request.attention must have shape (B, N) = {(batch, tokens)}, got {tuple(att.shape)}")
    return att[:, request.num_protected :].float()


class AttentionRanking(NamedTuple):
    """Candidates ranked by the attention they receive (most attended first); shared by EViT and DiffRate."""

    attention: Tensor  # (B, T) float32
    cand: Tensor  # (B, T) bool
    positions: Tensor  # (B, T)
    order: Tensor  # (B, T) token indices, most attended first
    rank: Tensor  # (B, T) rank of each token in that order
    count: Tensor  # (B, 1) number of candidates
    r: Tensor  # (B, 1) tokens to remove


def attention_ranking(request: MergeRequest, name: str) -> AttentionRanking:
    att = mergeable_attention(request, name)
    cand = candidates_or_all(request)
    batch, tokens = cand.shape
    positions = torch.arange(tokens, device=cand.device).expand(batch, tokens)
    order = sorted_desc(att.masked_fill(~cand, float("-inf")))
    return AttentionRanking(att, cand, positions, order, inverse_permutation(order),
                            cand.sum(dim=1, keepdim=True), request.r.unsqueeze(1))


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


@dataclass
class EViT(MergeAlgorithm):
    """fuse: fuse the inattentive tokens into one (True, EViT) or drop them (False)."""

    name: ClassVar[str] = "evit"
    needs_attention: ClassVar[bool] = True
    summary: ClassVar[str] = "EViT: keep the tokens the class token attends to, fuse the rest into one"

    fuse: bool = True

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
            return build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors())
        kept = (count - r - 1).clamp(0, tokens - 1)
        inattentive = cand & (rank >= kept)
        host = order.gather(1, kept)
        target = torch.where(inattentive, host, positions)
        key = torch.where(positions == host, float(tokens), key)  # the fused token after the kept ones
        weight = att.clamp_min(torch.finfo(torch.float32).tiny)
        return build_plan(target, key, request.num_protected, request.valid, weight=weight,
                          max_survivors=request.survivors())
