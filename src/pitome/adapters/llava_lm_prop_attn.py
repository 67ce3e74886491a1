"""Proportional attention inside a patched LLaVA's language model (ours; off unless asked for).

A merged visual token stands for ``size`` image patches. ToMe's proportional attention adds log(size) to the
attention logits of each key so that a merged token keeps the weight of the patches it replaced; in the vision
tower pitome does that with ``prop_attn``. Here the same bias is carried into the language model: every query
(prompt and generated tokens) adds log(size) to its logits for the visual positions; text positions get 0.
The sizes are those of the tokens at the tower's feature layer (``vision_feature_layer``), i.e. after the
merges LLaVA's features went through. Unmerged tokens have size 1 (bias 0), so with merging off nothing changes.

The language model's attention must be 'sdpa' or 'eager' (the bias goes in as an additive float mask, which
also means SDPA cannot take its flash path while this is on).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from ..step import log_size_bias, record_merges
from .base import get_tag
from .hf_llava import _feature_layers, _llava_model, _resolve, _strategy

__all__ = ["language_model_prop_attn"]


class _SizeBias:
    """Collects the visual tokens' sizes during the tower run and turns them into the language model's bias."""

    def __init__(self, llava: nn.Module) -> None:
        self.llava = llava
        settings = get_tag(llava, "settings")
        if settings is None:
            raise ValueError("language-model proportional attention needs a patched LLaVA (pitome.patch first)")
        layer = _feature_layers(llava)
        if not isinstance(layer, int):
            layer = min(int(i) for i in layer)
        self.feature_block = _resolve(int(layer), settings.num_layers)
        self.state: Any = None
        self.sizes: Optional[Tensor] = None  # (images, tokens) at the feature layer
        self.bias: Optional[Tensor] = None  # (B, prompt length) for the running generation

    def record(self, state: Any, layer: int, metric: Tensor, plan: Any) -> None:
        """``record_merges`` callback: state.size is the size before block ``layer``'s merge."""
        if state.settings is not get_tag(self.llava, "settings"):
            return
        if self.state is not state:
            self.state, self.sizes = state, None
        if layer >= self.feature_block and self.sizes is None:
            self.sizes = self._current(state, metric)

    @staticmethod
    def _current(state: Any, metric: Tensor) -> Tensor:
        if state.size is not None:
            return state.size.detach().clone()
        return torch.ones(metric.shape[:2], dtype=torch.float32, device=metric.device)

    def prompt_bias(self, input_ids: Tensor) -> Optional[Tensor]:
        """(B, L) log-size bias of the visual positions of a prefill's ids (None when nothing merged)."""
        sizes = self.sizes
        if sizes is None and self.state is not None:
            sizes = self.state.size  # no merging block at or after the feature layer: the final sizes
        if sizes is None:
            return None
        if _strategy(self.llava) == "default":
            sizes = sizes[:, 1:]
        where = input_ids == self.llava.config.image_token_id
        if int(where.sum()) != sizes.numel():
            raise ValueError(f"language-model proportional attention: {int(where.sum())} image positions in the "
                             f"prompt but {sizes.numel()} merged visual tokens")
        bias = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        bias[where] = log_size_bias(sizes.reshape(-1).to(bias.device), torch.float32)
        return bias

    def before_llava(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and bool((input_ids == self.llava.config.image_token_id).any()):
            self.bias = self.prompt_bias(input_ids)
            self.sizes, self.state = None, None

    def before_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        if self.bias is None:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        queries = hidden.shape[1]
        if mask is not None and mask.dim() == 4:
            keys = mask.shape[-1]
        else:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            keys = queries + (int(cache.get_seq_length(module.layer_idx)) if cache is not None else 0)
        kwargs["attention_mask"] = _float_mask(mask, queries, keys, self.bias, hidden.dtype)
        return args, kwargs


def _float_mask(mask: Optional[Tensor], queries: int, keys: int, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, q, k) additive mask: the model's mask (None = causal, bool = allowed) plus the per-key bias."""
    low = torch.finfo(dtype).min
    batch = bias.shape[0]
    if mask is None:
        rows = torch.arange(queries, device=bias.device).unsqueeze(1) + (keys - queries)
        allowed = torch.arange(keys, device=bias.device).unsqueeze(0) <= rows
        base = torch.zeros(queries, keys, dtype=dtype, device=bias.device).masked_fill(~allowed, low)
        base = base.expand(batch, 1, queries, keys)
    elif mask.dtype == torch.bool:
        base = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, low)
    else:
        base = mask.to(dtype)
    per_key = torch.zeros(batch, keys, dtype=torch.float32, device=bias.device)
    width = min(keys, bias.shape[1])
    per_key[:, :width] = bias[:, :width]
    per_key = per_key.clamp_min(low).to(dtype)
    return (base + per_key[:, None, None, :]).clamp_min(low)


@contextlib.contextmanager
def language_model_prop_attn(model: nn.Module) -> Iterator[None]:
    """While active, a patched LLaVA's language model attends to merged visual tokens in proportion to their size."""
    llava = _llava_model(model)
    language_model = llava.language_model
    impl = getattr(language_model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"language-model proportional attention needs attn_implementation 'sdpa' or 'eager', "
                         f"got {impl!r}")
    layers = getattr(language_model, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"language-model proportional attention: {type(language_model).__name__} has no "
                         f"layers[i].self_attn")
    collector = _SizeBias(llava)
    handles = [llava.register_forward_pre_hook(collector.before_llava, with_kwargs=True)]
    handles += [layer.self_attn.register_forward_pre_hook(collector.before_attention, with_kwargs=True)
                for layer in layers]
    try:
        with record_merges(collector.record):
            yield
    finally:
        for handle in handles:
            handle.remove()
