"""Algorithms x budgets in one run, compared at equal FLOPs.

PiToMe and the registered baselines take the same per-layer keep-ratio (identical token counts, as in the
paper's comparisons); ToMe by default keeps its own fixed-r schedule with the r whose FLOPs come closest to
the keep-ratio's (``tome_budget="r"``), or takes the keep-ratio too (``tome_budget="ratio"``).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from typing import Any, Callable, Optional, Sequence, Union

from ..flops import EncoderShape
from ..setting import MergeSetting
from ..solver import ModelCost, match_flops
from .base import Task
from .distributed import DistContext
from .engine import PassResult, run_pass

__all__ = ["default_algorithms", "build_specs", "match_r", "run_sweep", "VARIANTS"]

# PiToMe variants are options of PiToMe, not baselines: a default sweep does not list them separately.
VARIANTS = ("pitome_text", "pitome_bsm")


def default_algorithms(text: bool = False) -> list[str]:
    """PiToMe (the text variant for text models), ToMe, then every other registered algorithm."""
    import pitome

    first = ["pitome_text" if text else "pitome", "tome"]
    others = [a for a in pitome.available_algorithms() if a not in first and a not in VARIANTS and a != "pitome"]
    return first + others


def build_specs(
    algorithms: Sequence[str],
    ratios: Sequence[float],
    tome_budget: str = "r",
    include_unmerged: bool = True,
    common: Optional[dict] = None,
    per_algorithm: Optional[dict[str, dict]] = None,
    rs: Sequence[int] = (),
) -> list[MergeSetting]:
    """The unmerged model, then every algorithm at every keep-ratio (ToMe: FLOPs-matched r by default), then at
    every fixed r in ``rs``."""
    if tome_budget not in ("r", "ratio"):
        raise ValueError(f"tome_budget must be 'r' (ToMe's fixed r at equal FLOPs) or 'ratio', got {tome_budget!r}")
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"keep-ratios must be numbers in (0, 1], got {ratio!r}")
    import pitome

    known = pitome.available_algorithms()
    for name in algorithms:
        if name not in known:
            raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(known)}")
    specs = [MergeSetting.make(None)] if include_unmerged else []
    for name in algorithms:
        kwargs = {**(common or {}), **((per_algorithm or {}).get(name, {}))}
        for ratio in ratios:
            if name == "tome" and tome_budget == "r":
                specs.append(MergeSetting.make(name, equal_flops_to=MergeSetting.make(name, ratio=ratio), **kwargs))
            else:
                specs.append(MergeSetting.make(name, ratio=float(ratio), **kwargs))
        specs += [MergeSetting.make(name, r=int(r), **kwargs) for r in rs]
    return specs


def match_r(shape: EncoderShape, num_layers: int, num_protected: int, lengths: Sequence[int], ratio: float,
            layers: Optional[Sequence[int]] = None) -> tuple[int, float, float]:
    """The fixed r whose mean FLOPs over ``lengths`` (tokens per item) is closest to keep-ratio ``ratio``'s
    (``pitome.solver.match_flops``, the one FLOPs matcher). Returns (r, MACs at r, MACs at the ratio); ties go
    to the smaller r."""
    cost = ModelCost(shape=shape, num_layers=num_layers, num_tokens=max(lengths), num_protected=num_protected,
                     lengths=tuple(int(n) for n in lengths))
    target = cost.macs(ratio=ratio, layers=layers)
    solution = match_flops(cost, target, "tome", by="r", layers=layers)
    return int(solution.r), solution.macs, target


def _resolve(spec: MergeSetting, task: Task, lengths: Sequence[int]) -> MergeSetting:
    import pitome

    if spec.match_ratio is None or spec.r is not None:
        return spec
    shape = task.model.encoder_shape()
    if shape is None:
        raise ValueError(f"{task.name}: cannot read the model's widths, so FLOPs cannot be matched; give r")
    with pitome.patched(task.model.target, spec.algorithm, r=0, **spec.patch_options):
        settings = pitome.settings(task.model.target)
        num_layers, protected = settings.num_layers, settings.num_protected
        layers = [index for index, layer in enumerate(settings.layers) if layer.merges]
    r, _, _ = match_r(shape, num_layers, protected, lengths, spec.match_ratio, layers)
    return spec.with_budget(r=r)


def _lengths(task: Task, reference: Optional[PassResult]) -> list[int]:
    lengths = task.lengths()
    if lengths:
        return list(lengths)
    if reference is not None and reference.tokens_per_layer:
        return [reference.tokens_per_layer[0]]
    raise ValueError(f"{task.name}: no token count known for FLOPs matching; run the unmerged model first")


def _row(task: Task, result: PassResult, reference: Optional[PassResult], metrics: dict) -> dict[str, Any]:
    spec = result.spec
    row: dict[str, Any] = {
        "task": task.name, "algorithm": spec.display, "budget": spec.budget,
        "ratio": spec.ratio, "r": spec.r if not isinstance(spec.r, tuple) else list(spec.r),
        "matched_ratio": spec.match_ratio, "options": json.dumps(spec.patch_options, sort_keys=True, default=str),
        "items": result.items, "gflops": result.gflops, "items_per_s": result.items_per_s,
    }
    if reference is not None:  # no speed-up here: one pass per row, not interleaved (pitome bench measures speed)
        row["flops_kept"] = result.gflops / reference.gflops if reference.gflops else math.nan
    row.update(metrics)
    row["tokens_per_layer"] = result.tokens_per_layer
    return row


def run_sweep(
    tasks: Sequence[Task],
    specs: Union[Sequence[MergeSetting], Callable[[Task], Sequence[MergeSetting]]],
    ctx: Optional[DistContext] = None,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
    on_row: Optional[Callable[[dict[str, Any]], None]] = None,
) -> list[dict[str, Any]]:
    """Every spec on every task; tasks with the same ``pass_key`` share passes. Returns one row per pair.

    specs: one list for all tasks, or a function giving each task its list (e.g. PiToMe's text variant for text).

    A spec that fails (e.g. a model the algorithm cannot patch) gives a row with ``error`` and the sweep goes on.
    ``on_row(row)`` is called as each row finishes (the CLI streams rows to disk with it).
    """
    ctx = ctx or DistContext()
    say = log or (lambda text: None)
    passes: dict[tuple[str, MergeSetting], PassResult] = {}
    references: dict[str, PassResult] = {}
    rows: list[dict[str, Any]] = []
    for task in tasks:
        mine = specs(task) if callable(specs) else specs
        for spec in sorted(mine, key=lambda s: s.merges):  # unmerged first: it is the task's reference
            try:
                if spec.match_ratio is not None and spec.r is None:
                    spec = _resolve(spec, task, _lengths(task, references.get(task.pass_key)))
                key = (task.pass_key, spec)
                if key not in passes:
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        if spec.match_ratio is not None:  # the FLOPs match already counted ToMe's cap per step
                            warnings.filterwarnings("ignore", message=r"layer \d+: budget asks to remove")
                        passes[key] = run_pass(task.model, task.loader, task.batches, spec, ctx, progress,
                                               desc=f"{task.name}: {spec.label}")
                    say(f"  {task.pass_key}: {spec.label}: {passes[key].items} items, "
                        f"{time.perf_counter() - start:.1f} s")
                result = passes[key]
                if not spec.merges:
                    references.setdefault(task.pass_key, result)
                reference = references.get(task.pass_key)
                row = _row(task, result, reference, task.metrics(result, reference))
            except (ValueError, TypeError, RuntimeError) as error:
                warnings.warn(f"{task.name}: {spec.label} failed: {error}", stacklevel=2)
                row = {"task": task.name, "algorithm": spec.display, "budget": spec.budget,
                       "ratio": spec.ratio, "matched_ratio": spec.match_ratio,
                       "options": json.dumps(spec.patch_options, sort_keys=True, default=str),
                       "error": f"{type(error).__name__}: {error}"}
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
