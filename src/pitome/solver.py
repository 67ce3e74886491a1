"""FLOPs-target schedules: the PiToMe keep-ratio (or ToMe r) that removes X% of a model's FLOPs.

Token counts come from ``MergeSettings.token_counts`` (the merge step's own rule, including each algorithm's
cap per step; no forward needed once the model's ``ModelCost`` is known) and FLOPs from ``pitome.flops``. FLOPs fall monotonically as the ratio falls or r
grows, so a bisection (ratio) or a scan (r) finds the budget whose FLOPs are closest to the target; the
answer is off by at most one merge step's worth of tokens, since budgets are discrete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from .algorithms import algorithm_class
from .config import bound_settings
from .flops import EncoderShape, count_macs, encoder_macs, metric_width
from .schedule import resolve_budgets

__all__ = ["ModelCost", "Solution", "solve", "match_flops", "default_budget_kind"]


@dataclass(frozen=True)
class ModelCost:
    """What one item's FLOPs depend on, for one model and one input size.

    extra_macs: stem and head (outside the blocks), the same whatever the budget.
    metric:     'keys' or 'hidden' (width of the similarity the merge step computes).
    lengths:    tokens per item when items differ (text): MACs are the mean over them; empty = num_tokens.
    frozen:     real tokens after the protected ones that never merge (a text model's final [SEP]).
    """

    shape: EncoderShape
    num_layers: int
    num_tokens: int
    num_protected: int
    extra_macs: int = 0
    metric: str = "keys"
    lengths: tuple[int, ...] = ()
    frozen: int = 0

    @classmethod
    def from_model(cls, model: nn.Module, inputs: Any, metric: str = "keys") -> "ModelCost":
        """Read widths, token count and stem/head MACs from one forward of the (unpatched) model."""
        from .adapters import find_adapter
        from .api import is_patched, settings, unpatch

        previous = settings(model).config if is_patched(model) else None
        if previous is not None:
            unpatch(model)
        try:
            count = count_macs(model, inputs)
            adapter = find_adapter(model)
            protected, layers = adapter.num_protected(model), adapter.num_layers(model)
        finally:
            if previous is not None:
                from .api import apply

                apply(model, previous)
        return cls(shape=count.shape, num_layers=layers, num_tokens=count.tokens_per_layer[0],
                   num_protected=protected, extra_macs=count.extra_macs, metric=metric)

    def token_counts(self, ratio: Any = None, r: Any = None, layers: Optional[Sequence[int]] = None,
                     algorithm: str = "pitome", num_tokens: Optional[int] = None) -> list[int]:
        """Tokens entering each block, then leaving the last, for ``num_tokens`` (default: the model's input)."""
        budgets = resolve_budgets(self.num_layers, ratio=ratio, r=r, layers=layers)
        settings = bound_settings(budgets, self.num_protected, algorithm)
        return settings.token_counts(self.num_tokens if num_tokens is None else num_tokens, self.frozen)

    def macs(self, ratio: Any = None, r: Any = None, algorithm: str = "pitome", layers: Optional[Sequence[int]] = None,
             include_merge: bool = False) -> float:
        """MACs per item under a budget (ratio=1.0 or r=0: the unmerged model); the mean over ``lengths``."""
        lengths = self.lengths or (self.num_tokens,)
        total = 0
        for n in set(lengths):
            counts = self.token_counts(ratio=ratio, r=r, layers=layers, algorithm=algorithm, num_tokens=n)
            macs = self.extra_macs + encoder_macs(self.shape, counts)
            if include_merge:
                algo = algorithm_class(algorithm)()
                width = metric_width(self.shape, self.metric)
                macs += sum(int(algo.merge_macs(counts[i] - self.num_protected, width))
                            for i in range(self.num_layers) if counts[i + 1] < counts[i])
            total += lengths.count(n) * macs
        return total if len(lengths) == 1 else total / len(lengths)

    @property
    def base_macs(self) -> int:
        return self.macs(ratio=1.0)


@dataclass(frozen=True)
class Solution:
    """The budget found, and what it achieves. ``patch_kwargs()`` gives the arguments for ``pitome.patch``."""

    algorithm: str
    ratio: Optional[float]
    r: Optional[int]
    macs: float
    base_macs: int
    target_macs: float
    token_counts: tuple[int, ...]

    @property
    def reduction(self) -> float:
        """Share of the unmerged model's FLOPs removed."""
        return 1.0 - self.macs / self.base_macs

    @property
    def target_reduction(self) -> float:
        return 1.0 - self.target_macs / self.base_macs

    def patch_kwargs(self) -> dict:
        budget = {"ratio": self.ratio} if self.ratio is not None else {"r": self.r}
        return {"algorithm": self.algorithm, **budget}


def default_budget_kind(algorithm: str) -> str:
    """ToMe is specified with a fixed r; every other algorithm with PiToMe's keep-ratio."""
    return "r" if algorithm == "tome" else "ratio"


def _check_kind(by: str) -> str:
    if by not in ("ratio", "r"):
        raise ValueError(f"by must be 'ratio' or 'r', got {by!r}")
    return by


def solve(cost: ModelCost, reduction: float, algorithm: str = "pitome", by: Optional[str] = None,
          layers: Optional[Sequence[int]] = None, include_merge: bool = False) -> Solution:
    """The budget removing the share ``reduction`` in [0, 1) of the unmerged model's FLOPs (closest achievable).

    by: 'ratio' (keep-ratio per block) or 'r' (tokens per block); default 'r' for ToMe, 'ratio' otherwise.
    include_merge: count the merge steps' own FLOPs (off by default: the papers compare token schedules).
    """
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0.0 <= reduction < 1.0:
        raise ValueError(f"reduction must be a number in [0, 1) (share of FLOPs removed), got {reduction!r}")
    base = cost.macs(ratio=1.0)
    return match_flops(cost, base * (1.0 - reduction), algorithm, by, layers, include_merge)


def match_flops(cost: ModelCost, target_macs: float, algorithm: str = "tome", by: Optional[str] = None,
                layers: Optional[Sequence[int]] = None, include_merge: bool = False) -> Solution:
    """The budget whose MACs per item are closest to ``target_macs`` (e.g. another algorithm's setting)."""
    algorithm_class(algorithm)
    kind = _check_kind(by or default_budget_kind(algorithm))
    base = cost.macs(ratio=1.0)

    def macs(value: Any) -> int:
        budget = {"ratio": value} if kind == "ratio" else {"r": value}
        return cost.macs(**budget, algorithm=algorithm, layers=layers, include_merge=include_merge)

    if kind == "r":  # beyond every candidate, larger r changes nothing (each step is capped)
        r_max = max(max(cost.lengths or (cost.num_tokens,)) - cost.num_protected, 0)
        lowest = macs(r_max)
        _check_reachable(target_macs, lowest, base)
        value: Any = min(range(r_max + 1), key=lambda r: (abs(macs(r) - target_macs), r))
    else:
        lowest = macs(_TINY)
        _check_reachable(target_macs, lowest, base)
        value = _bisect_ratio(macs, target_macs)
    return Solution(algorithm=algorithm, ratio=value if kind == "ratio" else None, r=value if kind == "r" else None,
                    macs=macs(value), base_macs=base, target_macs=float(target_macs),
                    token_counts=tuple(cost.token_counts(**({"ratio": value} if kind == "ratio" else {"r": value}),
                                                         layers=layers, algorithm=algorithm)))


_TINY = 1e-9


def _check_reachable(target: float, lowest: int, base: int) -> None:
    if target > base * (1 + 1e-12):
        raise ValueError(f"target of {target:.6g} MACs is above the unmerged model's {base:.6g}")
    if target < lowest * (1 - 1e-12):
        raise ValueError(f"cannot remove {1 - target / base:.1%} of the FLOPs: at most {1 - lowest / base:.1%} with "
                         f"this model, input size and algorithm (each block removes at most what the algorithm can merge in one "
                         f"step: half of the tokens for bipartite matching)")


def _bisect_ratio(macs: Any, target: float) -> float:
    """Closest ratio, given macs(ratio) non-decreasing; returns the shortest decimal giving the same schedule."""
    lo, hi = _TINY, 1.0  # macs(lo) <= ... ; find the boundary where macs crosses target
    if macs(lo) >= target:
        return _nice(macs, lo, up=True)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if macs(mid) >= target:
            hi = mid
        else:
            lo = mid
    below, above = macs(lo), macs(hi)
    if target - below < above - target:
        return _nice(macs, lo, up=False)
    return _nice(macs, hi, up=True)


def _nice(macs: Any, value: float, up: bool) -> float:
    """A short decimal with the same MACs as ``value`` (rounded towards the inside of its schedule's interval)."""
    want = macs(value)
    for digits in range(0, 12):
        scale = 10 ** digits
        candidate = (math.ceil if up else math.floor)(value * scale) / scale
        if 0.0 < candidate <= 1.0 and macs(candidate) == want:
            return candidate
    return value
