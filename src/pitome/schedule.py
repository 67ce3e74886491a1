"""How many tokens each layer removes: PiToMe's keep-ratio, ToMe's fixed r, (r, inflection), per-layer lists."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Budget", "resolve_budgets", "resolve_layers", "predict_token_counts", "BudgetSpec"]

RatioSpec = Union[float, Sequence[Optional[float]]]
RSpec = Union[int, tuple, Sequence[Optional[int]]]
BudgetSpec = Union[RatioSpec, RSpec]


@dataclass(frozen=True)
class Budget:
    """Tokens to remove at one layer, from the number T of mergeable tokens.

    ratio: keep-ratio rho; removes floor(T - T * rho) (float arithmetic, as the official code).
    r:     fixed count, as ToMe.
    """

    ratio: Optional[float] = None
    r: Optional[int] = None

    def remove_count(self, mergeable: int) -> int:
        if self.r is not None:
            return self.r
        return math.floor(mergeable - mergeable * self.ratio)

    def remove_counts(self, mergeable: Tensor) -> Tensor:
        """Per-sample counts for a (B,) tensor of mergeable-token counts (padding-aware budgets)."""
        if self.r is not None:
            return torch.full_like(mergeable, self.r)
        t = mergeable.to(torch.float64)
        return torch.floor(t - t * self.ratio).to(torch.long)


def _check_ratio(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"ratio{where} must be a number in (0, 1] (keep-ratio per layer), got {value!r}")
    return float(value)


def _check_r(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ValueError(f"r{where} must be an integer >= 0 (tokens removed per layer), got {value!r}")
    return int(value)


def resolve_layers(layers: Optional[Iterable[int]], num_layers: int) -> list[bool]:
    """Which blocks merge: None = all; otherwise block indices (negative counts from the end)."""
    if layers is None:
        return [True] * num_layers
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"layers must be None or a list of block indices, got {layers!r}")
    chosen = [False] * num_layers
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise ValueError(f"layers must hold integers, got {index!r}")
        if not -num_layers <= index < num_layers:
            raise ValueError(f"layer {index} is out of range for a model with {num_layers} blocks")
        chosen[int(index) % num_layers] = True
    return chosen


def resolve_budgets(
    num_layers: int,
    ratio: Optional[RatioSpec] = None,
    r: Optional[RSpec] = None,
    layers: Optional[Iterable[int]] = None,
) -> list[Optional[Budget]]:
    """Per-block budget (None = that block does not merge).

    ratio: a keep-ratio for every merging block, or a list with one entry per block (None = skip).
    r:     a count for every merging block, ToMe's ``(r, inflection)`` (inflection in [-1, 1]: r_l goes
           linearly from r(1 - inflection) at the first block to r(1 + inflection) at the last; < 0 removes
           more early), or a list with one entry per block.
    """
    if ratio is not None and r is not None:
        raise ValueError("give either ratio (keep-ratio per layer) or r (tokens per layer), not both")
    if ratio is None and r is None:
        raise ValueError("a budget is needed: ratio=<keep-ratio in (0, 1]> or r=<tokens per layer>")
    active = resolve_layers(layers, num_layers)
    per_layer: list[Optional[Budget]]
    if ratio is not None:
        if isinstance(ratio, (list, tuple)):
            if len(ratio) != num_layers:
                raise ValueError(f"ratio list has {len(ratio)} entries; the model has {num_layers} blocks")
            per_layer = [None if v is None else Budget(ratio=_check_ratio(v, f"[{i}]")) for i, v in enumerate(ratio)]
        else:
            per_layer = [Budget(ratio=_check_ratio(ratio, ""))] * num_layers
    else:
        if isinstance(r, tuple) and len(r) == 2:  # ToMe's (r, inflection); per-block values come as a list
            base, inflection = _check_r(r[0], ""), r[1]
            if isinstance(inflection, bool) or not isinstance(inflection, numbers.Real) or not -1.0 <= inflection <= 1.0:
                raise ValueError(f"r inflection must be a number in [-1, 1], got {inflection!r}")
            span = max(num_layers - 1, 1)
            per_layer = [
                Budget(r=int(math.floor(base * (1 - inflection) + 2 * base * inflection * i / span)))
                for i in range(num_layers)
            ]
        elif isinstance(r, (list, tuple)):
            if len(r) != num_layers:
                raise ValueError(f"r list has {len(r)} entries; the model has {num_layers} blocks")
            per_layer = [None if v is None else Budget(r=_check_r(v, f"[{i}]")) for i, v in enumerate(r)]
        else:
            per_layer = [Budget(r=_check_r(r, ""))] * num_layers
    return [b if on else None for b, on in zip(per_layer, active)]


def capped(requested: int, allowed: int, layer: int) -> int:
    """Cap a budget at what one merge step allows; the warning comes once per forward, at the user's line."""
    if requested > allowed:
        from .caller_warnings import report_cap

        report_cap(requested, allowed, layer)
        return allowed
    return requested


def predict_token_counts(
    budgets: "Sequence[Optional[Budget]] | Any", num_tokens: int, num_protected: int = 1, *,
    algorithm: str = "pitome", frozen: int = 0, **options: Any,
) -> list[int]:
    """Tokens entering each block, then the tokens leaving the last one (length L + 1), for one sample.

    budgets:   ``pitome.settings(model)`` (a patched model's resolved settings: its algorithms, budgets and
               protected tokens; ``num_protected`` / ``algorithm`` are then ignored), or per-block budgets
               (``resolve_budgets``) merged by ``algorithm`` with ``options`` (its cap per step matters: bipartite
               methods remove at most half the candidates, dct / evit / diffrate / kth more).
    frozen:    real tokens after the protected ones that never merge (a text model's final [SEP]).
    With padding, call it with each sample's own length: a padded batch's real tokens per sample follow it.
    The merge step computes its counts with the same rule (``LayerSettings.remove_count``).
    """
    from .config import MergeSettings, bound_settings

    settings = budgets if isinstance(budgets, MergeSettings) else bound_settings(budgets, num_protected, algorithm, options)
    return settings.token_counts(num_tokens, frozen)
