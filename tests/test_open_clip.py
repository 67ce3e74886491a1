"""open_clip vision towers and CLIP models (tiny random configs, no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch

import pitome
from pitome.adapters import UnsupportedModelError
from pitome.schedule import predict_token_counts, resolve_budgets

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402

TINY = dict(image_size=32, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=2.0, output_dim=16)


def _tower(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**TINY, **overrides}).eval()


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
@pytest.mark.parametrize("algorithm", ["pitome", "tome"])
def test_ratio_one_is_exact_and_unpatch_restores(pool_type, algorithm):
    model, x = _tower(pool_type=pool_type), _images()
    with torch.no_grad():
        ref = model(x)
        pitome.patch(model, algorithm=algorithm, ratio=1.0)
        assert (model(x) - ref).abs().max() <= 1e-5
        pitome.patch(model, algorithm=algorithm, ratio=0.7)
        assert not torch.allclose(model(x), ref, atol=1e-3)
        pitome.unpatch(model)
        assert torch.equal(model(x), ref)
    assert "PiToMe" not in "".join(type(m).__name__ for m in model.modules())
    assert not any(k.startswith("_pitome") for m in model.modules() for k in vars(m))


def test_token_counts_follow_the_schedule():
    model, x = _tower(), _images()
    pitome.patch(model, ratio=0.8)
    with torch.no_grad():
        model(x)
    expected = predict_token_counts(resolve_budgets(4, ratio=0.8), 17, 1)
    assert pitome.info(model).tokens_per_layer == expected
    assert pitome.info(model).size.sum(dim=1).tolist() == [17.0] * 3


def test_avg_pool_is_size_weighted():
    model, x = _tower(pool_type="avg"), _images()
    pitome.patch(model, ratio=0.7, prop_attn=False)
    captured = {}
    model.register_forward_hook(lambda m, a, out: captured.setdefault("pooled", out))
    model.transformer.register_forward_hook(lambda m, a, out: captured.setdefault("tokens", out))
    with torch.no_grad():
        model(x)
    size = pitome.info(model).size[:, 1:].unsqueeze(-1)
    tokens = model.ln_post(captured["tokens"])[:, 1:]
    expected = ((tokens * size).sum(1) / size.sum(1)) @ model.proj
    torch.testing.assert_close(captured["pooled"], expected)


def test_sequence_first_towers_work():
    model, x = _tower(), _images()
    with torch.no_grad():
        pitome.patch(model, ratio=0.8)
        batch_first = model(x)
        other = copy.deepcopy(pitome.unpatch(model))
        other.transformer.batch_first = False
        for block in other.transformer.resblocks:
            block.attn.batch_first = False
        pitome.patch(other, ratio=0.8)
        torch.testing.assert_close(other(x), batch_first, atol=1e-5, rtol=1e-5)


def test_clip_model_merges_the_image_tower_only():
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16)
    text = dict(context_length=12, vocab_size=50, width=32, heads=2, layers=2)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    x, ids = _images(2), torch.randint(1, 49, (2, 12))
    with torch.no_grad():
        image_ref, text_ref = model.encode_image(x), model.encode_text(ids)
        pitome.patch(model, ratio=0.7)
        assert not torch.allclose(model.encode_image(x), image_ref, atol=1e-3)
        assert torch.equal(model.encode_text(ids), text_ref)
        assert pitome.info(model).tokens_per_layer[-1] < 17
        assert pitome.settings(model).num_layers == 3
        pitome.unpatch(model)
        assert torch.equal(model.encode_image(x), image_ref)
    assert not pitome.is_patched(model.visual)


def test_attention_baselines_and_clear_errors():
    model, x = _tower(), _images()
    with torch.no_grad():
        for name in ("evit", "diffrate"):
            pitome.patch(model, algorithm=name, ratio=0.8)
            assert torch.isfinite(model(x)).all()
            assert pitome.info(model).tokens_per_layer[-1] < 17
    with pytest.raises(UnsupportedModelError, match="custom"):
        pitome.patch(VisionTransformer(**TINY, block_type="custom"), ratio=0.9)
    with pytest.raises(UnsupportedModelError, match="attentional pooler"):
        pitome.patch(VisionTransformer(**TINY, attentional_pool=True, attn_pooler_heads=4), ratio=0.9)


def test_flops_of_a_patched_tower_match_the_flop_counter():
    """The patched tower runs its attention through SDPA, so FlopCounterMode sees every matmul."""
    from pitome.flops import count_macs, encoder_shape, flop_counter_macs

    model, x = _tower(), _images(2)
    shape = encoder_shape(model)
    assert (shape.dim, shape.attn_dim, shape.mlp_hidden, shape.heads) == (64, 64, 128, 4)
    pitome.patch(model, ratio=0.7)
    with torch.no_grad():
        analytic = count_macs(model, x)
        counted = flop_counter_macs(model, x)
    assert analytic.tokens_per_layer == pitome.info(model).tokens_per_layer
    total = analytic.block_macs + analytic.merge_macs + analytic.extra_macs
    assert abs(total - counted) <= 0.02 * counted


@pytest.mark.slow
def test_bench_takes_openclip_names():
    from pitome.bench import BenchOptions, bench
    from pitome.cli.errors import UserError
    from pitome.loading import load_model
    from pitome.setting import MergeSetting

    with pytest.raises(UserError, match="unknown open_clip architecture"):
        load_model("openclip:NoSuchNet")
    with pytest.raises(UserError, match="drop '/laion2b_s34b_b79k'"):
        load_model("openclip:ViT-B-32/laion2b_s34b_b79k", weights="random")
    loaded = load_model("openclip:ViT-B-32", weights="random", image_size=128)
    assert loaded.weights_note.startswith("random init") and loaded.module.transformer.resblocks
    options = BenchOptions(warmup=0, reps=1, latency=False, memory=False, progress=False)
    result = bench([loaded], [MergeSetting.make("pitome", ratio=0.8)], [1], options)
    rows = {row["variant"]: row for row in result.rows}
    assert rows["unmerged"]["tokens_per_layer"][0] == 17
    merged = [row for name, row in rows.items() if name != "unmerged"][0]
    assert merged["tokens_per_layer"][-1] < 17 and merged["gflops"] < rows["unmerged"]["gflops"]


@pytest.mark.slow
def test_eval_retrieval_runs_on_an_openclip_model(tmp_path):
    """`pitome eval retrieval --model openclip:<arch>` (random weights: no tag, so nothing is downloaded): the image
    tower is patched and its GFLOPs drop; captions come from a Karpathy-format file."""
    import json

    from pitome import cli

    from test_eval_sweep import _results, make_image_folder

    images = make_image_folder(tmp_path / "img", classes=2, per_class=2)
    files = sorted(images.rglob("*.png"))
    entries = [{"filename": str(f.relative_to(images)), "split": "test",
                "sentences": [{"raw": f"a photo of thing {i}"}]} for i, f in enumerate(files)]
    (tmp_path / "captions.json").write_text(json.dumps({"images": entries}))
    out = tmp_path / "out"
    code = cli.main(["eval", "retrieval", "--model", "openclip:ViT-B-32", "--captions", str(tmp_path / "captions.json"),
                     "--images", str(images), "--weights", "random", "--algorithms", "pitome", "--ratios", "0.9", "--out", str(out),
                     "--no-progress", "--batch-size", "4"])
    assert code == 0
    _, results = _results(out)
    rows = results["rows"] if isinstance(results, dict) else results
    by_algorithm = {row["algorithm"]: row for row in rows}
    assert set(by_algorithm) == {"unmerged", "pitome"} and not any("error" in row for row in rows)
    assert by_algorithm["unmerged"]["tokens_per_layer"][0] == 50
    assert by_algorithm["pitome"]["gflops"] < by_algorithm["unmerged"]["gflops"]


@pytest.mark.slow
def test_timm_towers_of_open_clip_models_are_patched_through_their_trunk():
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None, force_image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(UnsupportedModelError, match="model.visual.trunk"):
        pitome.patch(model, ratio=0.8)
    with torch.no_grad():
        plain = model.encode_image(x)
        pitome.patch(model.visual.trunk, ratio=0.8)
        merged = model.encode_image(x)
        assert pitome.info(model.visual.trunk).tokens_per_layer[-1] < 16
        pitome.unpatch(model.visual.trunk)
        assert torch.equal(model.encode_image(x), plain)
    assert not torch.allclose(merged, plain, atol=1e-3)
