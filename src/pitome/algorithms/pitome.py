"""PiToMe: energy-ranked token merging that protects isolated tokens (Tran et al., NeurIPS 2024).

One step (spec §1.1-1.3): cosine similarities S of the mergeable tokens; an energy per token that is high
for tokens inside large clusters of similar tokens; the 2r highest-energy tokens are candidates and are
split into A and B; each A token merges into its most similar B token; the others are protected.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..plan import MergePlan, build_plan, layout_plan, stable_argsort
from ._matching import best_edges, check_choice, inverse_permutation
from .base import MergeAlgorithm, MergeRequest, register, sorted_desc, unit_rows

__all__ = ["PiToMe", "PiToMeText", "PiToMeBSM", "energy_scores", "similarity_quantile"]

ENERGIES = ("elu", "paper", "gaussian")
SPLITS = ("alternate", "top_next", "random")
MATCHINGS = ("protect", "bsm")


def energy_scores(
    sim: Tensor, margin: "float | Tensor", kind: str = "elu", alpha: float = 1.0, valid: Optional[Tensor] = None,
    overwrite: bool = False, keys: Optional[Tensor] = None,
) -> Tensor:
    """Mean over neighbours j of f(S_ij); padding columns (valid False) are left out of the mean.

    margin: one number, or a (B, 1, 1) tensor with one margin per sample (``margin_quantile``).

    elu:      ELU_alpha(S - m), the official code's energy.
    paper:    Eq. (4): S if S >= m else alpha * (exp(S - m) - 1).
    gaussian: exp(-((1 - S) / sigma)^2 / 2) with sigma = 1 - m (official text variant; the constant
              factor 1 / (sigma sqrt(2 pi)) is dropped since it does not change the ranking).

    overwrite: sim may be used as the work buffer (its values are destroyed); saves one T x T copy.
    keys:     the rows sim is the Gram matrix of (sim = keys keys^T), when at hand: the row sums of S are then
              keys_i . sum_j keys_j, O(T d) instead of a pass over T x T.

    Speed and memory: the merge step's hot loop, so each T x T pass counts. With c = min(S, m),
    ELU(S - m) = (S - c) + alpha (e^-m e^c - 1) and Eq. (4) = [S >= m] S + alpha (e^-m e^c - 1), so the mean
    needs row sums of S, of c and of e^c: clamp and exp in place, three row sums, no other T x T temporary
    (values equal the plain formulas to float rounding, ~1e-7). For long sequences
    (T >= ENERGY_CHUNK_TOKENS) row chunks bound the work buffer to ~ENERGY_CHUNK_ELEMENTS.
    """
    check_choice(kind, "energy", ENERGIES)
    w = None if valid is None else valid.to(sim.dtype)
    rows, tokens = sim.shape[-2], sim.shape[-1]
    if sim.requires_grad and torch.is_grad_enabled():
        return _energy_differentiable(sim, margin, kind, alpha, w)
    if tokens < ENERGY_CHUNK_TOKENS:
        total = None
        if keys is not None and kind != "gaussian":
            column_sum = keys.sum(dim=1) if w is None else (w.unsqueeze(1) @ keys).squeeze(1)
            total = (keys @ column_sum.unsqueeze(-1)).squeeze(-1)
        return _energy_rows(sim if overwrite else sim.clone(), margin, kind, alpha, w, total)
    step = max(1, ENERGY_CHUNK_ELEMENTS // max(1, sim.shape[0] * tokens))
    parts = [_energy_rows(sim[:, i : i + step].clone(), margin, kind, alpha, w) for i in range(0, rows, step)]
    return torch.cat(parts, dim=-1)


ENERGY_CHUNK_TOKENS = 4096
ENERGY_CHUNK_ELEMENTS = 1 << 24


def _energy_differentiable(sim: Tensor, margin: "float | Tensor", kind: str, alpha: float,
                           w: Optional[Tensor]) -> Tensor:
    """The plain formulas, no in-place operations (for gradients through the energy)."""
    f = {"elu": lambda: F.elu(sim - margin, alpha=alpha),
         "paper": lambda: torch.where(sim >= margin, sim, alpha * torch.expm1(sim - margin)),
         "gaussian": lambda: torch.exp(-0.5 * ((1.0 - sim) / (1.0 - margin)) ** 2)}[kind]()
    return f.mean(dim=-1) if w is None else (f * w.unsqueeze(1)).sum(dim=-1) / w.sum(dim=-1, keepdim=True).clamp_min(1.0)


def _energy_rows(work: Tensor, margin: "float | Tensor", kind: str, alpha: float, w: Optional[Tensor],
                 total: Optional[Tensor] = None) -> Tensor:
    """energy_scores on a block of rows, destroying ``work`` (B, rows, T); ``total``: its row sums, if known."""
    def row_sum(t: Tensor) -> Tensor:
        return t.sum(dim=-1) if w is None else (t @ w.unsqueeze(-1)).squeeze(-1)

    count = float(work.shape[-1]) if w is None else w.sum(dim=-1, keepdim=True).clamp_min(1.0)
    if isinstance(margin, Tensor):  # one margin per sample: (B, 1, 1) for T x T work, (B, 1) for row sums
        margin = margin.to(work.device, work.dtype)
        row_margin, exp_neg_margin = margin.view(-1, 1), torch.exp(-margin).view(-1, 1)
    else:
        row_margin, exp_neg_margin = margin, math.exp(-margin)
    if kind == "gaussian":
        work.sub_(1.0).mul_(1.0 / ((1.0 - margin) * math.sqrt(2.0))).square_().neg_().exp_()
        return row_sum(work) / count
    total = row_sum(work) if total is None else total
    work.clamp_max_(margin)  # c = min(S, m)
    positive = total - row_sum(work)  # sum of relu(S - m)
    if kind == "paper":  # [S >= m] S = relu(S - m) + m [S >= m], and c == m exactly where S >= m
        positive = positive + row_margin * row_sum((work == margin).to(work.dtype))
    negative = alpha * (exp_neg_margin * row_sum(work.exp_()) - count)  # sum of alpha (exp(c - m) - 1)
    return (positive + negative) / count


@register
class PiToMe(MergeAlgorithm):
    """Options.

    margin:       m0 of the per-layer margin m_l = m0 - margin_decay * l / L.
    margin_decay: slope of that schedule; None means equal to ``margin`` (linear down to 0, as the paper).
    margin_quantile: None, or q in [0, 1]: instead of the schedule, each sample's margin at each layer is the
                  q-quantile of its off-diagonal cosine similarities between mergeable tokens (adapts the
                  margin to how similar that layer's tokens are; an ablation option, see docs/ablation.md).
    alpha:        ELU / Eq. (4) negative-side scale.
    energy:       'elu' (official code), 'paper' (Eq. 4) or 'gaussian' (official text variant).
    split:        'alternate' (A = ranks 1,3,5.. of the 2r candidates), 'top_next' (A = top r, B = next r) or
                  'random' (the 2r candidates split at random: the patch's seeded generator, else seed = layer).
    matching:     'protect' (full PiToMe: only the 2r highest-energy tokens take part) or 'bsm'
                  (energy-ordered bipartite soft matching over all tokens, no protection; spec §1.3a).
    """

    name: ClassVar[str] = "pitome"
    summary: ClassVar[str] = "PiToMe: energy score protects isolated tokens, merges inside clusters"

    margin: float = 0.9
    margin_decay: Optional[float] = None
    alpha: float = 1.0
    energy: str = "elu"
    split: str = "alternate"
    matching: str = "protect"
    margin_quantile: Optional[float] = None

    def __post_init__(self) -> None:
        check_choice(self.energy, "energy", ENERGIES)
        check_choice(self.split, "split", SPLITS)
        check_choice(self.matching, "matching", MATCHINGS)
        for key in ("margin", "alpha"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
        if not -1.0 <= self.margin < 1.0:
            raise ValueError(f"margin must be in [-1, 1), got {self.margin!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if self.margin_decay is not None and not math.isfinite(self.margin_decay):
            raise ValueError(f"margin_decay must be a finite number or None, got {self.margin_decay!r}")
        q = self.margin_quantile
        if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0):
            raise ValueError(f"margin_quantile must be None or a number in [0, 1], got {q!r}")

    def merge_macs(self, tokens: int, dim: int) -> int:
        """The full T x T similarity of the mergeable tokens (FLOPs accounting, see ``pitome.flops``)."""
        return tokens * tokens * dim

    def layer_margin(self, layer: int, num_layers: int) -> float:
        decay = self.margin if self.margin_decay is None else self.margin_decay
        return self.margin - decay * layer / max(num_layers, 1)

    def plan(self, request: MergeRequest) -> MergePlan:
        k = unit_rows(request.mergeable_metric)
        batch, tokens, _ = k.shape
        sim = k @ k.transpose(1, 2)
        cand = request.candidates
        if self.margin_quantile is not None:
            margin = similarity_quantile(sim, self.margin_quantile, cand).clamp(max=1.0 - 1e-4).view(-1, 1, 1)
        else:
            margin = self.layer_margin(request.layer, request.num_layers)
            if self.energy == "gaussian" and margin >= 1.0:
                raise ValueError(f"gaussian energy needs margin < 1 at every layer, got {margin}")
        energy = energy_scores(sim, margin, self.energy, self.alpha, request.valid, overwrite=True, keys=k)
        del sim  # now the energy's work buffer; the matching recomputes the few similarities it needs from k
        if cand is not None:
            energy = energy.masked_fill(~cand, float("-inf"))
        order = sorted_desc(energy)
        if cand is None and request.r_min == request.r_max:  # no padding, one r: the layout is known, no sorting
            if self.matching == "bsm":
                return _bipartite_layout(k, order, request.r_max, request.num_protected)
            if self.split != "random":
                return _protected_layout(k, order, request.r_max, self.split, request.num_protected)
        if self.matching == "protect":
            draws = _split_draws(request, 2 * request.r_max) if self.split == "random" else None
            target, key = _protected_matching(k, order, request.r, request.r_max, self.split, draws)
        else:
            target, key = _bipartite_over_energy(k, order, request.r, cand)
        if cand is not None:
            positions = torch.arange(tokens, device=k.device, dtype=key.dtype)
            key = torch.where(cand, key, 2 * tokens + positions)
        return build_plan(target, key, request.num_protected, request.valid, max_survivors=request.survivors(),
                          min_survivors=request.fewest_survivors())


def similarity_quantile(sim: Tensor, q: float, valid: Optional[Tensor] = None) -> Tensor:
    """(B,) the q-quantile (lower value, no interpolation) of each sample's off-diagonal similarities between
    valid tokens; 0 for a sample with fewer than two valid tokens."""
    batch, tokens, _ = sim.shape
    pairs = ~torch.eye(tokens, dtype=torch.bool, device=sim.device)
    pairs = pairs.expand(batch, tokens, tokens) if valid is None else pairs & valid.unsqueeze(2) & valid.unsqueeze(1)
    values = sim.masked_fill(~pairs, float("inf")).flatten(1).sort(dim=1).values  # invalid pairs sort last
    count = pairs.flatten(1).sum(dim=1)
    index = torch.floor(q * (count - 1).clamp_min(0).to(torch.float64)).to(torch.long)
    out = values.gather(1, index.unsqueeze(1)).squeeze(1)
    return torch.where(count > 0, out, torch.zeros_like(out))


def _rows(k: Tensor, index: Tensor) -> Tensor:
    """k[b, index[b]]: (B, n, d)."""
    return k.gather(1, index.unsqueeze(-1).expand(-1, -1, k.shape[-1]))


def _split_draws(request: MergeRequest, count: int) -> Tensor:
    """Random keys for the 'random' split, shared by the batch (a batch splits like each sample alone)."""
    gen = request.generator
    if gen is None:
        gen = torch.Generator().manual_seed(request.layer)
    return torch.rand(count, generator=gen, device=gen.device).to(request.metric.device)


def _protected_matching(k: Tensor, order: Tensor, r: Tensor, r_max: int, split: str,
                        draws: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Full PiToMe: the 2r top-energy tokens split into A/B; every A token merges into its best B token.

    Output order: protected tokens by energy rank, then B tokens (as the official code).
    """
    batch, tokens = order.shape
    device = order.device
    j = torch.arange(r_max, device=device)
    r_col = r.unsqueeze(1)
    active = j.unsqueeze(0) < r_col
    if split == "alternate":
        a_rank = (2 * j).expand(batch, r_max)
        b_rank = (2 * j + 1).expand(batch, r_max)
    elif split == "random":  # a random order of each sample's first 2r ranks: first r are A, next r are B
        keys = draws[: 2 * r_max].expand(batch, 2 * r_max)
        keys = keys.masked_fill(torch.arange(2 * r_max, device=device).unsqueeze(0) >= 2 * r_col, 2.0)
        shuffled = stable_argsort(keys, dim=1)
        a_rank = shuffled[:, :r_max]
        b_rank = shuffled.gather(1, (r_col + j).clamp_max(max(2 * r_max - 1, 0)))
    else:
        a_rank = j.expand(batch, r_max)
        b_rank = (r_col + j).clamp_max(tokens - 1)
    a_idx = order.gather(1, a_rank)
    b_idx = order.gather(1, b_rank)
    sim_ab = _rows(k, a_idx) @ _rows(k, b_idx).transpose(1, 2)
    sim_ab = sim_ab.masked_fill(~active.unsqueeze(1), float("-inf"))
    dst = b_idx.gather(1, sim_ab.argmax(dim=-1))
    target = torch.arange(tokens, device=device).repeat(batch, 1)
    target.scatter_(1, a_idx, torch.where(active, dst, a_idx))
    rank = inverse_permutation(order).to(torch.float32)
    is_dst = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    is_dst.scatter_(1, b_idx, active)
    key = torch.where(is_dst, rank + tokens, rank)
    return target, key


def _protected_layout(k: Tensor, order: Tensor, r: int, split: str, num_protected: int) -> MergePlan:
    """Full PiToMe when every sample removes the same r and nothing is padded: the plan straight from the
    energy order, as ``_protected_matching`` + ``build_plan`` lay it out (the protected tokens by energy rank,
    then the B tokens by energy rank; every A token merges into its most similar B token)."""
    batch, tokens = order.shape
    h = num_protected
    a_idx, b_idx = (order[:, 0 : 2 * r : 2], order[:, 1 : 2 * r : 2]) if split == "alternate" else \
        (order[:, :r], order[:, r : 2 * r])
    dst = (_rows(k, a_idx) @ _rows(k, b_idx).transpose(1, 2)).argmax(dim=-1) + (h + tokens - 2 * r)
    shifted = order + h  # sequence indices
    b_seq = shifted[:, 1 : 2 * r : 2] if split == "alternate" else shifted[:, r : 2 * r]
    a_seq = shifted[:, 0 : 2 * r : 2] if split == "alternate" else shifted[:, :r]
    keep = torch.cat([_head(batch, h, order.device), shifted[:, 2 * r :], b_seq], dim=1)
    return layout_plan(keep, a_seq, dst, h + tokens)


def _bipartite_layout(k: Tensor, order: Tensor, r: int, num_protected: int) -> MergePlan:
    """pitome_bsm when every sample removes the same r and nothing is padded: the plan straight from the
    matching, as ``_bipartite_over_energy`` + ``build_plan`` lay it out (unmerged A tokens by descending best
    match, then B tokens)."""
    batch, tokens = order.shape
    h = num_protected
    a_idx, b_idx = order[:, 0::2], order[:, 1::2]
    edges, best = best_edges(_rows(k, a_idx) @ _rows(k, b_idx).transpose(1, 2), r)
    a_seq = a_idx.gather(1, edges) + h  # A tokens by descending best match, as sequence indices
    dst = best + (h + a_idx.shape[1] - r)
    keep = torch.cat([_head(batch, h, order.device), a_seq[:, r:], b_idx + h], dim=1)
    return layout_plan(keep, a_seq[:, :r], dst, h + tokens)


def _head(batch: int, num_protected: int, device: torch.device) -> Tensor:
    """(B, h) the protected tokens' indices: they keep the leading slots."""
    return torch.arange(num_protected, device=device).expand(batch, num_protected)


def _bipartite_over_energy(k: Tensor, order: Tensor, r: Tensor, cand: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """pitome_bsm: A = even energy ranks, B = odd; the r A tokens with the best match merge (ToMe-style).

    Output order: unmerged A tokens by descending best-match score, then B tokens.
    """
    batch, tokens = order.shape
    device = order.device
    a_idx = order[:, 0::2]
    b_idx = order[:, 1::2]
    n_a = a_idx.shape[1]
    sim_ab = _rows(k, a_idx) @ _rows(k, b_idx).transpose(1, 2)
    if cand is not None:
        sim_ab = sim_ab.masked_fill(~cand.gather(1, b_idx).unsqueeze(1), float("-inf"))
    node_max, node_arg = sim_ab.max(dim=-1)
    if cand is not None:
        node_max = node_max.masked_fill(~cand.gather(1, a_idx), float("-inf"))
    edge_rank = inverse_permutation(sorted_desc(node_max))
    merged = edge_rank < r.unsqueeze(1)
    target = torch.arange(tokens, device=device).repeat(batch, 1)
    target.scatter_(1, a_idx, torch.where(merged, b_idx.gather(1, node_arg), a_idx))
    key = torch.empty(batch, tokens, device=device, dtype=torch.float32)
    key.scatter_(1, a_idx, edge_rank.to(torch.float32))
    key.scatter_(1, b_idx, (n_a + torch.arange(b_idx.shape[1], device=device, dtype=torch.float32)).expand_as(b_idx))
    return target, key


@register
class PiToMeText(PiToMe):
    """The official text variant (BERT / DistilBERT): Gaussian energy, top-r / next-r split, m_l = 0.9 - 0.25 l/L."""

    name: ClassVar[str] = "pitome_text"
    summary: ClassVar[str] = "PiToMe text variant: Gaussian energy, top-r / next-r split"

    margin: float = 0.9
    margin_decay: Optional[float] = 0.25
    energy: str = "gaussian"
    split: str = "top_next"


@register
class PiToMeBSM(PiToMe):
    """Energy-ordered bipartite soft matching without protection (the official code's ``pitome_bsm``)."""

    name: ClassVar[str] = "pitome_bsm"
    summary: ClassVar[str] = "PiToMe ordering + ToMe-style matching, no protection (paper ablation i)"

    matching: str = "bsm"
