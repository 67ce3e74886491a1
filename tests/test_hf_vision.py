"""Hugging Face ViT / DeiT / DINOv2 adapter: exact with merging off, schedule-true token counts, protected tokens,
size-weighted pooling, a hand-written merged forward, class-token attention, deepcopy / unpatch, clear errors."""

from __future__ import annotations

import copy
import math
import sys
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pitome  # noqa: E402
from pitome.adapters import UnsupportedModelError  # noqa: E402
from pitome.algorithms import ALGORITHMS, MergeAlgorithm, register  # noqa: E402
from pitome.algorithms.tome import ToMe  # noqa: E402
from pitome.schedule import predict_token_counts, resolve_budgets  # noqa: E402

IMPLS = ("sdpa", "eager")
COMMON = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=4)


def _make(name: str, impl: str) -> torch.nn.Module:
    t = transformers
    if name.startswith("ViT"):
        config = t.ViTConfig(intermediate_size=64, num_labels=3, **COMMON)
    elif name.startswith("DeiT"):
        config = t.DeiTConfig(intermediate_size=64, num_labels=3, **COMMON)
    elif name.startswith("Dinov2WithRegisters"):
        config = t.Dinov2WithRegistersConfig(num_register_tokens=2, layerscale_value=0.5, num_labels=3, **COMMON)
    else:
        config = t.Dinov2Config(layerscale_value=0.5, num_labels=3, **COMMON)
    torch.manual_seed(0)
    model = getattr(t, name)(config).eval()
    model.set_attn_implementation(impl)
    if name.startswith("Dinov2"):  # LayerScale must matter: give it non-constant values
        for module in model.modules():
            if hasattr(module, "lambda1"):
                module.lambda1.data.uniform_(0.2, 1.0)
    return model


FAMILIES = {  # model class -> protected leading tokens
    "ViTModel": 1, "ViTForImageClassification": 1, "DeiTModel": 2, "DeiTForImageClassificationWithTeacher": 2,
    "Dinov2Model": 1, "Dinov2ForImageClassification": 1, "Dinov2WithRegistersForImageClassification": 3,
}


def _outputs(out) -> list[torch.Tensor]:
    names = ("last_hidden_state", "pooler_output", "logits", "cls_logits", "distillation_logits")
    tensors = [getattr(out, n) for n in names if getattr(out, n, None) is not None]
    return tensors + list(out.hidden_states or ())


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_ratio_one_is_exact_and_counts_follow_schedule(name: str, impl: str, pixels: torch.Tensor) -> None:
    model = _make(name, impl)
    with torch.no_grad():
        reference = _outputs(model(pixels, output_hidden_states=True))
        pitome.patch(model, ratio=1.0)
        same = _outputs(model(pixels, output_hidden_states=True))
        assert len(same) == len(reference)
        for a, b in zip(reference, same):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0)

        pitome.patch(model, ratio=0.8)
        out = model(pixels, output_hidden_states=True)
    n0 = 64 + FAMILIES[name]
    expected = predict_token_counts(resolve_budgets(4, ratio=0.8), n0, FAMILIES[name])
    info = pitome.info(model)
    assert info.tokens_per_layer == expected
    assert [h.shape[1] for h in out.hidden_states] == expected
    assert expected[-1] < n0
    if getattr(out, "last_hidden_state", None) is not None:
        assert out.last_hidden_state.shape[1] == expected[-1]
    assert info.size.shape == (2, expected[-1]) and torch.allclose(info.size.sum(1), torch.full((2,), float(n0)))
    for t in _outputs(out):
        assert torch.isfinite(t).all()


def test_fixed_r_schedule_and_protected_tokens_of_deit(pixels: torch.Tensor) -> None:
    model = _make("DeiTForImageClassificationWithTeacher", "sdpa")
    with torch.no_grad():
        ref = model(pixels)
        pitome.patch(model, "tome", r=8, trace_source=True)
        out = model(pixels)
    info = pitome.info(model)
    assert info.tokens_per_layer == predict_token_counts(resolve_budgets(4, r=8), 66, 2) == [66, 58, 50, 42, 34]
    # class and distillation tokens stay alone in slots 0 and 1
    assert (info.source[:, 0] == 0).all() and (info.source[:, 1] == 1).all()
    assert ((info.source == 0).sum(1) == 1).all() and ((info.source == 1).sum(1) == 1).all()
    assert torch.equal(info.size[:, :2], torch.ones(2, 2))
    assert out.cls_logits.shape == ref.cls_logits.shape
    assert out.distillation_logits.shape == ref.distillation_logits.shape


def test_dinov2_head_mean_is_size_weighted(pixels: torch.Tensor) -> None:
    model = _make("Dinov2ForImageClassification", "sdpa")
    pitome.patch(model, ratio=0.7)
    seen = {}
    hook = model.dinov2.layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("seq", o))
    with torch.no_grad():
        logits = model(pixels).logits
    hook.remove()
    seq, size = seen["seq"], pitome.info(model).size
    assert seq.shape[1] < 65
    weight = size[:, 1:].unsqueeze(-1)
    pooled = torch.cat([seq[:, 0], (seq[:, 1:] * weight).sum(1) / weight.sum(1)], dim=1)
    expected = model.classifier(pooled)
    assert torch.allclose(logits, expected, atol=1e-5)
    plain = model.classifier(torch.cat([seq[:, 0], seq[:, 1:].mean(1)], dim=1))
    assert not torch.allclose(logits, plain, atol=1e-4)  # the plain mean of merged tokens would be wrong


@pytest.mark.parametrize("impl", IMPLS)
def test_merged_forward_matches_hand_written_reference(impl: str, pixels: torch.Tensor) -> None:
    """ViT with PiToMe at ratio 0.75: keys metric, merge after the attention residual, log-size attention bias."""
    model = _make("ViTModel", impl)
    pitome.patch(model, "pitome", ratio=0.75)
    with torch.no_grad():
        out = model(pixels).last_hidden_state
        algorithm = pitome.create_algorithm("pitome")
        x = model.embeddings(pixels)
        size = torch.ones(x.shape[:2])
        for index, layer in enumerate(model.layers):
            attn = layer.attention
            h = layer.layernorm_before(x)
            b, n, _ = h.shape
            q, k, v = (p(h).view(b, n, 4, 8).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            logits = q @ k.transpose(-1, -2) * attn.scaling + size.log()[:, None, None, :]
            a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 32)
            x = x + attn.o_proj(a)
            mergeable = n - 1
            r = min(math.floor(mergeable - mergeable * 0.75), mergeable // 2)
            request = pitome.algorithms.MergeRequest(
                metric=k.mean(1), r=torch.full((b,), r), r_max=r, r_min=r, num_protected=1, size=size[:, 1:],
                layer=index, num_layers=4)
            plan = algorithm.plan(request)
            x, size = plan.merge(x, size)
            x = x + layer.mlp(layer.layernorm_after(x))
        reference = model.layernorm(x)
    assert out.shape == reference.shape
    assert torch.allclose(out, reference, atol=1e-5)


@dataclass
class _ClsProbe(MergeAlgorithm):
    """Test algorithm: records the attention it receives, merges like ToMe."""

    name: ClassVar[str] = "test_hf_vision_cls_probe"
    needs_attention: ClassVar[bool] = True
    attention_from: ClassVar[str] = "cls"
    seen: ClassVar[list] = []

    def plan(self, request):
        type(self).seen.append(request.attention)
        return ToMe().plan(request)


@dataclass
class _MeanProbe(_ClsProbe):
    name: ClassVar[str] = "test_hf_vision_mean_probe"
    attention_from: ClassVar[str] = "mean"
    seen: ClassVar[list] = []


@pytest.mark.parametrize("probe", [_ClsProbe, _MeanProbe])
def test_attention_for_attention_ranking_algorithms(probe: type, pixels: torch.Tensor) -> None:
    if probe.name not in ALGORITHMS:
        register(probe)
    model = _make("ViTModel", "eager")
    pitome.patch(model, probe.name, r=6)
    probe.seen.clear()
    with torch.no_grad():
        out = model(pixels, output_attentions=True)
    assert len(probe.seen) == 4
    for given, probs in zip(probe.seen, out.attentions):  # eager attentions include the log-size bias
        expected = probs[:, :, 0].mean(1) if probe.attention_from == "cls" else probs.mean(dim=(1, 2))
        assert given.shape == expected.shape and torch.allclose(given, expected, atol=1e-5)
    assert pitome.info(model).tokens_per_layer == [65, 59, 53, 47, 41]


def test_deepcopy_unpatch_and_repatch(pixels: torch.Tensor) -> None:
    model = _make("Dinov2ForImageClassification", "sdpa")
    classes = {name: type(m) for name, m in model.named_modules()}
    with torch.no_grad():
        ref = model(pixels).logits
        pitome.patch(model, ratio=0.8)
        merged = model(pixels).logits
        twin = copy.deepcopy(model)
        assert torch.equal(twin(pixels).logits, merged)
        assert pitome.info(twin).tokens_per_layer == pitome.info(model).tokens_per_layer
        pitome.patch(model, ratio=0.6)  # reconfigure, not wrap twice
        model(pixels)
        assert pitome.info(model).tokens_per_layer[-1] < pitome.info(twin).tokens_per_layer[-1]
        pitome.unpatch(model)
        assert torch.equal(model(pixels).logits, ref)
        assert torch.equal(twin(pixels).logits, merged)  # the copy is independent
    assert {name: type(m) for name, m in model.named_modules()} == classes
    for module in model.modules():
        assert not any(k.startswith("_pitome") for k in module.__dict__)
        assert not any(getattr(h, "_pitome_hook", False) for h in module._forward_hooks.values())


def test_unsupported_models_and_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    config = transformers.ViTConfig(intermediate_size=64, encoder_stride=4, **COMMON)
    with pytest.raises(UnsupportedModelError, match="ViTModel"):
        pitome.patch(transformers.ViTForMaskedImageModeling(config))
    with pytest.raises(UnsupportedModelError, match="Dinov2Model"):
        pitome.patch(transformers.Dinov2Backbone(transformers.Dinov2Config(**COMMON)))
    with pytest.raises(UnsupportedModelError, match="supported"):
        pitome.patch(torch.nn.Linear(2, 2))
    model = _make("ViTModel", "sdpa")
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(__version__="4.46.0"))
    with pytest.raises(UnsupportedModelError, match=r">=5\.0,<6"):
        pitome.patch(model)
    monkeypatch.undo()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        pitome.patch(model)


def test_attention_mask_with_merging_is_refused(pixels: torch.Tensor) -> None:
    model = _make("ViTModel", "sdpa")
    pitome.patch(model, ratio=0.8)
    with pytest.raises(ValueError, match="attention_mask"):
        mask = torch.ones(2, 65, dtype=torch.long)
        mask[:, -1] = 0
        model(pixels, attention_mask=mask)


@pytest.mark.slow
def test_real_dinov2_small_is_exact_at_ratio_one() -> None:
    zoo = pytest.importorskip("pitome.zoo")
    try:
        model = zoo.load_dinov2_small()
    except zoo.AssetNotFoundError as exc:
        pytest.skip(str(exc))
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(pixels)
        pitome.patch(model, ratio=1.0)
        out = model(pixels)
        assert torch.allclose(ref.last_hidden_state, out.last_hidden_state, atol=1e-5, rtol=0)
        pitome.patch(model, ratio=0.9)
        merged = model(pixels)
    pitome.unpatch(model)
    assert merged.last_hidden_state.shape[1] < ref.last_hidden_state.shape[1]
    cosine = torch.nn.functional.cosine_similarity(merged.pooler_output, ref.pooler_output).item()
    assert cosine > 0.5


def test_save_pretrained_of_a_patched_classifier_saves_the_library_class(tmp_path, pixels) -> None:
    import json

    model = _make("ViTForImageClassification", "sdpa")
    pitome.patch(model, algorithm="pitome", ratio=0.8)
    model.save_pretrained(tmp_path)
    assert pitome.is_patched(model) and type(model).__name__.startswith("PiToMe")
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    pitome.unpatch(model)
    torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)
