"""Hugging Face CLIP / SigLIP adapters: vision towers and heads, CLIPModel / SiglipModel, the causal CLIP text
tower (padding, frozen EOS), exact with merging off, schedule-true counts, size-aware pooling, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pitome  # noqa: E402
from pitome.adapters import UnsupportedModelError  # noqa: E402
from pitome.schedule import predict_token_counts, resolve_budgets  # noqa: E402

IMPLS = ("sdpa", "eager")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
              patch_size=4)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=100,
            max_position_embeddings=24, bos_token_id=98, eos_token_id=99, pad_token_id=0)
SIGLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)


def _make(name: str, impl: str) -> torch.nn.Module:
    t = transformers
    configs = {
        "CLIPVisionModel": lambda: t.CLIPVisionConfig(**VISION),
        "CLIPVisionModelWithProjection": lambda: t.CLIPVisionConfig(projection_dim=16, **VISION),
        "CLIPForImageClassification": lambda: t.CLIPConfig(vision_config=VISION, text_config=TEXT, num_labels=3),
        "CLIPModel": lambda: t.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16),
        "SiglipVisionModel": lambda: t.SiglipVisionConfig(**VISION),
        "SiglipForImageClassification": lambda: t.SiglipConfig(vision_config=VISION, text_config=SIGLIP_TEXT,
                                                               num_labels=3),
        "SiglipModel": lambda: t.SiglipConfig(vision_config=VISION, text_config=SIGLIP_TEXT),
        "CLIPTextModelWithProjection": lambda: t.CLIPTextConfig(projection_dim=16, **TEXT),
    }
    torch.manual_seed(0)
    model = getattr(t, name)(configs[name]()).eval()
    model.set_attn_implementation(impl)
    return model


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def text() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sentences: EOS at 9 (then padding, masked) and at 15 (no padding)."""
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 98
    ids[0, 9], ids[0, 10:] = 99, 0
    ids[1, 15] = 99
    mask = (ids != 0).long()
    return ids, mask


def _tensors(out) -> list[torch.Tensor]:
    found = []
    for name in ("last_hidden_state", "pooler_output", "logits", "image_embeds", "text_embeds", "logits_per_image"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            found.append(value)
    return found + list(getattr(out, "hidden_states", None) or ())


VISION_MODELS = {"CLIPVisionModel": 1, "CLIPVisionModelWithProjection": 1, "CLIPForImageClassification": 1,
                 "SiglipVisionModel": 0, "SiglipForImageClassification": 0}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(VISION_MODELS))
def test_vision_ratio_one_exact_and_counts_follow_schedule(name: str, impl: str, pixels: torch.Tensor) -> None:
    model = _make(name, impl)
    with torch.no_grad():
        reference = _tensors(model(pixels, output_hidden_states=True))
        pitome.patch(model, ratio=1.0)
        same = _tensors(model(pixels, output_hidden_states=True))
        assert len(same) == len(reference) > 0
        for a, b in zip(reference, same):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0)
        pitome.patch(model, ratio=0.75)
        out = model(pixels, output_hidden_states=True)
    protected = VISION_MODELS[name]
    expected = predict_token_counts(resolve_budgets(4, ratio=0.75), 64 + protected, protected)
    assert pitome.info(model).tokens_per_layer == expected
    assert [h.shape[1] for h in out.hidden_states] == expected
    for t in _tensors(out):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", ["CLIPForImageClassification", "SiglipForImageClassification"])
def test_mean_pooling_heads_are_size_weighted(name: str, pixels: torch.Tensor) -> None:
    model = _make(name, "sdpa")
    pitome.patch(model, ratio=0.6)
    seen = {}
    tower = model.vision_model
    norm = tower.post_layernorm if name.startswith("Siglip") else None
    target = norm if norm is not None else tower.encoder
    hook = target.register_forward_hook(lambda m, a, o: seen.__setitem__("seq", o if norm is not None else o[0]))
    with torch.no_grad():
        logits = model(pixels).logits
    hook.remove()
    h = VISION_MODELS[name]
    seq, size = seen["seq"], pitome.info(model).size
    assert seq.shape[1] < 64 + h
    weight = size[:, h:].unsqueeze(-1)
    expected = model.classifier((seq[:, h:] * weight).sum(1) / weight.sum(1))
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(logits, model.classifier(seq[:, h:].mean(1)), atol=1e-4)


def test_siglip_pooling_head_weighs_merged_tokens_by_size(pixels: torch.Tensor) -> None:
    """The attention-pooling head on merged tokens + log(size) bias = the head on the tokens copied back."""
    model = _make("SiglipVisionModel", "sdpa")
    pitome.patch(model, ratio=0.6, trace_source=True)
    with torch.no_grad():
        out = model(pixels)
        info = pitome.info(model)
        seq = out.last_hidden_state
        assert seq.shape[1] < 64 and info.size.max() > 1
        copied = seq.gather(1, info.source.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))
        original_head = type(model.head).__dict__["_pitome_original_class"]
        expected = original_head.forward(model.head, copied)
        naive = original_head.forward(model.head, seq)
    assert torch.allclose(out.pooler_output, expected, atol=1e-5)
    assert not torch.allclose(out.pooler_output, naive, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_clip_model_vision_and_optional_text_tower(impl: str, pixels: torch.Tensor, text) -> None:
    ids, mask = text
    model = _make("CLIPModel", impl)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True)
        pitome.patch(model, ratio=1.0)
        pitome.patch(model.text_model, ratio=1.0)
        same = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True)
        for name in ("logits_per_image", "text_embeds", "image_embeds"):
            assert torch.allclose(getattr(ref, name), getattr(same, name), atol=1e-5, rtol=0)
        for a, b in zip(ref.text_model_output.hidden_states, same.text_model_output.hidden_states):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)

        pitome.patch(model, ratio=0.7)
        pitome.patch(model.text_model, "tome", r=2)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        vision_counts = pitome.info(model).tokens_per_layer
        text_counts = pitome.info(model.text_model).tokens_per_layer
        assert vision_counts == predict_token_counts(resolve_budgets(4, ratio=0.7), 65, 1)
        assert text_counts == [16, 14, 12, 10]
        assert out.text_model_output.last_hidden_state.shape == (2, 16, 32)  # copied back to the input length
        assert torch.isfinite(out.logits_per_image).all()
        features = model.get_image_features(pixel_values=pixels).pooler_output
        assert torch.allclose(features / features.norm(dim=-1, keepdim=True), out.image_embeds, atol=1e-5)
        assert pitome.info(model).tokens_per_layer == vision_counts

        pitome.unpatch(model)  # the vision tower only: the text tower keeps its own patch
        assert pitome.is_patched(model.text_model)
        assert type(model.vision_model).__name__ == "CLIPVisionModel"
        pitome.unpatch(model.text_model)
        back = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert torch.equal(back.logits_per_image, ref.logits_per_image)
    for module in model.modules():
        assert "_pitome_original_class" not in type(module).__dict__
        assert not any(k.startswith("_pitome") for k in module.__dict__)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("algorithm", ["pitome", "tome"])
def test_clip_text_padding_and_eos(impl: str, algorithm: str, text) -> None:
    ids, mask = text
    model = _make("CLIPTextModelWithProjection", impl)
    pitome.patch(model, algorithm, ratio=0.7)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).text_embeds
        assert pitome.info(model).tokens_per_layer[-1] < 16
        alone = model(input_ids=ids[:1, :10]).text_embeds  # the first sentence without its padding
        changed = ids.clone()
        changed[1, 1:15] = ids[1, 1:15].flip(0)
        other = model(input_ids=changed, attention_mask=mask).text_embeds
        tail = ids.clone()
        tail[0, 10:] = 7  # what follows EOS (masked or not) never changes the pooled EOS state
        unmasked_tail = model(input_ids=tail).text_embeds
    assert torch.allclose(batch[:1], alone, atol=1e-5)
    assert torch.allclose(batch[:1], unmasked_tail[:1], atol=1e-5)
    assert torch.allclose(batch[:1], other[:1], atol=1e-5)  # samples of a batch do not interact
    assert not torch.allclose(batch[1:], other[1:], atol=1e-3)


def test_clip_text_merged_token_sees_no_later_token() -> None:
    """After a merge, causal attention keeps each token blind to later positions (pos = last member)."""
    from pitome.adapters.hf_clip import causal_merged_mask
    from pitome.step import ForwardState

    settings = pitome.settings(pitome.patch(_make("CLIPTextModelWithProjection", "sdpa"), ratio=0.9))
    state = ForwardState(settings=settings)
    state.source = torch.tensor([[0, 1, 1, 2, 3]])  # tokens 1 and 2 merged into slot 1
    state.size = torch.tensor([[1.0, 2.0, 1.0, 1.0]])
    mask = causal_merged_mask(state, torch.zeros(1, 4, 8), None)[0, 0]
    allowed = mask > torch.finfo(torch.float32).min / 2
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    assert torch.allclose(mask[1, 1], torch.log(torch.tensor(2.0)))  # proportional attention


def test_siglip_model_and_attention_for_classless_tower(pixels: torch.Tensor) -> None:
    model = _make("SiglipModel", "eager")
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels)
        pitome.patch(model, ratio=1.0)
        same = model(input_ids=ids, pixel_values=pixels)
        assert torch.allclose(ref.logits_per_image, same.logits_per_image, atol=1e-5, rtol=0)
        if "mctf" in pitome.available_algorithms():  # an attention-ranking baseline on a tower without [CLS]
            pitome.patch(model, "mctf", r=4)
            out = model(input_ids=ids, pixel_values=pixels)
            assert pitome.info(model).tokens_per_layer == [64, 60, 56, 52, 48]
            assert torch.isfinite(out.logits_per_image).all()


def test_deepcopy_and_errors(pixels: torch.Tensor, text) -> None:
    model = _make("CLIPVisionModel", "sdpa")
    pitome.patch(model, ratio=0.8)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(model(pixels).pooler_output, twin(pixels).pooler_output)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        pitome.patch(model, ratio=0.8)
    text_model = _make("CLIPTextModelWithProjection", "sdpa")
    if "evit" in pitome.available_algorithms():
        with pytest.raises(NotImplementedError, match="text tower"):
            pitome.patch(text_model, "evit", r=2)
    pitome.patch(text_model, ratio=0.8)
    ids, mask = text
    with pytest.raises(ValueError, match="attention_mask"):
        text_model(input_ids=ids, attention_mask=mask[:, None, None, :])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_text_tower_half_precision_with_empty_slots(dtype: torch.dtype, text) -> None:
    """Samples merging different amounts leave empty slots; in half precision they must stay finite."""
    ids, mask = text
    model = _make("CLIPTextModelWithProjection", "eager").to(dtype)
    pitome.patch(model, ratio=0.7)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert (pitome.info(model).size == 0).any()  # there were empty slots
    assert out.text_embeds.dtype == dtype
    for t in (out.text_embeds, *out.hidden_states):
        assert torch.isfinite(t).all()
