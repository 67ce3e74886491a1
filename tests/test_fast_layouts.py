"""Plans built straight from a known layout (no padding, one r for the batch) equal the general route's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pitome.algorithms import create_algorithm
from pitome.algorithms.base import MergeRequest

CASES = [("pitome", {}), ("pitome", {"split": "top_next"}), ("pitome_text", {}), ("pitome_bsm", {}), ("tome", {})]


@pytest.mark.parametrize("name, options", CASES)
@pytest.mark.parametrize("protected, tokens, r", [(1, 17, 5), (0, 16, 8), (2, 21, 3)])
def test_layout_plan_equals_general_plan(name, options, protected, tokens, r):
    g = torch.Generator().manual_seed(tokens + r)
    batch = 3
    metric = torch.randn(batch, protected + tokens, 8, generator=g)
    metric[:, -4:] = metric[:, -5:-1] + 1e-3 * torch.randn(batch, 4, 8, generator=g)  # near ties
    algorithm = create_algorithm(name, **options)
    fast_request = MergeRequest(metric=metric, r=torch.full((batch,), r), r_max=r, r_min=r, num_protected=protected)
    general_request = dataclasses.replace(fast_request, r_min=None)
    fast = algorithm.plan(fast_request)
    general = dataclasses.replace(algorithm.plan(general_request), rows=None, dst=None)  # merges by scatter
    assert fast.rows is not None, "the layout route gives the gather form"
    assert fast.num_out == general.num_out == protected + tokens - r
    assert torch.equal(fast.assign, general.assign)
    x = torch.randn(batch, protected + tokens, 6, generator=g)
    size = torch.randint(1, 5, (batch, protected + tokens), generator=g).float()
    for s in (None, size):
        out_fast, size_fast = fast.merge(x, s)
        out_general, size_general = general.merge(x, s)
        torch.testing.assert_close(out_fast, out_general, rtol=1e-5, atol=1e-6)
        assert torch.equal(size_fast, size_general)
