"""Gradients of every registered algorithm's merge agree with float64 finite differences.

The choice of tokens (the plan's assignment) is piecewise constant in the inputs; with tie-free inputs and a small
step it does not change, so the merged output must be differentiable exactly: through the features, and through
merge weights taken from attention (evit, mctf), which is how those methods train.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import pitome
from pitome.algorithms import MergeRequest, create_algorithm


@pytest.mark.parametrize("name", pitome.available_algorithms())
def test_merge_gradients_match_finite_differences(name):
    algo = create_algorithm(name)
    batch, tokens = 2, 12
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, 5, dtype=torch.float64, generator=gen)
    attention = torch.rand(batch, tokens, dtype=torch.float64, generator=gen).softmax(dim=-1)
    size = torch.rand(batch, tokens, generator=gen) + 1.0

    def merged(features: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        request = MergeRequest(metric=features.detach(), r=torch.tensor([3, 4]), r_max=4, r_min=3, num_protected=1,
                               attention=att, size=size[:, 1:], generator=torch.Generator().manual_seed(0))
        return algo.plan(request).merge(features, size)[0]

    assert torch.autograd.gradcheck(merged, (x.requires_grad_(), attention.requires_grad_()))


@pytest.mark.slow
@pytest.mark.parametrize("name", pitome.available_algorithms())
def test_patched_model_gradients_match_finite_differences(name):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    model = timm_vit.VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                                       num_classes=3).double().eval()
    pitome.patch(model, algorithm=name, ratio=0.6, seed=0)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(model, (x.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)
