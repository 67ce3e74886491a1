"""timm VisionTransformer family (ViT / AugReg, DeiT incl. distilled, DeiT-III, MAE-style global pool,
qk-norm, register tokens), timm >= 1.0.17.

Each ``Block`` becomes: x = x + attn(norm1(x), bias) ; merge ; x = x + mlp(norm2(x)), with the block's own
LayerScale and drop-path. Attention stays timm's own module (fused SDPA when timm uses it); proportional
attention enters through its ``attn_mask`` argument as an additive float bias. Keys are read by a forward
hook on ``attn.k_norm`` (identity or qk-norm), so qk-norm models give post-norm keys.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import MergeSettings
from ..step import ForwardState, RootKey, log_size_bias
from .base import Adapter, UnsupportedModelError, get_tag, pitome_hook, root_state
from .common import (IntermediatesState, PatchedBlock, RootMixin, attention_mode, bind_call, bind_root, class_names,
                     intermediates_mode, intermediates_unmerged, mean_attention, swap, tag, taken_blocks)

__all__ = ["TimmViTAdapter"]

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


@dataclasses.dataclass
class _TimmState(IntermediatesState):
    """The timm adapter's per-forward fields: queries held between the q-norm and k-norm hooks."""

    query: Optional[Tensor] = None


def _adapter_state(state: ForwardState) -> _TimmState:
    if not isinstance(state.adapter, _TimmState):
        state.adapter = _TimmState()
    return state.adapter


@pitome_hook
def _capture_keys(module: nn.Module, args: tuple, output: Tensor) -> None:
    state = root_state(module)
    if state is not None and state.wants_keys(get_tag(module, "layer")):
        state.metric = output.mean(dim=1)  # (B, heads, N, d) -> (B, N, d)


@pitome_hook
def _capture_queries(module: nn.Module, args: tuple, output: Tensor) -> None:
    state = root_state(module)
    if state is not None and attention_mode(state, get_tag(module, "layer")) is not None:
        _adapter_state(state).query = output  # (B, heads, N, d) after q_norm


@pitome_hook
def _capture_attention(module: nn.Module, args: tuple, output: Tensor) -> None:
    """Attention probabilities for [CLS]-attention baselines, beside the (possibly fused) attention.

    softmax(q k^T / sqrt(d) + bias) for the class-token row only ('cls'), or for every row averaged
    ('mean'), then averaged over heads: (B, N) float32 in ``state.attention``.
    """
    state = root_state(module)
    if state is None or not isinstance(state.adapter, _TimmState) or state.adapter.query is None:
        return
    mode = attention_mode(state, get_tag(module, "layer"))
    query, state.adapter.query = state.adapter.query, None
    if mode is None:
        return
    q = query[:, :, :1] if mode == "cls" else query
    wide = torch.promote_types(output.dtype, torch.float32)  # fp32 at least; float64 kept (exact gradients)
    state.attention = mean_attention(q, output, output.shape[-1] ** -0.5, state.size_bias(wide), wide)


class _PatchedBlock(PatchedBlock):
    """Mixin for timm ``Block``: the merge sits between the attention and the MLP residuals."""

    def _pitome_block(self, state: ForwardState, layer: int, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        bias = state.size_bias(x.dtype)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias)))
        x = state.merge(layer, x, hidden_metric=x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _PatchedViT(RootMixin):
    """Mixin for the model: a fresh merge state per forward (also for forward_features, forward_intermediates and
    get_intermediate_layers); size-weighted average pooling."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("pitome: attn_mask / is_causal are not supported on a patched timm ViT "
                             "(merging changes the token count); unpatch the model to use them")
        return self._pitome_run(super().forward_features, x)

    def forward_intermediates(self, x: Tensor, *args: Any, unmerge: Optional[bool] = None, **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` with merging. Intermediates are the merged tokens of each block
        (output_fmt='NLC', a different count per block), or, with ``unmerge=True`` (the default for 'NCHW'),
        copied back to every input position they hold, so the grid is whole. Final features: merged tokens."""
        call = bind_call(super().forward_intermediates, (x, *args), kwargs)
        wanted = intermediates_mode(call.get("output_fmt", "NCHW"), unmerge)
        return self._pitome_run(self._pitome_intermediates, call, wanted)

    def get_intermediate_layers(self, x: Tensor, *args: Any, unmerge: Optional[bool] = None, **kwargs: Any) -> Any:
        """timm's ``get_intermediate_layers`` with merging (``unmerge`` as in ``forward_intermediates``)."""
        call = bind_call(super().get_intermediate_layers, (x, *args), kwargs)
        wanted = intermediates_mode("NCHW" if call.get("reshape") else "NLC", unmerge)

        def run() -> Any:
            _adapter_state(root_state(self)).unmerge = wanted
            return super(_PatchedViT, self).get_intermediate_layers(**call)

        return self._pitome_run(run)

    def _pitome_enter(self, state: ForwardState, owner: bool, fn: Any, args: tuple, kwargs: dict) -> None:
        super()._pitome_enter(state, owner, fn, args, kwargs)
        _adapter_state(state)

    def _pitome_intermediates(self, call: dict, wanted: bool) -> Any:
        state = root_state(self)
        adapter = _adapter_state(state)
        if call.get("attn_mask") is not None or call.get("is_causal"):
            raise ValueError("pitome: attn_mask / is_causal are not supported on a patched timm ViT "
                             "(merging changes the token count); unpatch the model to use them")
        wanted = wanted or adapter.unmerge
        adapter.unmerge = adapter.needs_source = wanted
        fmt = call.get("output_fmt", "NCHW")
        inner = dict(call, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=False)
        if "output_dict" in inner:
            inner["output_dict"] = False
        final, taken = super().forward_intermediates(**inner)
        prefix = [p for _, p in taken] if self.num_prefix_tokens else None
        spatial = [t for t, _ in taken] if self.num_prefix_tokens else list(taken)
        if wanted:
            spatial, prefix = intermediates_unmerged(state, spatial, prefix,
                                                     taken_blocks(len(self.blocks), call.get("indices")))
        if fmt == "NCHW":
            height, width = x_size = call["x"].shape[-2:]
            feat = getattr(self.patch_embed, "dynamic_feat_size", None)
            grid = feat(tuple(x_size)) if feat is not None else self.patch_embed.grid_size
            spatial = [t.reshape(t.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for t in spatial]
        return _intermediates_output(call, final, spatial, prefix)

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        state = root_state(self)
        size = state.size if state is not None else None
        if size is None:
            last = get_tag(self, "last")
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
        if not get_tag(self, "settings").config.prop_attn or not _POOL_TAKES_MASK.get(type(self.attn_pool), False):
            return super().pool(x)
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        return self.attn_pool(x[:, start:], attn_mask=log_size_bias(size[:, start:], x.dtype)[:, None, None, :])


def _intermediates_output(call: dict, final: Tensor, spatial: list[Tensor], prefix: Optional[list[Tensor]]) -> Any:
    """Assemble forward_intermediates' result as timm does for the caller's flags."""
    if call.get("output_dict"):
        result: dict[str, Any] = {"image_intermediates": spatial}
        if prefix is not None and call.get("return_prefix_tokens"):
            result["image_intermediates_prefix"] = prefix
        if not call.get("intermediates_only"):
            result["image_features"] = final
        return result
    taken: list[Any] = spatial
    if prefix is not None and call.get("return_prefix_tokens"):
        taken = list(zip(spatial, prefix))
    return taken if call.get("intermediates_only") else (final, taken)


# attention-pool head class -> whether its forward takes attn_mask (read at patch time, not per forward)
_POOL_TAKES_MASK: dict[type, bool] = {}


class TimmViTAdapter(Adapter):
    name = "timm_vit"
    family = "vision"
    supports = ("timm VisionTransformer family (ViT/AugReg, DeiT incl. distilled, DeiT-III, MAE-style "
                "global pool, qk-norm, register tokens) with timm >= 1.0.17 Block/Attention modules")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return "VisionTransformer" in class_names(model) and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")

    def num_layers(self, model: nn.Module) -> int:
        return len(model.blocks)

    def num_protected(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def blocks(self, model: nn.Module) -> nn.Module:
        return model.blocks

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
        for index, block in enumerate(model.blocks):
            k_norm = block.attn.k_norm
            tag(k_norm, key, index)
            if settings.config.metric == "keys" and settings.layers[index].merges:
                k_norm.register_forward_hook(_capture_keys)
            if settings.layers[index].merges and settings.layers[index].algorithm.needs_attention:
                tag(block.attn.q_norm, key, index)
                block.attn.q_norm.register_forward_hook(_capture_queries)
                k_norm.register_forward_hook(_capture_attention)
            swap(block, _PatchedBlock, key, index)
        pool = getattr(model, "attn_pool", None)
        if pool is not None and type(pool) not in _POOL_TAKES_MASK:
            _POOL_TAKES_MASK[type(pool)] = "attn_mask" in inspect.signature(pool.forward).parameters
        bind_root(model, key, settings, _PatchedViT)
