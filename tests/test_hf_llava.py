"""Hugging Face LLaVA adapter: a tiny random LLaVA (CLIP / SigLIP tower + Llama) is exact with merging off,
hands the language model exactly the schedule's number of image tokens, and generates with merging on."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pitome  # noqa: E402
from pitome.adapters.hf_llava import image_token_count  # noqa: E402
from pitome.schedule import predict_token_counts, resolve_budgets  # noqa: E402

IMAGE = 127
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
              patch_size=4)


def _make(impl: str = "sdpa", tower: str = "clip", **llava: object) -> torch.nn.Module:
    t = transformers
    vision = t.CLIPVisionConfig(**VISION) if tower == "clip" else t.SiglipVisionConfig(**VISION)
    text = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0)
    options = dict(vision_feature_layer=-2, vision_feature_select_strategy="default")
    options.update(llava)
    config = t.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, **options)
    torch.manual_seed(0)
    model = t.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(impl)
    return model


def _prompt(images_per_row: list[int], per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts as the processor builds them: each image expanded to ``per_image`` tokens."""
    rows = []
    for count in images_per_row:
        row = [1, 5]
        for i in range(count):
            row += [IMAGE] * per_image + [6 + i]
        rows.append(row + [7, 8])
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, (ids != 0).long()


class _LanguageModelInputs:
    """Records the length of every sequence handed to the language model, and the projector's output."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        self.projected: list[int] = []
        lm, projector = model.model.language_model, model.model.multi_modal_projector
        self.hooks = [
            lm.register_forward_pre_hook(lambda m, a, k: self.lengths.append(k["inputs_embeds"].shape[1]),
                                         with_kwargs=True),
            projector.register_forward_hook(lambda m, a, o: self.projected.append(o.shape[1])),
        ]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _image_tokens_predicted(ratio: float, tower_tokens: int = 65, protected: int = 1, feature_layer: int = 3) -> int:
    counts = predict_token_counts(resolve_budgets(4, ratio=ratio), tower_tokens, protected)
    return counts[feature_layer] - 1  # hidden_states[-2] = after block 2; 'default' drops token 0


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_ratio_one_is_exact_forward_and_generate(impl: str) -> None:
    model = _make(impl)
    ids, mask = _prompt([1, 1], 64)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        ref_gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                 do_sample=False)
        pitome.patch(model, ratio=1.0)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                             do_sample=False)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_with_merging_hands_the_predicted_image_tokens(impl: str) -> None:
    model = _make(impl)
    ids, mask = _prompt([1, 1], 64)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pitome.patch(model, ratio=0.8)
    predicted = _image_tokens_predicted(0.8)
    assert predicted < 64 and image_token_count(model) == predicted
    seen = _LanguageModelInputs(model)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                             do_sample=False)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    seen.remove()
    assert seen.projected[0] == predicted  # image tokens per image reaching the language model
    assert seen.lengths[0] == ids.shape[1] - 64 + predicted  # the prefill
    assert seen.lengths[1:4] == [1, 1, 1]  # then one token per step, from the cache
    assert gen.shape == (2, ids.shape[1] + 4)
    assert torch.equal(gen[:, : ids.shape[1]], ids)  # the caller's prompt, as given
    assert logits.shape == (2, ids.shape[1] - 64 + predicted, 128)
    assert pitome.info(model).tokens_per_layer == predict_token_counts(resolve_budgets(4, ratio=0.8), 65, 1)


def test_rows_with_different_image_counts_are_repadded() -> None:
    model = _make()
    ids, mask = _prompt([1, 2], 64)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    pitome.patch(model, ratio=0.7)
    k = _image_tokens_predicted(0.7)
    seen = _LanguageModelInputs(model)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2,
                             do_sample=False)
        short_ids, short_mask = _prompt([1, 2], k)
        direct = model.generate(input_ids=short_ids, attention_mask=short_mask, pixel_values=pixels,
                                max_new_tokens=2, do_sample=False)  # prompt already built with the merged count
    seen.remove()
    assert seen.lengths[0] == short_ids.shape[1]
    assert torch.equal(gen[:, -2:], direct[:, -2:])


def test_labels_follow_the_shortened_prompt() -> None:
    model = _make()
    ids, mask = _prompt([1], 64)
    labels = torch.where(ids == IMAGE, -100, ids)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pitome.patch(model, ratio=0.8)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    assert out.logits.shape[1] == ids.shape[1] - 64 + _image_tokens_predicted(0.8)
    assert torch.isfinite(out.loss)


def test_siglip_tower_keeps_the_default_strategy_consistent() -> None:
    model = _make(tower="siglip")
    ids, mask = _prompt([1], 63)  # no class token: 'default' drops the first patch
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        pitome.patch(model, ratio=1.0)
        assert torch.allclose(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref, atol=1e-5)
        pitome.patch(model, ratio=0.8, trace_source=True)
        seen = _LanguageModelInputs(model)
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2, do_sample=False)
        seen.remove()
    info = pitome.info(model)
    assert pitome.settings(model).num_protected == 1 and (info.source[:, 0] == 0).all()
    assert seen.projected[0] == _image_tokens_predicted(0.8, tower_tokens=64, protected=1) == image_token_count(model)


def test_feature_layer_lists_refuse_merging_between_them() -> None:
    model = _make(vision_feature_layer=[-3, -1])
    with pytest.raises(ValueError, match="vision_feature_layer"):
        pitome.patch(model, ratio=0.8)
    pitome.patch(model, ratio=0.8, layers=[0, 1])  # merging only before the first selected layer is fine
    ids, mask = _prompt([1], 64)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert out.logits.shape[1] == ids.shape[1] - 64 + image_token_count(model) < ids.shape[1]


def test_deepcopy_and_unpatch() -> None:
    model = _make()
    ids, mask = _prompt([1], 64)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        pitome.patch(model, ratio=0.8)
        merged = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        twin = copy.deepcopy(model)
        assert torch.equal(twin(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, merged)
        pitome.unpatch(model)
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref)
    for module in model.modules():
        assert "_pitome_original_class" not in type(module).__dict__
        assert not any(k.startswith("_pitome") for k in module.__dict__)


def test_wrong_placeholder_count_is_a_clear_error() -> None:
    model = _make()
    pitome.patch(model, ratio=0.8)
    ids, mask = _prompt([1], 50)
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(1, 3, 32, 32))


def test_images_merging_to_different_counts_are_left_padded() -> None:
    """Per-image merged counts (e.g. per-image budgets) differ: the batch equals one image at a time."""
    model = _make()
    pitome.patch(model, ratio=0.8)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    k = _image_tokens_predicted(0.8)
    kept = {round(float(p.sum()), 3): n for p, n in zip(pixels, [k, k - 9, k - 4])}  # tokens kept per image
    llava = model.model
    features = llava.get_image_features

    def fewer_tokens(*args: object, **kwargs: object) -> object:
        out = features(*args, **kwargs)
        out.pooler_output = [f[: kept[round(float(p.sum()), 3)]] for f, p in
                             zip(out.pooler_output, kwargs["pixel_values"])]
        return out

    llava.get_image_features = fewer_tokens
    seen = _LanguageModelInputs(model)
    ids, mask = _prompt([1, 1, 1], 64)
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5,
                               do_sample=False)
        one_ids, one_mask = _prompt([1], 64)
        singles = [model.generate(input_ids=one_ids, attention_mask=one_mask, pixel_values=pixels[i:i + 1],
                                  max_new_tokens=5, do_sample=False) for i in range(3)]
    seen.remove()
    assert seen.lengths[0] == ids.shape[1] - 64 + k  # the widest row sets the width; the others are left-padded
    assert torch.equal(batch[:, : ids.shape[1]], ids)
    assert torch.equal(batch[:, -5:], torch.cat([s[:, -5:] for s in singles]))
