"""Spectral distance between a token graph and its merged version (spec §3: Eq. 3, Definitions 1-2, Eq. 5).

Why: the paper's claim is that PiToMe's merges preserve the spectrum of the token graph and ToMe's need
not, but it reports no measured distance. This module measures it, per layer and end to end.

- Token graph (Eq. 3): W[i, j] = 1 - cos(k_i, k_j) over the mergeable tokens (protected tokens excluded),
  zero diagonal. ``graph="similarity"`` uses max(cos, 0) instead (a robustness check).
- Coarse graph (Definition 1): W_c = S_bar W S_bar^T, S (n, N) the 0/1 group membership, S_bar its rows
  divided by the group sizes s.
- Lifted graph (Definition 2): W_l = S^T W_c S (N x N, block-constant).
- Normalised Laplacian I - D^-1/2 W D^-1/2 (zero-degree nodes get D^-1/2 = 0). SD = sum_i |lambda_i -
  lambda_l,i| over the ascending eigenvalues, in float64.
- Coarse spectrum: the SIZE-WEIGHTED coarse Laplacian, degrees d_p = sum_q W_c[p, q] s_q and
  L_c = I - diag(sqrt(s/d)) W_c diag(sqrt(s/d)). With this definition Lemma 1 holds exactly: the lifted
  spectrum is the coarse spectrum plus the eigenvalue 1 with multiplicity N - n. The plain
  I - D_c^-1/2 W_c D_c^-1/2 with D_c = diag(W_c 1) has a different spectrum (W_c averages weights).

Everything here imports torch only. Groups are integer maps (B, N): the group (output slot) of each token,
-1 for a dropped token (it becomes an isolated node of the lifted graph).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .plan import MergePlan
from .step import record_merges

__all__ = [
    "GRAPHS", "token_graph", "membership", "coarsen", "lift", "normalized_laplacian", "spectrum",
    "coarse_spectrum", "lifted_spectrum", "spectral_distance", "plan_groups", "source_groups",
    "MergeRecord", "MergeRecorder", "layer_distances", "cumulative_distances", "source_after",
    "clustered_tokens", "merge_until", "synthetic_distances", "DEFAULT_CLUSTER_SIZES",
]

GRAPHS = ("distance", "similarity")
EPS = 1e-12


def _check_graph(kind: str) -> None:
    if kind not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {kind!r}")


def token_graph(metric: Tensor, kind: str = "distance") -> Tensor:
    """(B, N, d) or (N, d) token features -> (B, N, N) or (N, N) float64 edge weights, zero diagonal.

    distance:   1 - cos (the paper's Eq. 3; clamped at 0 against rounding).
    similarity: max(cos, 0).
    """
    _check_graph(kind)
    if metric.dim() not in (2, 3):
        raise ValueError(f"metric must be (N, d) or (B, N, d), got shape {tuple(metric.shape)}")
    k = metric.detach().to(torch.float64)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cos = k @ k.transpose(-1, -2)
    w = (1.0 - cos).clamp_min(0.0) if kind == "distance" else cos.clamp_min(0.0)
    eye = torch.eye(w.shape[-1], dtype=torch.bool, device=w.device)
    return w.masked_fill(eye, 0.0)


def _batched(groups: Tensor) -> Tensor:
    if groups.dim() == 1:
        return groups.unsqueeze(0)
    if groups.dim() != 2:
        raise ValueError(f"groups must be (N,) or (B, N), got shape {tuple(groups.shape)}")
    return groups


def membership(groups: Tensor, num_groups: Optional[int] = None) -> Tensor:
    """(B, N) group ids -> (B, n, N) float64 0/1 matrix S (row p = members of group p; -1 = in no group)."""
    groups = _batched(groups).long()
    n = int(groups.max()) + 1 if num_groups is None else int(num_groups)
    n = max(n, 1)
    if int(groups.max()) >= n:
        raise ValueError(f"group id {int(groups.max())} does not fit num_groups={n}")
    s = torch.zeros(groups.shape[0], n + 1, groups.shape[1], dtype=torch.float64, device=groups.device)
    idx = torch.where(groups < 0, n, groups)
    s.scatter_(1, idx.unsqueeze(1), 1.0)
    return s[:, :n]


def coarsen(w: Tensor, groups: Tensor, num_groups: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Definition 1: (W_c (B, n, n), sizes s (B, n)). Empty groups get size 0 and zero weights."""
    squeeze = w.dim() == 2
    w3 = w.unsqueeze(0) if squeeze else w
    s = membership(groups, num_groups)
    sizes = s.sum(dim=-1)
    s_bar = s / sizes.clamp_min(1.0).unsqueeze(-1)
    w_c = s_bar @ w3.to(torch.float64) @ s_bar.transpose(-1, -2)
    return (w_c[0], sizes[0]) if squeeze else (w_c, sizes)


def lift(w_c: Tensor, groups: Tensor) -> Tensor:
    """Definition 2: W_l[i, j] = W_c[group(i), group(j)] (0 for dropped tokens)."""
    squeeze = w_c.dim() == 2
    w3 = w_c.unsqueeze(0) if squeeze else w_c
    s = membership(groups, w3.shape[-1])
    w_l = s.transpose(-1, -2) @ w3.to(torch.float64) @ s
    return w_l[0] if squeeze else w_l


def normalized_laplacian(w: Tensor, sizes: Optional[Tensor] = None) -> Tensor:
    """I - D^-1/2 W D^-1/2; with ``sizes`` the size-weighted version (degrees W s, scale sqrt(s / d))."""
    w = w.to(torch.float64)
    if sizes is None:
        deg = w.sum(dim=-1)
        scale = torch.where(deg > EPS, deg.clamp_min(EPS).rsqrt(), torch.zeros_like(deg))
    else:
        s = sizes.to(torch.float64)
        deg = (w @ s.unsqueeze(-1)).squeeze(-1)
        scale = torch.where(deg > EPS, (s / deg.clamp_min(EPS)).sqrt(), torch.zeros_like(deg))
    eye = torch.eye(w.shape[-1], dtype=torch.float64, device=w.device)
    return eye - scale.unsqueeze(-1) * w * scale.unsqueeze(-2)


@contextlib.contextmanager
def _few_threads(size: int) -> Iterator[None]:
    """Small eigenproblems run fastest on one CPU thread; with several, a busy machine made them ~500x slower."""
    previous = torch.get_num_threads()
    if size > 1024 or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def spectrum(w: Tensor, sizes: Optional[Tensor] = None) -> Tensor:
    """Ascending eigenvalues of the (optionally size-weighted) normalised Laplacian, float64."""
    lap = normalized_laplacian(w, sizes)
    lap = 0.5 * (lap + lap.transpose(-1, -2))
    if lap.device.type != "cpu":
        return torch.linalg.eigvalsh(lap)
    with _few_threads(lap.shape[-1]):
        return torch.linalg.eigvalsh(lap)


def coarse_spectrum(w_c: Tensor, sizes: Tensor) -> Tensor:
    """Spectrum of the size-weighted coarse Laplacian of ONE sample (n, n); empty groups are left out."""
    if w_c.dim() != 2:
        raise ValueError(f"coarse_spectrum takes one sample (n, n), got shape {tuple(w_c.shape)}")
    keep = sizes > 0
    return spectrum(w_c[keep][:, keep], sizes[keep])


def lifted_spectrum(w: Tensor, groups: Tensor, num_groups: Optional[int] = None) -> Tensor:
    """Ascending spectrum of the lifted graph of ``w`` under ``groups`` (batched like ``w``)."""
    w_c, _ = coarsen(w, groups, num_groups)
    return spectrum(lift(w_c, groups))


def spectral_distance(
    w: Tensor, groups: Tensor, num_groups: Optional[int] = None, base: Optional[Tensor] = None
) -> Tensor:
    """Eq. (5): sum_i |lambda_i(L(W)) - lambda_i(L(W_l))|, float64; (B,) for a batch, scalar for one graph.

    base: ``spectrum(w)`` if already computed (saves one eigendecomposition when comparing many partitions).
    """
    squeeze = w.dim() == 2
    w3 = w.unsqueeze(0) if squeeze else w
    g = _batched(groups)
    if g.shape != w3.shape[:2]:
        raise ValueError(f"groups {tuple(g.shape)} do not match the graph {tuple(w3.shape)}")
    lam = spectrum(w3) if base is None else base.reshape(w3.shape[0], -1)
    lam_l = lifted_spectrum(w3, g, num_groups)
    sd = (lam - lam_l).abs().sum(dim=-1)
    return sd[0] if squeeze else sd


# -- groups from plans and source maps ----------------------------------------------------------------------

def plan_groups(plan: MergePlan, num_protected: int) -> tuple[Tensor, int]:
    """Group of each mergeable token under one layer's plan: (assign - h over tokens h.., num groups)."""
    h = int(num_protected)
    assign = plan.assign[:, h:]
    groups = torch.where(assign < 0, assign, assign - h)
    if bool((assign[assign >= 0] < h).any()):
        raise ValueError("the plan merges a token into a protected slot; spectral analysis excludes protected tokens")
    return groups, max(plan.num_out - h, 1)


def source_groups(source: Tensor, num_protected: int) -> tuple[Tensor, int]:
    """Group of each original mergeable token under a cumulative source map (B, N0)."""
    h = int(num_protected)
    src = source[:, h:]
    groups = torch.where(src < 0, src, src - h)
    return groups, max(int(groups.max()) + 1, 1)


def source_after(history: Sequence[tuple[int, Tensor]], layer: int) -> Optional[Tensor]:
    """The source map after the last merge at or before block ``layer`` (None if nothing merged yet)."""
    found = None
    for index, source in history:
        if index <= layer:
            found = source
    return found


# -- recording what a patched model's merge steps saw ----------------------------------------------------

@dataclass
class MergeRecord:
    """One merge step of one forward: the metric the algorithm saw and the plan it made."""

    layer: int
    metric: Tensor                 # (B, N, d) float32, CPU, detached (protected tokens included)
    plan: Optional[MergePlan]      # None when the layer removed nothing
    size: Optional[Tensor]         # (B, N) sizes before the merge (None = all ones)
    num_protected: int
    num_layers: int
    algorithm: Any                 # the layer's MergeAlgorithm (for the energy of PiToMe's variants)


class MergeRecorder:
    """``with MergeRecorder() as rec: model(x)`` -> ``rec.records``, one per merging block, in order.

    Works with any adapter, since it observes the shared merge step (``pitome.step.record_merges``).
    """

    def __init__(self) -> None:
        self.records: list[MergeRecord] = []
        self._context: Optional[Any] = None

    def __call__(self, state: Any, layer: int, metric: Tensor, plan: Optional[MergePlan]) -> None:
        settings = state.settings
        plan_cpu = None
        if plan is not None:
            plan_cpu = MergePlan(assign=plan.assign.detach().cpu(), num_out=plan.num_out,
                                 weight=None if plan.weight is None else plan.weight.detach().cpu())
        self.records.append(MergeRecord(
            layer=layer, metric=metric.detach().float().cpu(), plan=plan_cpu,
            size=None if state.size is None else state.size.detach().cpu(),
            num_protected=settings.num_protected, num_layers=settings.num_layers,
            algorithm=settings.layers[layer].algorithm,
        ))

    def __enter__(self) -> "MergeRecorder":
        self._context = record_merges(self)
        self._context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._context is not None
        self._context.__exit__(*exc)
        self._context = None

    def by_layer(self) -> dict[int, MergeRecord]:
        return {rec.layer: rec for rec in self.records}


def layer_distances(records: Sequence[MergeRecord], graph: str = "distance") -> dict[int, Tensor]:
    """Per-layer SD: the graph of the tokens entering each merge step vs that step's plan. (B,) per layer.

    Each algorithm is measured on its own trajectory (the tokens it produced so far), so deeper layers of
    two algorithms are different graphs; ``cumulative_distances`` compares against a common reference.
    """
    out: dict[int, Tensor] = {}
    with _few_threads(max((r.metric.shape[1] for r in records), default=0)):
        for rec in records:
            out[rec.layer] = _layer_distance(rec, graph)
    return out


def _layer_distance(rec: MergeRecord, graph: str) -> Tensor:
    h = rec.num_protected
    w = token_graph(rec.metric[:, h:], graph)
    if rec.plan is None:
        return torch.zeros(w.shape[0], dtype=torch.float64)
    groups, n = plan_groups(rec.plan, h)
    return spectral_distance(w, groups, n)


def cumulative_distances(
    reference: Sequence[MergeRecord], history: Sequence[tuple[int, Tensor]], graph: str = "distance"
) -> dict[int, Tensor]:
    """End-to-end SD per layer: the UNMERGED model's token graph at block l vs the partition of the original
    tokens made by all merges up to and including block l (the cumulative source map).

    reference: records of a forward that merged nothing (e.g. patched with ratio=1), one per block.
    history:   ``pitome.info(model).source_history`` of the merged forward (trace_source=True).
    """
    out: dict[int, Tensor] = {}
    with _few_threads(max((r.metric.shape[1] for r in reference), default=0)):
        for rec in reference:
            out[rec.layer] = _cumulative_distance(rec, history, graph)
    return out


def _cumulative_distance(rec: MergeRecord, history: Sequence[tuple[int, Tensor]], graph: str) -> Tensor:
    if rec.plan is not None:
        raise ValueError(f"reference record of block {rec.layer} merged tokens; use a forward with ratio=1")
    h = rec.num_protected
    w = token_graph(rec.metric[:, h:], graph)
    source = source_after(history, rec.layer)
    if source is None:
        return torch.zeros(w.shape[0], dtype=torch.float64)
    groups, n = source_groups(source.cpu(), h)
    if groups.shape != w.shape[:2]:
        raise ValueError(f"source map over {groups.shape[1]} tokens does not match the reference graph "
                         f"over {w.shape[1]} tokens at block {rec.layer}")
    return spectral_distance(w, groups, n)


# -- synthetic clusters satisfying the theorem's assumptions (A1-A3) ---------------------------------------

DEFAULT_CLUSTER_SIZES = (40, 32, 25, 20, 16, 12, 10, 8, 6, 5, 4, 3, 2, 1, 1, 1)


def clustered_tokens(
    sizes: Sequence[int] = DEFAULT_CLUSTER_SIZES, dim: int = 1024, noise: float = 1e-3, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Tokens in true clusters: (features (T, dim), cluster label (T,)), in a random (seeded) order.

    A1: within-cluster cosine -> 1 as ``noise`` -> 0 (token = centre + noise * N(0, I/dim)).
    A2: random unit centres in high dimension have |cos| of about 1/sqrt(dim), far below any margin in
        (0.1, 0.9) that sits under the within-cluster cosine.
    A3: cluster sizes as given (keep them non-increasing).
    """
    if not sizes or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive cluster sizes, got {list(sizes)!r}")
    if noise < 0 or dim < 2:
        raise ValueError(f"need noise >= 0 and dim >= 2, got noise={noise!r}, dim={dim!r}")
    gen = torch.Generator().manual_seed(int(seed))
    centres = torch.randn(len(sizes), dim, generator=gen, dtype=torch.float64)
    centres = centres / centres.norm(dim=-1, keepdim=True)
    labels = torch.cat([torch.full((int(s),), i, dtype=torch.long) for i, s in enumerate(sizes)])
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=gen, dtype=torch.float64) / dim ** 0.5
    perm = torch.randperm(len(labels), generator=gen)
    return x[perm].float(), labels[perm]


def merge_until(
    algorithm: Any, tokens: Tensor, ratio: float, target: int, generator: Optional[torch.Generator] = None
) -> list[tuple[int, Tensor]]:
    """Merge ``tokens`` (T, d) step after step, as a model with identity blocks would, until ``target`` remain.

    Each step removes floor(t - t * ratio) tokens (at least 1, at most t // 2 and never below ``target``),
    so every algorithm gets the same budget at every step. Returns [(tokens left, source map (T,))].
    """
    from .algorithms.base import MergeRequest

    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) for the synthetic run, got {ratio!r}")
    total = tokens.shape[0]
    if not 1 <= target <= total:
        raise ValueError(f"target must be in [1, {total}], got {target!r}")
    cur = tokens.unsqueeze(0).float()
    size = torch.ones(1, total)
    source = torch.arange(total).unsqueeze(0)
    steps: list[tuple[int, Tensor]] = []
    layer = 0
    while cur.shape[1] > target:
        t = cur.shape[1]
        r = min(max(1, int(t - t * ratio)), t // 2, t - target)
        request = MergeRequest(metric=cur, r=torch.full((1,), r), r_max=r, r_min=r, num_protected=0,
                               size=size, layer=layer, num_layers=layer + 1, generator=generator)
        plan = algorithm.plan(request)
        cur, size = plan.merge(cur, size)
        source = plan.compose_source(source)
        steps.append((cur.shape[1], source[0]))
        layer += 1
    return steps


def synthetic_distances(
    algorithms: dict[str, Any], sizes: Sequence[int] = DEFAULT_CLUSTER_SIZES, dim: int = 1024,
    noise: float = 1e-3, ratio: float = 0.7, seeds: Sequence[int] = range(10), graph: str = "distance",
    target: Optional[int] = None, every_step: bool = True,
) -> dict[str, list[list[float]]]:
    """SD(G, G_alg) after each merge step (or only the last, ``every_step=False``), per algorithm and seed,
    merging down to ``target`` tokens (default: the number of true clusters, the end point of Theorem 1).
    {name: [[SD per step] per seed]}."""
    out: dict[str, list[list[float]]] = {name: [] for name in algorithms}
    goal = len(sizes) if target is None else int(target)
    with _few_threads(sum(sizes)):
        for seed in seeds:
            _synthetic_seed(out, algorithms, sizes, dim, noise, ratio, int(seed), graph, goal, every_step)
    return out


def _synthetic_seed(out: dict, algorithms: dict[str, Any], sizes: Sequence[int], dim: int, noise: float,
                    ratio: float, seed: int, graph: str, goal: int, every_step: bool) -> None:
    x, _ = clustered_tokens(sizes, dim, noise, seed)
    w = token_graph(x, graph)
    base = spectrum(w)
    for name, algorithm in algorithms.items():
        gen = torch.Generator().manual_seed(seed)
        steps = merge_until(algorithm, x, ratio, goal, generator=gen)
        chosen = steps if every_step else steps[-1:]
        out[name].append([float(spectral_distance(w, src, base=base)) for _, src in chosen])
