"""One merge setting as the tools pass it around: algorithm + budget + options (bench, eval, calibrate, train).

A ``MergeSetting`` is frozen and hashable (runs are cached by setting), prints as a short label
("tome r=8", "auto ratio=0.9", "pitome -30% FLOPs") and round-trips through JSON. Its budget is either
concrete (``ratio`` or ``r``, what ``pitome.patch`` takes) or solved per model: ``flops_reduction`` (remove this
share of FLOPs) or ``equal_flops_to`` (the FLOPs of another setting). Solved settings are resolved with
``with_budget`` once a model is known; ``patch_kwargs`` refuses an unresolved one.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

__all__ = ["MergeSetting", "UNMERGED"]


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _ratio(value: Any) -> Any:
    """A keep-ratio as stored: a float, or a tuple with one entry per block (calibrated budgets; None = no merge)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return tuple(None if v is None else float(v) for v in value)
    return float(value)


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _r_for_patch(r: Any) -> Any:
    """(r, inflection) stays a tuple, a per-block schedule becomes a list again."""
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        return r
    return _thaw(r)


@dataclass(frozen=True)
class MergeSetting:
    """algorithm None and preset None = the unmerged model. ``kwargs``: frozen (key, value) pairs of the other
    ``pitome.patch`` arguments (layers, prop_attn, algorithm options...; ``options`` is the same as a dict);
    ``name``: what rows call it (e.g. "auto")."""

    algorithm: Optional[str] = None
    ratio: Any = None  # a keep-ratio, or a tuple with one per block (calibrated budgets)
    r: Any = None
    flops_reduction: Optional[float] = None
    equal_flops_to: Optional["MergeSetting"] = None
    preset: Optional[str] = None
    kwargs: tuple = ()
    budgets: Optional[str] = None
    name: Optional[str] = None
    note: str = ""

    @staticmethod
    def make(algorithm: Optional[str] = None, ratio: Optional[float] = None, r: Any = None, *,
             flops_reduction: Optional[float] = None, equal_flops_to: Optional["MergeSetting"] = None,
             preset: Optional[str] = None, budgets: Optional[str] = None, name: Optional[str] = None,
             note: str = "", **options: Any) -> "MergeSetting":
        """Keyword arguments beyond the budget are ``pitome.patch`` options (None values are dropped)."""
        items = tuple(sorted((k, _freeze(v)) for k, v in options.items() if v is not None))
        return MergeSetting(algorithm, _ratio(ratio), _freeze(r), flops_reduction,
                            equal_flops_to, preset, items, budgets, name, note)

    # --- what it is -----------------------------------------------------------------------------------------

    @property
    def merges(self) -> bool:
        return self.algorithm is not None or self.preset is not None

    @property
    def solved(self) -> bool:
        """True while the budget still has to be computed for a model (FLOPs target or FLOPs match)."""
        return self.flops_reduction is not None or (self.equal_flops_to is not None and self.r is None
                                                    and self.ratio is None)

    @property
    def options(self) -> dict:
        return {k: _thaw(v) for k, v in self.kwargs}

    @property
    def patch_options(self) -> dict:
        """``pitome.patch`` arguments other than the algorithm and the budget: the options and the preset."""
        return {**self.options, **({"preset": self.preset} if self.preset is not None else {})}

    @property
    def match_ratio(self) -> Optional[float]:
        """The keep-ratio whose FLOPs this setting matches (eval's ToMe-at-equal-FLOPs rows), if any."""
        return None if self.equal_flops_to is None else self.equal_flops_to.ratio

    @property
    def display(self) -> str:
        """The algorithm column: 'unmerged', the name, the algorithm, or 'preset X'."""
        if not self.merges:
            return "unmerged"
        return self.name or self.algorithm or f"preset {self.preset}"

    @property
    def budget(self) -> str:
        """The budget column: 'ratio=0.9', 'r=8 (FLOPs of ratio 0.9)', '-30% FLOPs', '-' for unmerged."""
        if not self.merges:
            return "-"
        if self.budgets is not None:
            return f"calibrated ({self.budgets})"
        if self.ratio is not None:
            text = (f"ratio={self.ratio:g}" if isinstance(self.ratio, float)
                    else "ratios=" + "/".join("-" if v is None else f"{v:g}" for v in self.ratio))
        elif self.r is not None:
            text = f"r={_r_for_patch(self.r)}"
        elif self.flops_reduction is not None:
            return f"-{self.flops_reduction:.0%} FLOPs"
        else:
            text = "r=?"
        if self.equal_flops_to is not None:
            ref = self.equal_flops_to
            text += f" (FLOPs of {f'ratio {ref.ratio:g}' if ref.ratio is not None else ref.label})"
        return text

    @property
    def label(self) -> str:
        """One line for tables and progress: 'tome r=8 (FLOPs of ratio 0.9) prop_attn=False'."""
        if not self.merges:
            return "unmerged"
        parts = [self.display, self.budget]
        if self.preset and self.name != self.preset and self.algorithm:
            parts.append(f"preset={self.preset}")
        parts += [f"{k}={json.dumps(_thaw(v))}" for k, v in self.kwargs]
        return " ".join(parts)

    def __str__(self) -> str:
        return self.label

    # --- using it -------------------------------------------------------------------------------------------

    def with_budget(self, ratio: Optional[float] = None, r: Any = None, note: str = "") -> "MergeSetting":
        """This setting with a concrete budget (a solved one, resolved for a model)."""
        return replace(self, ratio=_ratio(ratio), r=_freeze(r), flops_reduction=None,
                       note=note or self.note)

    def patch_kwargs(self) -> dict:
        """Arguments for ``pitome.patch(model, **kwargs)``."""
        if self.solved:
            raise ValueError(f"setting {self.label!r} has a budget solved per model; resolve it for a model first")
        kwargs: dict = self.options
        if self.budgets is not None:  # a calibration file (pitome calibrate): its setting and per-block ratios
            from .calibration import Calibration

            # the row's own algorithm / preset (when named) run with the calibrated per-block keep-ratios
            named = {key: getattr(self, key) for key in ("algorithm", "preset") if getattr(self, key) is not None}
            return {**Calibration.load(self.budgets).patch_kwargs(), **named, **kwargs}
        for key in ("algorithm", "ratio", "preset"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        if self.r is not None:
            kwargs["r"] = _r_for_patch(self.r)
        return kwargs

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """Patch ``model`` for the duration (unmerged: make sure it is not patched)."""
        import pitome

        if not self.merges:
            if pitome.is_patched(model):
                raise RuntimeError("the model is already patched; an unmerged pass needs the original model")
            yield model
            return
        with pitome.patched(model, **self.patch_kwargs()):
            yield model

    def to_dict(self) -> dict:
        """JSON-ready; ``from_dict`` gives the same setting back."""
        out: dict = {k: getattr(self, k) for k in ("algorithm", "ratio", "flops_reduction", "preset", "budgets",
                                                   "name", "note") if getattr(self, k) not in (None, "")}
        if self.r is not None:
            out["r"] = _thaw(self.r)
        if self.kwargs:
            out["options"] = self.options
        if self.equal_flops_to is not None:
            out["equal_flops_to"] = self.equal_flops_to.to_dict()
        return out

    @staticmethod
    def from_dict(data: dict) -> "MergeSetting":
        data = dict(data)
        options = data.pop("options", {}) or {}
        ref = data.pop("equal_flops_to", None)
        return MergeSetting.make(**data, equal_flops_to=None if ref is None else MergeSetting.from_dict(ref),
                                 **options)


UNMERGED = MergeSetting()
