"""Budgets per block: keep-ratio, fixed r, (r, inflection), per-block lists, ``layers=``, caps and no-ops."""

from __future__ import annotations

import warnings

import pytest
import torch

import pitome
from pitome.schedule import Budget, predict_token_counts, resolve_budgets

DEIT_S_AT_09 = [197, 178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66]


def _counts(model, x, **kwargs) -> list[int]:
    pitome.patch(model, **kwargs)
    with torch.no_grad():
        model(x)
    return pitome.info(model).tokens_per_layer


def test_keep_ratio_rule_uses_float_arithmetic():
    assert Budget(ratio=0.9).remove_count(196) == 19  # floor(196 - 176.4)
    assert Budget(ratio=0.9).remove_count(177) == 17
    assert Budget(ratio=0.5).remove_count(64) == 32
    assert Budget(ratio=1.0).remove_count(196) == 0
    assert Budget(r=13).remove_count(5) == 13
    assert Budget(ratio=0.9).remove_counts(torch.tensor([196, 177, 5])).tolist() == [19, 17, 0]


def test_predicted_deit_s_counts():
    counts = predict_token_counts(resolve_budgets(12, ratio=0.9), 197, num_protected=1)
    assert counts[:12] == DEIT_S_AT_09
    assert counts[12] == 60


@pytest.mark.slow
def test_deit_s_tokens_entering_each_block():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    counts = _counts(model, torch.randn(1, 3, 224, 224), ratio=0.9)
    assert counts[:12] == DEIT_S_AT_09
    assert len(counts) == 13 and counts[12] == 60
    assert pitome.info(model).size.sum().item() == 197


def test_resolve_budgets_forms():
    assert resolve_budgets(3, ratio=0.8) == [Budget(ratio=0.8)] * 3
    assert resolve_budgets(3, ratio=[0.8, None, 1]) == [Budget(ratio=0.8), None, Budget(ratio=1.0)]
    assert resolve_budgets(2, r=4) == [Budget(r=4)] * 2
    assert resolve_budgets(3, r=[4, 0, None]) == [Budget(r=4), Budget(r=0), None]
    assert resolve_budgets(4, r=5, layers=[0, -1]) == [Budget(r=5), None, None, Budget(r=5)]


def test_r_inflection_goes_linearly_between_the_documented_ends():
    # r(1 - inflection) at the first block, r(1 + inflection) at the last, floored in between
    assert [b.r for b in resolve_budgets(5, r=(8, 0.5))] == [4, 6, 8, 10, 12]
    assert [b.r for b in resolve_budgets(5, r=(8, -0.5))] == [12, 10, 8, 6, 4]
    assert [b.r for b in resolve_budgets(3, r=(7, 0.0))] == [7, 7, 7]
    assert [b.r for b in resolve_budgets(3, r=(10, -1.0))] == [20, 10, 0]
    assert [b.r for b in resolve_budgets(2, r=(8, 0))] == [8, 8]  # a tuple is (r, inflection), even with an int


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=[0.9, 0.9]), "ratio list has 2 entries; the model has 3 blocks"),
    (dict(r=[1, 2]), "r list has 2 entries"),
    (dict(r=4, layers=[3]), "layer 3 is out of range"),
    (dict(r=4, layers="0"), "layers must be None or a list"),
    (dict(r=(4, 1.5)), "inflection must be a number in \\[-1, 1\\], got 1.5"),
    (dict(r=[1, -2, 0]), "r\\[1\\] must be an integer >= 0"),
    (dict(ratio=[0.9, 0.0, None]), "ratio\\[1\\] must be a number in \\(0, 1\\]"),
    (dict(r=2.5), "got 2.5"),
    (dict(), "a budget is needed"),
])
def test_resolve_budgets_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_budgets(3, **kwargs)


@pytest.mark.slow
def test_fixed_r_and_per_layer_lists_in_a_model(make_vit, images):
    model, x = make_vit(), images(1)
    assert _counts(model, x, algorithm="tome", r=5) == [65, 60, 55, 50, 45]
    assert _counts(model, x, r=[10, 0, None, 3]) == [65, 55, 55, 55, 52]
    assert _counts(model, x, ratio=[0.5, None, 0.75, 1.0]) == [65, 33, 33, 25, 25]
    assert _counts(model, x, r=(6, 0.5)) == [65, 62, 57, 50, 41]  # r = 3, 5, 7, 9


def test_layers_selects_the_merging_blocks(make_vit, images):
    model, x = make_vit(), images(1)
    assert _counts(model, x, ratio=0.9, layers=[1, 3]) == [65, 65, 59, 59, 54]
    assert _counts(model, x, algorithm="tome", r=4, layers=[-1]) == [65, 65, 65, 65, 61]
    settings = pitome.settings(model)
    assert [layer.merges for layer in settings.layers] == [False, False, False, True]


@pytest.mark.slow
def test_budget_that_rounds_to_zero_is_a_noop(make_vit, images):
    model, x = make_vit(), images(2)
    with torch.no_grad():
        ref = model(x)
    for kwargs in (dict(ratio=0.99), dict(ratio=0.985, algorithm="pitome_text"), dict(algorithm="tome", r=0),
                   dict(r=[0, 0, 0, 0])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            counts = _counts(model, x, **kwargs)
        assert counts == [65] * 5, kwargs
        with torch.no_grad():
            assert (model(x) - ref).abs().max() <= 1e-5
    # late blocks whose budget rounds to 0 stop merging quietly
    assert _counts(model, x, ratio=0.95) == [65, 62, 59, 57, 55]


def test_over_budget_is_capped_with_a_warning(make_vit, images):
    model, x = make_vit(), images(1)
    with pytest.warns(UserWarning) as record:
        counts = _counts(model, x, ratio=0.3)
    assert counts == [65, 33, 17, 9, 5]
    assert counts == predict_token_counts(resolve_budgets(4, ratio=0.3), 65)
    messages = [str(w.message) for w in record]
    assert any("layer 0: budget asks to remove 44 tokens" in m and "capped to 32" in m for m in messages)
    with pytest.warns(UserWarning) as record:
        counts = _counts(model, x, algorithm="tome", r=40)
    assert counts == [65, 33, 17, 9, 5]
    assert any("remove 40 tokens" in str(w.message) and "capped to 32" in str(w.message) for w in record)


@pytest.mark.parametrize("kwargs", [dict(ratio=0.8), dict(ratio=0.6, algorithm="pitome_bsm"),
                                    dict(algorithm="tome", r=(7, -0.5)), dict(preset="deit", ratio=0.7)])
def test_measured_counts_equal_predicted(make_vit, images, kwargs):
    model = make_vit(reg_tokens=2, depth=3)
    counts = _counts(model, images(1), **kwargs)
    settings = pitome.settings(model)
    budgets = [layer.budget for layer in settings.layers]
    assert counts == predict_token_counts(budgets, 67, num_protected=3)
