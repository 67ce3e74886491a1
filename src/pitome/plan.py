"""Merge plans: which input token goes to which output slot, applicable to any per-token tensor.

A plan is one integer map ``assign`` of shape (B, N): the output slot of every input token, or -1 when
the token is dropped (pruning baselines). Every algorithm produces a plan and never touches features;
the merge step applies the same plan to features, sizes, masks and source maps, and can unmerge.

Speed: when every sample keeps the same number of tokens (no padding differences), builders also give the
same assignment in gather form (``rows`` / ``dst``), so features merge as one row gather, one scatter-add of
the R merged-away rows (R = tokens removed) and one division, like ToMe's own gather + scatter_reduce, instead
of a scatter over all N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["MergePlan", "build_plan", "compaction_plan", "gather_form", "identity_plan", "layout_plan",
           "stable_argsort"]


@dataclass(frozen=True)
class MergePlan:
    """Output slot per input token.

    assign:  (B, N) long, values in [-1, num_out); -1 = dropped.
    num_out: number of output tokens (same for the whole batch; slots nobody fills are empty,
             with size 0, which only happens when samples of a batch merge different amounts).
    weight:  optional (B, N) non-negative extra merge weight per token (multiplies the size), for
             baselines that average with other weights than sizes.
    norm:    None, or 'max': every slot with two or more members is rescaled after averaging to the
             largest norm among its members (norm-preserving merge, ToFu's MLERP).
    rows, dst: optional gather form of ``assign`` (only when no slot is empty). rows (B * W,) flat input
             rows (b * N + i), W = num_out + 1 + R per sample: the token surviving into each slot, one spare
             column, then the R tokens merged away or dropped; dst (B, R) the column each of those goes to
             (its slot, or the spare column num_out when dropped). Builders derive both from the same
             ordering as ``assign`` (``gather_form``); tests check both forms agree.
    mix:     optional dense (B or 1, num_out, N) linear map, for reductions that are not assignments
             (DCT). When present it replaces the assignment in merge / sum / any / unmerge:
             merge = mix @ x (sizes and weights do not enter the features); sum = P @ t with
             P = |mix| normalised per input column, so each input's size is shared among the outputs in
             proportion to |mix| and totals are preserved; any = (P @ mask) > 0; unmerge = pinv(mix) @ y.
             ``assign`` then holds argmax_j |mix[j, i]| (-1 for an all-zero column): the output each
             input contributes most to, which is what source maps record.
    """

    assign: Tensor
    num_out: int
    weight: Optional[Tensor] = None
    norm: Optional[str] = None
    mix: Optional[Tensor] = None
    rows: Optional[Tensor] = None
    dst: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.norm not in (None, "max"):
            raise ValueError(f"norm must be None or 'max', got {self.norm!r}")

    @property
    def num_in(self) -> int:
        return self.assign.shape[1]

    # -- reductions ---------------------------------------------------------------------------------
    def _index(self, channels: int) -> Tensor:
        """Scatter index with dropped tokens routed to a spare slot at the end."""
        idx = torch.where(self.assign < 0, self.num_out, self.assign)
        return idx.unsqueeze(-1).expand(-1, -1, channels)

    def sum(self, t: Tensor) -> Tensor:
        """Sum of the members of each slot. t: (B, N, C) or (B, N)."""
        squeeze = t.dim() == 2
        t3 = t.unsqueeze(-1) if squeeze else t
        if self.mix is not None:
            out = self._mass().to(t3.dtype) @ t3
            return out.squeeze(-1) if squeeze else out
        if self.rows is not None:
            out = self._gathered_sum(self._gather(t3))
            return out.squeeze(-1) if squeeze else out
        out = t3.new_zeros(t3.shape[0], self.num_out + 1, t3.shape[-1])
        out.scatter_add_(1, self._index(t3.shape[-1]), t3)
        out = out[:, : self.num_out]
        return out.squeeze(-1) if squeeze else out

    def _mass(self) -> Tensor:
        """|mix| with every input column summing to 1 (all-zero columns stay zero), in float32."""
        mass = self.mix.abs().float()
        return mass / mass.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    def any(self, mask: Tensor) -> Tensor:
        """A slot is set if any member is set (padding masks: a merged token is valid if any member is)."""
        return self.sum(mask.to(torch.float32)) > 0

    def merge(self, x: Tensor, size: Optional[Tensor], size_weighted: bool = True) -> tuple[Tensor, Tensor]:
        """Weighted average of the members of each slot, and the summed sizes.

        x: (B, N, C); size: (B, N) float32, or None for all ones (a first merge). Weights are the sizes
        (size_weighted) or 1 per token, times ``weight`` if the plan has one. Empty slots get zeros.
        """
        unit_weights = self.weight is None and (size is None or not size_weighted)
        if self.rows is not None and unit_weights and self.norm is None:  # plain means: no weighing pass
            num = self._gathered_sum(self._gather(x))
            width = self.num_out + 1 + self.dst.shape[1]
            count = self._gathered_sum(torch.ones(x.shape[0], width, 1, dtype=torch.float32, device=x.device))
            count = count.squeeze(-1)
            out = num / count.to(x.dtype).unsqueeze(-1)  # every slot has its survivor: count >= 1
            return out, count if size is None else self.sum(size)
        if size is None:
            size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        if self.mix is not None:
            return self.mix.to(x.dtype) @ x, self.sum(size)
        w = size if size_weighted else torch.ones_like(size)
        if self.weight is not None:
            w = w * self.weight
        if self.rows is not None:  # gather form: the same formula on gathered rows
            w_rows = self._gather(w.unsqueeze(-1))
            num = self._gathered_sum(self._gather(x) * w_rows.to(x.dtype))
            total = self._gathered_sum(w_rows, in_place=False).squeeze(-1)  # w_rows is saved for gradients
            out = num / total.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
        else:
            total = self.sum(w)
            num = self.sum(x * w.to(x.dtype).unsqueeze(-1))
            out = num / total.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)  # empty slots: 0, not 0/0
        if self.norm == "max":
            out = self._rescale_to_max_norm(x, out)
        same = w is size  # size-weighted without extra weight: the weight totals are the new sizes
        return out, total if same else self.sum(size)

    def _gather(self, t: Tensor) -> Tensor:
        """(B, W, C): the rows of t (B, N, C) in gather-form order (survivors, spare, merged-away)."""
        batch, _, channels = t.shape
        return t.reshape(-1, channels).index_select(0, self.rows).view(batch, -1, channels)

    def _gathered_sum(self, gathered: Tensor, in_place: bool = True) -> Tensor:
        """Add the merged-away rows of ``gathered`` (B, W, C) into their slots (in place unless told); returns
        the slots.
        (scatter_add, not index_add: the TorchScript ONNX exporter turns index_add into a plain scatter that
        drops repeated indices, and several tokens merge into one slot.)"""
        slots = self.num_out + 1
        index = self.dst.unsqueeze(-1).expand(-1, -1, gathered.shape[-1])
        head, tail = gathered[:, :slots], gathered[:, slots:]
        if not in_place or torch.onnx.is_in_onnx_export():  # that exporter loses in-place writes into a view
            head = head.scatter_add(1, index, tail)
        else:
            head.scatter_add_(1, index, tail)
        return head[:, : self.num_out]

    def _rescale_to_max_norm(self, x: Tensor, out: Tensor) -> Tensor:
        """Scale each slot with >= 2 members to its largest member norm (norms in fp32 or wider)."""
        wide = torch.promote_types(x.dtype, torch.float32)  # fp32 at least, float64 kept (exact gradients)
        norms = x.to(wide).norm(dim=-1)
        idx = torch.where(self.assign < 0, self.num_out, self.assign)
        largest = norms.new_zeros(norms.shape[0], self.num_out + 1).scatter_reduce(1, idx, norms, "amax")
        count = self.sum(torch.ones_like(norms))
        current = out.to(wide).norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        factor = torch.where(count > 1, largest[:, : self.num_out] / current, torch.ones_like(current))
        return out * factor.to(out.dtype).unsqueeze(-1)

    def unmerge(self, y: Tensor) -> Tensor:
        """Copy every output token back to each input position it came from (zeros where dropped)."""
        squeeze = y.dim() == 2
        y3 = y.unsqueeze(-1) if squeeze else y
        if self.mix is not None:
            out = torch.linalg.pinv(self.mix.float()).to(y3.dtype) @ y3
            return out.squeeze(-1) if squeeze else out
        idx = self.assign.clamp_min(0).unsqueeze(-1).expand(-1, -1, y3.shape[-1])
        out = y3.gather(1, idx)
        out = out.masked_fill((self.assign < 0).unsqueeze(-1), 0)
        return out.squeeze(-1) if squeeze else out

    def compose_source(self, source: Tensor) -> Tensor:
        """Push a source map (B, N0): current slot of each original token (-1 = dropped) through the plan."""
        new = self.assign.gather(1, source.clamp_min(0))
        return torch.where(source < 0, source, new)


def identity_plan(batch: int, tokens: int, device: torch.device) -> MergePlan:
    assign = torch.arange(tokens, device=device).expand(batch, tokens)
    return MergePlan(assign=assign, num_out=tokens)


def stable_argsort(values: Tensor, dim: int = -1, descending: bool = False) -> Tensor:
    """argsort with ties in index order. While exporting (torch.export / ONNX), as a full top-k: ONNX has no stable
    sort, and its TopK breaks ties by the lower index, which is the same order."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return torch.topk(values, values.shape[dim], dim=dim, largest=descending, sorted=True).indices
    return torch.argsort(values, dim=dim, descending=descending, stable=True)


def build_plan(
    target: Tensor,
    order_key: Tensor,
    num_protected: int,
    valid: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    max_survivors: Optional[int] = None,
    min_survivors: Optional[int] = None,
) -> MergePlan:
    """Turn "who merges into whom" into a plan with a deterministic output order.

    target:    (B, T) long over the mergeable tokens (those after the ``num_protected`` leading ones):
               the token each one merges into (itself if it stays), or -1 if dropped. A token that is
               a target must target itself (no chains).
    order_key: (B, T) float; surviving tokens are laid out by ascending key (stable).
    valid:     (B, T) bool padding mask; padding tokens that survive go after all real tokens, so real
               tokens keep the same relative order with or without padding.
    max_survivors: the largest number of survivors in a sample, when the caller knows it (saves a
               device sync); computed otherwise.
    min_survivors: the smallest, when known; equal to ``max_survivors``, every slot is filled and the plan also
               carries the gather form (``MergePlan.rows / dst``) for fast merging.
    Leading protected tokens keep slots 0..num_protected-1.
    """
    batch, tokens = target.shape
    device = target.device
    positions = torch.arange(tokens, device=device).expand(batch, tokens)
    survives = target == positions
    # group 0: real survivors, 1: padding survivors, 2: merged or dropped (no slot of their own)
    group = torch.where(survives, 0, 2)
    if valid is not None:
        group = torch.where(survives & ~valid, 1, group)
    perm = stable_argsort(order_key, dim=1)
    perm = perm.gather(1, stable_argsort(group.gather(1, perm), dim=1))
    slot = torch.empty_like(perm)
    slot.scatter_(1, perm, positions)
    if max_survivors is None:
        max_survivors = int(survives.sum(dim=1).max()) if batch > 0 else 0
    num_out = num_protected + max_survivors
    assign_mergeable = torch.where(target < 0, -1, slot.gather(1, target.clamp_min(0)) + num_protected)
    head = torch.arange(num_protected, device=device).expand(batch, num_protected)
    assign = torch.cat([head, assign_mergeable], dim=1)
    if weight is not None and weight.shape[1] == tokens:
        weight = torch.cat([weight.new_ones(batch, num_protected), weight], dim=1)
    if min_survivors is None or min_survivors != max_survivors:
        return MergePlan(assign=assign, num_out=num_out, weight=weight)
    # gather form: survivors lead ``perm`` (in slot order), the tokens merged away or dropped follow it
    shifted = perm + num_protected
    movers = perm[:, max_survivors:]
    return MergePlan(assign=assign, num_out=num_out, weight=weight,
                     **gather_form(torch.cat([head, shifted[:, :max_survivors]], dim=1), shifted[:, max_survivors:],
                                   assign_mergeable.gather(1, movers), num_protected + tokens, num_out))


def layout_plan(keep: Tensor, movers: Tensor, dst: Tensor, num_in: int) -> MergePlan:
    """A plan straight from a layout the algorithm already knows (no sorting): keep (B, num_out) the token
    surviving into each slot, in slot order (protected tokens first); movers (B, R) every other token; dst
    (B, R) the slot each mover merges into. Every slot is filled and nothing is dropped (the common case
    without padding: ToMe, PiToMe)."""
    batch, num_out = keep.shape
    assign = torch.empty(batch, num_in, dtype=torch.long, device=keep.device)
    assign.scatter_(1, keep, torch.arange(num_out, device=keep.device).expand(batch, num_out))
    assign.scatter_(1, movers, dst)
    return MergePlan(assign=assign, num_out=num_out, **gather_form(keep, movers, dst, num_in, num_out, drops=False))


def gather_form(keep: Tensor, movers: Tensor, dst: Tensor, num_in: int, num_out: int, drops: bool = True
                ) -> dict[str, Tensor]:
    """MergePlan's ``rows`` / ``dst`` from per-sample token indices: keep (B, num_out) the token surviving into
    each slot; movers (B, R) the tokens merged away or dropped; dst (B, R) their slots (-1 = dropped, only
    when ``drops``)."""
    batch = keep.shape[0]
    local = torch.cat([keep, keep[:, :1], movers], dim=1)  # the spare column reads any row: it is discarded
    rows = (local + torch.arange(0, batch * num_in, num_in, device=keep.device).unsqueeze(1)).flatten()
    return dict(rows=rows, dst=torch.where(dst < 0, num_out, dst) if drops else dst)


def compaction_plan(valid: Tensor) -> Optional[MergePlan]:
    """Keep the first ``max(valid.sum(1))`` slots of each sample, real tokens first (stable): the plan that drops
    slots holding only padding after a merge (None when there is nothing to drop).

    valid: (B, N) bool. Every kept slot has one member, so applying the plan only moves tokens.
    """
    counts = valid.sum(dim=1)
    keep = int(counts.max())
    batch, tokens = valid.shape
    if keep >= tokens:
        return None
    position = torch.arange(tokens, device=valid.device).expand(batch, tokens)
    if bool((valid[:, :keep].sum(dim=1) == counts).all()):
        rank = position  # real tokens already lead every row
    else:
        order = stable_argsort((~valid).to(torch.int8), dim=1)
        rank = torch.empty_like(order).scatter_(1, order, position)
    return MergePlan(assign=torch.where(rank < keep, rank, -1), num_out=keep)
