"""Hugging Face vision encoders: ViT (``ViTModel``, ``ViTForImageClassification``), DeiT (``DeiTModel``, with
and without the teacher head: class + distillation token protected), DINOv2 (``Dinov2Model``, LayerScale;
``Dinov2WithRegistersModel``: class + register tokens protected) and their classification heads; transformers 5.x.

Each encoder layer becomes: x = x + attn(norm1(x), mask + log-size bias) ; merge ; x = x + mlp(norm2(x)), with
the layer's own LayerScale / drop-path / dropout. The attention module is transformers' own (its ``sdpa`` or
``eager`` function, chosen by ``config._attn_implementation``); proportional attention enters as the additive
float mask both accept. Keys (averaged over heads) are read by a forward hook on ``k_proj``.

This file also holds the vision pieces ``hf_clip`` and ``hf_llava`` reuse (version and mask helpers live in
``hf_common``): the key hook, the layer mask, class-token attention, the per-forward owner mixin, and unmerging
the last hidden states for mean-pooling heads (copied back to every original position, the heads' plain mean is
the size-weighted mean).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import MergeSettings
from ..step import ForwardState, RootKey, activate
from .base import (ATTRS, Adapter, UnsupportedModelError, pitome_hook, remove_hooks, restore_class, root_state,
                   swap_class)
from .hf_common import (SUPPORTED_TRANSFORMERS, additive_mask, as_additive, check_attention_backend, class_names,
                        first_token_attention, register_output_capture, require_transformers, split_heads_mean)

__all__ = ["HFViTAdapter", "VISION_MODELS"]

# --- shared helpers ---------------------------------------------------------------------------------------

def original_name(module: nn.Module) -> str:
    """The class name of a module as transformers built it (also when pitome has swapped its class)."""
    return type(module).__dict__.get("_pitome_original_class", type(module)).__name__


def tag(module: nn.Module, key: RootKey, layer: Optional[int] = None) -> None:
    """Mark a module as part of the patched model ``key`` (every swapped or hooked module is tagged)."""
    module.__dict__["_pitome_key"] = key
    if layer is not None:
        module.__dict__["_pitome_layer"] = layer


def swap(module: nn.Module, mixin: type, key: RootKey, layer: Optional[int] = None) -> None:
    tag(module, key, layer)
    swap_class(module, mixin)


def unpatch_key(model: nn.Module) -> None:
    """Undo a patch: only the modules tagged with this model's key (a separately patched tower keeps its patch)."""
    key = model.__dict__.get("_pitome_key")
    for module in model.modules():
        if module is model or (key is not None and module.__dict__.get("_pitome_key") is key):
            remove_hooks(module)
            restore_class(module)
            for attr in ATTRS:
                module.__dict__.pop(attr, None)


def num_heads(attn: nn.Module) -> int:
    for name in ("num_attention_heads", "num_heads"):
        if hasattr(attn, name):
            return int(getattr(attn, name))
    raise UnsupportedModelError(f"{type(attn).__name__} has no num_attention_heads / num_heads")


def attention_scaling(attn: nn.Module) -> float:
    for name in ("scaling", "scale"):
        if getattr(attn, name, None) is not None:
            return float(getattr(attn, name))
    return float(attn.head_dim) ** -0.5


@pitome_hook
def _capture_key_projection(module: nn.Module, args: tuple, output: Tensor) -> None:
    """Keep the raw key projection (B, N, H*d) of a merging layer; ``prepare_metric`` turns it into the metric."""
    state = root_state(module)
    if state is not None and state.layer_merges(module.__dict__["_pitome_layer"]):
        state.metric = output


def hook_keys(attn: nn.Module, key: RootKey, layer: int, settings: MergeSettings) -> None:
    if (settings.config.metric == "keys" or settings.needs_attention) and settings.layers[layer].merges:
        tag(attn.k_proj, key, layer)
        attn.k_proj.register_forward_hook(_capture_key_projection)


def layer_mask(state: ForwardState, attention_mask: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """The model's own mask until tokens merge, then the size bias (log size, -inf for empty slots)."""
    if not state.merged:
        return attention_mask
    if attention_mask is not None and state.caller_mask is False:
        attention_mask = None  # all-attend mask that transformers builds while exporting; the size bias replaces it
    if attention_mask is not None:
        raise ValueError(
            "pitome: an attention_mask cannot be combined with merging in a vision encoder (the mask refers to "
            "the original tokens); call the model without attention_mask, or unpatch it"
        )
    return additive_mask(state.valid, state.size_bias(x.dtype), x.dtype, shape=tuple(x.shape[:2]))


def attention_mode(state: ForwardState, layer: int) -> Optional[str]:
    """'cls' / 'mean' when this layer's algorithm ranks tokens by attention, else None (as the timm adapter)."""
    spec = state.settings.layers[layer]
    if not (state.settings.needs_attention and spec.merges and spec.algorithm.needs_attention):
        return None
    return getattr(spec.algorithm, "attention_from", "cls") if state.settings.num_protected > 0 else "mean"


def received_attention(queries: Tensor, keys: Tensor, heads: int, scaling: float, mask: Optional[Tensor]) -> Tensor:
    """(B, N) attention each token receives, averaged over heads and over all query tokens, in float32."""
    batch, tokens, width = keys.shape
    q = queries.float().view(batch, -1, heads, width // heads).transpose(1, 2)
    k = keys.float().view(batch, tokens, heads, width // heads).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * scaling
    mask = as_additive(mask, torch.float32)
    if mask is not None:
        logits = logits + mask.float()
    return logits.softmax(dim=-1).mean(dim=(1, 2))


def prepare_metric(state: ForwardState, layer: int, attn: nn.Module, normed: Tensor, mask: Optional[Tensor]) -> None:
    """Turn the captured key projection into the keys metric, and token attention if the algorithm wants it."""
    raw = state.metric
    state.metric = None
    if not state.layer_merges(layer):
        return
    heads = num_heads(attn)
    mode = attention_mode(state, layer)
    if mode is not None:
        if raw is None:
            raise RuntimeError("pitome: the key projection was not captured; re-patch the model")
        with torch.no_grad():
            if mode == "cls":
                state.attention = first_token_attention(attn.q_proj(normed[:, :1]), raw, heads,
                                                        attention_scaling(attn), mask)
            else:
                state.attention = received_attention(attn.q_proj(normed), raw, heads, attention_scaling(attn), mask)
    if state.settings.config.metric == "keys" and raw is not None:
        state.metric = split_heads_mean(raw, heads)


def after_layer(state: ForwardState, out: Tensor) -> Tensor:
    state.final_tokens = out.shape[1]
    return out


def start_source(state: ForwardState, x: Tensor) -> None:
    """Track the source map internally when this forward needs it (unmerging), even without trace_source."""
    if state.source is None and state.needs_source:
        state.source = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)


def unmerge(x: Tensor, state: ForwardState, fill_mean_from: Optional[int] = None) -> Tensor:
    """Copy each merged token back to every original position it holds (length N0 again).

    Dropped tokens (pruning baselines) get zeros, or, with ``fill_mean_from=h``, the size-weighted mean of the
    tokens after the first h, so that a plain mean over those positions equals the size-weighted mean of the
    surviving tokens.
    """
    source = state.source
    if source is None or source.shape[0] != x.shape[0]:
        raise RuntimeError("pitome: no source map to unmerge with")
    out = x.gather(1, source.clamp_min(0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    dropped = (source < 0).unsqueeze(-1)
    if fill_mean_from is None:
        return out.masked_fill(dropped, 0)
    h = fill_mean_from
    size = state.size[:, h:] if state.size is not None else torch.ones(x.shape[0], x.shape[1] - h, device=x.device)
    weight = size.to(x.dtype).unsqueeze(-1)
    mean = (x[:, h:] * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.where(dropped, mean.expand_as(out), out)


def _replace_first(output: Any, value: Tensor) -> Any:
    if isinstance(output, tuple):
        return (value,) + tuple(output[1:])
    output.last_hidden_state = value
    return output


def model_device(model: nn.Module) -> Optional[torch.device]:
    for param in model.parameters():
        return param.device
    return None


def check_no_checkpointing(model: nn.Module) -> None:
    if model.training and torch.is_grad_enabled() and any(
            getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ValueError("pitome: gradient checkpointing is not supported while merging (the recomputation runs "
                         "outside the forward's merge state); call model.gradient_checkpointing_disable() or unpatch")


def store_info(model: nn.Module, state: ForwardState) -> None:
    """Keep the latest forward's MergeInfo (without the internally tracked source map unless asked for)."""
    info = state.info()
    if not state.settings.config.trace_source:
        info = dataclasses.replace(info, source=None, source_history=[])
    model.__dict__["_pitome_last"] = info


def _passes_attention_mask(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
    if kwargs.get("attention_mask") is not None:
        return True
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return True  # cannot tell: keep the strict behaviour
    return bound.arguments.get("attention_mask") is not None


class RootMixin:
    """Owner of the per-forward merge state: any patched model part a forward can start from.

    ``_pitome_mean_pool`` is set on mean-pooling heads: their encoder (``_pitome_encoder``) then returns
    last_hidden_state unmerged to full length, so the head's plain mean over the non-protected tokens is the
    size-weighted mean of the merged tokens.
    """

    _pitome_mean_pool: ClassVar[bool] = False
    _pitome_encoder: ClassVar[bool] = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._pitome_run(super().forward, *args, **kwargs)

    def _pitome_run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        key = self.__dict__["_pitome_key"]
        with activate(key, self.__dict__["_pitome_settings"], model_device(self)) as (state, owner):
            if owner:
                check_no_checkpointing(self)
                if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
                    state.caller_mask = _passes_attention_mask(fn, args, kwargs)
            if self._pitome_mean_pool:
                state.needs_source = state.unmerge_output = True
            out = fn(*args, **kwargs)
            if self._pitome_encoder and state.unmerge_output and state.merged and state.source is not None:
                first = out[0] if isinstance(out, tuple) else out.last_hidden_state
                out = _replace_first(out, unmerge(first, state, fill_mean_from=state.settings.num_protected))
            if owner:
                store_info(self, state)
            return out


def patch_layers(layers: Sequence[nn.Module], attn_attr: str, mixin: type, key: RootKey,
                 settings: MergeSettings) -> None:
    for index, layer in enumerate(layers):
        hook_keys(getattr(layer, attn_attr), key, index, settings)
        swap(layer, mixin, key, index)


def bind_root(model: nn.Module, key: RootKey, settings: MergeSettings, mixin: type) -> None:
    model.__dict__["_pitome_settings"] = settings
    swap(model, mixin, key)


# --- ViT / DeiT / DINOv2 layers ------------------------------------------------------------------------------

class _ViTLayer:
    """Mixin for ``ViTLayer`` / ``DeiTLayer`` (pre-norm; ``layernorm_before``, ``attention``, ``layernorm_after``)."""

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        state = root_state(self)
        if state is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        layer = self.__dict__["_pitome_layer"]
        start_source(state, hidden_states)
        state.enter_block(layer, hidden_states)
        normed = self.layernorm_before(hidden_states)
        mask = layer_mask(state, attention_mask, normed)
        attn, _ = self.attention(normed, mask, **kwargs)
        prepare_metric(state, layer, self.attention, normed, mask)
        hidden_states = self.dropout(attn) + hidden_states
        hidden_states = state.merge(layer, hidden_states, hidden_metric=hidden_states)
        out = self.dropout(self.mlp(self.layernorm_after(hidden_states))) + hidden_states
        return after_layer(state, out)


class _Dinov2Layer:
    """Mixin for ``Dinov2Layer`` / ``Dinov2WithRegistersLayer`` (LayerScale and drop-path kept)."""

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        state = root_state(self)
        if state is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        layer = self.__dict__["_pitome_layer"]
        start_source(state, hidden_states)
        state.enter_block(layer, hidden_states)
        normed = self.norm1(hidden_states)
        mask = layer_mask(state, attention_mask, normed)
        attn, _ = self.attention(normed, attention_mask=mask, **kwargs)
        prepare_metric(state, layer, self.attention, normed, mask)
        hidden_states = self.drop_path(self.layer_scale1(attn)) + hidden_states
        hidden_states = state.merge(layer, hidden_states, hidden_metric=hidden_states)
        out = self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states)))) + hidden_states
        return after_layer(state, out)


class EncoderRoot(RootMixin):
    """An encoder model (its last_hidden_state is what heads pool)."""

    _pitome_encoder = True


class MeanPoolRoot(RootMixin):
    """A head model that mean-pools the encoder's tokens."""

    _pitome_mean_pool = True


class ClsRoot(RootMixin):
    """A head model that reads protected tokens only (class / distillation token)."""


@dataclasses.dataclass(frozen=True)
class _Family:
    encoder_attr: Optional[str]       # attribute of the head model holding the encoder (None: the model is it)
    layers: Callable[[nn.Module], Sequence[nn.Module]]
    layer_mixin: type
    layer_parts: tuple[str, ...]
    protected: Callable[[nn.Module], int]
    mean_pool: bool = False


def _vit_layers(encoder: nn.Module) -> Sequence[nn.Module]:
    return encoder.layers


def _dinov2_layers(encoder: nn.Module) -> Sequence[nn.Module]:
    return encoder.encoder.layer


_VIT_PARTS = ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp")
_DINO_PARTS = ("norm1", "attention", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2")

_FAMILIES: dict[str, _Family] = {
    "ViTModel": _Family(None, _vit_layers, _ViTLayer, _VIT_PARTS, lambda m: 1),
    "ViTForImageClassification": _Family("vit", _vit_layers, _ViTLayer, _VIT_PARTS, lambda m: 1),
    "DeiTModel": _Family(None, _vit_layers, _ViTLayer, _VIT_PARTS, lambda m: 2),
    "DeiTForImageClassification": _Family("deit", _vit_layers, _ViTLayer, _VIT_PARTS, lambda m: 2),
    "DeiTForImageClassificationWithTeacher": _Family("deit", _vit_layers, _ViTLayer, _VIT_PARTS, lambda m: 2),
    "Dinov2Model": _Family(None, _dinov2_layers, _Dinov2Layer, _DINO_PARTS, lambda m: 1),
    "Dinov2ForImageClassification": _Family("dinov2", _dinov2_layers, _Dinov2Layer, _DINO_PARTS, lambda m: 1, True),
    "Dinov2WithRegistersModel": _Family(
        None, _dinov2_layers, _Dinov2Layer, _DINO_PARTS, lambda m: 1 + int(m.config.num_register_tokens)),
    "Dinov2WithRegistersForImageClassification": _Family(
        "dinov2_with_registers", _dinov2_layers, _Dinov2Layer, _DINO_PARTS,
        lambda m: 1 + int(m.config.num_register_tokens), True),
}

VISION_MODELS = tuple(_FAMILIES)

_REFUSED = {
    "ViTForMaskedImageModeling": "it reshapes the tokens back into an image grid",
    "DeiTForMaskedImageModeling": "it reshapes the tokens back into an image grid",
    "Dinov2Backbone": "its feature maps reshape the tokens back into an image grid",
    "Dinov2WithRegistersBackbone": "its feature maps reshape the tokens back into an image grid",
}


def check_layer(index: int, layer: nn.Module, parts: Sequence[str]) -> None:
    missing = [p for p in parts if not hasattr(layer, p)]
    attn = getattr(layer, "attention", None) or getattr(layer, "self_attn", None)
    if missing or attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj")):
        raise UnsupportedModelError(
            f"layer {index} is a {type(layer).__name__} without the parts pitome expects ({', '.join(parts)}; "
            f"attention q_proj/k_proj): this transformers version's module layout is not supported; supported: "
            f"transformers{SUPPORTED_TRANSFORMERS}"
        )


class HFViTAdapter(Adapter):
    name = "hf_vit"
    family = "vision"
    supports = ("Hugging Face ViTModel / ViTForImageClassification, DeiTModel / DeiTForImageClassification"
                "(WithTeacher), Dinov2Model / Dinov2ForImageClassification, Dinov2WithRegistersModel / "
                f"Dinov2WithRegistersForImageClassification (transformers{SUPPORTED_TRANSFORMERS}; "
                "not: *ForMaskedImageModeling, *Backbone)")

    @classmethod
    def _family(cls, model: nn.Module) -> Optional[_Family]:
        return _FAMILIES.get(original_name(model))

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        name = original_name(model)
        if name in _REFUSED and "PreTrainedModel" in class_names(model):
            raise UnsupportedModelError(f"pitome cannot patch {name}: {_REFUSED[name]}, which merged tokens "
                                        f"do not have; supported: {cls.supports}")
        return name in _FAMILIES and "PreTrainedModel" in class_names(model)

    def _encoder(self, model: nn.Module) -> nn.Module:
        family = self._family(model)
        return model if family.encoder_attr is None else getattr(model, family.encoder_attr)

    def num_layers(self, model: nn.Module) -> int:
        return len(self._family(model).layers(self._encoder(model)))

    def num_protected(self, model: nn.Module) -> int:
        return self._family(model).protected(model)

    def patch(self, model: nn.Module, settings: MergeSettings) -> None:
        require_transformers()
        family = self._family(model)
        encoder = self._encoder(model)
        check_attention_backend(encoder.config, original_name(model))
        layers = list(family.layers(encoder))
        for index, layer in enumerate(layers):
            check_layer(index, layer, family.layer_parts)
        key = RootKey()
        patch_layers(layers, "attention", family.layer_mixin, key, settings)
        bind_root(encoder, key, settings, EncoderRoot)
        if encoder is not model:
            bind_root(model, key, settings, MeanPoolRoot if family.mean_pool else ClsRoot)
        register_output_capture(model)

    def unpatch(self, model: nn.Module) -> None:
        unpatch_key(model)
