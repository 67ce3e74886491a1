"""Per-block merge budgets calibrated on a few unlabeled inputs, at a FLOPs target.

A uniform keep-ratio spends the same share of tokens in every block, but blocks differ in how much merging
hurts (docs/ablation.md: *where* the budget is spent matters more than the energy's details). ``calibrate``
searches per-block keep-ratios that keep the model's output closest to the unmerged model's on a handful of
inputs (cosine distance of the embedding, or KL of the logits), under a FLOPs target counted by the same
analytic formulas as ``pitome.flops`` (attention's N^2 included, per item, padding-aware).

The search, in a fixed number of forwards of the calibration batch (deterministic for a seed):
1. a shape vector w (one weight per block) sets the keep-ratios rho_l = 1 - t * w_l; for any w the scale t
   is found by bisection on the analytic FLOPs, so every candidate meets the target (no forward needed);
2. a line search over linear ramps of w (merge more early / late), then coordinate descent on single blocks
   (w_l up or down, step halved per sweep), keeping a change only when the distortion falls.

Keep-ratios (not counts) are returned, so the result applies to inputs of any length (text).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .flops import count_macs, run_forward
from .solver import ModelCost

__all__ = ["Calibration", "calibrate", "output_distance"]

FORMAT = "pitome.calibration/1"
MIN_RATIO = 0.05          # a block never keeps less than this share of its candidates (bipartite merges: 0.5)
TRIM_TOLERANCE = 0.005   # relative FLOPs error: above it a schedule gets a one-block trim, then is rejected
RAMP_SLOPES = (-0.9, -0.45, 0.45, 0.9)   # w_l = 1 + slope * (2 l / (L - 1) - 1): > 0 merges more in late blocks


@dataclass(frozen=True)
class Calibration:
    """A calibrated setting: per-block keep-ratios plus the other ``pitome.patch`` arguments, and how it was found.

    ``pitome.patch(model, **setting.patch_kwargs())`` applies it; ``save`` / ``load`` keep it as JSON so a model
    is calibrated once.
    """

    ratios: tuple[float, ...]
    patch: dict = field(default_factory=dict)
    target_reduction: float = 0.0
    reduction: float = 0.0            # FLOPs share removed on the calibration batch
    distortion: float = 0.0           # mean distance to the unmerged output on the calibration batch
    uniform_ratio: float = 1.0        # the uniform keep-ratio at the same FLOPs, and its distortion
    uniform_distortion: float = 0.0
    distance: str = "cosine"
    items: int = 0
    forwards: int = 0                 # forwards of the calibration batch, all included
    seconds: float = 0.0
    seed: int = 0

    def patch_kwargs(self) -> dict:
        """Arguments for ``pitome.patch``: the stored setting with ``ratio`` = the per-block keep-ratios."""
        return {**self.patch, "ratio": list(self.ratios)}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ratios"] = list(self.ratios)
        return {"format": FORMAT, **out}

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a pitome calibration (expected format {FORMAT!r}, "
                             f"got {data.get('format') if isinstance(data, dict) else type(data).__name__!r})")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        ratios = values.get("ratios")
        if not isinstance(ratios, list) or not ratios or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in ratios):
            raise ValueError(f"calibration 'ratios' must be a non-empty list of keep-ratios in (0, 1], got {ratios!r}")
        values["ratios"] = tuple(float(v) for v in ratios)
        return cls(**values)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Calibration":
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"calibration file {str(path)!r} does not exist")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"calibration file {str(path)!r} is not valid JSON: {error}") from None
        return cls.from_dict(data)

    def summary(self) -> str:
        ratios = " ".join(f"{v:.3f}" for v in self.ratios)
        return (f"keep-ratios per block: {ratios}\n"
                f"FLOPs removed: {self.reduction:.1%} (target {self.target_reduction:.1%}) on {self.items} items; "
                f"distortion ({self.distance}) {self.distortion:.5f} vs {self.uniform_distortion:.5f} for the "
                f"uniform keep-ratio {self.uniform_ratio:.3f}\n"
                f"cost: {self.forwards} forwards of the calibration batch, {self.seconds:.1f} s")


# --- distances ---------------------------------------------------------------------------------------------

def output_distance(merged: Tensor, reference: Tensor, distance: str) -> Tensor:
    """Per-item distance: 1 - cosine of embeddings, or KL(reference || merged) of logits."""
    a, b = merged.float().flatten(1), reference.float().flatten(1)
    if distance == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
    if distance == "kl":
        ref = torch.log_softmax(b, dim=-1)
        return (ref.exp() * (ref - torch.log_softmax(a, dim=-1))).sum(dim=-1)
    raise ValueError(f"distance must be 'cosine' or 'kl', got {distance!r}")


def _default_output(model: nn.Module, family: Optional[str]) -> Callable[[Any], Tensor]:
    """What to compare when the caller gives no ``output``: logits (KL) when the model has them, else the
    pooled embedding (text: size- and mask-weighted mean of the last hidden states; vision: the class token)."""
    from .pooling import pool_mean

    def run(inputs: Any) -> Tensor:
        out = run_forward(model, inputs)
        if isinstance(out, Tensor):
            return out if out.dim() == 2 else out[:, 0]
        get = out.get if isinstance(out, dict) else (lambda k: getattr(out, k, None))
        for key in ("logits", "image_embeds", "text_embeds"):
            if isinstance(get(key), Tensor):
                value = get(key)
                return value if value.dim() == 2 else value[:, 0]
        hidden = get("last_hidden_state")
        if family == "text" and isinstance(hidden, Tensor):
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            return pool_mean(model, hidden, mask)
        pooled = get("pooler_output")
        if isinstance(pooled, Tensor):
            return pooled
        if isinstance(hidden, Tensor):
            return hidden[:, 0]
        raise ValueError(f"cannot find an embedding or logits in the output of {type(model).__name__}; pass "
                         f"output=<callable(inputs) -> (batch, dim) tensor>")

    return run


# --- FLOPs of a keep-ratio schedule, per item ----------------------------------------------------------------

@dataclass(frozen=True)
class _Budgeter:
    """Per-block keep-ratio schedules at a FLOPs target. MACs per item come from ``pitome.solver.ModelCost`` (the
    library's one token-count rule, mean over the items' own lengths), so they are what a forward does."""

    cost: ModelCost
    algorithm: str
    min_ratio: float   # the lowest keep-ratio within one merge step's cap (bipartite: just above 0.5)

    def macs(self, ratios: Sequence[float]) -> float:
        return float(self.cost.macs(ratio=list(ratios), algorithm=self.algorithm))

    @property
    def base_macs(self) -> float:
        return self.macs([1.0] * self.cost.num_layers)

    def lowest_macs(self) -> float:
        return self.macs([self.min_ratio] * self.cost.num_layers)

    def schedule(self, weights: Sequence[float], target: float) -> tuple[list[float], float]:
        """Keep-ratios rho_l = 1 - t w_l with the t whose MACs come closest to ``target``."""
        w = np.asarray(weights, dtype=np.float64)
        floor = self.min_ratio
        top = (1.0 - floor) / max(float(w.max()), 1e-12)

        def ratios(t: float) -> list[float]:
            return [float(np.clip(1.0 - t * v, floor, 1.0)) for v in w]

        lo, hi = 0.0, top
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.macs(ratios(mid)) > target else (lo, mid)
        best = min((lo, hi), key=lambda t: (abs(self.macs(ratios(t)) - target), t))
        chosen = [round(v, 4) for v in ratios(best)]
        got = self.macs(chosen)
        if abs(got / target - 1.0) > TRIM_TOLERANCE:  # few tokens: one scale t is too coarse, trim one block
            chosen, got = self._trim(ratios(lo), ratios(hi), target, (chosen, got))
        return chosen, got

    def _trim(self, above: list[float], below: list[float], target: float,
              best: tuple[list[float], float]) -> tuple[list[float], float]:
        """Move one block's ratio alone: down from the schedule just above the target, or up from the one just
        below it; the block and ratio whose MACs come closest to the target win (single-token steps)."""
        for start, low, high in ((above, self.min_ratio, None), (below, None, 1.0)):
            for layer in range(self.cost.num_layers):
                def with_layer(value: float) -> list[float]:
                    out = list(start)
                    out[layer] = value
                    return out

                lo = low if low is not None else start[layer]
                hi = high if high is not None else start[layer]
                for _ in range(30):
                    mid = 0.5 * (lo + hi)
                    lo, hi = (lo, mid) if self.macs(with_layer(mid)) > target else (mid, hi)
                for value in (lo, hi):
                    candidate = [round(v, 4) for v in with_layer(value)]
                    macs = self.macs(candidate)
                    if abs(macs - target) < abs(best[1] - target):
                        best = (candidate, macs)
        return best


def _min_ratio(algorithm: Any) -> float:
    """Just above the share one step can remove (bipartite: 0.5), so no block asks for more than its cap, also
    when a frozen token counts in the budget (text)."""
    share = algorithm.max_removable(1000) / 1000
    return min(max(1.0 - share, MIN_RATIO) + 0.01, 1.0)


# --- the search ----------------------------------------------------------------------------------------------

def _ramp(num_layers: int, slope: float) -> list[float]:
    span = max(num_layers - 1, 1)
    return [max(0.05, 1.0 + slope * (2.0 * i / span - 1.0)) for i in range(num_layers)]


def _check_inputs(inputs: Any) -> int:
    from .flops import batch_size_of

    if inputs is None:
        raise ValueError("calibrate needs a batch of inputs (16-64 unlabeled examples), got None")
    if isinstance(inputs, dict):
        if not inputs:
            raise ValueError("calibrate needs a batch of inputs, got an empty dict")
        sizes = {k: int(v.shape[0]) for k, v in inputs.items() if isinstance(v, Tensor) and v.dim() > 0}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the calibration batch has tensors of different batch sizes: {sizes}")
    try:
        size = batch_size_of(inputs)
    except ValueError:
        raise ValueError("calibrate needs a batch of inputs: a tensor, or a dict / tuple of tensors, batch first"
                         ) from None
    if size == 0:
        raise ValueError("the calibration batch is empty (0 items); give 16-64 unlabeled examples")
    return size


def _item_lengths(inputs: Any, tokens: int, batch: int) -> list[int]:
    """Tokens entering block 0 per item: the padding mask's row sums for padded text, else the forward's count."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, Tensor) and mask.dim() == 2:
        extra = tokens - int(mask.shape[1])  # tokens the model adds in front of the text (usually none)
        return [int(v) + extra for v in (mask != 0).sum(dim=1).tolist()]
    return [tokens] * batch


def calibrate(
    model: nn.Module,
    inputs: Any,
    *,
    flops_reduction: Optional[float] = None,
    macs: Optional[float] = None,
    preset: Optional[str] = None,
    algorithm: Any = None,
    output: Optional[Callable[[Any], Tensor]] = None,
    distance: Optional[str] = None,
    max_forwards: int = 48,
    seed: int = 0,
    **patch_kwargs: Any,
) -> Calibration:
    """Per-block keep-ratios that keep ``model``'s output closest to the unmerged one at a FLOPs target.

    inputs:          one batch (16-64 unlabeled items) as the model takes it (tensor, dict of tensors, tuple);
                     padded text needs its ``attention_mask`` (budgets and FLOPs follow each item's real length).
    flops_reduction: share of the unmerged model's FLOPs to remove, in (0, 1) (stem and head included, merge
                     steps excluded, as ``pitome.solver``); or ``macs``: the MACs per item to reach.
    preset / algorithm / patch_kwargs: the setting whose budgets are calibrated (``preset="auto"`` when no
                     algorithm is given).
    output:          inputs -> (batch, dim) tensor compared with the unmerged model's (default: the logits if
                     the model returns them, else its pooled embedding).
    distance:        'cosine' (embeddings) or 'kl' (logits); default 'kl' for logits, else 'cosine'.
    max_forwards:    forwards of the batch the search may use (two more measure the unmerged model).
    seed:            order of the coordinate-descent sweeps.
    """
    from .adapters import find_adapter
    from .api import is_patched, patched
    from .api import settings as merge_settings

    if (flops_reduction is None) == (macs is None):
        raise ValueError("give exactly one target: flops_reduction=<share in (0, 1)> or macs=<MACs per item>")
    if flops_reduction is not None and (isinstance(flops_reduction, bool) or
                                        not isinstance(flops_reduction, (int, float)) or
                                        not 0.0 < flops_reduction < 1.0):
        raise ValueError(f"flops_reduction must be a number in (0, 1) (share of FLOPs removed), got {flops_reduction!r}")
    if macs is not None and (isinstance(macs, bool) or not isinstance(macs, (int, float)) or macs <= 0):
        raise ValueError(f"macs must be a positive number (MACs per item), got {macs!r}")
    if isinstance(max_forwards, bool) or not isinstance(max_forwards, int) or max_forwards < 6:
        raise ValueError(f"max_forwards must be an integer >= 6, got {max_forwards!r}")
    if distance is not None and distance not in ("cosine", "kl"):
        raise ValueError(f"distance must be 'cosine' or 'kl', got {distance!r}")
    if "ratio" in patch_kwargs or "r" in patch_kwargs:
        raise ValueError("calibrate chooses the budgets itself; do not pass ratio or r")
    if is_patched(model):
        raise ValueError("calibrate needs the unpatched model (call pitome.unpatch(model) first)")
    batch = _check_inputs(inputs)
    adapter = find_adapter(model)
    num_layers = adapter.num_layers(model)
    family = getattr(adapter, "family", None) or None
    if preset is None and algorithm is None:
        preset = "auto"
    setting = {"algorithm": algorithm, "preset": preset, **patch_kwargs}
    setting = {k: v for k, v in setting.items() if v is not None}
    # validate the setting (and learn its algorithm and cap) before any forward
    with patched(model, ratio=1.0, **setting) as probe:
        resolved = merge_settings(probe)
        first = next((s.algorithm for s in resolved.layers if s.algorithm is not None), None)
        num_protected, metric = resolved.num_protected, resolved.config.metric
    if first is None:
        raise ValueError("the setting merges in no block (layers / algorithm None everywhere): nothing to calibrate")

    start = time.perf_counter()
    forwards = 0
    with torch.no_grad():
        count = count_macs(model, inputs)
        forwards += 1
        run = output if output is not None else _default_output(model, family)
        reference = run(inputs)
        forwards += 1
    if not isinstance(reference, Tensor) or reference.dim() < 2 or reference.shape[0] != batch:
        raise ValueError(f"output must return a (batch, dim) tensor with {batch} rows, got "
                         f"{getattr(reference, 'shape', type(reference).__name__)}")
    if distance is None:
        distance = "kl" if output is None and _returns_logits(model) else "cosine"

    lengths = _item_lengths(inputs, count.tokens_per_layer[0], batch)
    cost = ModelCost(shape=count.shape, num_layers=num_layers, num_tokens=max(lengths), num_protected=num_protected,
                     extra_macs=count.extra_macs, metric=metric, lengths=tuple(lengths),
                     frozen=1 if family == "text" else 0)
    budgeter = _Budgeter(cost, first.name, _min_ratio(first))
    base = budgeter.base_macs
    target = float(macs) if macs is not None else base * (1.0 - float(flops_reduction))
    lowest = budgeter.lowest_macs()
    if not lowest * (1 - 1e-9) <= target <= base:
        raise ValueError(f"FLOPs target {1 - target / base:.1%} reduction is out of reach: with this model and batch "
                         f"the reachable range is 0% to {1 - lowest / base:.1%} (each block merges at most half of "
                         f"its tokens)")

    def distortion(ratios: Sequence[float]) -> float:
        nonlocal forwards
        with torch.no_grad(), warnings.catch_warnings(), patched(model, ratio=list(ratios), **setting):
            warnings.simplefilter("ignore", UserWarning)  # budgets above a block's cap: the cost model caps them too
            merged = run(inputs)
        forwards += 1
        return float(output_distance(merged, reference, distance).mean())

    def evaluate(weights: Sequence[float]) -> tuple[float, list[float], list[float]]:
        ratios, achieved = budgeter.schedule(weights, target)
        if abs(achieved / target - 1.0) > TRIM_TOLERANCE:  # capped blocks cannot make up the rest: not a candidate
            return math.inf, ratios, list(weights)
        key = tuple(ratios)
        if key not in seen:
            seen[key] = distortion(ratios)
        return seen[key], ratios, list(weights)

    seen: dict[tuple, float] = {}
    budget = max_forwards + forwards
    best = evaluate([1.0] * num_layers)
    uniform_distortion, uniform_ratios = best[0], best[1]
    for slope in RAMP_SLOPES:
        if forwards >= budget:
            break
        candidate = evaluate(_ramp(num_layers, slope))
        best = min(best, candidate, key=lambda c: c[0])
    rng = np.random.default_rng(seed)
    step = 0.5
    while forwards < budget and step > 0.02:
        improved = False
        for layer in rng.permutation(num_layers).tolist():
            for direction in (1.0, -1.0):
                if forwards >= budget:
                    break
                weights = list(best[2])
                weights[layer] = max(0.0, weights[layer] * (1.0 + direction * step))
                if max(weights) <= 0:
                    continue
                candidate = evaluate(weights)
                if candidate[0] < best[0]:
                    best, improved = candidate, True
                    break
        if not improved:
            step /= 2
    ratios = best[1]
    achieved = budgeter.macs(ratios)
    return Calibration(
        ratios=tuple(ratios), patch=setting, target_reduction=1.0 - target / base, reduction=1.0 - achieved / base,
        distortion=best[0], uniform_ratio=uniform_ratios[0], uniform_distortion=uniform_distortion,
        distance=distance, items=batch, forwards=forwards, seconds=time.perf_counter() - start, seed=seed)


def _returns_logits(model: nn.Module) -> bool:
    """Whether the model's own output is a classifier's logits (then KL is the distance)."""
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and num_classes > 0 and hasattr(model, "forward_head"):
        return True  # timm classifier
    config = getattr(model, "config", None)
    return type(model).__name__.endswith("ForImageClassification") or type(model).__name__.endswith(
        "ForSequenceClassification") if config is not None else False


# --- pitome.patch(..., flops_reduction=..., example_input=... | calibrate=...) ---------------------------------

def patch_arguments(model: nn.Module, kwargs: dict, flops_reduction: Optional[float], example_input: Any,
                    source: Any) -> dict:
    """``pitome.patch`` arguments with the budget filled in from a FLOPs target or a calibration.

    - ``flops_reduction`` + ``example_input``: the uniform keep-ratio that removes that share of the FLOPs on
      ``example_input`` (``pitome.solver``);
    - ``flops_reduction`` + ``calibrate=<batch>``: per-block keep-ratios calibrated on that batch (``calibrate``);
    - ``calibrate=<Calibration or path to its JSON>``: a saved calibration (its setting, then explicit arguments).
    ``model`` must not be patched (``pitome.patch`` unpatches it first).
    """
    if "ratio" in kwargs or "r" in kwargs:
        raise ValueError("give either a budget (ratio / r) or flops_reduction / calibrate, not both")
    if isinstance(source, (str, Path)):
        source = Calibration.load(source)
    if isinstance(source, Calibration):
        if flops_reduction is not None or example_input is not None:
            raise ValueError("a Calibration already fixes the budget; do not pass flops_reduction or example_input")
        return {**source.patch_kwargs(), **kwargs}
    if flops_reduction is None:
        raise ValueError("calibrate=<batch> and example_input need flops_reduction=<share of FLOPs to remove, in (0, 1)>")
    if source is not None:
        if example_input is not None:
            raise ValueError("give example_input (uniform schedule) or calibrate=<batch> (calibrated), not both")
        return calibrate(model, source, flops_reduction=flops_reduction, **kwargs).patch_kwargs()
    if example_input is None:
        raise ValueError("flops_reduction needs example_input=<one batch> (uniform schedule) or calibrate=<batch> "
                         "(per-block budgets calibrated on it)")
    return {**kwargs, "ratio": uniform_ratio(model, example_input, flops_reduction, kwargs)}


def uniform_ratio(model: nn.Module, example_input: Any, flops_reduction: float, kwargs: dict) -> float:
    """The keep-ratio (every block) removing ``flops_reduction`` of the FLOPs on ``example_input``."""
    from .api import patched, settings
    from .solver import ModelCost, solve

    if isinstance(flops_reduction, bool) or not isinstance(flops_reduction, (int, float)) or \
            not 0.0 < flops_reduction < 1.0:
        raise ValueError(f"flops_reduction must be a number in (0, 1) (share of FLOPs removed), got {flops_reduction!r}")
    _check_inputs(example_input)
    with patched(model, ratio=1.0, **kwargs):  # validates the setting and resolves its algorithm and metric
        config = settings(model).config
        layers = config.layers
    algorithm = config.algorithm if isinstance(config.algorithm, str) else next(
        (a for a in config.algorithm if a is not None), "pitome")
    cost = ModelCost.from_model(model, example_input, metric=config.metric)
    return float(solve(cost, float(flops_reduction), algorithm, by="ratio", layers=layers).ratio)
