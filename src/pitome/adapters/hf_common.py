"""The toolkit of the Hugging Face adapters (built on ``common``): the supported transformers range, the attention
back-ends that take merged-token masks, layer masks after a merge, the key hook and metric / attention signals of
an encoder layer, the roots of encoder / head models (unmerging the last hidden states for mean-pooling heads: copied
back to every original position, the heads' plain mean is the size-weighted mean), and keeping transformers' output
capturing working on swapped classes.

transformers is imported lazily (inside functions), so importing this module needs only torch.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import MergeSettings
from ..step import AdapterState, ForwardState, RootKey
from .base import Adapter, UnsupportedModelError, get_tag, is_swapped, pitome_hook, root_state
from .common import (RootMixin, attention_mode, class_names, original_class, original_name, first_token_attention, received_attention,
                     split_heads_mean, swap, tag)

__all__ = ["SUPPORTED_TRANSFORMERS", "require_transformers", "check_attention_backend", "additive_mask",
           "register_output_capture", "layer_mask", "prepare_metric", "hook_keys", "patch_layers", "check_layer",
           "SavesAsOriginal", "HFRoot", "EncoderRoot", "MeanPoolRoot", "ClsRoot", "replace_first", "HFAdapter"]

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
        if can_record is not None and is_swapped(module):
            _CAN_RECORD_REGISTRY[module] = can_record


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


def check_layer(index: int, layer: nn.Module, parts: Sequence[str]) -> None:
    missing = [p for p in parts if not hasattr(layer, p)]
    attn = getattr(layer, "attention", None) or getattr(layer, "self_attn", None)
    if missing or attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj")):
        raise UnsupportedModelError(
            f"layer {index} is a {type(layer).__name__} without the parts pitome expects ({', '.join(parts)}; "
            f"attention q_proj/k_proj): this transformers version's module layout is not supported; supported: "
            f"transformers{SUPPORTED_TRANSFORMERS}"
        )


# --- per layer ------------------------------------------------------------------------------------------------

@pitome_hook
def capture_key_projection(module: nn.Module, args: tuple, output: Tensor) -> None:
    """Keep the raw key projection (B, N, H*d) of a merging layer; the layer turns it into the metric."""
    state = root_state(module)
    if state is not None and state.layer_merges(get_tag(module, "layer")):
        state.metric = output


def hook_keys(attn: nn.Module, key: RootKey, layer: int, settings: MergeSettings) -> None:
    if (settings.config.metric == "keys" or settings.needs_attention) and settings.layers[layer].merges:
        tag(attn.k_proj, key, layer)
        attn.k_proj.register_forward_hook(capture_key_projection)


def patch_layers(layers: Sequence[nn.Module], attn_attr: str, mixin: type, key: RootKey,
                 settings: MergeSettings) -> None:
    for index, layer in enumerate(layers):
        hook_keys(getattr(layer, attn_attr), key, index, settings)
        swap(layer, mixin, key, index)


def layer_mask(state: ForwardState, attention_mask: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A vision layer's mask: the model's own until tokens merge, then the size bias (log size, -inf for empty
    slots)."""
    if not state.merged:
        return attention_mask
    if attention_mask is not None and isinstance(state.adapter, HFState) and state.adapter.caller_mask is False:
        attention_mask = None  # all-attend mask that transformers builds while exporting; the size bias replaces it
    if attention_mask is not None:
        raise ValueError(
            "pitome: an attention_mask cannot be combined with merging in a vision encoder (the mask refers to "
            "the original tokens); call the model without attention_mask, or unpatch it"
        )
    return additive_mask(state.valid, state.size_bias(x.dtype), x.dtype, shape=tuple(x.shape[:2]))


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


# --- roots ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class HFState(AdapterState):
    """The HF vision adapters' per-forward fields.

    caller_mask: while exporting, whether the caller passed its own attention mask (else a mask transformers built
    for tracing is all-attend and may be replaced by the size bias after a merge). unmerge_output: the encoder
    returns last_hidden_state unmerged to full length (a mean-pooling head runs on it).
    """

    caller_mask: Optional[bool] = None
    unmerge_output: bool = False


def replace_first(output: Any, value: Tensor) -> Any:
    """An HF output (tuple or ModelOutput) with its first entry (last_hidden_state) replaced."""
    if isinstance(output, tuple):
        return (value,) + tuple(output[1:])
    output.last_hidden_state = value
    return output


def _passes_attention_mask(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
    if kwargs.get("attention_mask") is not None:
        return True
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return True  # cannot tell: keep the strict behaviour
    return bound.arguments.get("attention_mask") is not None


class SavesAsOriginal:
    """``save_pretrained`` on a patched Hugging Face model saves it as the library's class.

    transformers writes ``type(self).__name__`` into config.json's ``architectures``; the patched class is the
    dynamic ``PiToMe<Name>``, which no loader knows. The weights are the same patched or not, so saving under the
    original class is exact (merging itself is not saved: patch again after loading). This also makes Hugging
    Face Trainer checkpoints of a patched model load with ``from_pretrained``."""

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        patched = type(self)
        self.__class__ = original_class(self)
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = patched


class HFRoot(SavesAsOriginal, RootMixin):
    """A root of an HF vision model part. ``_pitome_mean_pool`` is set on mean-pooling heads: their encoder
    (``_pitome_encoder``) then returns last_hidden_state unmerged to full length, so the head's plain mean over the
    non-protected tokens is the size-weighted mean of the merged tokens."""

    _pitome_mean_pool: ClassVar[bool] = False
    _pitome_encoder: ClassVar[bool] = False

    def _pitome_enter(self, state: ForwardState, owner: bool, fn: Callable[..., Any], args: tuple,
                      kwargs: dict) -> None:
        super()._pitome_enter(state, owner, fn, args, kwargs)
        if not isinstance(state.adapter, HFState):
            state.adapter = HFState()
        if owner and (torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()):
            state.adapter.caller_mask = _passes_attention_mask(fn, args, kwargs)
        if self._pitome_mean_pool:
            state.adapter.needs_source = state.adapter.unmerge_output = True

    def _pitome_exit(self, state: ForwardState, owner: bool, out: Any) -> Any:
        adapter = state.adapter
        if self._pitome_encoder and adapter.unmerge_output and state.merged and state.source is not None:
            first = out[0] if isinstance(out, tuple) else out.last_hidden_state
            out = replace_first(out, state.unmerge(first, fill_mean_from=state.settings.num_protected))
        return out


class EncoderRoot(HFRoot):
    """An encoder model (its last_hidden_state is what heads pool)."""

    _pitome_encoder = True


class MeanPoolRoot(HFRoot):
    """A head model that mean-pools the encoder's tokens."""

    _pitome_mean_pool = True


class ClsRoot(HFRoot):
    """A head model that reads protected tokens only (class / distillation token)."""


class HFAdapter(Adapter):
    """An adapter for transformers models found by the class names in ``roots`` (as transformers built them)."""

    roots: ClassVar[Sequence[str]] = ()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return original_name(model) in cls.roots and "PreTrainedModel" in class_names(model)
