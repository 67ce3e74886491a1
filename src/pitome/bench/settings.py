"""Merge settings in bench: applying one to a model, and solving per-model budgets (a FLOPs reduction, or the
FLOPs of another setting) with ``pitome.solver``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

from torch import nn

from ..api import patch, unpatch
from ..setting import MergeSetting
from ..solver import ModelCost, match_flops, solve

__all__ = ["apply_setting", "resolve_setting", "Variant"]


def apply_setting(model: nn.Module, setting: MergeSetting) -> None:
    unpatch(model)
    if setting.merges:
        patch(model, **setting.patch_kwargs())


def _layers(setting: MergeSetting, num_layers: int) -> Optional[list]:
    layers = setting.options.get("layers")
    if layers is not None:
        return list(layers)
    if setting.preset is not None and setting.preset != "auto":
        from ..config import preset_config

        return preset_config(setting.preset, num_layers).get("layers")
    return None


def resolve_setting(setting: MergeSetting, cost: Callable[[], ModelCost]) -> MergeSetting:
    """A setting with a concrete budget (solved budgets are computed for this model and input size)."""
    if not setting.solved:
        return setting
    model_cost = cost()
    algorithm = setting.algorithm or "pitome"
    layers = _layers(setting, model_cost.num_layers)
    if setting.flops_reduction is not None:
        solution = solve(model_cost, setting.flops_reduction, algorithm, None, layers)
        note = f"solver: target -{setting.flops_reduction:.1%} FLOPs, got -{solution.reduction:.1%}"
        return replace(setting.with_budget(solution.ratio, solution.r), note=setting.note or note)
    ref = resolve_setting(setting.equal_flops_to, cost)
    ref_budget = {"ratio": ref.ratio} if ref.ratio is not None else {"r": ref.r if ref.r is not None else 0}
    target = model_cost.macs(**ref_budget, layers=_layers(ref, model_cost.num_layers))
    solution = match_flops(model_cost, target, algorithm, None, layers)
    return replace(setting, ratio=solution.ratio, r=solution.r, equal_flops_to=ref,
                   note=setting.note or f"equal FLOPs to {ref.label} (solver)")


def Variant(algorithm: Optional[str] = None, ratio: Optional[float] = None, r: Any = None, *,
            flops_reduction: Optional[float] = None, equal_flops_to: Optional[MergeSetting] = None,
            preset: Optional[str] = None, layers: Any = None, options: Optional[dict] = None,
            note: str = "") -> MergeSetting:
    """The former bench-only setting type, now a ``MergeSetting`` (kept for scripts written against it)."""
    return MergeSetting.make(algorithm, ratio, r, flops_reduction=flops_reduction, equal_flops_to=equal_flops_to,
                             preset=preset, note=note, layers=None if layers is None else list(layers),
                             **(options or {}))
