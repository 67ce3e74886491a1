"""The public entry points: patch, unpatch, patched, info."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Union

from torch import nn

from .adapters import find_adapter
from .adapters.base import TAGS, clear_tags, get_tag, set_tags
from .config import MergeConfig, MergeSettings, build_config, resolve
from .schedule import RatioSpec, RSpec
from .step import MergeInfo

__all__ = ["patch", "apply", "set_budget", "unpatch", "patched", "is_patched", "info", "settings"]


def patch(
    model: nn.Module,
    algorithm: Union[None, str, Sequence[Optional[str]]] = None,
    ratio: Optional[RatioSpec] = None,
    r: Optional[RSpec] = None,
    *,
    preset: Optional[str] = None,
    layers: Optional[Sequence[int]] = None,
    prop_attn: Optional[bool] = None,
    size_weighted: Optional[bool] = None,
    metric: Optional[str] = None,
    trace_source: bool = False,
    seed: Optional[int] = None,
    flops_reduction: Optional[float] = None,
    example_input: Any = None,
    calibrate: Any = None,
    **options: Any,
) -> nn.Module:
    """Make ``model`` merge tokens between its blocks; returns the same model object.

    algorithm: 'pitome' (default), 'pitome_text', 'pitome_bsm', 'tome', ... or one name per block.
    ratio:     keep-ratio per merging block (PiToMe's schedule), default 0.9 when neither ratio nor r is given.
    r:         tokens removed per merging block (ToMe's schedule), or (r, inflection), or a per-block list.
    preset:    official per-family settings ('deit', 'mae', 'clip', 'bert', 'paper', ...), or 'auto' (our
               measured defaults for the model's family, vision or text); explicit arguments override the preset.
    options:   algorithm options (e.g. margin, margin_decay, alpha, energy, split, matching); a list
               gives one value per block.
    flops_reduction: instead of ratio / r, the share of FLOPs to remove: with ``example_input`` (one batch)
               the uniform keep-ratio that does it (``pitome.solver``); with ``calibrate=<batch>`` per-block
               keep-ratios calibrated on those unlabeled inputs (``pitome.calibrate``, docs/calibration.md).
    calibrate: a batch (see flops_reduction), or a ``pitome.Calibration`` / the path of its JSON to apply.
    Patching a patched model reconfigures it (it is unpatched first, never wrapped twice); invalid
    arguments raise before anything changes, so the previous patch stays in place.
    """
    adapter = find_adapter(model)
    if flops_reduction is not None or example_input is not None or calibrate is not None:
        from .calibration import patch_arguments

        given = dict(algorithm=algorithm, ratio=ratio, r=r, preset=preset, layers=layers, prop_attn=prop_attn,
                     size_weighted=size_weighted, metric=metric, seed=seed, **options)
        given = {k: v for k, v in given.items() if v is not None}
        if trace_source:
            given["trace_source"] = True
        if is_patched(model):
            unpatch(model)
        return patch(model, **patch_arguments(model, given, flops_reduction, example_input, calibrate))
    config = build_config(
        adapter.num_layers(model), algorithm, ratio, r, preset=preset, layers=layers, prop_attn=prop_attn,
        size_weighted=size_weighted, metric=metric, trace_source=trace_source, seed=seed,
        family=getattr(adapter, "family", None) or None, **options,
    )
    return apply(model, config)


def apply(model: nn.Module, config: MergeConfig) -> nn.Module:
    """Patch with a complete config (presets already folded in): the one path every (re-)patch takes, so
    restoring a previous patch (``patched``, the solver) keeps everything it had, preset included."""
    adapter = find_adapter(model)
    merge_settings = resolve(config, adapter.num_layers(model), adapter.num_protected(model))
    if is_patched(model):
        unpatch(model)
    adapter.patch(model, merge_settings)
    set_tags(model, adapter=adapter)
    return model


def set_budget(model: nn.Module, ratio: Optional[RatioSpec] = None, r: Optional[RSpec] = None) -> nn.Module:
    """Re-patch a patched model with a new budget, keeping everything else (what ``model.r = 16`` does)."""
    from dataclasses import replace

    if (ratio is None) == (r is None):
        raise ValueError("give exactly one of ratio= or r= (e.g. model.r = 16, or pitome.patch(model, r=16))")
    return apply(model, replace(settings(model).config, ratio=ratio, r=r))


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch expects the torch.nn.Module that pitome.patch returned, got {model!r:.60}")


def is_patched(model: nn.Module) -> bool:
    return isinstance(model, nn.Module) and get_tag(model, "adapter") is not None


def unpatch(model: nn.Module) -> nn.Module:
    """Give the model back exactly: original classes, no hooks, no extra attributes."""
    _check_model(model)
    adapter = get_tag(model, "adapter")
    if adapter is None:
        return model
    adapter.unpatch(model)
    clear_tags(model, *TAGS)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, *args: Any, **kwargs: Any) -> Iterator[nn.Module]:
    """Temporarily patch: ``with pitome.patched(model, ratio=0.9): model(x)``; restores the previous state."""
    previous = settings(model) if is_patched(model) else None
    patch(model, *args, **kwargs)
    try:
        yield model
    finally:
        unpatch(model)
        if previous is not None:
            apply(model, previous.config)


def settings(model: nn.Module) -> MergeSettings:
    """The resolved per-block settings of a patched model."""
    if not is_patched(model):
        raise ValueError("model is not patched; call pitome.patch(model, ...) first")
    return get_tag(model, "settings")


def info(model: nn.Module) -> MergeInfo:
    """Token counts per block, sizes and (with trace_source) the source map of the latest forward."""
    if not is_patched(model):
        raise ValueError("model is not patched; call pitome.patch(model, ...) first")
    last = get_tag(model, "last")
    if last is None:
        raise ValueError("no forward has run since the model was patched")
    if last.flops_kept is None and len(last.tokens_per_layer) > 1:  # for its one-line repr
        from .describe import flops_kept_of

        last.flops_kept = flops_kept_of(model, last.tokens_per_layer)
    return last
