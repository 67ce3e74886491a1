"""Pieces every Hugging Face adapter shares: the supported transformers range, attention masks after a merge,
the attention back-ends that accept them, and keeping transformers' output capturing working on swapped classes.

transformers is imported lazily (inside functions), so importing this module needs only torch.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..plan import stable_argsort
from ..step import ForwardState
from .base import UnsupportedModelError

__all__ = ["SUPPORTED_TRANSFORMERS", "require_transformers", "class_names", "check_attention_backend",
           "additive_mask", "as_additive", "register_output_capture", "split_heads_mean", "first_token_attention",
           "drop_padding_slots"]

SUPPORTED_TRANSFORMERS = ">=5.0,<6"
_MIN, _MAX = (5, 0), (6, 0)
ATTENTION_BACKENDS = ("sdpa", "eager")


def _version_tuple(text: str) -> tuple[int, int]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts)))  # type: ignore[return-value]


def require_transformers() -> str:
    """The installed transformers version; a clear error when it is outside the range pitome supports."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UnsupportedModelError(
            f"patching a Hugging Face model needs transformers {SUPPORTED_TRANSFORMERS}: "
            f"pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        ) from exc
    version = transformers.__version__
    if not _MIN <= _version_tuple(version) < _MAX:
        raise UnsupportedModelError(
            f"pitome supports transformers {SUPPORTED_TRANSFORMERS}, found {version}; "
            f"install a supported version: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )
    return version


def class_names(obj: Any) -> set[str]:
    """Names of the classes in obj's MRO (matching by name survives library refactors and our swapped classes)."""
    return {c.__name__ for c in type(obj).__mro__}


def check_attention_backend(config: Any, where: str) -> None:
    """Merging needs an attention that takes an additive float mask of any length: sdpa or eager."""
    backend = getattr(config, "_attn_implementation", None) or "eager"
    if backend not in ATTENTION_BACKENDS:
        raise UnsupportedModelError(
            f"{where} uses attn_implementation={backend!r}; pitome supports {ATTENTION_BACKENDS} (merged tokens need "
            f"an additive attention mask). Load the model with attn_implementation='sdpa' or call "
            f"model.set_attn_implementation('sdpa')"
        )


def additive_mask(valid: Optional[Tensor], size_bias: Optional[Tensor], dtype: torch.dtype,
                  shape: Optional[tuple[int, int]] = None) -> Optional[Tensor]:
    """(B, 1, 1, N) additive attention mask: ``size_bias`` (log size / -inf for empty slots) and padding blocked.

    valid: (B, N) bool or None; size_bias: (B, 1, 1, N) or None. None when there is nothing to mask.
    """
    if valid is None and size_bias is None:
        return None
    if size_bias is None:
        batch, tokens = valid.shape if valid is not None else shape  # type: ignore[misc]
        size_bias = torch.zeros(batch, 1, 1, tokens, dtype=dtype, device=valid.device if valid is not None else None)
    mask = size_bias.to(dtype)
    if valid is not None:
        mask = mask.masked_fill(~valid[:, None, None, :], torch.finfo(dtype).min)
    return mask


def as_additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Transformers' layer masks are bool (True = attend) for sdpa and additive floats for eager; give floats."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def split_heads_mean(projection: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*d) projection output -> (B, N, d) mean over heads (the keys metric of PiToMe / ToMe)."""
    batch, tokens, width = projection.shape
    return projection.view(batch, tokens, num_heads, width // num_heads).mean(dim=2)


def first_token_attention(query0: Tensor, keys: Tensor, num_heads: int, scaling: float,
                          mask: Optional[Tensor]) -> Tensor:
    """(B, N) attention that token 0 pays to every token, averaged over heads, in float32.

    query0: (B, 1, H*d) query projection of token 0; keys: (B, N, H*d); mask: additive or bool layer mask,
    (B, 1, Q, N) or (B, 1, 1, N), or None. For algorithms that rank tokens by [CLS] attention.
    """
    batch, tokens, width = keys.shape
    head_dim = width // num_heads
    q = query0.float().view(batch, 1, num_heads, head_dim).transpose(1, 2)  # (B, H, 1, d)
    k = keys.float().view(batch, tokens, num_heads, head_dim).transpose(1, 2)  # (B, H, N, d)
    logits = (q @ k.transpose(-1, -2)) * scaling  # (B, H, 1, N)
    mask = as_additive(mask, torch.float32)
    if mask is not None:
        logits = logits + mask[:, :, :1, :].float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def register_output_capture(model: nn.Module) -> None:
    """Transformers looks up ``_can_record_outputs`` by class name; register our swapped classes under theirs.

    Without this, ``output_hidden_states`` / ``output_attentions`` are silently ignored on a patched model.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # pragma: no cover - older / newer layouts
        return
    for module in model.modules():
        can_record = getattr(type(module), "_can_record_outputs", None)
        if can_record is not None and "_pitome_original_class" in type(module).__dict__:
            _CAN_RECORD_REGISTRY[module] = can_record


def drop_padding_slots(state: ForwardState, x: Tensor) -> Tensor:
    """Shrink a padded batch to its widest sample after a merge: slots holding only padding (or nothing) go.

    Padding never merges, so without this a short sequence keeps all its pad tokens and sets the batch width.
    Real tokens keep their order (valid slots are stable-sorted first, a no-op for plans from ``build_plan``);
    the dropped pad tokens get source -1. Padding is masked out of attention, so results do not change.
    """
    valid = state.valid
    if valid is None or not state.merged:
        return x
    counts = valid.sum(dim=1)
    keep = int(counts.max())
    if keep >= x.shape[1]:
        return x
    order = None
    if not bool((valid[:, :keep].sum(dim=1) == counts).all()):
        order = stable_argsort((~valid).to(torch.int8), dim=1)

    def take(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        if order is not None:
            index = order if t.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, t.shape[-1])
            t = t.gather(1, index)
        return t[:, :keep]

    x = take(x)
    state.size, state.frozen, state.valid = take(state.size), take(state.frozen), take(state.valid)
    if state.source is not None:
        source = state.source
        if order is not None:
            position = torch.empty_like(order)
            position.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
            source = torch.where(source < 0, source, position.gather(1, source.clamp_min(0)))
        source = torch.where(source >= keep, -1, source)
        if state.source_history and state.source_history[-1][1] is state.source:
            state.source_history[-1] = (state.source_history[-1][0], source)
        state.source = source
    return x
