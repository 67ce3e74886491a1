"""MCTF: multi-criteria token fusion (Lee et al., CVPR 2024), inference step without its training recipe.

The attraction between tokens i and j multiplies three criteria, each raised to 1 / temperature:
  similarity       W_sim  = (cos(x_i, x_j) + 1) / 2
  informativeness  W_info = 1 / (a_i + a_j), a = attention a token receives (mean over heads and queries):
                   tokens nobody attends to carry little information and are fused first
  size             W_size = 1 / (s_i + s_j): tokens that already absorbed many others are fused last
Matching is bidirectional bipartite: with A / B the alternating split, ceil(r/2) A tokens merge into their
most attracted B token, then floor(r/2) B tokens merge into their most attracted remaining A token, scored with
the same attractions (the B tokens that absorbed A tokens in the first pass are not re-scored). Fusion is the
average weighted by attention x size.

Deviations: MCTF's "one-step-ahead" attention (the next block's attention map, computed before the merge) is
replaced by this block's own attention, which the adapter captures on the way; the token-reduction-consistency
fine-tuning is a training recipe and not part of this library.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ..plan import MergePlan, build_plan
from ._attention import mergeable_attention
from ._matching import bipartite_key, candidates_or_all, check_bool, cosine, kth_split, match_into
from .base import MergeAlgorithm, MergeRequest, register

__all__ = ["MCTF"]

_TINY = torch.finfo(torch.float32).tiny


def _check_tau(value: object, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0 (inf or None turns the criterion off), got {value!r}")


def _power(tau: Optional[float]) -> float:
    return 0.0 if tau is None or math.isinf(tau) else 1.0 / float(tau)


@register
class MCTF(MergeAlgorithm):
    """Options (the paper's and official defaults).

    tau_sim, tau_info, tau_size: temperatures of the three criteria (None or inf: criterion off).
    bidirectional:      two matching passes (A->B, then B->A); False = one ToMe-like pass.
    attention_weighted: fuse with attention x size weights (True, MCTF) or by size only.
    """

    name: ClassVar[str] = "mctf"
    needs_attention: ClassVar[bool] = True
    attention_from: ClassVar[str] = "mean"
    summary: ClassVar[str] = "MCTF: similarity x informativeness x size attraction, bidirectional matching"

    tau_sim: Optional[float] = 1.0
    tau_info: Optional[float] = 20.0
    tau_size: Optional[float] = 40.0
    bidirectional: bool = True
    attention_weighted: bool = True

    def __post_init__(self) -> None:
        for key in ("tau_sim", "tau_info", "tau_size"):
            _check_tau(getattr(self, key), key)
        check_bool(self.bidirectional, "bidirectional")
        check_bool(self.attention_weighted, "attention_weighted")

    def attraction(self, request: MergeRequest, att: Tensor) -> Tensor:
        """(B, T, T) log of the attraction W (a monotone transform: same best matches and edge order)."""
        log_w = torch.log(((cosine(request) + 1.0) / 2.0).clamp_min(_TINY)) * _power(self.tau_sim)
        p_info = _power(self.tau_info)
        if p_info:
            a = att.clamp_min(_TINY)
            log_w = log_w - torch.log(a.unsqueeze(2) + a.unsqueeze(1)) * p_info
        p_size = _power(self.tau_size)
        if p_size:
            s = request.size.float() if request.size is not None else torch.ones_like(att)
            log_w = log_w - torch.log((s.unsqueeze(2) + s.unsqueeze(1)).clamp_min(_TINY)) * p_size
        return log_w

    def plan(self, request: MergeRequest) -> MergePlan:
        att = mergeable_attention(request, self.name)
        cand = candidates_or_all(request)
        in_b = kth_split(cand, 2, request.num_protected)
        in_a = cand & ~in_b
        log_w = self.attraction(request, att)
        second = request.r // 2 if self.bidirectional else torch.zeros_like(request.r)
        target, merged = match_into(log_w, in_a, in_b, request.r - second)
        if self.bidirectional and request.r_max > 1:
            back, _ = match_into(log_w, in_b, in_a & ~merged, second)
            target = back.gather(1, target)  # an A token whose B host moved on follows it
        weight = att.clamp_min(_TINY) if self.attention_weighted else None
        key = bipartite_key(in_b, cand)
        return build_plan(target, key, request.num_protected, request.valid, weight=weight,
                          max_survivors=request.survivors(),
                          min_survivors=request.fewest_survivors())
