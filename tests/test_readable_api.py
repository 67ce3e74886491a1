"""What a user reads: one-line reprs of MergeInfo / MergeSettings, ToMe's `model.r = 16`, and budget warnings
that come once per forward at the user's own line."""

from __future__ import annotations

import warnings

import pytest
import torch

import pitome


def test_info_and_settings_print_in_one_line(make_vit, images):
    model = make_vit()
    pitome.patch(model, ratio=0.9)
    with torch.no_grad():
        model(images(2))
    text = repr(pitome.info(model))
    assert text.startswith("MergeInfo(65→") and "tokens over 4 blocks" in text and "% FLOPs (pitome, ratio 0.9)" in text
    assert "batch 2" in text and "tensor" not in text
    assert repr(pitome.settings(model)) == ("MergeSettings(pitome, ratio 0.9, merging in 4 of 4 blocks, 1 protected "
                                            "token, proportional attention on, metric keys)")
    assert 0 < pitome.info(model).flops_kept < 1


def test_setting_r_on_a_patched_model_repatches(make_vit, images):
    model = make_vit()
    pitome.patch(model, algorithm="tome", r=2, prop_attn=False)
    model.r = 8
    with torch.no_grad():
        model(images(1))
    assert pitome.info(model).tokens_per_layer == [65, 57, 49, 41, 33]
    config = pitome.settings(model).config
    assert (config.algorithm, config.r, config.ratio, config.prop_attn) == ("tome", 8, None, False)
    with pytest.raises(ValueError, match="r must be"):
        model.r = -1
    assert pitome.settings(model).config.r == 8  # an invalid value leaves the patch as it was
    model.ratio = 0.8
    assert pitome.settings(model).config.ratio == 0.8 and pitome.settings(model).config.r is None
    pitome.unpatch(model)
    model.r = 3  # an unpatched model: an ordinary attribute again
    assert model.r == 3 and not pitome.is_patched(model)


def test_budget_cap_warns_once_per_forward_at_the_callers_line(make_vit, images):
    model, x = make_vit(), images(1)
    pitome.patch(model, ratio=0.3)
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        model(x)
    assert len(record) == 1
    assert record[0].filename == __file__
    message = str(record[0].message)
    assert "layer 0: budget asks to remove 44 tokens" in message and "also capped in block(s) 1, 2, 3" in message
