"""pitome.calibrate: per-block keep-ratios at a FLOPs target (met within 1%, measured by pitome.flops on the patched
model), deterministic for a seed, on timm ViT, HF ViT / DINOv2, padded BERT and CLIP vision; JSON round trip; errors."""

from __future__ import annotations

import pytest
import torch

import pitome
from pitome.flops import count_macs
from test_baselines_models import _padded_ids  # noqa: E402  (tests/ is on sys.path under pytest)

FORWARDS = 8  # search forwards: enough to move away from the uniform schedule, small enough for a fast suite


def _macs_without_merge_steps(model: torch.nn.Module, inputs) -> int:
    """What the FLOPs target counts: blocks + stem/head (the merge steps' own cost excluded, as pitome.solver)."""
    count = count_macs(model, inputs)
    return count.block_macs + count.extra_macs


def _check_target(model: torch.nn.Module, inputs, result: pitome.Calibration, reduction: float) -> None:
    base = _macs_without_merge_steps(model, inputs)
    with pitome.patched(model, **result.patch_kwargs()):
        merged = _macs_without_merge_steps(model, inputs)
    assert merged / (base * (1 - reduction)) == pytest.approx(1.0, abs=0.01)
    assert result.reduction == pytest.approx(1 - merged / base, abs=1e-9)
    rows = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    assert result.forwards <= FORWARDS + 2 and result.items == len(rows)


def test_timm_vit_meets_target_and_is_deterministic(make_vit, images):
    model, x = make_vit(), images(batch=16)
    first = pitome.calibrate(model, x, flops_reduction=0.4, max_forwards=FORWARDS, seed=3)
    second = pitome.calibrate(model, x, flops_reduction=0.4, max_forwards=FORWARDS, seed=3)
    assert first.ratios == second.ratios and first.distortion == second.distortion
    assert len(first.ratios) == 4 and not pitome.is_patched(model)
    assert first.distance == "kl"  # a timm classifier: its logits are compared
    assert first.distortion <= first.uniform_distortion  # the uniform schedule is the search's starting point
    _check_target(model, x, first, 0.4)


def test_macs_target_and_explicit_algorithm(make_vit, images):
    model, x = make_vit(num_classes=0), images(batch=8)
    base = _macs_without_merge_steps(model, x)
    result = pitome.calibrate(model, x, macs=0.6 * base, algorithm="tome", prop_attn=True,
                              max_forwards=FORWARDS)
    assert result.distance == "cosine"  # features, not logits
    assert result.patch == {"algorithm": "tome", "prop_attn": True}
    _check_target(model, x, result, 0.4)


def test_json_round_trip(make_vit, images, tmp_path):
    model, x = make_vit(), images(batch=8)
    result = pitome.calibrate(model, x, flops_reduction=0.3, max_forwards=FORWARDS)
    path = tmp_path / "budgets.json"
    result.save(path)
    loaded = pitome.Calibration.load(path)
    assert loaded == result
    with pitome.patched(model, **result.patch_kwargs()):
        expected = model(x)
    with pitome.patched(model, **loaded.patch_kwargs()):
        assert torch.equal(model(x), expected)


def _hf_vision(name: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=4)
    configs = {"ViTModel": lambda: transformers.ViTConfig(intermediate_size=64, **common),
               "Dinov2Model": lambda: transformers.Dinov2Config(**common),
               "CLIPVisionModel": lambda: transformers.CLIPVisionConfig(intermediate_size=64, **common)}
    torch.manual_seed(0)
    return getattr(transformers, name)(configs[name]()).eval()


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model", "CLIPVisionModel"])
def test_hf_vision_models(name):
    model = _hf_vision(name)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = pitome.calibrate(model, x, flops_reduction=0.45, max_forwards=FORWARDS)
    assert result.distance == "cosine" and result.patch == {"preset": "auto"}
    _check_target(model, x, result, 0.45)


def _padded_bert_batch() -> tuple[torch.nn.Module, dict, list[int]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=100)).eval()
    lengths = [64, 60, 57, 52, 48, 45, 41, 40, 64, 33, 62, 50, 47, 58, 36, 55]
    ids, mask = _padded_ids(lengths)
    return model, {"input_ids": ids, "attention_mask": mask}, lengths


def test_bert_with_padding_meets_target_per_item():
    """Keep-ratios apply to each item's real length: the mean FLOPs of the items run one by one (no padding)
    meet the target."""
    model, batch, lengths = _padded_bert_batch()
    result = pitome.calibrate(model, batch, flops_reduction=0.5, max_forwards=FORWARDS)
    assert result.patch == {"preset": "auto"} and result.distance == "cosine"

    def mean_macs() -> float:
        items = [{"input_ids": batch["input_ids"][i:i + 1, :n], "attention_mask": batch["attention_mask"][i:i + 1, :n]}
                 for i, n in enumerate(lengths)]
        return sum(_macs_without_merge_steps(model, item) for item in items) / len(items)

    base = mean_macs()
    with pitome.patched(model, **result.patch_kwargs()):
        merged = mean_macs()
        padded = model(**batch).last_hidden_state  # the padded batch runs under the same per-block ratios
    assert merged / (0.5 * base) == pytest.approx(1.0, abs=0.01)
    assert padded.shape[0] == len(lengths)


def test_errors_before_any_forward(make_vit, images):
    model, x = make_vit(), images(batch=4)
    with pytest.raises(ValueError, match="exactly one target"):
        pitome.calibrate(model, x)
    with pytest.raises(ValueError, match="exactly one target"):
        pitome.calibrate(model, x, flops_reduction=0.4, macs=1e6)
    with pytest.raises(ValueError, match=r"flops_reduction must be a number in \(0, 1\)"):
        pitome.calibrate(model, x, flops_reduction=1.5)
    with pytest.raises(ValueError, match="calibration batch is empty"):
        pitome.calibrate(model, x[:0], flops_reduction=0.4)
    with pytest.raises(ValueError, match="needs a batch"):
        pitome.calibrate(model, None, flops_reduction=0.4)
    with pytest.raises(ValueError, match="different batch sizes"):
        pitome.calibrate(model, {"x": x, "y": x[:2]}, flops_reduction=0.4)
    with pytest.raises(ValueError, match="do not pass ratio or r"):
        pitome.calibrate(model, x, flops_reduction=0.4, ratio=0.9)
    with pytest.raises(ValueError, match="unknown preset"):
        pitome.calibrate(model, x, flops_reduction=0.4, preset="nope")
    with pitome.patched(model, ratio=0.9):
        with pytest.raises(ValueError, match="unpatched model"):
            pitome.calibrate(model, x, flops_reduction=0.4)


def test_unreachable_target_names_the_range(make_vit, images):
    model, x = make_vit(), images(batch=4)
    with pytest.raises(ValueError, match=r"out of reach: .* reachable range is 0% to \d+\.\d%"):
        pitome.calibrate(model, x, flops_reduction=0.95)


def test_output_must_match_the_batch(make_vit, images):
    model, x = make_vit(), images(batch=4)
    with pytest.raises(ValueError, match="4 rows"):
        pitome.calibrate(model, x, flops_reduction=0.3, output=lambda inputs: model(inputs)[:2])


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a pitome calibration"):
        pitome.Calibration.load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        pitome.Calibration.load(tmp_path / "missing.json")
    bad.write_text('{"format": "pitome.calibration/1", "ratios": [0.5, 2.0]}')
    with pytest.raises(ValueError, match="keep-ratios in"):
        pitome.Calibration.load(bad)


def test_patch_one_liners(make_vit, images, tmp_path):
    model, x = make_vit(), images(batch=8)
    base = _macs_without_merge_steps(model, x)
    pitome.patch(model, flops_reduction=0.4, example_input=x)  # uniform keep-ratio via pitome.solver
    config = pitome.settings(model).config
    assert isinstance(config.ratio, float) and config.preset is None
    assert _macs_without_merge_steps(model, x) / (0.6 * base) == pytest.approx(1.0, abs=0.02)  # one ratio: coarse
    pitome.patch(model, preset="auto", flops_reduction=0.4, calibrate=x)  # calibrated (unpatches first)
    config = pitome.settings(model).config
    assert isinstance(config.ratio, list) and len(config.ratio) == 4 and config.preset == "auto"
    assert _macs_without_merge_steps(model, x) / (0.6 * base) == pytest.approx(1.0, abs=0.01)
    pitome.unpatch(model)
    result = pitome.calibrate(model, x, flops_reduction=0.4, max_forwards=FORWARDS)
    result.save(tmp_path / "b.json")
    pitome.patch(model, calibrate=str(tmp_path / "b.json"), trace_source=True)
    assert list(pitome.settings(model).config.ratio) == list(result.ratios)
    assert pitome.settings(model).config.trace_source
    with pytest.raises(ValueError, match="not both"):
        pitome.patch(model, ratio=0.9, flops_reduction=0.4, example_input=x)
    with pytest.raises(ValueError, match="needs example_input"):
        pitome.patch(model, flops_reduction=0.4)
    with pytest.raises(ValueError, match="already fixes the budget"):
        pitome.patch(model, calibrate=result, flops_reduction=0.3)


def test_targets_near_the_cap_are_still_met(make_vit, images):
    """Candidates whose capped blocks cannot reach the target are rejected, not scored at fewer FLOPs removed."""
    model, x = make_vit(), images(batch=8)
    result = pitome.calibrate(model, x, flops_reduction=0.6, max_forwards=FORWARDS)
    assert all(ratio >= 0.5 for ratio in result.ratios)  # never more than a bipartite step can remove
    _check_target(model, x, result, 0.6)
