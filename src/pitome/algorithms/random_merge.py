"""Random merging, the reference point every informed method has to beat.

The mergeable tokens are split at random into A (ceil(T/2)) and B (floor(T/2)); r A tokens merge into B tokens.
``match='random'``: the first r A tokens in the random order each merge into a random B token (no similarity
at all). ``match='similar'``: ToMe's rule on the random split (each A token picks its most similar B token,
the r best edges merge), i.e. ToMe with a random instead of an alternating partition.

Randomness comes from the merge state's generator (``pitome.patch(..., seed=...)``) or, without one, from a
generator seeded with ``seed + layer``, so a forward is deterministic either way. One random draw per token
position is shared by the whole batch, so a batch merges like each of its samples alone.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..plan import MergePlan, build_plan, stable_argsort
from ._matching import bipartite_key, candidates_or_all, check_choice, check_int, cosine, inverse_permutation, match_into
from .base import MergeAlgorithm, MergeRequest, register

__all__ = ["RandomMerge"]

MATCHES = ("random", "similar")


@register
class RandomMerge(MergeAlgorithm):
    """match: 'random' (random pairs) or 'similar' (best match on a random split); seed: used without a
    generator from ``patch(seed=...)``."""

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "random bipartite split and random pairs (reference point), seeded"

    match: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.match, "match", MATCHES)
        check_int(self.seed, "seed", 0)

    def _draws(self, request: MergeRequest, tokens: int) -> tuple[Tensor, Tensor]:
        gen = request.generator
        if gen is None:
            gen = torch.Generator().manual_seed(self.seed + request.layer)
        device = request.metric.device
        draws = torch.rand(tokens, 2, generator=gen, device=gen.device).to(device)  # prefix-stable in tokens
        return draws[:, 0], draws[:, 1]

    def plan(self, request: MergeRequest) -> MergePlan:
        cand = candidates_or_all(request)
        batch, tokens = cand.shape
        u, v = self._draws(request, tokens)
        order = stable_argsort(torch.where(cand, u.expand(batch, tokens), 2.0), dim=1)
        rank = inverse_permutation(order)  # random rank among candidates; non-candidates last
        count = cand.sum(dim=1, keepdim=True)
        n_a = count - count // 2
        in_b = cand & (rank >= n_a)
        src = cand & ~in_b
        if self.match == "similar":
            target, _ = match_into(cosine(request), src, in_b, request.r)
        else:
            merged = src & (rank < request.r.unsqueeze(1))
            n_b = (count // 2).clamp_min(1)
            dst_rank = (n_a + (v.expand(batch, tokens) * n_b).long().clamp_max(n_b - 1)).clamp_max(tokens - 1)
            positions = torch.arange(tokens, device=cand.device).expand(batch, tokens)
            target = torch.where(merged, order.gather(1, dst_rank), positions)
        key = bipartite_key(in_b, cand)
        return build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors(),
                          min_survivors=request.fewest_survivors())
