"""torch.compile on patched models: whole-graph capture where shapes are static, correct results everywhere.

backend="eager" runs dynamo's tracing (graph capture, guards, recompiles) without code generation, so these tests
check what compile sees and does, in seconds; inductor itself is exercised by users, not here.
"""

from __future__ import annotations

import pytest
import torch

import pitome

pytestmark = pytest.mark.slow  # compile / export / real assets / processes: minutes

transformers = pytest.importorskip("transformers")


def _compiled(model: torch.nn.Module, fullgraph: bool) -> torch.nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend="eager", fullgraph=fullgraph)


def test_timm_vit_compiles_to_one_graph_and_follows_repatching(make_vit, images):
    model, x = make_vit(), images(3)
    compiled = _compiled(model, fullgraph=True)  # fullgraph: any graph break is an error
    with torch.no_grad():
        plain = model(x)
        pitome.patch(model, ratio=0.8, trace_source=True)
        merged = model(x)
        eager_info = pitome.info(model)
        assert torch.equal(compiled(x), merged)
        info = pitome.info(model)  # written by the compiled forward too
        assert info.tokens_per_layer == eager_info.tokens_per_layer and info.tokens_per_layer[-1] < 65
        assert torch.equal(info.source, eager_info.source)
        assert model.blocks[0].__dict__["_pitome_key"].traced is None
        pitome.unpatch(model)
        pitome.patch(model, algorithm="tome", r=5)
        assert torch.equal(compiled(x), model(x)), "the compiled model must follow a re-patch"
        assert pitome.info(model).tokens_per_layer == [65, 60, 55, 50, 45]
        pitome.unpatch(model)
        assert torch.equal(compiled(x), plain)


def test_hf_vit_compiles_to_one_graph():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=5)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    pitome.patch(model, ratio=0.8)
    compiled = _compiled(model, fullgraph=True)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        assert torch.allclose(compiled(pixel_values=x).logits, expected, atol=1e-6)
    assert pitome.info(model).tokens_per_layer[-1] < 17


def test_padded_text_compiles_with_graph_breaks_and_stays_exact():
    """Padding makes the merged counts data-dependent, so compile breaks the graph there; results must not change."""
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    pitome.patch(model, preset="bert", ratio=0.7)
    compiled = _compiled(model, fullgraph=False)
    with torch.no_grad():
        for cut in (12, 15):
            ids = torch.randint(1, 100, (2, 20))
            mask = torch.ones(2, 20, dtype=torch.long)
            mask[1, cut:] = 0
            expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
            tokens = pitome.info(model).tokens_per_layer
            got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
            assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)
            assert pitome.info(model).tokens_per_layer == tokens and tokens[-1] < 20


def test_mean_pooling_head_compiles_to_one_graph():
    """Dinov2ForImageClassification mean-pools the patch tokens: its encoder output is unmerged inside the forward."""
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                       image_size=32, patch_size=8, num_labels=5)
    torch.manual_seed(0)
    model = transformers.Dinov2ForImageClassification(config).eval()
    pitome.patch(model, ratio=0.7)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        tokens = pitome.info(model).tokens_per_layer
        assert torch.allclose(_compiled(model, fullgraph=True)(pixel_values=x).logits, expected, atol=1e-6)
    assert pitome.info(model).tokens_per_layer == tokens and tokens[-1] < 17


def test_clip_model_with_padded_text_compiles_and_stays_exact():
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=99, max_position_embeddings=16, eos_token_id=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    pitome.patch(model, ratio=0.7)
    ids = torch.randint(3, 99, (2, 12))
    ids[:, -1] = 2
    ids[1, 8] = 2
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=x)
        got = _compiled(model, fullgraph=False)(input_ids=ids, attention_mask=mask, pixel_values=x)
    assert torch.allclose(got.image_embeds, expected.image_embeds, atol=1e-6)
    assert torch.allclose(got.text_embeds, expected.text_embeds, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_every_algorithm_compiles_exactly(make_vit, images):
    """Whole-graph for every algorithm except the seeded ones (a torch.Generator per forward breaks the graph,
    which compile handles by splitting it; results stay the same)."""
    from pitome.algorithms import available_algorithms

    model, x = make_vit(), images(2)
    for name in available_algorithms():
        seeded = name == "random"
        pitome.patch(model, algorithm=name, ratio=0.8, **({"seed": 0} if seeded else {}))
        with torch.no_grad():
            expected = model(x)
            got = _compiled(model, fullgraph=not seeded)(x)
        assert torch.allclose(got, expected, atol=1e-6), name


def test_text_encoder_without_padding_mask_compiles_to_one_graph():
    """No attention_mask: the frozen last token is known statically, so budgets stay Python ints."""
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1, 100, (2, 20))
    for options in (dict(preset="bert"), dict(preset="auto")):
        pitome.patch(model, ratio=0.7, **options)
        with torch.no_grad():
            expected = model(ids).logits
            with_mask = model(ids, attention_mask=torch.ones_like(ids)).logits
            assert torch.allclose(with_mask, expected, atol=1e-5)
            assert torch.equal(_compiled(model, fullgraph=True)(ids).logits, expected)
        assert pitome.info(model).tokens_per_layer[-1] < 20
