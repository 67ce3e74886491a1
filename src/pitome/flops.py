"""Analytic FLOPs of Transformer encoders from the token counts a forward actually saw.

Counted as multiply-accumulates (MACs), the convention of the ToMe / PiToMe papers and fvcore
("GFLOPs" in their tables); ``torch.utils.flop_counter`` counts 2 per MAC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["EncoderShape", "block_macs", "encoder_macs"]


@dataclass(frozen=True)
class EncoderShape:
    """Widths of a standard pre-norm encoder block."""

    dim: int
    mlp_hidden: int
    attn_dim: Optional[int] = None  # heads * head_dim, when it differs from dim

    @property
    def inner(self) -> int:
        return self.attn_dim or self.dim


def block_macs(shape: EncoderShape, tokens_in: int, tokens_after_merge: Optional[int] = None) -> int:
    """One block: qkv + output projection and QK^T + AV on the tokens entering it; MLP after the merge."""
    n = tokens_in
    m = n if tokens_after_merge is None else tokens_after_merge
    c, a = shape.dim, shape.inner
    attention = 3 * n * c * a + n * a * c + 2 * n * n * a
    mlp = 2 * m * c * shape.mlp_hidden
    return attention + mlp


def encoder_macs(shape: EncoderShape, tokens_per_layer: Sequence[int]) -> int:
    """All blocks, from the counts entering each block followed by the count leaving the last one.

    The merge inside block l happens before its MLP, so the MLP sees the count entering block l + 1.
    """
    counts = list(tokens_per_layer)
    return sum(block_macs(shape, counts[i], counts[i + 1]) for i in range(len(counts) - 1))
