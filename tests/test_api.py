"""Public API: patch / unpatch / patched, re-patching, deepcopy, threads, errors, presets."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import pitome

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import Block  # noqa: E402

from pitome.adapters.timm_vit import _PatchedBlock  # noqa: E402
from pitome.config import PRESET_FAMILIES, build_config, resolve  # noqa: E402


def _snapshot(model: nn.Module) -> dict:
    return {name: (type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}


def _no_pitome_left(model: nn.Module) -> None:
    for name, module in model.named_modules():
        leftovers = [k for k in vars(module) if k.startswith("_pitome")]
        assert not leftovers, (name, leftovers)
        for hook in list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values()):
            assert not getattr(hook, "_pitome_hook", False), name
        assert "PiToMe" not in type(module).__name__, name


@pytest.mark.slow
def test_import_needs_only_torch_and_numpy():
    code = "import sys, pitome; bad = [m for m in ('timm', 'transformers', 'matplotlib', 'sklearn') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_patch_returns_the_model_and_default_ratio(make_vit, images):
    model = make_vit()
    assert pitome.patch(model) is model and pitome.is_patched(model)
    assert pitome.settings(model).config.ratio == 0.9 and pitome.settings(model).config.algorithm == "pitome"
    with torch.no_grad():
        model(images(1))
    assert pitome.info(model).tokens_per_layer == [65, 59, 54, 49, 45]


def test_unpatch_restores_classes_hooks_and_outputs_exactly(make_vit, images):
    model, x = make_vit(qk_norm=True, reg_tokens=2), images(2)
    with torch.no_grad():
        ref = model(x)
    before, keys = _snapshot(model), list(model.state_dict())
    pitome.patch(model, ratio=0.7, trace_source=True)
    assert all(type(b) is not Block and isinstance(b, _PatchedBlock) for b in model.blocks)
    assert list(model.state_dict()) == keys, "patching adds no parameters or buffers"
    with torch.no_grad():
        assert (model(x) - ref).abs().max() > 1e-4
    assert pitome.unpatch(model) is model and not pitome.is_patched(model)
    assert all(type(b) is Block for b in model.blocks)
    assert type(model).__name__ == "VisionTransformer"
    assert _snapshot(model) == before
    _no_pitome_left(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert pitome.unpatch(model) is model  # unpatching twice is harmless
    with pytest.raises(ValueError, match="not patched"):
        pitome.info(model)
    with pytest.raises(ValueError, match="not patched"):
        pitome.settings(model)


def test_info_before_any_forward_is_an_error(make_vit):
    model = pitome.patch(make_vit(), ratio=0.9)
    with pytest.raises(ValueError, match="no forward"):
        pitome.info(model)


def test_repatch_reconfigures_without_double_wrapping(make_vit, images):
    model, x = make_vit(), images(2)
    pitome.patch(model, ratio=0.9)
    pitome.patch(model, algorithm="tome", r=6)
    pitome.patch(model, algorithm="tome", r=6)
    for block in model.blocks:
        assert type(block).__mro__.count(_PatchedBlock) == 1
        assert type(block).__bases__ == (_PatchedBlock, Block)
        assert len(block.attn.k_norm._forward_hooks) == 1
    assert pitome.settings(model).config.r == 6 and pitome.settings(model).config.ratio is None
    with torch.no_grad():
        out = model(x)
        fresh = pitome.patch(copy.deepcopy(pitome.unpatch(copy.deepcopy(model))), algorithm="tome", r=6)
        torch.testing.assert_close(out, fresh(x), rtol=0, atol=0)
    assert pitome.info(model).tokens_per_layer == [65, 59, 53, 47, 41]
    pitome.patch(model, ratio=0.9, metric="hidden")
    assert all(len(b.attn.k_norm._forward_hooks) == 0 for b in model.blocks), "no key hooks for a hidden metric"


def test_invalid_repatch_keeps_the_previous_patch(make_vit, images):
    model = make_vit()
    pitome.patch(model, algorithm="tome", r=5)
    with pytest.raises(ValueError):
        pitome.patch(model, ratio=2.0)
    assert pitome.is_patched(model) and pitome.settings(model).config.r == 5
    with torch.no_grad():
        model(images(1))
    assert pitome.info(model).tokens_per_layer == [65, 60, 55, 50, 45]


def test_patched_context_restores_unpatched_and_patched_states(make_vit, images):
    model, x = make_vit(), images(2)
    with torch.no_grad():
        ref = model(x)
        with pitome.patched(model, ratio=0.7) as same:
            assert same is model and pitome.is_patched(model)
            assert (model(x) - ref).abs().max() > 1e-4
        assert not pitome.is_patched(model)
        _no_pitome_left(model)
        assert torch.equal(model(x), ref)

        pitome.patch(model, preset="deit", ratio=0.8, trace_source=True)
        before = pitome.settings(model)
        merged = model(x)
        with pytest.raises(RuntimeError, match="boom"):
            with pitome.patched(model, algorithm="tome", r=3):
                assert pitome.settings(model).config.algorithm == "tome"
                raise RuntimeError("boom")
        after = pitome.settings(model)
        assert after.layers == before.layers and after.config == before.config
        assert after.config.trace_source and after.config.prop_attn is False
        assert torch.equal(model(x), merged)
        assert all(type(b).__mro__.count(_PatchedBlock) == 1 for b in model.blocks)


def test_deepcopy_of_a_patched_model(make_vit, images):
    model, x = make_vit(reg_tokens=1), images(2)
    pitome.patch(model, ratio=0.7, trace_source=True)
    with torch.no_grad():
        out = model(x)
    clone = copy.deepcopy(model)
    assert pitome.is_patched(clone)
    keys = {b.__dict__["_pitome_key"] for b in clone.blocks}
    assert len(keys) == 1 and keys.pop() is not model.blocks[0].__dict__["_pitome_key"]
    with torch.no_grad():
        assert torch.equal(clone(x), out)
        pitome.unpatch(model)
        assert torch.equal(clone(x), out), "the copy keeps merging after the original is unpatched"
        assert pitome.info(clone).tokens_per_layer == [66, 47, 34, 25, 19]
        pitome.unpatch(clone)
        _no_pitome_left(clone)
        assert torch.equal(clone(x), model(x))


@pytest.mark.slow
def test_torch_save_and_load_of_a_whole_patched_model(make_vit, images, tmp_path):
    """torch.save(model) pickles the module objects; the patched classes are rebuilt from their parents on load,
    including in a fresh interpreter that never patched anything."""
    model, x = make_vit(), images(2)
    with torch.no_grad():
        plain = model(x)
        pitome.patch(model, ratio=0.7, prop_attn=False)
        merged = model(x)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert pitome.is_patched(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x), merged)
        assert pitome.info(loaded).tokens_per_layer == pitome.info(model).tokens_per_layer
        pitome.unpatch(loaded)
        _no_pitome_left(loaded)
        assert torch.equal(loaded(x), plain)
    code = (f"import torch; m = torch.load({str(path)!r}, weights_only=False); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); import pitome; "
            "print(type(m).__name__, pitome.is_patched(m), float(m(x).sum()))")
    torch.save(x, tmp_path / "x.pt")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["PiToMeVisionTransformer", "True"]
    assert abs(float(out[2]) - float(merged.sum())) < 1e-4


def test_two_threads_share_one_patched_model(make_vit, images):
    model = pitome.patch(make_vit(), ratio=0.7, trace_source=True)
    inputs = [images(2, seed=10), images(3, seed=11)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(8):
                    results[i].append(model(inputs[i]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in (0, 1):
        assert len(results[i]) == 8
        for out in results[i]:
            torch.testing.assert_close(out, expected[i], rtol=0, atol=0)


def test_nested_calls_of_two_patched_models(make_vit, images):
    """Each patched model has its own per-forward state, even when one runs inside the other."""
    outer, inner, x = make_vit(seed=0), make_vit(seed=1), images(1)
    pitome.patch(outer, ratio=0.7)
    pitome.patch(inner, algorithm="tome", r=3)
    with torch.no_grad():
        expected_inner = inner(x)
        expected_outer = outer(x)
    seen = []
    outer.blocks[1].register_forward_hook(lambda *args: seen.append(inner(x)))
    with torch.no_grad():
        got = outer(x)
    torch.testing.assert_close(got, expected_outer, rtol=0, atol=0)
    torch.testing.assert_close(seen[0], expected_inner, rtol=0, atol=0)
    assert pitome.info(inner).tokens_per_layer == [65, 62, 59, 56, 53]


# -- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,names", [
    (dict(algorithm="fast"), ["'fast'", "pitome", "pitome_bsm", "pitome_text", "tome"]),
    (dict(algorithm=["tome", "nope", None, "tome"]), ["'nope'", "tome"]),
    (dict(foo=1), ["foo", "margin", "alpha", "energy", "split", "matching"]),
    (dict(algorithm="tome", margin=0.5), ["margin", "'tome': []"]),
    (dict(ratio=0), ["got 0", "(0, 1]"]),
    (dict(ratio=1.5), ["got 1.5", "(0, 1]"]),
    (dict(ratio=-0.1), ["got -0.1", "(0, 1]"]),
    (dict(ratio="a"), ["got 'a'", "(0, 1]"]),
    (dict(ratio=float("nan")), ["got nan", "(0, 1]"]),
    (dict(r=-1), ["got -1", "integer >= 0"]),
    (dict(r=1.5), ["got 1.5", "integer >= 0"]),
    (dict(ratio=0.9, r=3), ["either ratio", "or r"]),
    (dict(energy="no_such_energy"), ["'no_such_energy'", "elu", "paper", "gaussian"]),
    (dict(split="no_such_split"), ["'no_such_split'", "alternate", "top_next"]),
    (dict(matching="no_such_matching"), ["'no_such_matching'", "protect", "bsm"]),
    (dict(margin=1.0), ["margin", "got 1.0"]),
    (dict(margin=[0.9, 0.8]), ["2 entries", "4 blocks"]),
    (dict(metric="queries"), ["'queries'", "keys", "hidden"]),
    (dict(prop_attn="yes"), ["prop_attn", "'yes'"]),
    (dict(preset="vit-huge"), ["'vit-huge'", "deit", "mae", "clip", "bert", "paper"]),
    (dict(layers=[7]), ["layer 7", "4 blocks"]),
])
def test_bad_arguments_name_the_value_and_what_is_allowed(kwargs, names, make_vit):
    model = make_vit()
    with pytest.raises(ValueError) as err:
        pitome.patch(model, **kwargs)
    for name in names:
        assert name in str(err.value), (name, str(err.value))
    assert not pitome.is_patched(model)
    _no_pitome_left(model)


@pytest.mark.parametrize("build", ["linear", "resnet18", "not_a_module"])
def test_unsupported_models(build):
    model = {"linear": lambda: nn.Linear(4, 4),
             "resnet18": lambda: timm.create_model("resnet18", pretrained=False),
             "not_a_module": lambda: "vit"}[build]()
    with pytest.raises(TypeError) as err:
        pitome.patch(model, ratio=0.9)
    message = str(err.value)
    assert "VisionTransformer" in message or "nn.Module" in message
    if build != "not_a_module":
        assert type(model).__name__ in message and "supported models" in message
        assert not any(k.startswith("_pitome") for m in model.modules() for k in vars(m))


# -- presets ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", [p for p in pitome.available_presets() if PRESET_FAMILIES.get(p) != "text"])
def test_every_preset_patches_and_runs(preset, make_vit, images):
    model, x = make_vit(), images(2)
    pitome.patch(model, preset=preset)
    assert pitome.settings(model).config.preset == preset
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    counts = pitome.info(model).tokens_per_layer
    assert counts[-1] < counts[0]


@pytest.mark.parametrize("depth", [4, 5, 12])
def test_deit_and_mae_presets_split_the_blocks(depth, make_vit):
    half = math.ceil(depth / 2)
    model = make_vit(depth=depth, embed_dim=32, num_heads=2)
    pitome.patch(model, preset="deit")
    layers = pitome.settings(model).layers
    assert [layer.algorithm.matching for layer in layers] == ["bsm"] * half + ["protect"] * (depth - half)
    assert all(layer.algorithm.margin == 0.75 and layer.algorithm.layer_margin(depth // 2, depth)
               == pytest.approx(0.75 - 0.75 * (depth // 2) / depth) for layer in layers)
    assert pitome.settings(model).config.prop_attn is False and pitome.settings(model).config.metric == "keys"
    pitome.patch(model, preset="mae")
    assert [layer.algorithm.matching for layer in pitome.settings(model).layers] == (
        ["protect"] * half + ["bsm"] * (depth - half))


@pytest.mark.parametrize("preset", ["bert", "distilbert"])
def test_a_family_preset_on_the_wrong_family_is_refused(preset, make_vit):
    model = make_vit()
    with pytest.raises(ValueError, match=f"preset '{preset}' is for text models, but this model is a vision model"):
        pitome.patch(model, preset=preset)
    assert not pitome.is_patched(model)


def test_preset_details_and_overrides(make_vit):
    model = make_vit(depth=6, embed_dim=32, num_heads=2)
    s = resolve(build_config(6, preset="bert", ratio=0.8), 6, 1)  # a text preset: checked without a text model
    assert [layer.merges for layer in s.layers] == [True] * 3 + [False] * 3
    assert type(s.layers[0].algorithm).name == "pitome_text" and s.layers[0].algorithm.energy == "gaussian"
    assert s.config.size_weighted is False
    pitome.patch(model, preset="clip")
    assert pitome.settings(model).config.metric == "hidden" and pitome.settings(model).layers[0].algorithm.margin == 0.95
    pitome.patch(model, preset="paper")
    s = pitome.settings(model)
    assert s.config.prop_attn and s.layers[0].algorithm.energy == "paper"
    pitome.patch(model, preset="blip2")
    assert pitome.settings(model).layers[0].algorithm.margin_decay == 0.4
    # explicit arguments win over the preset
    pitome.patch(model, preset="deit", prop_attn=True, margin=0.5)
    s = pitome.settings(model)
    assert s.config.prop_attn and all(layer.algorithm.margin == 0.5 for layer in s.layers)
    assert s.layers[0].algorithm.matching == "bsm"
    # a different algorithm keeps only the preset options it understands
    pitome.patch(model, preset="deit", algorithm="tome", r=2)
    assert all(type(layer.algorithm).name == "tome" for layer in pitome.settings(model).layers)


def test_per_block_algorithms_and_options(make_vit, images):
    model = make_vit()
    pitome.patch(model, algorithm=["tome", None, "pitome", "pitome_bsm"], ratio=0.8, margin=[0.9, 0.8, 0.7, 0.6])
    s = pitome.settings(model)
    assert [type(l.algorithm).name if l.algorithm else None for l in s.layers] == [
        "tome", None, "pitome", "pitome_bsm"]
    assert s.layers[2].algorithm.margin == 0.7 and s.layers[3].algorithm.margin == 0.6
    with torch.no_grad():
        model(images(1))
    assert pitome.info(model).tokens_per_layer == [65, 53, 53, 43, 35]


# -- clear errors at patch time; one re-patch path -----------------------------------------------------------

@pytest.mark.parametrize("seed", [2**70, -(2**63) - 1, 1.5, True])
def test_a_seed_outside_the_generator_range_is_refused_at_patch_time(seed, make_vit):
    with pytest.raises(ValueError, match=r"seed must be None or an integer in \[-2\*\*63, 2\*\*64 - 1\]"):
        pitome.patch(make_vit(), algorithm="random", seed=seed)


def test_a_misspelt_patch_keyword_lists_patch_parameters_with_a_suggestion(make_vit):
    with pytest.raises(ValueError, match=r"did you mean 'ratio' for 'ratios'.*patch\(\) parameters: algorithm, ratio"):
        pitome.patch(make_vit(), ratios=0.9)


def test_unpatch_of_something_that_is_not_a_model_is_a_clear_error():
    with pytest.raises(TypeError, match="unpatch expects the torch.nn.Module"):
        pitome.unpatch(None)


def test_every_repatch_keeps_the_preset(make_vit, images):
    """``patched`` restores and ``ModelCost.from_model`` re-patches through ``api.apply``: nothing is dropped."""
    from pitome.solver import ModelCost

    model = make_vit()
    pitome.patch(model, preset="deit", ratio=0.8)
    before = pitome.settings(model).config
    ModelCost.from_model(model, images(1))
    assert pitome.settings(model).config == before and before.preset == "deit"
    with pitome.patched(model, algorithm="tome", r=2):
        assert pitome.settings(model).config.algorithm == "tome"
    assert pitome.settings(model).config == before


def test_the_public_surface():
    for name in ("UnsupportedModelError", "MergeInfo", "MergeSettings", "record_merges", "merge_timing",
                 "register_adapter"):
        assert name in pitome.__all__ and hasattr(pitome, name)
    import typing

    hints = typing.get_type_hints(pitome.patch)
    assert "Any" not in str(hints["ratio"]) and "Any" not in str(hints["r"])
