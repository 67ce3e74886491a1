"""Hugging Face CLIP and SigLIP (transformers 5.x): vision towers, their heads, ``CLIPModel`` / ``SiglipModel``
(vision tower), and CLIP's causal text tower.

Vision: ``CLIPVisionModel`` (class token protected; pooled output = token 0), ``CLIPVisionModelWithProjection``,
``CLIPForImageClassification`` (mean of the patch tokens, made size-weighted), ``SiglipVisionModel`` (no class
token: every token mergeable; its attention-pooling head gets log(size) as an additive bias, so a merged token
weighs as many times as the tokens it holds), ``SiglipForImageClassification`` (mean, size-weighted).
``pitome.patch(clip_model)`` patches the vision tower of ``CLIPModel`` / ``SiglipModel``.

Text (optional): ``pitome.patch(clip_model.text_model, ...)`` (or a ``CLIPTextModel`` /
``CLIPTextModelWithProjection``) merges in the causal text tower with its own settings. The token CLIP pools
(EOS) and every token after it are frozen (never merged, so padding after EOS is untouched); padding from the
2-D attention_mask never merges. After a merge, a merged token counts at the position of its last member, so
causal attention stays causal (no token sees a later one). ``last_hidden_state`` of the text tower is copied
back to the input length (each position holds its merged token), so CLIP's EOS pooling is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..config import MergeSettings
from ..step import AdapterState, ForwardState, RootKey, log_size_bias
from .base import UnsupportedModelError, pitome_hook, root_state
from .common import PatchedBlock, RootMixin, bind_root, class_names, original_name, swap, tag
from .hf_common import (SUPPORTED_TRANSFORMERS, ClsRoot, EncoderRoot, HFAdapter, HFRoot, MeanPoolRoot,
                        SavesAsOriginal, check_attention_backend, check_layer, layer_mask, patch_layers,
                        prepare_metric, register_output_capture, require_transformers)

__all__ = ["HFClipAdapter", "HFClipTextAdapter", "VISION_TOWERS", "patch_vision_tower"]

# vision tower class -> leading protected tokens
VISION_TOWERS = {"CLIPVisionModel": 1, "SiglipVisionModel": 0}
_LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")


# --- layers -------------------------------------------------------------------------------------------------

class _ClipLayer(PatchedBlock):
    """Mixin for ``CLIPEncoderLayer`` / ``SiglipEncoderLayer`` in a vision tower."""

    def _pitome_mask(self, state: ForwardState, attention_mask: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
        return layer_mask(state, attention_mask, x)

    def _pitome_block(self, state: ForwardState, layer: int, hidden_states: Tensor,
                      attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        normed = self.layer_norm1(hidden_states)
        mask = self._pitome_mask(state, attention_mask, normed)
        attn, _ = self.self_attn(hidden_states=normed, attention_mask=mask, **kwargs)
        prepare_metric(state, layer, self.self_attn, normed, mask)
        hidden_states = hidden_states + attn
        hidden_states = state.merge(layer, hidden_states, hidden_metric=hidden_states)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


def causal_merged_mask(state: ForwardState, x: Tensor, real: Optional[Tensor]) -> Tensor:
    """(B, 1, N, N) additive mask for a causal sequence after merges.

    A merged token sits at the position of its last member: query i sees key j iff pos(j) <= pos(i) and key j
    holds a real token (``real``: (B, N0) bool of the input tokens, None = all real), plus itself; log(size) is
    added with proportional attention.
    """
    source = state.source
    batch, tokens = x.shape[:2]
    n0 = source.shape[1]
    slot = torch.where(source < 0, tokens, source)
    order = torch.arange(n0, device=x.device).expand(batch, n0)
    pos = torch.full((batch, tokens + 1), -1, dtype=torch.long, device=x.device)
    pos = pos.scatter_reduce(1, slot, order, reduce="amax")[:, :tokens]
    real0 = torch.ones(batch, n0, dtype=torch.long, device=x.device) if real is None else real.long()
    keys_ok = torch.zeros(batch, tokens + 1, dtype=torch.long, device=x.device)
    keys_ok = keys_ok.scatter_reduce(1, slot, real0, reduce="amax")[:, :tokens] > 0
    size = state.size if state.size is not None else torch.ones(batch, tokens, device=x.device)
    keys_ok = keys_ok & (size > 0)
    allowed = pos[:, None, :] <= pos[:, :, None]
    allowed = (allowed & keys_ok[:, None, :]) | torch.eye(tokens, dtype=torch.bool, device=x.device)
    low = torch.finfo(x.dtype).min
    bias = torch.log(size.clamp_min(1e-30)) if state.settings.config.prop_attn else torch.zeros_like(size)
    bias = bias.masked_fill(size <= 0, low).to(x.dtype)
    mask = bias[:, None, None, :].expand(batch, 1, tokens, tokens).masked_fill(~allowed[:, None], low)
    # an empty slot (size 0) attends to itself with weight 1, so its row never overflows to NaN in half precision
    empty_self = torch.eye(tokens, dtype=torch.bool, device=x.device) & (size <= 0)[:, :, None]
    return mask.masked_fill(empty_self[:, None], 0.0)


class _ClipTextLayer(_ClipLayer):
    """Mixin for ``CLIPEncoderLayer`` in the causal text tower: the model's causal mask until tokens merge."""

    def _pitome_mask(self, state: ForwardState, attention_mask: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
        if not state.merged:
            return attention_mask
        return causal_merged_mask(state, x, state.adapter.input_real)


class _SiglipPoolingHead:
    """Mixin for ``SiglipMultiheadAttentionPoolingHead``: the probe attends with a log(size) bias."""

    def forward(self, hidden_state: Tensor) -> Tensor:
        state = root_state(self)
        size = state.size if state is not None else None
        if size is None or tuple(size.shape) != tuple(hidden_state.shape[:2]):
            return super().forward(hidden_state)
        batch = hidden_state.shape[0]
        probe = self.probe.repeat(batch, 1, 1)
        mask = log_size_bias(size, hidden_state.dtype)[:, None, :].repeat_interleave(self.attention.num_heads, dim=0)  # (B * heads, 1, N)
        hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=mask, need_weights=False)[0]
        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)
        return hidden_state[:, 0]


# --- model level ------------------------------------------------------------------------------------------------

class _DualModel(HFRoot):
    """Mixin for ``CLIPModel`` / ``SiglipModel``: image features run under the vision tower's merge state."""

    def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
        return self._pitome_run(super().get_image_features, *args, **kwargs)


@pitome_hook
def _unmerge_text_output(module: nn.Module, args: tuple, output: Tensor) -> Optional[Tensor]:
    state = root_state(module)
    if state is None or not state.merged or state.source is None:
        return None
    return state.unmerge(output)


def _eos_index(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The position CLIPTextModel pools (same rule as transformers: argmax id for legacy configs, else first EOS)."""
    eos = model.config.eos_token_id
    ids = input_ids.to(torch.int)
    if eos == 2:
        return ids.argmax(dim=-1)
    return (ids == eos).int().argmax(dim=-1)


@dataclasses.dataclass
class _ClipTextState(AdapterState):
    """The CLIP text tower's per-forward fields: (B, N0) real (non-padding) input tokens, for the causal mask."""

    needs_source: bool = True  # last_hidden_state is unmerged back to the input length
    input_real: Optional[Tensor] = None


class _ClipTextRoot(SavesAsOriginal, RootMixin):
    """Mixin for ``CLIPTextModel`` / ``CLIPTextModelWithProjection``: padding, EOS and what follows it."""

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, **kwargs: Any) -> Any:
        return self._pitome_run(super().forward, input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, **kwargs)

    def _pitome_enter(self, state: ForwardState, owner: bool, fn: Callable[..., Any], args: tuple,
                      kwargs: dict) -> None:
        super()._pitome_enter(state, owner, fn, args, kwargs)
        if owner:
            state.adapter = _ClipTextState()
            input_ids = kwargs.get("input_ids")
            if input_ids is not None:
                state.adapter.input_real, state.valid, state.frozen = _text_state(self, input_ids,
                                                                                  kwargs.get("attention_mask"))


def _text_state(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(real, valid, frozen) over the input tokens.

    real: not padding (attention). valid: may take part in merging = real and not after the pooled EOS, so the
    pooled output does not depend on what follows EOS. frozen: the pooled EOS itself (never merged).
    """
    ids = input_ids.reshape(-1, input_ids.shape[-1])
    batch, tokens = ids.shape
    if attention_mask is None:
        real = torch.ones(batch, tokens, dtype=torch.bool, device=ids.device)
    else:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, tokens):
            raise ValueError(f"pitome: a patched CLIP text tower needs a 2-D padding attention_mask of shape "
                             f"{(batch, tokens)}, got {tuple(attention_mask.shape)}")
        real = attention_mask.to(ids.device) != 0
    position = torch.arange(tokens, device=ids.device)[None, :]
    eos = _eos_index(model, ids).to(ids.device)[:, None]
    return real, real & (position <= eos), position == eos


# --- patching ----------------------------------------------------------------------------------------------------

def _tower_layers(tower: nn.Module) -> list[nn.Module]:
    return list(tower.encoder.layers)


def _check_tower(model: nn.Module, tower: nn.Module) -> list[nn.Module]:
    require_transformers()
    check_attention_backend(tower.config, original_name(model))
    layers = _tower_layers(tower)
    for index, layer in enumerate(layers):
        check_layer(index, layer, _LAYER_PARTS)
    return layers


def patch_vision_tower(model: nn.Module, tower: nn.Module, key: RootKey, settings: MergeSettings) -> None:
    """Patch a CLIP / SigLIP vision tower (layers, SigLIP pooling head, the tower's own forward) under ``key``."""
    layers = _check_tower(model, tower)
    patch_layers(layers, "self_attn", _ClipLayer, key, settings)
    head = getattr(tower, "head", None)
    if head is not None and "SiglipMultiheadAttentionPoolingHead" in class_names(head):
        swap(head, _SiglipPoolingHead, key)
    bind_root(tower, key, settings, EncoderRoot)


# model class -> (attribute holding the vision tower or None, root mixin)
_VISION_ROOTS: dict[str, tuple[Optional[str], type]] = {
    "CLIPVisionModel": (None, EncoderRoot),
    "SiglipVisionModel": (None, EncoderRoot),
    "CLIPVisionModelWithProjection": ("vision_model", ClsRoot),
    "CLIPForImageClassification": ("vision_model", MeanPoolRoot),
    "SiglipForImageClassification": ("vision_model", MeanPoolRoot),
    "CLIPModel": ("vision_model", _DualModel),
    "SiglipModel": ("vision_model", _DualModel),
}


class HFClipAdapter(HFAdapter):
    name = "hf_clip"
    roots = tuple(_VISION_ROOTS)
    family = "vision"
    supports = (f"Hugging Face CLIP / SigLIP vision (transformers {SUPPORTED_TRANSFORMERS}, attn 'sdpa' or 'eager'): "
                f"{', '.join(_VISION_ROOTS)} (CLIPModel / SiglipModel: the vision tower; patch "
                f"model.text_model separately to merge CLIP text tokens)")

    def _tower(self, model: nn.Module) -> nn.Module:
        attr = _VISION_ROOTS[original_name(model)][0]
        return model if attr is None else getattr(model, attr)

    def num_layers(self, model: nn.Module) -> int:
        return len(_tower_layers(self._tower(model)))

    def num_protected(self, model: nn.Module) -> int:
        return VISION_TOWERS[original_name(self._tower(model))]

    def blocks(self, model: nn.Module) -> nn.Module:
        return self._tower(model).encoder.layers

    def patch(self, model: nn.Module, settings: MergeSettings) -> None:
        tower = self._tower(model)
        if original_name(tower) not in VISION_TOWERS:
            raise UnsupportedModelError(f"{original_name(model)}.vision_model is a {original_name(tower)}; "
                                        f"supported towers: {', '.join(VISION_TOWERS)}")
        key = RootKey()
        patch_vision_tower(model, tower, key, settings)
        if tower is not model:
            bind_root(model, key, settings, _VISION_ROOTS[original_name(model)][1])
        register_output_capture(model)


_TEXT_ROOTS = {"CLIPTextModel": None, "CLIPTextModelWithProjection": "text_model"}


class HFClipTextAdapter(HFAdapter):
    name = "hf_clip_text"
    roots = tuple(_TEXT_ROOTS)
    family = "text"
    supports = (f"Hugging Face CLIP text tower (transformers {SUPPORTED_TRANSFORMERS}, attn 'sdpa' or 'eager'): "
                f"CLIPTextModel, CLIPTextModelWithProjection (e.g. pitome.patch(clip_model.text_model, ...))")

    def _tower(self, model: nn.Module) -> nn.Module:
        attr = _TEXT_ROOTS[original_name(model)]
        return model if attr is None else getattr(model, attr)

    def num_layers(self, model: nn.Module) -> int:
        return len(_tower_layers(self._tower(model)))

    def num_protected(self, model: nn.Module) -> int:
        return 0

    def blocks(self, model: nn.Module) -> nn.Module:
        return self._tower(model).encoder.layers

    def patch(self, model: nn.Module, settings: MergeSettings) -> None:
        tower = self._tower(model)
        layers = _check_tower(model, tower)
        if settings.needs_attention:
            raise NotImplementedError("pitome: attention-ranking algorithms are not supported on the causal CLIP "
                                      "text tower; choose e.g. 'pitome' or 'tome'")
        key = RootKey()
        patch_layers(layers, "self_attn", _ClipTextLayer, key, settings)
        tag(tower.final_layer_norm, key)
        tower.final_layer_norm.register_forward_hook(_unmerge_text_output)
        for module in {id(tower): tower, id(model): model}.values():
            bind_root(module, key, settings, _ClipTextRoot)
        register_output_capture(model)
