"""The public entry points: patch, unpatch, patched, info."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

from torch import nn

from .adapters import find_adapter
from .adapters.base import ATTRS
from .config import MergeSettings, build_config, resolve
from .step import MergeInfo

__all__ = ["patch", "unpatch", "patched", "is_patched", "info", "settings"]


def patch(
    model: nn.Module,
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
    Patching a patched model reconfigures it (it is unpatched first, never wrapped twice); invalid
    arguments raise before anything changes, so the previous patch stays in place.
    """
    adapter = find_adapter(model)
    num_layers = adapter.num_layers(model)
    config = build_config(
        num_layers, algorithm, ratio, r, preset=preset, layers=layers, prop_attn=prop_attn,
        size_weighted=size_weighted, metric=metric, trace_source=trace_source, seed=seed,
        family=getattr(adapter, "family", None) or None, **options,
    )
    merge_settings = resolve(config, num_layers, adapter.num_protected(model))
    if is_patched(model):
        unpatch(model)
    adapter.patch(model, merge_settings)
    model.__dict__["_pitome_adapter"] = adapter
    return model


def is_patched(model: nn.Module) -> bool:
    return "_pitome_adapter" in getattr(model, "__dict__", {})


def unpatch(model: nn.Module) -> nn.Module:
    """Give the model back exactly: original classes, no hooks, no extra attributes."""
    adapter = model.__dict__.get("_pitome_adapter")
    if adapter is None:
        return model
    adapter.unpatch(model)
    for attr in ATTRS:
        model.__dict__.pop(attr, None)
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
            c = previous.config
            patch(model, c.algorithm, c.ratio, c.r, preset=c.preset, layers=c.layers, prop_attn=c.prop_attn,
                  size_weighted=c.size_weighted, metric=c.metric, trace_source=c.trace_source, seed=c.seed,
                  **c.options)


def settings(model: nn.Module) -> MergeSettings:
    """The resolved per-block settings of a patched model."""
    if not is_patched(model):
        raise ValueError("model is not patched; call pitome.patch(model, ...) first")
    return model.__dict__["_pitome_settings"]


def info(model: nn.Module) -> MergeInfo:
    """Token counts per block, sizes and (with trace_source) the source map of the latest forward."""
    if not is_patched(model):
        raise ValueError("model is not patched; call pitome.patch(model, ...) first")
    last = model.__dict__.get("_pitome_last")
    if last is None:
        raise ValueError("no forward has run since the model was patched")
    return last
