"""timm VisionTransformer family: exactness with merging off, a hand-written merged forward, sizes and sources."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pitome
from pitome.algorithms import MergeRequest, create_algorithm

timm = pytest.importorskip("timm")

# small configs of each family (64 patches of 8 px); the real DeiT sizes are built by name below
FAMILIES: dict[str, dict] = {
    "vit": dict(),
    "deit3_layerscale": dict(init_values=0.1, no_embed_class=True),
    "qk_norm": dict(qk_norm=True),
    "registers": dict(reg_tokens=4),
    "gap_no_cls": dict(global_pool="avg", class_token=False),
    "gap_with_cls": dict(global_pool="avg"),
    "gap_registers_include_prefix": dict(global_pool="avg", reg_tokens=2, pool_include_prefix=True),
}
NAMED = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224"]


def _named(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMED)
def test_named_deit_models_equal_unpatched_with_merging_off(name, images):
    model, x = _named(name), images(1, size=224)
    with torch.no_grad():
        ref = model(x)
        pitome.patch(model, ratio=1.0)
        assert _max_diff(model(x), ref) <= 1e-5
        pitome.patch(model, algorithm="tome", r=0)
        assert _max_diff(model(x), ref) <= 1e-5
        assert pitome.info(model).tokens_per_layer == [197 + ("distilled" in name)] * 13
        pitome.unpatch(model)
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_equal_unpatched_with_merging_off_and_merge_otherwise(family, make_vit, images):
    model, x = make_vit(**FAMILIES[family]), images(2)
    with torch.no_grad():
        ref = model(x)
        for kwargs in (dict(ratio=1.0), dict(algorithm="tome", r=0), dict(preset="deit", ratio=1.0),
                       dict(algorithm="pitome_text", ratio=1.0, prop_attn=True, metric="hidden")):
            pitome.patch(model, **kwargs)
            assert _max_diff(model(x), ref) <= 1e-5, kwargs
        pitome.patch(model, ratio=0.8, trace_source=True)
        out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _max_diff(out, ref) > 1e-4, "merging must change the output"
    info = pitome.info(model)
    n0 = 64 + model.num_prefix_tokens
    assert info.tokens_per_layer[0] == n0 and info.tokens_per_layer[-1] < n0
    torch.testing.assert_close(info.size.sum(1), torch.full((2,), float(n0)))
    _assert_partition(info.source, info.tokens_per_layer[-1], model.num_prefix_tokens)


def _assert_partition(source: torch.Tensor, num_out: int, head: int) -> None:
    """Every original token sits in exactly one output token; every output token holds one or more."""
    for row in source:
        assert row.min() >= 0 and row.max() < num_out
        assert torch.bincount(row, minlength=num_out).min() >= 1
        assert row[:head].tolist() == list(range(head)), "prefix tokens stay at slots 0..h-1"


def reference_forward(model: nn.Module, x: torch.Tensor, algorithm: str, ratio: float, prop_attn: bool,
                      metric: str = "keys", **options) -> torch.Tensor:
    """The merged forward written out by hand: explicit attention (+ log size), merge after the
    attention residual, MLP, size-weighted pooling."""
    algo = create_algorithm(algorithm, **options)
    head = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = torch.ones(x.shape[:2])
    depth = len(model.blocks)
    for layer, blk in enumerate(model.blocks):
        a, (b, n, _) = blk.attn, x.shape
        qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) * a.head_dim ** -0.5
        if prop_attn:
            logits = logits + size.log()[:, None, None, :]
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + blk.ls1(a.proj(a.norm(o)))
        t = n - head
        r = min(math.floor(t - t * ratio), t // 2)
        if r > 0:
            request = MergeRequest(metric=k.mean(1) if metric == "keys" else x, r=torch.full((b,), r), r_max=r,
                                   r_min=r, num_protected=head, layer=layer, num_layers=depth)
            x, size = algo.plan(request).merge(x, size)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    if model.global_pool == "avg":
        start = 0 if model.pool_include_prefix else head
        w = size[:, start:, None]
        x = (x[:, start:] * w).sum(1) / w.sum(1)
    else:
        x = x[:, 0]
    return model.head(model.fc_norm(x))


CASES = [
    ("vit", "pitome", dict(), True, "keys"),
    ("vit", "pitome", dict(energy="paper", split="top_next", margin=0.5), False, "keys"),
    ("deit3_layerscale", "pitome_bsm", dict(), True, "keys"),
    ("qk_norm", "pitome", dict(margin=0.8, margin_decay=0.4), True, "keys"),
    ("registers", "tome", dict(), True, "keys"),
    ("gap_no_cls", "pitome", dict(), True, "hidden"),
    ("gap_with_cls", "pitome_text", dict(), False, "keys"),
    ("gap_registers_include_prefix", "pitome", dict(), True, "keys"),
]


@pytest.mark.parametrize("family,algorithm,options,prop_attn,metric", CASES)
def test_patched_forward_equals_hand_written_reference(family, algorithm, options, prop_attn, metric,
                                                       make_vit, images):
    model, x = make_vit(**FAMILIES[family]), images(2)
    with torch.no_grad():
        expected = reference_forward(model, x, algorithm, 0.75, prop_attn, metric, **options)
        pitome.patch(model, algorithm=algorithm, ratio=0.75, prop_attn=prop_attn, metric=metric, **options)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fused_and_explicit_attention_agree_with_proportional_attention(make_vit, images):
    model, x = make_vit(), images(2)
    pitome.patch(model, ratio=0.7, prop_attn=True)
    with torch.no_grad():
        fused = model(x)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        explicit = model(x)
        pitome.patch(model, ratio=0.7, prop_attn=False)
        no_prop = model(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)
    assert _max_diff(no_prop, explicit) > 1e-5, "prop_attn must reach the attention"


@pytest.mark.slow
def test_batch_equals_each_sample_alone(make_vit, images):
    model, x = make_vit(qk_norm=True, reg_tokens=1), images(3)
    for kwargs in (dict(ratio=0.7), dict(algorithm="tome", r=12), dict(preset="deit", ratio=0.8)):
        pitome.patch(model, trace_source=True, **kwargs)
        with torch.no_grad():
            batch = model(x)
            sizes = pitome.info(model).size
            for i in range(3):
                torch.testing.assert_close(model(x[i : i + 1]), batch[i : i + 1], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(pitome.info(model).size, sizes[i : i + 1])


def test_gradients_flow_through_the_merge(make_vit, images):
    model = make_vit(init_values=0.1)
    model.train()
    pitome.patch(model, ratio=0.6)
    x = images(2).requires_grad_(True)
    model(x).square().sum().backward()
    assert pitome.info(model).tokens_per_layer[-1] < 65
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gap_no_cls", "gap_with_cls", "gap_registers_include_prefix"])
def test_size_weighted_pooling_equals_mean_over_original_tokens(family, make_vit, images):
    """Pooling merged tokens by size = mean over all original positions of the unmerged features."""
    model, x = make_vit(**FAMILIES[family]), images(2)
    pitome.patch(model, ratio=0.7, trace_source=True)
    with torch.no_grad():
        feats = model.forward_features(x)
        info = pitome.info(model)
        assert feats.shape[1] == info.tokens_per_layer[-1] < info.tokens_per_layer[0]
        start = 0 if model.pool_include_prefix else model.num_prefix_tokens
        unmerged = feats.gather(1, info.source.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        expected = model.fc_norm(unmerged[:, start:].mean(1))
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), model.head(expected), rtol=1e-5, atol=1e-5)
        pitome.patch(model, ratio=1.0)
        plain = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(plain, pre_logits=True),
                                   model.fc_norm(plain[:, start:].mean(1)), rtol=1e-6, atol=1e-6)


def test_source_maps_and_history(make_vit, images):
    model, x = make_vit(reg_tokens=4), images(2)
    pitome.patch(model, ratio=0.8, trace_source=True)
    with torch.no_grad():
        model(x)
    info = pitome.info(model)
    counts = info.tokens_per_layer
    assert [layer for layer, _ in info.source_history] == [0, 1, 2, 3]
    for (layer, source), tokens in zip(info.source_history, counts[1:]):
        _assert_partition(source, tokens, 5)
    matrix = info.source_matrix()
    assert matrix.shape == (2, counts[-1], counts[0])
    assert torch.equal(matrix.sum(1), torch.ones(2, counts[0], dtype=torch.long))
    torch.testing.assert_close(matrix.sum(2).float(), info.size)
    # without trace_source there is no map, but sizes and counts are still there
    pitome.patch(model, ratio=0.8)
    with torch.no_grad():
        model(x)
    assert pitome.info(model).source is None and pitome.info(model).tokens_per_layer == counts
    with pytest.raises(ValueError, match="trace_source=True"):
        pitome.info(model).source_matrix()


def test_distilled_model_protects_both_tokens_and_merges(images):
    model, x = _named("deit_tiny_distilled_patch16_224"), images(1, size=224)
    pitome.patch(model, ratio=0.9, trace_source=True)
    assert pitome.settings(model).num_protected == 2
    with torch.no_grad():
        out = model(x)
    info = pitome.info(model)
    assert out.shape == (1, 1000) and info.tokens_per_layer[:3] == [198, 179, 162]
    _assert_partition(info.source, info.tokens_per_layer[-1], 2)


def test_keys_are_read_after_qk_norm(make_vit, images):
    """With qk-norm the metric is the normalised key: a hidden-state metric gives a different plan."""
    model, x = make_vit(qk_norm=True), images(1)
    with torch.no_grad():
        expected = reference_forward(model, x, "pitome", 0.7, True, "keys")
        pitome.patch(model, ratio=0.7, metric="keys")
        keys = model(x)
        pitome.patch(model, ratio=0.7, metric="hidden")
        hidden = model(x)
    torch.testing.assert_close(keys, expected, rtol=1e-4, atol=1e-4)
    assert _max_diff(keys, hidden) > 1e-5


def test_attn_mask_is_refused_while_patched(make_vit, images):
    model = make_vit()
    pitome.patch(model, ratio=0.9)
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(images(1), attn_mask=torch.zeros(1, 1, 65, 65))


@pytest.mark.parametrize("algorithm", ["pitome", "pitome_text", "pitome_bsm", "tome"])
def test_every_core_algorithm_keeps_sizes_and_sources_consistent(algorithm, make_vit, images):
    model = make_vit(reg_tokens=3)
    pitome.patch(model, algorithm=algorithm, ratio=0.6, trace_source=True)
    with torch.no_grad():
        feats = model.forward_features(images(2))
    info = pitome.info(model)
    assert info.tokens_per_layer == [68, 43, 28, 19, 13] and feats.shape[1] == 13
    torch.testing.assert_close(info.size.sum(1), torch.full((2,), 68.0))
    assert torch.equal(info.size[:, :4], torch.ones(2, 4))
    _assert_partition(info.source, 13, 4)
    counts = torch.stack([torch.bincount(row, minlength=13) for row in info.source]).float()
    torch.testing.assert_close(counts, info.size)


def test_bfloat16_model_keeps_sizes_in_float32(make_vit, images):
    model = make_vit().to(torch.bfloat16)
    pitome.patch(model, ratio=0.8)
    with torch.no_grad():
        out = model(images(2).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert pitome.info(model).size.dtype == torch.float32
    torch.testing.assert_close(pitome.info(model).size.sum(1), torch.full((2,), 65.0))


def test_budgets_follow_the_token_count_of_each_input(make_vit, images):
    model = make_vit(dynamic_img_size=True)
    pitome.patch(model, ratio=0.9)
    with torch.no_grad():
        model(images(1, size=48))
        assert pitome.info(model).tokens_per_layer == [37, 34, 31, 28, 26]
        model(images(1, size=64))
        assert pitome.info(model).tokens_per_layer == [65, 59, 54, 49, 45]


def test_gradient_checkpointing_keeps_merging_on(make_vit, images):
    """Checkpointed blocks merge like the others (gradients: tests/test_train_checkpointing.py)."""
    model = make_vit()
    pitome.patch(model, ratio=0.9)
    model.train()
    plain = model(images(2))
    model.set_grad_checkpointing(True)
    out = model(images(2))
    assert torch.allclose(out, plain, atol=1e-6)
    assert pitome.info(model).tokens_per_layer[-1] < pitome.info(model).tokens_per_layer[0]
    out.sum().backward()


def test_attention_pool_head_weighs_a_merged_token_as_its_copies(make_vit, images):
    """SigLIP-style "map" pooling with proportional attention: pooling the merged tokens equals pooling a sequence
    where each merged token is repeated as many times as the patches it holds."""
    model, x = make_vit(global_pool="map", class_token=False), images(2)
    with torch.no_grad():
        plain = model(x)
        pitome.patch(model, ratio=1.0)
        assert (model(x) - plain).abs().max() <= 1e-5
        pitome.patch(model, ratio=0.7)
        feats = model.forward_features(x)
        pooled = model.pool(feats)
        sizes = pitome.info(model).size
        assert feats.shape[1] < 64
        for b in range(2):
            copies = feats[b].repeat_interleave(sizes[b].round().long(), dim=0)[None]
            assert copies.shape[1] == 64
            torch.testing.assert_close(model.attn_pool(copies), pooled[b:b + 1], atol=1e-5, rtol=1e-5)
        pitome.patch(model, ratio=0.7, prop_attn=False)  # without prop. attn the head sees each token once
        feats = model.forward_features(x)
        torch.testing.assert_close(model.pool(feats), model.attn_pool(feats))
