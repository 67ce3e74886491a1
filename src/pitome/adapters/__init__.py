"""Model adapters, found by model type. Each adapter file imports its model library lazily.

``register_adapter`` adds an adapter that is tried before the built-in ones (the latest registered first), so a
user adapter can take over a model family pitome already knows.
"""

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

ADAPTERS: list[type[Adapter]] = [TimmViTAdapter, HFTextAdapter, HFViTAdapter, HFClipAdapter, HFClipTextAdapter,
                                  HFLlavaAdapter, OpenClipViTAdapter]


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Register a model adapter (usable as a class decorator); it is tried before every adapter registered earlier
    and every built-in one."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"register_adapter takes a subclass of pitome.adapters.Adapter, got {cls!r}")
    if cls in ADAPTERS:
        ADAPTERS.remove(cls)
    ADAPTERS.insert(0, cls)
    return cls


def find_adapter(model: nn.Module) -> Adapter:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"pitome patches torch.nn.Module models, got {type(model).__name__}")
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    supported = "\n  - ".join(c.supports for c in ADAPTERS)
    raise UnsupportedModelError(f"pitome cannot patch a {type(model).__name__}; supported models:\n  - {supported}")
