"""timm VisionTransformer family (ViT / AugReg, DeiT incl. distilled, DeiT-III, MAE-style global pool,
qk-norm, register tokens), timm >= 1.0.17.

Each ``Block`` becomes: x = x + attn(norm1(x), bias) ; merge ; x = x + mlp(norm2(x)), with the block's own
LayerScale and drop-path. Attention stays timm's own module (fused SDPA when timm uses it); proportional
attention enters through its ``attn_mask`` argument as an additive float bias. Keys are read by a forward
hook on ``attn.k_norm`` (identity or qk-norm), so qk-norm models give post-norm keys.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import MergeSettings
from ..step import ForwardState, RootKey, activate, log_size_bias
from .base import Adapter, UnsupportedModelError, pitome_hook, root_state, swap_class

__all__ = ["TimmViTAdapter"]

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def _class_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


@pitome_hook
def _capture_keys(module: nn.Module, args: tuple, output: Tensor) -> None:
    state = root_state(module)
    if state is not None and state.wants_keys(module.__dict__["_pitome_layer"]):
        state.metric = output.mean(dim=1)  # (B, heads, N, d) -> (B, N, d)


def _attention_mode(state: "ForwardState", layer: int) -> Optional[str]:
    """'cls' / 'mean' when this layer's algorithm ranks tokens by attention, else None."""
    spec = state.settings.layers[layer]
    if not (state.settings.needs_attention and spec.merges and spec.algorithm.needs_attention):
        return None
    return spec.algorithm.attention_from if state.settings.num_protected > 0 else "mean"


@pitome_hook
def _capture_queries(module: nn.Module, args: tuple, output: Tensor) -> None:
    state = root_state(module)
    if state is not None and _attention_mode(state, module.__dict__["_pitome_layer"]) is not None:
        state.query = output  # (B, heads, N, d) after q_norm


@pitome_hook
def _capture_attention(module: nn.Module, args: tuple, output: Tensor) -> None:
    """Attention probabilities for [CLS]-attention baselines, beside the (possibly fused) attention.

    softmax(q k^T / sqrt(d) + bias) for the class-token row only ('cls'), or for every row averaged
    ('mean'), then averaged over heads: (B, N) float32 in ``state.attention``.
    """
    state = root_state(module)
    if state is None or state.query is None:
        return
    mode = _attention_mode(state, module.__dict__["_pitome_layer"])
    query, state.query = state.query, None
    if mode is None:
        return
    q = query[:, :, :1] if mode == "cls" else query
    wide = torch.promote_types(output.dtype, torch.float32)  # fp32 at least; float64 kept (exact gradients)
    logits = (q.to(wide) @ output.to(wide).transpose(-2, -1)) * output.shape[-1] ** -0.5
    bias = state.size_bias(wide)
    if bias is not None:
        logits = logits + bias
    state.attention = logits.softmax(dim=-1).mean(dim=(1, 2))


class _PatchedBlock:
    """Mixin for timm ``Block``: the merge sits between the attention and the MLP residuals."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        state = root_state(self)
        if state is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        layer = self.__dict__["_pitome_layer"]
        state.enter_block(layer, x)
        bias = state.size_bias(x.dtype)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias)))
        x = state.merge(layer, x, hidden_metric=x)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class _PatchedViT:
    """Mixin for the model: a fresh merge state per forward; size-weighted average pooling."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        with activate(self._pitome_key, self._pitome_settings, x.device) as (state, owner):
            if attn_mask is not None or is_causal:
                raise ValueError("pitome: attn_mask / is_causal are not supported on a patched timm ViT "
                                 "(merging changes the token count); unpatch the model to use them")
            if getattr(self, "grad_checkpointing", False) and self.training:
                raise ValueError("pitome: gradient checkpointing is not supported while merging; "
                                 "call model.set_grad_checkpointing(False) or unpatch")
            out = super().forward_features(x)
            state.final_tokens = out.shape[1]
            if owner:
                self.__dict__["_pitome_last"] = state.info()
            return out

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        with activate(self._pitome_key, self._pitome_settings, x.device) as (state, owner):
            out = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            if owner:
                self.__dict__["_pitome_last"] = state.info()
            return out

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        state = root_state(self)
        size = state.size if state is not None else None
        if size is None:
            last = self.__dict__.get("_pitome_last")
            size = last.size if last is not None else None
        if size is None or size.shape != x.shape[:2]:
            return super().pool(x, pool_type)
        if self.attn_pool is not None:
            return self._attention_pool(x, size)
        if pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        tokens, weight = x[:, start:], size[:, start:].to(x.dtype).unsqueeze(-1)
        avg = (tokens * weight).sum(dim=1) / weight.sum(dim=1)
        return avg if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + avg)

    def _attention_pool(self, x: Tensor, size: Tensor) -> Tensor:
        """Attention pooling (SigLIP's "map" head) with proportional attention: a token of size s weighs as s
        copies of itself, like in the blocks (only when prop_attn is on, the head's forward takes attn_mask)."""
        if not self._pitome_settings.config.prop_attn or not _POOL_TAKES_MASK.get(type(self.attn_pool), False):
            return super().pool(x)
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        return self.attn_pool(x[:, start:], attn_mask=log_size_bias(size[:, start:], x.dtype)[:, None, None, :])


# attention-pool head class -> whether its forward takes attn_mask (read at patch time, not per forward)
_POOL_TAKES_MASK: dict[type, bool] = {}


class TimmViTAdapter(Adapter):
    name = "timm_vit"
    family = "vision"
    supports = ("timm VisionTransformer family (ViT/AugReg, DeiT incl. distilled, DeiT-III, MAE-style "
                "global pool, qk-norm, register tokens) with timm >= 1.0.17 Block/Attention modules")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return "VisionTransformer" in _class_names(model) and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")

    def num_layers(self, model: nn.Module) -> int:
        return len(model.blocks)

    def num_protected(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def _check(self, model: nn.Module) -> None:
        if not hasattr(model, "pool"):
            raise UnsupportedModelError("pitome needs timm >= 1.0.17 (VisionTransformer.pool); upgrade timm")
        for index, block in enumerate(model.blocks):
            missing = [p for p in _BLOCK_PARTS if not hasattr(block, p)]
            attn = getattr(block, "attn", None)
            if missing or not all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "num_heads")):
                raise UnsupportedModelError(
                    f"block {index} is a {type(block).__name__} (attention {type(attn).__name__}); pitome supports "
                    f"timm's pre-norm Block with the standard Attention (parts {', '.join(_BLOCK_PARTS)}; "
                    f"attn.qkv / attn.k_norm). Not supported: ResPostBlock, ParallelScalingBlock, "
                    f"ParallelThingsBlock, rotary / EVA attention"
                )
            if "attn_mask" not in inspect.signature(attn.forward).parameters:
                raise UnsupportedModelError(
                    "this timm version's Attention.forward has no attn_mask argument; pitome needs timm >= 1.0.17"
                )

    def patch(self, model: nn.Module, settings: MergeSettings) -> None:
        self._check(model)
        key = RootKey()
        model.__dict__["_pitome_key"] = key
        model.__dict__["_pitome_settings"] = settings
        for index, block in enumerate(model.blocks):
            block.__dict__["_pitome_key"] = key
            block.__dict__["_pitome_layer"] = index
            k_norm = block.attn.k_norm
            k_norm.__dict__["_pitome_key"] = key
            k_norm.__dict__["_pitome_layer"] = index
            if settings.config.metric == "keys" and settings.layers[index].merges:
                k_norm.register_forward_hook(_capture_keys)
            if settings.layers[index].merges and settings.layers[index].algorithm.needs_attention:
                q_norm = block.attn.q_norm
                q_norm.__dict__["_pitome_key"] = key
                q_norm.__dict__["_pitome_layer"] = index
                q_norm.register_forward_hook(_capture_queries)
                k_norm.register_forward_hook(_capture_attention)
            swap_class(block, _PatchedBlock)
        pool = getattr(model, "attn_pool", None)
        if pool is not None and type(pool) not in _POOL_TAKES_MASK:
            _POOL_TAKES_MASK[type(pool)] = "attn_mask" in inspect.signature(pool.forward).parameters
        swap_class(model, _PatchedViT)
