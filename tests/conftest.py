"""Shared fixtures: tiny random-weight timm ViTs (no downloads) and images for them."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

SMALL_VIT = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)


@pytest.fixture
def make_vit() -> Callable[..., nn.Module]:
    """Factory of small timm VisionTransformers (64 patches + prefix tokens), eval mode, seeded weights."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")

    def build(seed: int = 0, **overrides: Any) -> nn.Module:
        torch.manual_seed(seed)
        return timm_vit.VisionTransformer(**{**SMALL_VIT, **overrides}).eval()

    return build


@pytest.fixture
def images() -> Callable[..., torch.Tensor]:
    """Random images for a model of a given input size (seeded, so every call gives the same batch)."""

    def make(batch: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, size, size, generator=g)

    return make
