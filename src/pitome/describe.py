"""One-line descriptions of what a patch does, for ``repr`` / ``print``: a user should read
"197→60 tokens over 12 blocks, -43% FLOPs (pitome, ratio 0.9)", not a dump of tensors.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["budget_text", "settings_text", "info_text", "flops_kept_of"]


def budget_text(config: Any) -> str:
    """'ratio 0.9', 'r=13', 'r=(13, -0.5)', 'r per block' from a ``MergeConfig``."""
    if config.ratio is not None:
        return f"ratio {config.ratio:g}" if isinstance(config.ratio, (int, float)) else "ratio per block"
    if isinstance(config.r, list):
        return "r per block"
    return f"r={config.r}"


def _algorithms(settings: Any) -> str:
    names = list(dict.fromkeys(layer.algorithm.name for layer in settings.layers if layer.merges))
    return "+".join(names) or "nothing"


def settings_text(settings: Any) -> str:
    """'MergeSettings(pitome, ratio 0.9, merging in 12 of 12 blocks, 1 protected token, proportional attention on,
    metric keys)'."""
    config = settings.config
    merging = sum(layer.merges for layer in settings.layers)
    parts = [_algorithms(settings), budget_text(config), f"merging in {merging} of {len(settings.layers)} blocks",
             f"{settings.num_protected} protected token{'s' if settings.num_protected != 1 else ''}",
             f"proportional attention {'on' if config.prop_attn else 'off'}", f"metric {config.metric}"]
    if config.preset:
        parts.append(f"preset {config.preset}")
    return f"MergeSettings({', '.join(parts)})"


def flops_kept_of(model: Any, tokens_per_layer: list[int]) -> Optional[float]:
    """Encoder-block FLOPs of these token counts over those of the unmerged model (None if widths unreadable)."""
    from .flops import encoder_macs, encoder_shape

    try:
        shape = encoder_shape(model)
    except (ValueError, TypeError, AttributeError):
        return None
    full = encoder_macs(shape, [tokens_per_layer[0]] * len(tokens_per_layer))
    return encoder_macs(shape, tokens_per_layer) / full if full else None


def info_text(info: Any, settings: Any = None, flops_kept: Optional[float] = None) -> str:
    """'MergeInfo(197→60 tokens over 12 blocks, -43% FLOPs (pitome, ratio 0.9), batch 8)'."""
    tokens = info.tokens_per_layer
    parts = [f"{tokens[0]}→{tokens[-1]} tokens over {len(tokens) - 1} blocks"]
    if flops_kept is not None:
        parts[0] += f", {(flops_kept - 1) * 100:+.0f}% FLOPs".replace("+0%", "±0%").replace("-0%", "±0%")
    if settings is not None:
        parts[0] += f" ({_algorithms(settings)}, {budget_text(settings.config)})"
    if info.size is not None:
        parts.append(f"batch {info.size.shape[0]}")
    if info.source is not None:
        parts.append("source map kept")
    return f"MergeInfo({', '.join(parts)})"
