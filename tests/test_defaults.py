"""Pins the defaults chosen by the ablation (docs/ablation.md), so they never drift silently.

Changing a value here means re-running ``benchmarks/ablate.py`` and updating docs/ablation.md with the evidence.
"""

import pytest
import torch

import pitome
from pitome.adapters import ADAPTERS
from pitome.algorithms.pitome import PiToMe
from pitome.config import FAMILIES, MergeConfig, build_config, preset_config

# preset="auto": measured on DINOv2-S / Fashion-MNIST (vision) and MiniLM-L6 / BBC News (text), docs/ablation.md
AUTO_VISION = dict(algorithm="pitome", prop_attn=True, metric="keys", size_weighted=True,
                   options=dict(margin=0.9, margin_decay=0.9, alpha=1.0, energy="elu", split="alternate",
                                matching="bsm"))
AUTO_TEXT = dict(algorithm="tome", prop_attn=True, metric="hidden", size_weighted=True, options={})

# pitome.patch(model) without a preset: the paper's PiToMe (kept; see docs/ablation.md, "Plain defaults")
PLAIN_CONFIG = dict(algorithm="pitome", prop_attn=True, size_weighted=True, metric="keys", layers=None)
PLAIN_PITOME = dict(margin=0.9, margin_decay=None, alpha=1.0, energy="elu", split="alternate", matching="protect",
                    margin_quantile=None)
PLAIN_RATIO = 0.9


@pytest.mark.parametrize("family, expected", [("vision", AUTO_VISION), ("text", AUTO_TEXT)])
def test_auto_preset_values(family, expected):
    for layers in (6, 12):
        assert preset_config("auto", layers, family) == expected


def test_auto_needs_a_family():
    assert FAMILIES == ("vision", "text")
    for family in (None, "audio"):
        with pytest.raises(ValueError, match="family"):
            preset_config("auto", 12, family)
    with pytest.raises(ValueError, match="family"):
        pitome.config.PRESETS["auto"][0](12)
    assert "auto" in pitome.available_presets()


def test_every_adapter_declares_its_family():
    families = {cls.name: cls.family for cls in ADAPTERS}
    assert set(families.values()) <= set(FAMILIES)
    assert families["timm_vit"] == "vision" and families["hf_vit"] == "vision"
    assert families["hf_text"] == "text" and families["hf_clip_text"] == "text"
    assert families["hf_clip"] == "vision" and families["hf_llava"] == "vision"


def test_plain_defaults():
    config = build_config(12)
    for key, value in PLAIN_CONFIG.items():
        assert getattr(config, key) == value, key
    assert config.ratio == PLAIN_RATIO and config.r is None and config.preset is None and config.options == {}
    algorithm = PiToMe()
    for key, value in PLAIN_PITOME.items():
        assert getattr(algorithm, key) == value, key
    assert MergeConfig().prop_attn is True and MergeConfig().size_weighted is True


def _resolved(model) -> tuple:
    s = pitome.settings(model)
    layer = next(l.algorithm for l in s.layers if l.algorithm is not None)
    return s.config, layer


def test_auto_on_a_vision_model(make_vit, images):
    model = make_vit()
    pitome.patch(model, preset="auto", ratio=0.8)
    config, algorithm = _resolved(model)
    assert config.preset == "auto" and config.prop_attn is True and config.size_weighted is True
    assert type(algorithm).name == "pitome" and algorithm.matching == "bsm" and algorithm.energy == "elu"
    with torch.no_grad():
        out = model(images(2))
    assert torch.isfinite(out).all()
    # explicit arguments still win over the preset
    pitome.patch(model, preset="auto", ratio=0.8, prop_attn=False, matching="protect")
    config, algorithm = _resolved(model)
    assert config.prop_attn is False and algorithm.matching == "protect"


def test_auto_on_a_text_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=50, attn_implementation="sdpa")
    model = transformers.BertModel(config).eval()
    pitome.patch(model, preset="auto", ratio=0.8)
    merge_config, algorithm = _resolved(model)
    assert merge_config.prop_attn is True and merge_config.size_weighted is True
    assert merge_config.metric == "hidden" and merge_config.layers is None
    assert type(algorithm).name == "tome"
    ids = torch.randint(1, 50, (2, 24))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.isfinite(out).all() and out.shape[1] < 24
