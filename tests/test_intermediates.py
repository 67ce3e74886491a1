"""Intermediate outputs of patched models (timm forward_intermediates / get_intermediate_layers, open_clip
forward_intermediates): they merge like forward, report merged tokens or unmerge them to the grid as asked, and
``pitome.info`` describes the call just made. Tiny random-weight models, no downloads."""

from __future__ import annotations

import copy

import pytest
import torch

import pitome


def _unmerged_by_loops(merged: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Reference unmerge written with Python loops: position j holds merged token source[b, j] (zeros if dropped)."""
    batch, n0 = source.shape
    out = torch.zeros(batch, n0, merged.shape[-1])
    for b in range(batch):
        for j in range(n0):
            if source[b, j] >= 0:
                out[b, j] = merged[b, source[b, j]]
    return out


def _source_after(info: pitome.MergeInfo, layer: int, batch: int, n0: int) -> torch.Tensor:
    source = torch.arange(n0).expand(batch, n0)
    for merged_at, s in info.source_history:
        if merged_at <= layer:
            source = s
    return source


def test_timm_merging_off_equals_the_unpatched_model(make_vit, images):
    model, x = make_vit(), images(2)
    with torch.no_grad():
        refs = [model.forward_intermediates(x), model.forward_intermediates(x, output_fmt="NLC", indices=2),
                model.get_intermediate_layers(x, n=2, reshape=True, return_prefix_tokens=True)]
        pitome.patch(model, ratio=1.0)
        outs = [model.forward_intermediates(x), model.forward_intermediates(x, output_fmt="NLC", indices=2),
                model.get_intermediate_layers(x, n=2, reshape=True, return_prefix_tokens=True)]
    flat = lambda o: [t for t in torch.utils._pytree.tree_leaves(o) if isinstance(t, torch.Tensor)]  # noqa: E731
    for ref, out in zip(refs, outs):
        assert len(flat(ref)) == len(flat(out))
        for a, b in zip(flat(ref), flat(out)):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5


def test_timm_forward_intermediates_merges_and_reports_merged_tokens(make_vit, images):
    model, x = make_vit(), images(2)
    pitome.patch(model, ratio=0.8, trace_source=True)
    with torch.no_grad():
        features = model.forward_features(x)
        final, taken = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
    counts = pitome.info(model).tokens_per_layer
    assert counts[-1] < counts[0]  # info describes a merging forward, not a stale or skipped one
    assert [s.shape[1] + p.shape[1] for s, p in taken] == counts[1:]
    torch.testing.assert_close(final, features)


def test_timm_nchw_intermediates_are_unmerged_to_the_grid(make_vit, images):
    model, x = make_vit(), images(2)
    reference = copy.deepcopy(model)
    pitome.patch(model, ratio=0.8, trace_source=True)
    with torch.no_grad():
        _, merged = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
        info = pitome.info(model)
        grid = model.forward_intermediates(x, intermediates_only=True)
        unpatched = reference.forward_intermediates(x, intermediates_only=True)
        listed = model.get_intermediate_layers(x, n=4, reshape=True)
    assert [g.shape for g in grid] == [u.shape for u in unpatched]
    assert not torch.allclose(grid[-1], unpatched[-1], atol=1e-3)  # it merged
    for layer, ((spatial, prefix), g) in enumerate(zip(merged, grid)):
        full = torch.cat([prefix, spatial], dim=1)
        source = _source_after(info, layer, 2, 65)
        expected = _unmerged_by_loops(full, source)[:, 1:]
        torch.testing.assert_close(g.flatten(2).transpose(1, 2), expected)
    for a, b in zip(listed, grid):
        torch.testing.assert_close(a, b)


def test_timm_unmerge_option(make_vit, images):
    model, x = make_vit(), images(2)
    pitome.patch(model, ratio=0.8)
    with torch.no_grad():
        merged = model.get_intermediate_layers(x, n=2)
        full = model.get_intermediate_layers(x, n=2, unmerge=True)
        nlc_full = model.forward_intermediates(x, output_fmt="NLC", unmerge=True, intermediates_only=True)
    assert all(t.shape[1] < 64 for t in merged)
    assert all(t.shape[1] == 64 for t in full) and all(t.shape[1] == 64 for t in nlc_full)
    with pytest.raises(ValueError, match="unmerge=True"):
        model.forward_intermediates(x, unmerge=False)
    with pytest.raises(ValueError, match="unmerge=True"):
        model.get_intermediate_layers(x, reshape=True, unmerge=False)


@pytest.mark.parametrize("call", ["forward", "forward_features", "forward_intermediates", "get_intermediate_layers"])
def test_every_public_timm_forward_path_merges(make_vit, images, call):
    model, x = make_vit(), images(1)
    pitome.patch(model, ratio=0.8)
    with torch.no_grad():
        getattr(model, call)(x)
    counts = pitome.info(model).tokens_per_layer
    assert counts[0] == 65 and counts[-1] < 65


def test_open_clip_forward_intermediates_merge():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(image_size=32, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=2.0,
                              output_dim=16).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(tower)
    with torch.no_grad():
        pitome.patch(tower, ratio=1.0)
        off = tower.forward_intermediates(x)
        ref = reference.forward_intermediates(x)
        for a, b in zip(off["image_intermediates"], ref["image_intermediates"]):
            assert (a - b).abs().max() <= 1e-5
        pitome.patch(tower, ratio=0.7, trace_source=True)
        merged = tower.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
        info = pitome.info(tower)
        grid = tower.forward_intermediates(x)
        torch.testing.assert_close(merged["image_features"], tower(x))
    assert info.tokens_per_layer[-1] < 17
    assert [t.shape[1] + 1 for t in merged["image_intermediates"]] == info.tokens_per_layer[1:]
    assert [g.shape for g in grid["image_intermediates"]] == [r.shape for r in ref["image_intermediates"]]
    for layer, (spatial, prefix, g) in enumerate(zip(merged["image_intermediates"],
                                                     merged["image_intermediates_prefix"],
                                                     grid["image_intermediates"])):
        expected = _unmerged_by_loops(torch.cat([prefix, spatial], 1), _source_after(info, layer, 2, 17))[:, 1:]
        torch.testing.assert_close(g.flatten(2).transpose(1, 2), expected)
    with pytest.raises(ValueError, match="unmerge=True"):
        tower.forward_intermediates(x, unmerge=False)
    del open_clip
