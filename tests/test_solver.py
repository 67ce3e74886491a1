"""FLOPs-target solver: hits the requested reduction within one merge step, and its prediction is what runs."""

from __future__ import annotations

import pytest
import torch

import pitome
from pitome.flops import count_macs
from pitome.solver import ModelCost, match_flops, solve

REDUCTIONS = [0.03, 0.1, 0.2, 0.3, 0.45]


@pytest.fixture
def cost(make_vit, images) -> ModelCost:
    return ModelCost.from_model(make_vit(), images(batch=1))


def test_model_cost_reads_the_model(cost):
    assert (cost.num_layers, cost.num_tokens, cost.num_protected) == (4, 65, 1)
    assert cost.extra_macs > 0
    assert cost.macs(ratio=1.0) == cost.macs(r=0) == cost.base_macs


def test_costs_fall_monotonically(cost):
    ratios = [i / 200 for i in range(1, 201)]
    by_ratio = [cost.macs(ratio=v) for v in ratios]
    assert by_ratio == sorted(by_ratio)
    by_r = [cost.macs(r=r) for r in range(33)]
    assert by_r == sorted(by_r, reverse=True)


@pytest.mark.parametrize("target", REDUCTIONS)
def test_ratio_is_the_closest_achievable(cost, target):
    found = solve(cost, target, "pitome")
    assert found.r is None and 0 < found.ratio <= 1
    assert found.macs == cost.macs(ratio=found.ratio)
    # nothing on a fine grid of ratios gets closer to the target
    grid = [cost.macs(ratio=i / 4000) for i in range(1, 4001)]
    best = min(abs(1 - m / cost.base_macs - target) for m in grid)
    assert abs(found.reduction - target) <= best + 1e-12
    # within one merge step: the achieved value lies between the schedules just below and just above the target
    reductions = sorted({1 - m / cost.base_macs for m in grid})
    below = max((v for v in reductions if v <= target), default=reductions[0])
    above = min((v for v in reductions if v >= target), default=reductions[-1])
    assert below - 1e-12 <= found.reduction <= above + 1e-12


@pytest.mark.parametrize("target", REDUCTIONS)
def test_r_is_the_closest_achievable(cost, target):
    found = solve(cost, target, "tome")
    assert found.ratio is None and isinstance(found.r, int)
    reductions = [1 - cost.macs(r=r) / cost.base_macs for r in range(33)]
    assert abs(found.reduction - target) == min(abs(v - target) for v in reductions)
    step = max(abs(reductions[found.r] - reductions[max(found.r - 1, 0)]),
               abs(reductions[min(found.r + 1, 32)] - reductions[found.r]))
    assert abs(found.reduction - target) <= step


def test_solved_budget_runs_as_predicted(make_vit, images, cost):
    model = make_vit()
    x = images(batch=2)
    for algorithm in ("pitome", "tome"):
        found = solve(cost, 0.3, algorithm)
        pitome.patch(model, **found.patch_kwargs())
        seen = count_macs(model, x)
        assert list(found.token_counts) == seen.tokens_per_layer
        assert seen.total_macs - seen.merge_macs == found.macs
        pitome.unpatch(model)


def test_equal_flops_match(cost):
    reference = cost.macs(ratio=0.9)
    tome = match_flops(cost, reference, "tome")
    gaps = sorted(abs(cost.macs(r=r) - reference) for r in range(33))
    assert abs(tome.macs - reference) == gaps[0]
    by_ratio = match_flops(cost, reference, "tome", by="ratio")
    assert by_ratio.macs == reference  # the same schedule is reachable by ratio


def test_include_merge_counts_the_merge_step(cost):
    plain = solve(cost, 0.3, "pitome")
    with_merge = solve(cost, 0.3, "pitome", include_merge=True)
    assert with_merge.macs == cost.macs(ratio=with_merge.ratio, include_merge=True)
    assert cost.macs(ratio=plain.ratio, include_merge=True) > plain.macs


def test_layers_restrict_the_solver(cost):
    found = solve(cost, 0.1, "pitome", layers=[0, 1])
    assert found.token_counts[2:] == (found.token_counts[2],) * 3
    assert found.reduction > 0


def test_zero_reduction_gives_the_identity(cost):
    assert solve(cost, 0.0, "pitome").ratio == 1.0
    assert solve(cost, 0.0, "tome").r == 0


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.3", True, None])
def test_bad_reduction_is_a_clear_error(cost, bad):
    with pytest.raises(ValueError, match="reduction must be a number in"):
        solve(cost, bad)


def test_unreachable_and_bad_options(cost):
    with pytest.raises(ValueError, match="at most"):
        solve(cost, 0.95)
    with pytest.raises(ValueError, match="by must be"):
        solve(cost, 0.2, by="tokens")
    with pytest.raises(ValueError, match="unknown algorithm"):
        solve(cost, 0.2, "nope")
    with pytest.raises(ValueError, match="above"):
        match_flops(cost, cost.base_macs * 1.5)


def test_from_model_keeps_a_patch(make_vit, images):
    model = make_vit()
    pitome.patch(model, algorithm="tome", r=5)
    cost = ModelCost.from_model(model, images(batch=1))
    assert cost.num_tokens == 65
    assert pitome.is_patched(model) and pitome.settings(model).config.r == 5
    with torch.no_grad():
        model(images(batch=1))
    assert pitome.info(model).tokens_per_layer[-1] == 65 - 4 * 5
