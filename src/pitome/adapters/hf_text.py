"""Hugging Face BERT-like text encoders (transformers >=5.0,<6): BERT, RoBERTa, XLM-RoBERTa, CamemBERT, DistilBERT
and their task models; sentence-embedding models built on them (pool with ``pitome.pool_mean``).

Each layer becomes: attention sub-layer (self-attention + output projection + residual + LayerNorm) ; merge ;
feed-forward sub-layer. The model's own modules run unchanged; only the layer's ``forward`` and the base model's
``forward`` are swapped. Keys (mean over heads) come from a forward hook on the key projection.

Padding and protected tokens: the per-forward state gets ``valid`` from the 2-D ``attention_mask`` and ``frozen``
= the last real token ([SEP] / </s>), which never merges; [CLS] / <s> is the protected leading token. After the
first merge every layer gets an additive mask (B, 1, 1, N) rebuilt from ``valid`` plus the size bias (log size with
proportional attention, -inf for empty slots); before it, the model's own mask is used unchanged, so a model that
merges nothing gives exactly the unpatched outputs. Works with ``attn_implementation`` "sdpa" and "eager".

Token-level task models (token classification, question answering, masked LM, pre-training) get their last hidden
states copied back to the original positions ("unmerged") so their heads and losses see the input length.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..config import MergeSettings
from ..step import AdapterState, ForwardState, RootKey
from .base import Adapter, UnsupportedModelError, get_tag, set_tags
from .common import (PatchedBlock, RootMixin, class_names, first_token_attention, original_class, relay_info,
                     split_heads_mean, swap, tag)
from .hf_common import (SUPPORTED_TRANSFORMERS, SavesAsOriginal, additive_mask, capture_key_projection,
                        check_attention_backend, register_output_capture, replace_first, require_transformers)

__all__ = ["HFTextAdapter", "BERT_LIKE_MODELS", "DISTILBERT_MODELS"]

BERT_LIKE_MODELS = ("BertModel", "RobertaModel", "XLMRobertaModel", "CamembertModel")
DISTILBERT_MODELS = ("DistilBertModel",)
TOKEN_LEVEL_HEADS = ("ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM", "ForPreTraining",
                     "LMHeadModel")


# --- where things are, per family -------------------------------------------------------------------------

def _family(base: nn.Module) -> Optional[str]:
    names = class_names(base)
    if names & set(BERT_LIKE_MODELS):
        return "bert"
    if names & set(DISTILBERT_MODELS):
        return "distilbert"
    return None


def _find_base(model: nn.Module) -> Optional[nn.Module]:
    """The encoder inside ``model`` (the model itself or its ``base_model``), if it is a supported family."""
    if _family(model) is not None:
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model and _family(base) is not None:
        return base
    return None


def _layers(base: nn.Module) -> nn.ModuleList:
    return base.transformer.layer if _family(base) == "distilbert" else base.encoder.layer


def _attention_parts(layer: nn.Module, family: str) -> tuple[nn.Linear, nn.Linear, int, float]:
    """(query projection, key projection, heads, scaling) of a layer's self-attention."""
    if family == "distilbert":
        attn = layer.attention
        return attn.q_lin, attn.k_lin, int(attn.n_heads), float(attn.scaling)
    attn = layer.attention.self
    return attn.query, attn.key, int(attn.num_attention_heads), float(attn.scaling)


_REQUIRED = {
    "bert": ("attention", "attention.self", "attention.self.query", "attention.self.key", "attention.output",
             "intermediate", "output"),
    "distilbert": ("attention", "attention.q_lin", "attention.k_lin", "sa_layer_norm", "ffn", "output_layer_norm"),
}


def _has_path(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(module, part):
            return False
        module = getattr(module, part)
    return True


# --- per layer ----------------------------------------------------------------------------------------------

def _layer_mask(state: ForwardState, given: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """The model's own mask until something merged; then valid + size bias for the current tokens."""
    if not state.merged:
        return given
    return additive_mask(state.valid, state.size_bias(x.dtype), x.dtype, shape=tuple(x.shape[:2]))


def _prepare_metric(layer_module: nn.Module, state: ForwardState, layer: int, x_in: Tensor,
                    mask: Optional[Tensor]) -> None:
    """Turn the captured key projection into the keys metric, and [CLS] attention if the algorithm wants it."""
    raw = state.metric
    state.metric = None
    if not state.layer_merges(layer):
        return
    query, _, heads, scaling = _attention_parts(layer_module, get_tag(layer_module, "family"))
    algorithm = state.settings.layers[layer].algorithm
    if getattr(algorithm, "needs_attention", False):
        if raw is None:
            raise RuntimeError("pitome: the key projection was not captured; re-patch the model")
        with torch.no_grad():  # a ranking signal, like the metric: no gradient
            state.attention = first_token_attention(query(x_in[:, :1]), raw.detach(), heads, scaling, mask)
    if state.settings.config.metric == "keys" and raw is not None:
        state.metric = split_heads_mean(raw, heads)


def _feed_forward(fn: Callable[[Tensor], Tensor], chunk_size: int, x: Tensor) -> Tensor:
    """transformers' chunked feed-forward needs the length divisible by the chunk; merged lengths may not be."""
    if chunk_size and x.shape[1] % chunk_size == 0:
        from transformers.pytorch_utils import apply_chunking_to_forward

        return apply_chunking_to_forward(fn, chunk_size, 1, x)
    return fn(x)


class _PatchedBertLayer(PatchedBlock):
    """Mixin for BertLayer / RobertaLayer / ...: attention sub-layer, merge, feed-forward sub-layer."""

    def _pitome_block(self, state: ForwardState, layer: int, hidden_states: Tensor,
                      attention_mask: Optional[Tensor] = None, *args: Any, **kwargs: Any) -> Tensor:
        mask = _layer_mask(state, attention_mask, hidden_states)
        kwargs.pop("encoder_attention_mask", None)
        attention_output, _ = self.attention(hidden_states, mask, cache=kwargs.pop("cache", None), **kwargs)
        _prepare_metric(self, state, layer, hidden_states, mask)
        x = state.compact_padding(state.merge(layer, attention_output, hidden_metric=attention_output))
        return _feed_forward(self.feed_forward_chunk, self.chunk_size_feed_forward, x)


class _PatchedDistilBertBlock(PatchedBlock):
    """Mixin for DistilBERT's TransformerBlock: attention + residual + sa_layer_norm, merge, FFN + output norm."""

    def _pitome_block(self, state: ForwardState, layer: int, hidden_states: Tensor,
                      attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        mask = _layer_mask(state, attention_mask, hidden_states)
        attention_output, _ = self.attention(hidden_states, attention_mask=mask, **kwargs)
        x = self.sa_layer_norm(attention_output + hidden_states)
        _prepare_metric(self, state, layer, hidden_states, mask)
        x = state.compact_padding(state.merge(layer, x, hidden_metric=x))
        ffn_output = _feed_forward(self.ffn.ff_chunk, self.ffn.chunk_size_feed_forward, x)
        return self.output_layer_norm(ffn_output + x)


# --- per forward ----------------------------------------------------------------------------------------------

_INPUTS = ("input_ids", "attention_mask", "inputs_embeds")
_POSITIONS: dict[type, dict[str, int]] = {}


def _input_positions(cls: type) -> dict[str, int]:
    """Positional index of input_ids / attention_mask / inputs_embeds in ``cls.forward`` (after self); cached at
    patch time, so a compiled forward never runs ``inspect``."""
    if cls not in _POSITIONS:
        params = list(inspect.signature(cls.forward).parameters)[1:]
        _POSITIONS[cls] = {name: params.index(name) for name in _INPUTS if name in params}
    return _POSITIONS[cls]


def _inputs(model: nn.Module, args: tuple, kwargs: dict) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(input_ids, attention_mask, inputs_embeds) from the call, whatever was passed positionally."""
    positions = _input_positions(original_class(model))

    def pick(name: str) -> Optional[Tensor]:
        if name in kwargs:
            return kwargs[name]
        index = positions.get(name)
        return args[index] if index is not None and index < len(args) else None

    return pick("input_ids"), pick("attention_mask"), pick("inputs_embeds")


def _last_token_mask(input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor]) -> Tensor:
    """(B, N) bool, True at the last position ([SEP] / </s> of an unpadded batch)."""
    reference = input_ids if input_ids is not None else inputs_embeds
    if reference is None:
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    batch, tokens = reference.shape[:2]
    return torch.arange(tokens, device=reference.device).expand(batch, tokens) == tokens - 1


def _padding_state(input_ids: Optional[Tensor], attention_mask: Optional[Tensor],
                   inputs_embeds: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(valid, frozen): the 2-D padding mask, and the last real token of each sequence ([SEP] / </s>)."""
    if input_ids is not None:
        shape, device = tuple(input_ids.shape[:2]), input_ids.device
    elif inputs_embeds is not None:
        shape, device = tuple(inputs_embeds.shape[:2]), inputs_embeds.device
    else:
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if attention_mask is None:
        valid = torch.ones(shape, dtype=torch.bool, device=device)
    else:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != shape:
            raise ValueError(
                f"pitome: a patched text model needs a 2-D padding attention_mask of shape {shape} (1 = token, "
                f"0 = padding), got shape {tuple(attention_mask.shape)}; custom 3-D / 4-D masks are not supported"
            )
        valid = attention_mask.to(device) != 0
    if shape[1] > 0 and not bool(valid[:, 0].all()):
        raise ValueError(
            "pitome: every sequence must start with a real token ([CLS] / <s>): use right padding "
            "(tokenizer.padding_side = 'right') and no empty sequences"
        )
    count = valid.sum(dim=1, keepdim=True)
    frozen = valid & (valid.long().cumsum(dim=1) == count)
    return valid, frozen


class _PatchedTextModel(SavesAsOriginal, RootMixin):
    """Mixin for the base model (BertModel, DistilBertModel, ...): a fresh merge state per forward; token-level
    heads get last_hidden_state unmerged back to the input length."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        check_attention_backend(self.config, type(self).__name__)
        return self._pitome_run(super().forward, *args, **kwargs)

    def _pitome_enter(self, state: ForwardState, owner: bool, fn: Callable[..., Any], args: tuple,
                      kwargs: dict) -> None:
        super()._pitome_enter(state, owner, fn, args, kwargs)
        if not owner:
            return
        input_ids, attention_mask, inputs_embeds = _inputs(self, args, kwargs)
        if attention_mask is None:  # no padding: the last token is frozen, the same budget for every sample
            state.valid, state.frozen = None, _last_token_mask(input_ids, inputs_embeds)
            state.frozen_count = 1
        else:
            state.valid, state.frozen = _padding_state(input_ids, attention_mask, inputs_embeds)
        state.adapter = AdapterState(needs_source=get_tag(self, "unmerge", False))

    def _pitome_exit(self, state: ForwardState, owner: bool, out: Any) -> Any:
        if owner and state.adapter.needs_source and state.source is not None and state.merged:
            return replace_first(out, state.unmerge(out[0]))
        return out


class _PatchedTaskModel(SavesAsOriginal):
    """Mixin for a task model around the base model: makes ``pitome.info`` work on the model the user holds."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return relay_info(self, self.base_model, lambda: super(_PatchedTaskModel, self).forward(*args, **kwargs))


# --- the adapter ------------------------------------------------------------------------------------------------

class HFTextAdapter(Adapter):
    name = "hf_text"
    family = "text"
    supports = (f"Hugging Face text encoders with transformers {SUPPORTED_TRANSFORMERS} and attn_implementation "
                f"'sdpa' or 'eager': {', '.join(BERT_LIKE_MODELS + DISTILBERT_MODELS)} and their task models "
                f"(...ForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering, "
                f"...ForMultipleChoice, ...ForMaskedLM); encoders only (no is_decoder / cross-attention)")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _find_base(model) is not None

    def num_layers(self, model: nn.Module) -> int:
        return len(_layers(_find_base(model)))

    def num_protected(self, model: nn.Module) -> int:
        return 1

    def blocks(self, model: nn.Module) -> nn.Module:
        return _layers(_find_base(model))

    def _check(self, model: nn.Module, base: nn.Module, family: str) -> None:
        require_transformers()
        config = base.config
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise UnsupportedModelError(
                f"{type(model).__name__} is configured as a decoder (is_decoder / add_cross_attention); pitome merges "
                f"tokens in bidirectional encoders only. Supported: {self.supports}"
            )
        check_attention_backend(config, type(model).__name__)
        for index, layer in enumerate(_layers(base)):
            missing = [p for p in _REQUIRED[family] if not _has_path(layer, p)]
            if missing:
                raise UnsupportedModelError(
                    f"layer {index} ({type(layer).__name__}) lacks {missing}; this transformers layout is not "
                    f"supported. Supported: {self.supports}"
                )

    def patch(self, model: nn.Module, settings: MergeSettings) -> None:
        base = _find_base(model)
        family = _family(base)
        self._check(model, base, family)
        key = RootKey()
        set_tags(model, settings=settings)
        set_tags(base, settings=settings, unmerge=any(type(model).__name__.endswith(s) for s in TOKEN_LEVEL_HEADS))
        want_keys = settings.config.metric == "keys" or settings.needs_attention
        for index, layer in enumerate(_layers(base)):
            _, key_proj, _, _ = _attention_parts(layer, family)
            tag(key_proj, key, index)
            set_tags(layer, family=family)
            if want_keys and settings.layers[index].merges:
                key_proj.register_forward_hook(capture_key_projection)
            swap(layer, _PatchedDistilBertBlock if family == "distilbert" else _PatchedBertLayer, key, index)
        swap(base, _PatchedTextModel, key)
        _input_positions(original_class(base))
        if model is not base:
            swap(model, _PatchedTaskModel, key)
        register_output_capture(model)
