"""Helpers for the algorithms that rank tokens by the attention they receive (evit, diffrate, mctf)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._matching import candidates_or_all, inverse_permutation
from .base import MergeRequest, sorted_desc

__all__ = ["mergeable_attention", "AttentionRanking", "attention_ranking"]


def mergeable_attention(request: MergeRequest, name: str) -> Tensor:
    """(B, T) attention of the mergeable tokens (float32, or float64 for float64 inputs); a clear error when the adapter did not supply it."""
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
    att = att[:, request.num_protected :]
    return att if att.dtype == torch.float64 else att.float()  # fp32 at least; float64 stays (exact gradients)


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
