"""Model adapters, found by model type. Each adapter file imports its model library lazily."""

from __future__ import annotations

from torch import nn

from .base import Adapter, UnsupportedModelError
from .hf_clip import HFClipAdapter, HFClipTextAdapter
from .hf_llava import HFLlavaAdapter
from .hf_text import HFTextAdapter
from .hf_vision import HFViTAdapter
from .open_clip_vit import OpenClipViTAdapter
from .timm_vit import TimmViTAdapter

__all__ = ["Adapter", "UnsupportedModelError", "ADAPTERS", "find_adapter", "register_adapter"]

ADAPTERS: list[type[Adapter]] = [TimmViTAdapter]
ADAPTERS.append(HFTextAdapter)
ADAPTERS.extend([HFViTAdapter, HFClipAdapter, HFClipTextAdapter, HFLlavaAdapter, OpenClipViTAdapter])


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS.append(cls)
    return cls


def find_adapter(model: nn.Module) -> Adapter:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"pitome patches torch.nn.Module models, got {type(model).__name__}")
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    supported = "\n  - ".join(c.supports for c in ADAPTERS)
    raise UnsupportedModelError(f"pitome cannot patch a {type(model).__name__}; supported models:\n  - {supported}")
