"""What every merging algorithm receives and returns. Algorithms import torch only, never a model library."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from ..plan import MergePlan, stable_argsort

__all__ = ["MergeRequest", "MergeAlgorithm", "ALGORITHMS", "register", "unit_rows", "sorted_desc"]


@dataclass
class MergeRequest:
    """One layer's merge problem.

    metric:        (B, N, d) similarity features (keys averaged over heads, or hidden states).
    r:             (B,) long, tokens to remove per sample; already capped to what the algorithm allows.
    r_max, r_min:  max and min of ``r`` as Python ints (no device sync inside algorithms).
    num_protected: leading tokens (class / distillation / register) that are never merged.
    valid:         (B, T) bool over the T = N - num_protected mergeable tokens; False = padding.
    frozen:        (B, T) bool, real tokens that must stay as they are (e.g. [SEP] / EOS).
    size:          (B, T) float32 current token sizes (for algorithms that weigh by size).
    attention:     (B, N) float attention received from the class token, averaged over heads
                   (only for algorithms with ``needs_attention``; see ``attention_from``).
    layer, num_layers: position of this layer in the model (for per-layer schedules such as margins).
    generator:     random generator for randomised baselines.
    """

    metric: Tensor
    r: Tensor
    r_max: int
    num_protected: int
    r_min: Optional[int] = None
    valid: Optional[Tensor] = None
    frozen: Optional[Tensor] = None
    size: Optional[Tensor] = None
    attention: Optional[Tensor] = None
    layer: int = 0
    num_layers: int = 1
    generator: Optional[torch.Generator] = None

    def survivors(self) -> int:
        """Most tokens left in one sample after removing r (the plan's width without the head)."""
        r_min = self.r_min if self.r_min is not None else int(self.r.min())
        return self.metric.shape[1] - self.num_protected - r_min

    def fewest_survivors(self) -> int:
        """Fewest tokens left in one sample (equal to ``survivors()`` when every sample removes the same r:
        plans then carry their fast gather form)."""
        return self.metric.shape[1] - self.num_protected - self.r_max

    @property
    def mergeable_metric(self) -> Tensor:
        return self.metric[:, self.num_protected :]

    @property
    def candidates(self) -> Optional[Tensor]:
        """(B, T) bool: tokens allowed to merge or receive merges; None means all."""
        if self.valid is None and self.frozen is None:
            return None
        cand = torch.ones_like(self.valid if self.valid is not None else self.frozen)
        if self.valid is not None:
            cand = cand & self.valid
        if self.frozen is not None:
            cand = cand & ~self.frozen
        return cand


class MergeAlgorithm:
    """Base class: a dataclass of options plus ``plan``.

    Subclasses are dataclasses whose fields are the algorithm's options. ``max_removable`` tells the
    merge step how many tokens one application can remove at most, given the number of candidates.
    """

    name: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = False
    # with needs_attention: 'cls' = attention paid by token 0 (the class token); 'mean' = attention received,
    # averaged over all query tokens (adapters use 'mean' for models without a leading protected token)
    attention_from: ClassVar[str] = "cls"
    summary: ClassVar[str] = ""

    def plan(self, request: MergeRequest) -> MergePlan:  # pragma: no cover - interface
        raise NotImplementedError

    def max_removable(self, candidates: "Tensor | int") -> "Tensor | int":
        """Largest r per sample given the count of candidate tokens; bipartite schemes allow half."""
        return candidates // 2

    def merge_macs(self, tokens: int, dim: int) -> int:
        """Multiply-accumulates of one merge step on ``tokens`` mergeable tokens with metric width ``dim``,
        for FLOPs accounting (``pitome.flops``); default: bipartite matching, a ceil(T/2) x floor(T/2) similarity."""
        return ((tokens + 1) // 2) * (tokens // 2) * dim

    @staticmethod
    def all_but_one(candidates: "Tensor | int") -> "Tensor | int":
        """Cap for methods that can reduce the candidates to a single token (pruning, DCT, fusion)."""
        if isinstance(candidates, Tensor):
            return (candidates - 1).clamp_min(0)
        return max(candidates - 1, 0)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []

    @classmethod
    def create(cls, **options: Any) -> "MergeAlgorithm":
        allowed = cls.option_names()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for algorithm '{cls.name}'; allowed: {allowed or 'none'}"
            )
        return cls(**options)


ALGORITHMS: dict[str, type[MergeAlgorithm]] = {}


def register(cls: type[MergeAlgorithm]) -> type[MergeAlgorithm]:
    """Make an algorithm selectable by its ``name`` (a class decorator; each algorithm file registers itself).
    The class becomes a dataclass of its options unless it already is one itself (``@register @dataclass`` works)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty 'name'")
    if "__dataclass_fields__" not in vars(cls):
        cls = dataclass(cls)
    ALGORITHMS[cls.name] = cls
    return cls


def unit_rows(metric: Tensor) -> Tensor:
    """L2-normalised rows in float32 (similarities stay in fp32 under half precision)."""
    m = metric.float()
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def sorted_desc(score: Tensor) -> Tensor:
    """Stable descending argsort along the last dim (deterministic ties: lower index first)."""
    return stable_argsort(score, dim=-1, descending=True)
