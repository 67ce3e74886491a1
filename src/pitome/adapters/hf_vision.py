"""Hugging Face vision encoders: ViT (``ViTModel``, ``ViTForImageClassification``), DeiT (``DeiTModel``, with
and without the teacher head: class + distillation token protected), DINOv2 (``Dinov2Model``, LayerScale;
``Dinov2WithRegistersModel``: class + register tokens protected) and their classification heads; transformers 5.x.

Each encoder layer becomes: x = x + attn(norm1(x), mask + log-size bias) ; merge ; x = x + mlp(norm2(x)), with
the layer's own LayerScale / drop-path / dropout. The attention module is transformers' own (its ``sdpa`` or
``eager`` function, chosen by ``config._attn_implementation``); proportional attention enters as the additive
float mask both accept. Keys (averaged over heads) are read by a forward hook on ``k_proj``. The pieces shared
with the other HF adapters are in ``hf_common``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from torch import Tensor, nn

from ..config import MergeSettings
from ..step import ForwardState, RootKey
from .base import Adapter, UnsupportedModelError
from .common import PatchedBlock, bind_root, class_names, original_name
from .hf_common import (SUPPORTED_TRANSFORMERS, ClsRoot, EncoderRoot, MeanPoolRoot, check_attention_backend,
                        check_layer, layer_mask, patch_layers, prepare_metric, register_output_capture,
                        require_transformers)

__all__ = ["HFViTAdapter", "VISION_MODELS"]


# --- ViT / DeiT / DINOv2 layers ------------------------------------------------------------------------------

class _ViTLayer(PatchedBlock):
    """Mixin for ``ViTLayer`` / ``DeiTLayer`` (pre-norm; ``layernorm_before``, ``attention``, ``layernorm_after``)."""

    def _pitome_block(self, state: ForwardState, layer: int, hidden_states: Tensor,
                      attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        normed = self.layernorm_before(hidden_states)
        mask = layer_mask(state, attention_mask, normed)
        attn, _ = self.attention(normed, mask, **kwargs)
        prepare_metric(state, layer, self.attention, normed, mask)
        hidden_states = self.dropout(attn) + hidden_states
        hidden_states = state.merge(layer, hidden_states, hidden_metric=hidden_states)
        return self.dropout(self.mlp(self.layernorm_after(hidden_states))) + hidden_states


class _Dinov2Layer(PatchedBlock):
    """Mixin for ``Dinov2Layer`` / ``Dinov2WithRegistersLayer`` (LayerScale and drop-path kept)."""

    def _pitome_block(self, state: ForwardState, layer: int, hidden_states: Tensor,
                      attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        normed = self.norm1(hidden_states)
        mask = layer_mask(state, attention_mask, normed)
        attn, _ = self.attention(normed, attention_mask=mask, **kwargs)
        prepare_metric(state, layer, self.attention, normed, mask)
        hidden_states = self.drop_path(self.layer_scale1(attn)) + hidden_states
        hidden_states = state.merge(layer, hidden_states, hidden_metric=hidden_states)
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states)))) + hidden_states


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

    def blocks(self, model: nn.Module) -> nn.Module:
        return self._family(model).layers(self._encoder(model))

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
