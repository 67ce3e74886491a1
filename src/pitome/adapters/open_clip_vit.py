"""open_clip vision towers: ``open_clip.transformer.VisionTransformer`` (OpenAI CLIP / OpenCLIP ViTs) whose blocks
are ``ResidualAttentionBlock`` with ``nn.MultiheadAttention``, alone or inside an open_clip ``CLIP`` model.

Each block becomes x = x + ls_1(attention(ln_1(x), bias)) ; merge ; x = x + ls_2(mlp(ln_2(x))). The attention
uses the block's own ``nn.MultiheadAttention`` weights in one fused SDPA call (in_proj -> q, k, v; proportional
attention as its additive mask), so the keys are at hand as the merge metric without a second projection.
"avg" pooling is size-weighted. open_clip is never imported here: models are recognised by their classes' names.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MergeSettings
from ..step import ForwardState, RootKey
from .base import Adapter, UnsupportedModelError, get_tag, root_state
from .common import (RootMixin, attention_mode, bind_call, bind_root, class_names, first_token_attention,
                     intermediates_mode, intermediates_state, intermediates_unmerged, received_attention, relay_info,
                     run_block, swap, taken_blocks)

__all__ = ["OpenClipViTAdapter"]


def _is_open_clip_vit(module: nn.Module) -> bool:
    return ("VisionTransformer" in class_names(module) and type(module).__module__.startswith("open_clip")
            and hasattr(module, "transformer") and hasattr(module.transformer, "resblocks"))


def _tower(model: nn.Module) -> nn.Module:
    """The VisionTransformer itself, or the ``visual`` tower of an open_clip CLIP model."""
    return model if _is_open_clip_vit(model) else model.visual


def _attention(block: nn.Module, state: ForwardState, layer: int, h: Tensor) -> Tensor:
    """Multi-head self-attention of ``block.attn`` (an nn.MultiheadAttention) on h (B, N, C), with the size bias."""
    attn = block.attn
    batch, tokens, width = h.shape
    heads = attn.num_heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
    bias = state.size_bias(h.dtype)
    if state.layer_merges(layer):
        mode = attention_mode(state, layer)
        if mode is not None:  # attention-ranking baselines (EViT, DiffRate, ...): received attention
            with torch.no_grad():
                flat_q = q.transpose(1, 2).reshape(batch, tokens, width)
                flat_k = k.transpose(1, 2).reshape(batch, tokens, width)
                scale = (width // heads) ** -0.5
                state.attention = (first_token_attention(flat_q[:, :1], flat_k, heads, scale, bias) if mode == "cls"
                                   else received_attention(flat_q, flat_k, heads, scale, bias))
        if state.wants_keys(layer):
            state.metric = k.mean(dim=1)  # (B, N, d): keys averaged over heads
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class _PatchedBlock:
    """Mixin for ``ResidualAttentionBlock``: the merge sits between the attention and the MLP residuals."""

    def forward(self, q_x: Tensor, k_x: Optional[Tensor] = None, v_x: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tensor:
        return run_block(self, q_x, self._pitome_body, super().forward, k_x=k_x, v_x=v_x, attn_mask=attn_mask)

    def _pitome_body(self, state: ForwardState, q_x: Tensor, k_x: Optional[Tensor] = None,
                     v_x: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("pitome: cross-attention inputs (k_x / v_x) and attn_mask are not supported in a patched "
                             "open_clip vision block (merging changes the token count); unpatch the model to use them")
        batch_first = self.attn.batch_first
        x = q_x if batch_first else q_x.transpose(0, 1)
        layer = get_tag(self, "layer")
        state.begin_block(layer, x)
        x = x + self.ls_1(_attention(self, state, layer, self.ln_1(x)))
        x = state.merge(layer, x, hidden_metric=x)
        x = state.end_block(layer, x + self.ls_2(self.mlp(self.ln_2(x))))
        return x if batch_first else x.transpose(0, 1)


class _PatchedTower(RootMixin):
    """Mixin for the VisionTransformer: a fresh merge state per forward (also forward_intermediates);
    size-weighted "avg" pooling."""

    def forward_intermediates(self, x: Tensor, *args: Any, unmerge: Optional[bool] = None, **kwargs: Any) -> Any:
        """open_clip's ``forward_intermediates`` with merging: intermediates as merged tokens (output_fmt='NLC'),
        or, with ``unmerge=True`` (the default for 'NCHW'), copied back to every input position they hold."""
        call = bind_call(super().forward_intermediates, (x, *args), kwargs)
        wanted = intermediates_mode(call.get("output_fmt", "NCHW"), unmerge)
        return self._pitome_run(self._pitome_intermediates, call, wanted)

    def _pitome_intermediates(self, call: dict, wanted: bool) -> Any:
        state = root_state(self)
        wanted = intermediates_state(state, wanted).unmerge
        out = super().forward_intermediates(**dict(call, output_fmt="NLC", output_extra_tokens=True))
        spatial, prefix = out["image_intermediates"], out.pop("image_intermediates_prefix")
        if wanted:
            spatial, prefix = intermediates_unmerged(state, spatial, prefix,
                                                     taken_blocks(len(self.transformer.resblocks), call["indices"]))
        if call.get("output_fmt", "NCHW") == "NCHW":
            height, width = call["x"].shape[-2] // self.patch_size[0], call["x"].shape[-1] // self.patch_size[1]
            spatial = [t.reshape(t.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous() for t in spatial]
        out["image_intermediates"] = spatial
        if call.get("output_extra_tokens"):
            out["image_intermediates_prefix"] = prefix
        return out

    def _global_pool(self, x: Tensor) -> tuple[Tensor, Tensor]:
        state = root_state(self)
        size = state.size if state is not None else None
        if self.pool_type != "avg" or size is None or size.shape != x.shape[:2]:
            return super()._global_pool(x)
        weight = size[:, 1:].to(x.dtype).unsqueeze(-1)
        return (x[:, 1:] * weight).sum(dim=1) / weight.sum(dim=1), x[:, 1:]


class _PatchedClip:
    """Mixin for an open_clip CLIP model: ``pitome.info`` on the model the user holds."""

    def encode_image(self, *args: Any, **kwargs: Any) -> Any:
        return relay_info(self, self.visual, lambda: super(_PatchedClip, self).encode_image(*args, **kwargs))

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        return relay_info(self, self.visual,
                          lambda: super(_PatchedClip, self).forward_intermediates(*args, **kwargs))


class OpenClipViTAdapter(Adapter):
    name = "open_clip_vit"
    family = "vision"
    supports = ("open_clip VisionTransformer (ResidualAttentionBlock + nn.MultiheadAttention, class token, 'tok' / "
                "'avg' / 'none' pooling), alone or as the visual tower of an open_clip CLIP model (image side only); "
                "open_clip models with a timm image tower (SigLIP, ...): patch model.visual.trunk, a timm ViT")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_open_clip_vit(model) or (hasattr(model, "encode_image") and _is_open_clip_vit(
            getattr(model, "visual", nn.Identity())))

    def num_layers(self, model: nn.Module) -> int:
        return len(_tower(model).transformer.resblocks)

    def num_protected(self, model: nn.Module) -> int:
        return 1  # the class token

    def blocks(self, model: nn.Module) -> nn.Module:
        return _tower(model).transformer.resblocks

    def _check(self, tower: nn.Module) -> None:
        if getattr(tower, "attn_pool", None) is not None:
            raise UnsupportedModelError("pitome: open_clip towers with an attentional pooler (CoCa-style) are not "
                                        "supported; their pooler would need the token sizes")
        for index, block in enumerate(tower.transformer.resblocks):
            attn = getattr(block, "attn", None)
            ok = (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.bias_k is None
                  and not attn.add_zero_attn and all(hasattr(block, p) for p in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")))
            if not ok:
                raise UnsupportedModelError(
                    f"block {index} is a {type(block).__name__} (attention {type(attn).__name__}); pitome supports "
                    "open_clip's ResidualAttentionBlock with a plain nn.MultiheadAttention (not block_type='custom', "
                    "qk-norm, scaled cosine attention, add_bias_kv or add_zero_attn)")

    def patch(self, model: nn.Module, settings: MergeSettings) -> None:
        tower = _tower(model)
        self._check(tower)
        key = RootKey()
        for index, block in enumerate(tower.transformer.resblocks):
            swap(block, _PatchedBlock, key, index)
        bind_root(tower, key, settings, _PatchedTower)
        if tower is not model:
            bind_root(model, key, settings, _PatchedClip)
