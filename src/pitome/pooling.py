"""Mean pooling that stays right after merging: each output token weighs as many original tokens as it holds.

Sentence-embedding models (sentence-transformers style) pool with a mask-aware mean over tokens. After merging,
one token stands for ``size`` original tokens, and padding / empty slots must not count; ``pool_mean`` gives the
size- and mask-weighted mean, which equals ordinary masked mean pooling when nothing merged.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .step import MergeInfo

__all__ = ["pool_mean", "pooling_weights"]


def pooling_weights(info: MergeInfo, shape: Optional[tuple[int, int]] = None,
                    size_weighted: bool = True) -> Optional[Tensor]:
    """(B, N) float32 weight per output token: its size (if size_weighted) times its padding mask; None if unknown."""
    weight: Optional[Tensor] = None
    if size_weighted and info.size is not None:
        weight = info.size.float()
    if info.valid is not None:
        valid = info.valid.float()
        weight = valid if weight is None else weight * valid
    if weight is not None and shape is not None and tuple(weight.shape) != tuple(shape):
        raise ValueError(
            f"the hidden states have {tuple(shape)} (batch, tokens) but the latest forward of the patched model "
            f"ended with {tuple(weight.shape)}; pass the last_hidden_state of that same forward"
        )
    return weight


def pool_mean(model_or_info: Union[nn.Module, MergeInfo], last_hidden_state: Tensor,
              attention_mask: Optional[Tensor] = None, size_weighted: bool = True) -> Tensor:
    """Size- and mask-weighted mean of ``last_hidden_state`` (B, N, C) -> (B, C).

    model_or_info: the patched model (its latest forward is used) or a ``MergeInfo`` from ``pitome.info``.
    attention_mask: only for an unpatched model (then this is plain masked mean pooling); a patched model's
                    own mask (merged along with the tokens) is used otherwise.
    size_weighted:  weigh each token by the number of original tokens it holds (default); False gives every
                    remaining real token the same weight (a plain masked mean over the merged sequence).
    """
    if isinstance(model_or_info, MergeInfo):
        info: Optional[MergeInfo] = model_or_info
    elif isinstance(model_or_info, nn.Module):
        from .api import info as _info, is_patched

        info = _info(model_or_info) if is_patched(model_or_info) else None
    else:
        raise TypeError(f"pool_mean needs a model or a pitome MergeInfo, got {type(model_or_info).__name__}")
    if last_hidden_state.dim() != 3:
        raise ValueError("last_hidden_state must be (batch, tokens, channels), got shape "
                         f"{tuple(last_hidden_state.shape)}")
    shape = tuple(last_hidden_state.shape[:2])
    if not isinstance(size_weighted, bool):
        raise ValueError(f"size_weighted must be True or False, got {size_weighted!r}")
    weight = pooling_weights(info, shape, size_weighted) if info is not None else None
    if weight is None and attention_mask is not None:
        if tuple(attention_mask.shape) != shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {shape}")
        weight = (attention_mask != 0).float()
    if weight is None:
        return last_hidden_state.mean(dim=1)
    weight = weight.to(last_hidden_state.device)
    total = (last_hidden_state.float() * weight.unsqueeze(-1)).sum(dim=1)
    return (total / weight.sum(dim=1, keepdim=True).clamp_min(1e-9)).to(last_hidden_state.dtype)
