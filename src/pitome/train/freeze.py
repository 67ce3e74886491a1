"""Which parameters train: a linear probe (head only), the last k blocks + head, or everything.

The blocks are the ones pitome patches (``flops.find_blocks``); the head is the classifier module the model
library names (timm ``get_classifier()``, Hugging Face ``classifier`` / ``score``, ``head``), plus the norm
layers that sit after the blocks (they feed the head and are cheap to adapt).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..flops import find_blocks

__all__ = ["MODES", "classifier_head", "set_trainable", "trainable_blocks"]

MODES = ("linear", "last-k", "full")
_HEAD_ATTRS = ("classifier", "score", "head", "fc")
# norms between the blocks and the head (timm: norm / fc_norm / head_drop; HF: layernorm / post_layernorm ...)
_FINAL_NORMS = ("norm", "fc_norm", "layernorm", "post_layernorm", "final_layer_norm", "ln_post")


def classifier_head(model: nn.Module) -> nn.Module:
    """The module that maps pooled features to logits."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    for attr in _HEAD_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    raise ValueError(f"cannot find the classification head of a {type(model).__name__} (looked for "
                     f"get_classifier() and attributes {_HEAD_ATTRS}); pass a model with a classifier")


def _final_norms(model: nn.Module) -> list[nn.Module]:
    """Norm layers after the blocks, found on the model and on its encoder / base model."""
    owners = [model] + [getattr(model, a) for a in ("base_model", "encoder", "vit", "dinov2", "bert")
                        if isinstance(getattr(model, a, None), nn.Module)]
    norms = []
    for owner in owners:
        for attr in _FINAL_NORMS:
            module = getattr(owner, attr, None)
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
                norms.append(module)
    return norms


def trainable_blocks(model: nn.Module, mode: str, last_k: int = 1) -> list[int]:
    """Indices of the blocks that get gradients in ``mode``."""
    count = len(find_blocks(model))
    if mode == "full":
        return list(range(count))
    if mode == "last-k":
        return list(range(count - last_k, count))
    return []


def set_trainable(model: nn.Module, mode: str, last_k: Optional[int] = None) -> list[str]:
    """Freeze every parameter, then unfreeze what ``mode`` trains; returns the names of the trainable ones.

    mode: 'linear' (head + final norms), 'last-k' (the last ``last_k`` blocks + head + final norms), 'full'.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    blocks = find_blocks(model)
    if mode == "last-k":
        if isinstance(last_k, bool) or not isinstance(last_k, int) or not 1 <= last_k <= len(blocks):
            raise ValueError(f"last_k must be an integer in [1, {len(blocks)}] (the model has {len(blocks)} blocks), "
                             f"got {last_k!r}")
    if mode == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        parts = [classifier_head(model), *_final_norms(model)]
        parts += [blocks[i] for i in trainable_blocks(model, mode, last_k or 1)]
        for part in parts:
            for param in part.parameters():
                param.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]
