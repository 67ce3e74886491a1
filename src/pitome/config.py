"""User-facing settings, presets, and their resolution into per-block merge settings."""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .algorithms import ALGORITHMS, MergeAlgorithm, algorithm_class
from .schedule import Budget, capped, resolve_budgets

__all__ = ["MergeConfig", "LayerSettings", "MergeSettings", "PRESETS", "available_presets", "resolve",
           "bound_settings"]

METRICS = ("keys", "hidden")
SEED_RANGE = (-(2**63), 2**64 - 1)
# pitome.patch's own keyword parameters: a misspelt one arrives among the algorithm options
PATCH_PARAMETERS = ("algorithm", "ratio", "r", "preset", "layers", "prop_attn", "size_weighted", "metric",
                    "trace_source", "seed")


@dataclass(frozen=True)
class MergeConfig:
    """Everything ``pitome.patch`` accepts, before it is bound to a model.

    algorithm:     a name, or one name per block (None = that block does not merge).
    ratio / r:     the budget (see ``pitome.schedule.resolve_budgets``).
    layers:        which blocks merge (None = all).
    prop_attn:     add log(token size) to the attention logits (proportional attention).
    size_weighted: merge by size-weighted average (True) or plain mean of the tokens merged at that layer.
    metric:        'keys' (keys averaged over heads) or 'hidden' (hidden states after the attention residual).
    trace_source:  keep the map from original tokens to merged tokens (and its history per layer).
    seed:          seed for randomised algorithms.
    options:       algorithm options; any of them may be a list with one value per block.
    preset:        the preset these settings came from, for reporting.
    """

    algorithm: Any = "pitome"
    ratio: Any = None
    r: Any = None
    layers: Optional[Sequence[int]] = None
    prop_attn: bool = True
    size_weighted: bool = True
    metric: str = "keys"
    trace_source: bool = False
    seed: Optional[int] = None
    options: dict = field(default_factory=dict)
    preset: Optional[str] = None


@dataclass(frozen=True)
class LayerSettings:
    algorithm: Optional[MergeAlgorithm]
    budget: Optional[Budget]

    @property
    def merges(self) -> bool:
        return self.algorithm is not None and self.budget is not None

    def remove_count(self, candidates: int, frozen: int = 0, warn_layer: Optional[int] = None) -> int:
        """Tokens this block removes from a sample: THE token-count rule (predictions, the merge step, FLOPs).

        candidates: real tokens that may merge (after the protected ones; not padding, not frozen).
        frozen:     real tokens after the protected ones that stay as they are ([SEP] / EOS). The budget is
                    taken on candidates + frozen (the official code counts [SEP] in T), then capped by what
                    the algorithm can remove from the candidates in one step (``max_removable``).
        warn_layer: warn (once per call site) when the cap applies, naming this block.
        """
        if not self.merges:
            return 0
        requested = self.budget.remove_count(candidates + frozen)
        allowed = int(self.algorithm.max_removable(max(candidates, 0)))
        if warn_layer is not None:
            return max(capped(requested, allowed, warn_layer), 0)
        return max(min(requested, allowed), 0)

    def remove_counts(self, candidates: Tensor, frozen: "Tensor | int" = 0, warn_layer: Optional[int] = None) -> Tensor:
        """``remove_count`` per sample, for (B,) long tensors of counts (padded batches)."""
        requested = self.budget.remove_counts(candidates + frozen)
        allowed = self.algorithm.max_removable(candidates)
        if warn_layer is not None and bool((requested > allowed).any()):
            capped(int(requested.max()), int(allowed.max()), warn_layer)
        return torch.minimum(requested, allowed).clamp_min(0)


@dataclass(frozen=True)
class MergeSettings:
    """A config bound to a model: one ``LayerSettings`` per block plus the model-wide switches."""

    config: MergeConfig
    layers: tuple[LayerSettings, ...]
    num_protected: int
    needs_attention: bool

    def __repr__(self) -> str:
        """'MergeSettings(pitome, ratio 0.9, merging in 12 of 12 blocks, 1 protected token, ...)'."""
        from .describe import settings_text

        return settings_text(self)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def token_counts(self, num_tokens: int, frozen: int = 0) -> list[int]:
        """Tokens entering each block, then those leaving the last one (length L + 1), for one sample of
        ``num_tokens`` real tokens of which ``frozen`` (after the protected ones) never merge.

        With padding a batch is as wide as its widest sample; each sample's real tokens follow this count for
        its own length (``pitome.info(model).valid`` marks them)."""
        counts = [num_tokens]
        for spec in self.layers:
            candidates = max(num_tokens - self.num_protected - frozen, 0)
            num_tokens -= spec.remove_count(candidates, frozen)
            counts.append(num_tokens)
        return counts


# --- presets: the official per-family settings of the paper's code (spec §1.5, §1.7) -------------------

def _first_half(num_layers: int, first: str, rest: str) -> list[str]:
    half = math.ceil(num_layers / 2)
    return [first] * half + [rest] * (num_layers - half)


def _deit(num_layers: int) -> dict:
    return dict(algorithm="pitome", prop_attn=False, metric="keys",
                options=dict(margin=0.75, margin_decay=0.75, energy="elu", split="alternate",
                             matching=_first_half(num_layers, "bsm", "protect")))


def _mae(num_layers: int) -> dict:
    return dict(algorithm="pitome", prop_attn=False, metric="keys",
                options=dict(margin=0.75, margin_decay=0.75, energy="elu", split="alternate",
                             matching=_first_half(num_layers, "protect", "bsm")))


def _clip(num_layers: int) -> dict:
    return dict(algorithm="pitome", prop_attn=False, metric="hidden",
                options=dict(margin=0.95, margin_decay=0.95, energy="elu", split="alternate", matching="protect"))


def _clip_hf(num_layers: int) -> dict:
    bsm_layers = min(13, num_layers)
    algorithms = ["tome"] * bsm_layers + ["pitome"] * (num_layers - bsm_layers)
    options = dict(margin=0.9, margin_decay=0.9, energy="elu", split="alternate", matching="protect")
    if bsm_layers == num_layers:
        options = {}
    return dict(algorithm=algorithms, prop_attn=False, metric="hidden", size_weighted=False, options=options)


def _blip(num_layers: int) -> dict:
    return dict(algorithm="pitome", prop_attn=False, metric="hidden",
                options=dict(margin=0.9, margin_decay=0.9, energy="elu", split="alternate", matching="protect"))


def _blip2(num_layers: int) -> dict:
    return dict(algorithm="pitome", prop_attn=True, metric="keys",
                options=dict(margin=0.75, margin_decay=0.4, energy="elu", split="alternate", matching="protect"))


def _bert(num_layers: int) -> dict:
    return dict(algorithm="pitome_text", prop_attn=False, metric="keys", size_weighted=False,
                layers=list(range(min(3, num_layers))),
                options=dict(margin=0.9, margin_decay=0.25, energy="gaussian", split="top_next", matching="protect"))


def _paper(num_layers: int) -> dict:
    return dict(algorithm="pitome", prop_attn=True, metric="keys", size_weighted=True,
                options=dict(margin=0.9, margin_decay=0.9, alpha=1.0, energy="paper", split="alternate",
                             matching="protect"))


PRESETS: dict[str, tuple[Callable[[int], dict], str]] = {
    "deit": (_deit, "official DeiT code: m_l = 0.75 - 0.75 l/L, first half of the blocks pitome_bsm, "
                    "keys, no proportional attention"),
    "mae": (_mae, "official MAE code: m_l = 0.75 - 0.75 l/L, second half of the blocks pitome_bsm, keys, "
                  "no proportional attention, size-weighted average pooling"),
    "clip": (_clip, "official CLIP (LAVIS / open_clip) code: m_l = 0.95 - 0.95 l/L, full PiToMe everywhere, "
                    "hidden states as metric, no proportional attention"),
    "clip_hf": (_clip_hf, "official Hugging Face CLIP code used for LLaVA: ToMe matching in blocks 0-12, "
                          "PiToMe after, m_l = 0.9 - 0.9 l/L, hidden states, plain mean, no proportional "
                          "attention (we merge after attention, not after the whole block)"),
    "blip": (_blip, "official BLIP / ALBEF code: m_l = 0.9 - 0.9 l/L, hidden states, no proportional attention"),
    "blip2": (_blip2, "official BLIP-2 code: m_l = 0.75 - 0.4 l/L, keys, proportional attention"),
    "bert": (_bert, "official BERT code: text variant (Gaussian energy, top-r / next-r split), "
                    "m_l = 0.9 - 0.25 l/L, first 3 blocks, keys, sizes reset per layer, no proportional attention"),
    "distilbert": (_bert, "official DistilBERT code: as 'bert' (first 3 of 6 blocks)"),
    "paper": (_paper, "the paper as written: Eq. (4) energy, m_l = 0.9 - 0.9 l/L, alpha 1, full PiToMe in every "
                      "block, keys, size-weighted, proportional attention"),
}


# --- preset 'auto': our defaults per model family, chosen by the ablation in docs/ablation.md ---------------

FAMILIES = ("vision", "text")


def _auto_vision(num_layers: int) -> dict:
    """Energy-ordered bipartite matching (no protection) + proportional attention: ties ToMe + prop. attn on
    accuracy with embeddings closer to the unmerged model; protection and no prop. attn lose (docs/ablation.md)."""
    return dict(algorithm="pitome", prop_attn=True, metric="keys", size_weighted=True,
                options=dict(margin=0.9, margin_decay=0.9, alpha=1.0, energy="elu", split="alternate",
                             matching="bsm"))


def _auto_text(num_layers: int) -> dict:
    """ToMe's bipartite matching on hidden states with proportional attention: on text no PiToMe setting we
    measured beat it (ties on accuracy, embeddings clearly closer to the unmerged model; docs/ablation.md).
    Proportional attention helps here only with hidden states as the metric (with keys it costs accuracy)."""
    return dict(algorithm="tome", prop_attn=True, metric="hidden", size_weighted=True, options={})


AUTO: dict[str, Callable[[int], dict]] = {"vision": _auto_vision, "text": _auto_text}


def _auto_unbound(num_layers: int) -> dict:
    raise ValueError("preset 'auto' depends on the model family; pitome.patch knows it from the model, "
                     f"elsewhere call preset_config('auto', num_layers, family=...) with family in {FAMILIES}")


PRESETS["auto"] = (_auto_unbound, "our defaults per model family (vision / text), chosen by measurements on real "
                                  "offline models at equal FLOPs (docs/ablation.md); the family comes from the adapter")


# the model family a preset was written for (None: any family, e.g. CLIP / BLIP presets serve both towers)
PRESET_FAMILIES: dict[str, Optional[str]] = {"deit": "vision", "mae": "vision", "bert": "text", "distilbert": "text"}


def available_presets() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str, num_layers: int, family: Optional[str] = None) -> dict:
    """A preset's settings; ``family`` ('vision' / 'text', from the adapter) is needed by 'auto' only."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    if name == "auto":
        if family not in AUTO:
            raise ValueError(f"preset 'auto' needs the model family, one of {FAMILIES}; got {family!r} "
                             "(a custom adapter can declare it with a class attribute family = 'vision' or 'text')")
        return AUTO[family](num_layers)
    declared = PRESET_FAMILIES.get(name)
    if declared is not None and family is not None and family != declared:
        fitting = sorted(n for n in PRESETS if PRESET_FAMILIES.get(n) in (None, family))
        raise ValueError(f"preset {name!r} is for {declared} models, but this model is a {family} model; "
                         f"presets that fit it: {', '.join(fitting)}")
    return PRESETS[name][0](num_layers)


# --- resolution ------------------------------------------------------------------------------------------

def _per_layer(value: Any, num_layers: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(f"{what} list has {len(value)} entries; the model has {num_layers} blocks")
        return list(value)
    return [value] * num_layers


def _validate_switches(config: MergeConfig) -> None:
    for key in ("prop_attn", "size_weighted", "trace_source"):
        if not isinstance(getattr(config, key), bool):
            raise ValueError(f"{key} must be True or False, got {getattr(config, key)!r}")
    if config.metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {config.metric!r}")
    seed = config.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ValueError(f"seed must be None or an integer in [-2**63, 2**64 - 1] (torch.Generator's range), "
                         f"got {seed!r}")


def resolve(config: MergeConfig, num_layers: int, num_protected: int) -> MergeSettings:
    """Bind a config to a model with ``num_layers`` blocks; validates everything once, at patch time."""
    _validate_switches(config)
    names = _per_layer(config.algorithm, num_layers, "algorithm")
    for name in names:
        if name is not None:
            algorithm_class(name)
    budgets = resolve_budgets(num_layers, ratio=config.ratio, r=config.r, layers=config.layers)
    used = {name for name in names if name is not None}
    accepted = {opt for name in used for opt in ALGORITHMS[name].option_names()}
    unknown = sorted(set(config.options) - accepted)
    if unknown:
        allowed = {name: ALGORITHMS[name].option_names() for name in sorted(used)}
        known = list(PATCH_PARAMETERS) + sorted(accepted)
        hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hint = "; ".join(f"did you mean {m[0]!r} for {u!r}?" for u, m in hints.items() if m)
        raise ValueError(f"unknown option(s) {unknown}" + (f" ({hint})" if hint else "")
                         + f"; patch() parameters: {', '.join(PATCH_PARAMETERS)}; "
                         f"options of the chosen algorithm(s): {allowed}")
    per_layer_options = {k: _per_layer(v, num_layers, f"option {k!r}") for k, v in config.options.items()}
    layers = []
    for index, (name, budget) in enumerate(zip(names, budgets)):
        algorithm = None
        if name is not None and budget is not None:
            cls = ALGORITHMS[name]
            own = {k: v[index] for k, v in per_layer_options.items() if k in cls.option_names()}
            algorithm = cls.create(**own)
        layers.append(LayerSettings(algorithm=algorithm, budget=budget if algorithm is not None else None))
    needs_attention = any(s.algorithm is not None and s.algorithm.needs_attention for s in layers)
    return MergeSettings(config=config, layers=tuple(layers), num_protected=num_protected,
                         needs_attention=needs_attention)


def bound_settings(budgets: Sequence[Optional[Budget]], num_protected: int, algorithm: str = "pitome",
                   options: Optional[dict] = None) -> MergeSettings:
    """Settings for per-block budgets merged by one algorithm, without a model (token-count predictions)."""
    algo = algorithm_class(algorithm).create(**(options or {}))
    layers = tuple(LayerSettings(algorithm=algo if b is not None else None, budget=b) for b in budgets)
    return MergeSettings(config=MergeConfig(algorithm=algorithm, options=dict(options or {})), layers=layers,
                         num_protected=num_protected, needs_attention=algo.needs_attention)


def build_config(
    num_layers: int,
    algorithm: Any = None,
    ratio: Any = None,
    r: Any = None,
    *,
    preset: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
    prop_attn: Optional[bool] = None,
    size_weighted: Optional[bool] = None,
    metric: Optional[str] = None,
    trace_source: bool = False,
    seed: Optional[int] = None,
    default_ratio: float = 0.9,
    family: Optional[str] = None,
    **options: Any,
) -> MergeConfig:
    """Merge a preset (if any) with explicit arguments; explicit arguments win. ``family``: see preset 'auto'."""
    base: dict = preset_config(preset, num_layers, family) if preset is not None else {}
    explicit = dict(algorithm=algorithm, layers=layers, prop_attn=prop_attn, size_weighted=size_weighted,
                    metric=metric)
    fields = {**base, **{k: v for k, v in explicit.items() if v is not None}}
    merged_options = dict(base.get("options", {}))
    if algorithm is not None and preset is not None and algorithm != base.get("algorithm"):
        # a different algorithm than the preset's: keep only the options it understands
        names = [n for n in _per_layer(algorithm, num_layers, "algorithm") if n is not None]
        accepted = {o for n in names for o in algorithm_class(n).option_names()}
        merged_options = {k: v for k, v in merged_options.items() if k in accepted}
    merged_options.update(options)
    fields["options"] = merged_options
    if ratio is None and r is None:
        ratio = default_ratio
    return replace(MergeConfig(), **fields, ratio=ratio, r=r, trace_source=trace_source, seed=seed, preset=preset)

