"""Gradient (activation) checkpointing with merging on: the recomputed forward of each block rebuilds the same
merge plan from the state the block entered with, so gradients equal those without checkpointing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import pitome  # noqa: E402
from pitome.train import call_model, logits_of  # noqa: E402
from train_models import batch, tiny_hf_bert, tiny_timm_vit  # noqa: E402

SETTINGS = [("pitome", {}), ("tome", {}), ("random", {"seed": 3}), ("kth", {})]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gradients(model: torch.nn.Module, family: str) -> dict:
    inputs, labels = batch(family, 4)
    torch.manual_seed(5)  # the same dropout masks with and without checkpointing (checkpoint replays the RNG)
    torch.nn.functional.cross_entropy(logits_of(call_model(model, inputs)), labels).backward()
    assert pitome.info(model).tokens_per_layer[-1] < pitome.info(model).tokens_per_layer[0]
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(plain: dict, checkpointed: dict) -> None:
    assert set(plain) == set(checkpointed) and plain
    worst = max(float((plain[n] - checkpointed[n]).abs().max()) for n in plain)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("algorithm, options", SETTINGS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_timm_checkpointing_gives_the_same_gradients(algorithm, options, reentrant, monkeypatch):
    import timm.layers

    if hasattr(timm.layers, "set_reentrant_ckpt"):
        timm.layers.set_reentrant_ckpt(reentrant)
    elif reentrant:
        pytest.skip("this timm has no set_reentrant_ckpt")
    grads = []
    try:
        for checkpointing in (False, True):
            model = tiny_timm_vit(dropout=0.1).train()
            pitome.patch(model, algorithm, ratio=0.7, **options)
            model.set_grad_checkpointing(checkpointing)
            grads.append(_gradients(model, "timm_vit"))
    finally:
        if hasattr(timm.layers, "set_reentrant_ckpt"):
            timm.layers.set_reentrant_ckpt(False)
    _assert_same(*grads)


@pytest.mark.parametrize("algorithm, options", [("pitome_text", {}), ("tome", {}), ("random", {"seed": 3})])
@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_bert_checkpointing_gives_the_same_gradients(algorithm, options, reentrant):
    grads = []
    for checkpointing in (False, True):
        model = tiny_hf_bert(dropout=0.1).train()
        pitome.patch(model, algorithm, ratio=0.7, **options)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        grads.append(_gradients(model, "hf_bert"))
    _assert_same(*grads)


def test_two_forwards_then_one_backward_still_match():
    """Gradient accumulation in one backward: each recomputed block finds its own entry state."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_timm_vit(dropout=0.0).train()
        pitome.patch(model, "pitome", ratio=0.7)
        model.set_grad_checkpointing(checkpointing)
        (a, _), (b, _) = batch("timm_vit", 4, seed=1), batch("timm_vit", 4, seed=2)
        (model(a).square().mean() + model(b).square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    _assert_same(*grads)


def test_open_clip_checkpointing_gives_the_same_gradients():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        tower = VisionTransformer(image_size=32, patch_size=4, width=32, layers=4, heads=4, mlp_ratio=2.0,
                                  output_dim=8, pool_type="avg").train()
        pitome.patch(tower, "pitome", ratio=0.7)
        tower.set_grad_checkpointing(checkpointing)
        images, _ = batch("timm_vit", 4)
        tower(images).square().mean().backward()
        assert pitome.info(tower).tokens_per_layer[-1] < pitome.info(tower).tokens_per_layer[0]
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
    _assert_same(*grads)


@pytest.mark.parametrize("family", ["hf_vit", "hf_clip_vision"])
def test_hf_vision_checkpointing_gives_the_same_gradients(family):
    from train_models import BUILDERS

    grads = []
    for checkpointing in (False, True):
        model = BUILDERS[family](dropout=0.1).train()
        pitome.patch(model, "pitome", ratio=0.7)
        if checkpointing:
            model.gradient_checkpointing_enable()
        grads.append(_gradients(model, family))
    _assert_same(*grads)
