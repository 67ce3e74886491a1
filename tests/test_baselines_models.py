"""Every baseline on real model code: a small timm ViT (and a tiny Hugging Face BERT with padding when the
text adapter is present), the attention the adapters supply, and the exact no-op at ratio 1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import pitome
from pitome.algorithms import ALGORITHMS, MergeAlgorithm, MergeRequest, create_algorithm
from pitome.plan import MergePlan

BASELINES = ("tofu", "dct", "diffrate", "mctf", "crossget", "random", "kth", "evit")


def _cls_attention(model, images, layer: int = 0, mode: str = "cls") -> torch.Tensor:
    """Attention of the unpatched block ``layer`` computed by hand from its q and k (mean over heads)."""
    seen = {}
    block = model.blocks[layer]
    handle = block.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(images)
        handle.remove()
        attn = block.attn
        x = block.norm1(seen["x"])
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    return probs[:, :, 0].mean(dim=1) if mode == "cls" else probs.mean(dim=(1, 2))


@dataclass
class _Recorder(MergeAlgorithm):
    """Records the attention it is given and merges like ToMe."""

    name: ClassVar[str] = "_test_attention_recorder"
    needs_attention: ClassVar[bool] = True
    seen: ClassVar[list] = []

    def plan(self, request: MergeRequest) -> MergePlan:
        type(self).seen.append((request.layer, request.attention))
        return create_algorithm("tome").plan(request)


@dataclass
class _MeanRecorder(_Recorder):
    name: ClassVar[str] = "_test_mean_attention_recorder"
    attention_from: ClassVar[str] = "mean"


@pytest.mark.parametrize("name", BASELINES)
def test_timm_vit_merges_with_every_baseline(name, make_vit, images):
    model = make_vit()
    x = images(2)
    with torch.no_grad():
        ref = model(x)
        pitome.patch(model, algorithm=name, ratio=0.8, trace_source=True)
        out = model(x)
        info = pitome.info(model)
        pitome.patch(model, algorithm=name, ratio=1.0)
        same = model(x)
        pitome.unpatch(model)
        back = model(x)
    assert torch.equal(same, ref) and torch.equal(back, ref)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    expected = pitome.predict_token_counts(pitome.resolve_budgets(4, ratio=0.8), 65)
    assert info.tokens_per_layer == expected
    total = info.size.sum(dim=1)
    if name == "tofu":  # blocks 0 and 1 of 4 prune
        assert (total < 65).all()
    else:
        torch.testing.assert_close(total, torch.full((2,), 65.0))
    assert info.source.shape == (2, 65) and info.source[:, 0].tolist() == [0, 0]
    assert info.source.max() < info.tokens_per_layer[-1]


@pytest.mark.parametrize("name", BASELINES)
def test_timm_batch_equals_each_sample_alone(name, make_vit, images):
    model = make_vit()
    x = images(3)
    pitome.patch(model, algorithm=name, ratio=0.75)
    with torch.no_grad():
        batch = model(x)
        for b in range(3):
            torch.testing.assert_close(model(x[b : b + 1])[0], batch[b], rtol=1e-4, atol=1e-5)


def test_timm_supplies_class_token_attention_only_while_needed(make_vit, images, monkeypatch):
    monkeypatch.setitem(ALGORITHMS, _Recorder.name, _Recorder)
    monkeypatch.setitem(ALGORITHMS, _MeanRecorder.name, _MeanRecorder)
    model = make_vit()
    x = images(2)
    expected = _cls_attention(model, x, layer=0)
    _Recorder.seen.clear()
    pitome.patch(model, algorithm=_Recorder.name, ratio=0.8)
    with torch.no_grad():
        model(x)
    assert [layer for layer, _ in _Recorder.seen] == [0, 1, 2, 3]
    torch.testing.assert_close(_Recorder.seen[0][1], expected, rtol=1e-5, atol=1e-6)
    for layer, att in _Recorder.seen:
        torch.testing.assert_close(att.sum(dim=1), torch.ones(2))  # later layers include the size bias
    # 'mean': attention received, averaged over every query
    pitome.unpatch(model)
    expected_mean = _cls_attention(model, x, layer=0, mode="mean")
    _MeanRecorder.seen.clear()
    pitome.patch(model, algorithm=_MeanRecorder.name, ratio=0.8)
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(_MeanRecorder.seen[0][1], expected_mean, rtol=1e-5, atol=1e-6)
    # algorithms that do not need attention get none, and no extra hooks are installed
    pitome.patch(model, algorithm="tome", ratio=0.8)
    assert not model.blocks[0].attn.q_norm._forward_hooks
    pitome.patch(model, algorithm=[_Recorder.name, "tome", None, "tome"], ratio=0.8)
    assert model.blocks[0].attn.q_norm._forward_hooks and not model.blocks[1].attn.q_norm._forward_hooks
    pitome.unpatch(model)
    assert not any(m._forward_hooks for m in model.modules())


def test_timm_without_class_token_uses_mean_attention(make_vit, images, monkeypatch):
    monkeypatch.setitem(ALGORITHMS, _Recorder.name, _Recorder)
    model = make_vit(class_token=False, global_pool="avg")
    x = images(2)
    expected = _cls_attention(model, x, layer=0, mode="mean")
    _Recorder.seen.clear()
    pitome.patch(model, algorithm=_Recorder.name, ratio=0.8)
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(_Recorder.seen[0][1], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dct", "tofu", "mctf"])
def test_timm_half_precision_keeps_dtype(name, make_vit, images):
    model = make_vit().to(torch.bfloat16)
    pitome.patch(model, algorithm=name, ratio=0.8, layers=[1, 2, 3])
    with torch.no_grad():
        out = model(images(2).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_per_block_options_reach_each_block(make_vit, images):
    model = make_vit()
    pitome.patch(model, algorithm="diffrate", ratio=0.8, prune_fraction=[0.0, 1.0, 0.0, 1.0])
    layers = pitome.settings(model).layers
    assert [spec.algorithm.prune_fraction for spec in layers] == [0.0, 1.0, 0.0, 1.0]
    with torch.no_grad():
        model(images(1))
    sizes = pitome.info(model).size.sum()
    assert sizes < 65  # blocks 1 and 3 pruned


# --- Hugging Face BERT with padding ------------------------------------------------------------------------------

def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    if not any(cls.__name__ == "HFTextAdapter" for cls in __import__("pitome.adapters", fromlist=["ADAPTERS"]).ADAPTERS):
        pytest.skip("the Hugging Face text adapter is not available")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100, attn_implementation="sdpa")
    return transformers.BertModel(config).eval()


def _padded_ids(lengths=(30, 50, 17)):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, 100, (n,), generator=g)
        ids[row, 0], ids[row, n - 1] = 3, 4
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("name", BASELINES)
def test_hf_bert_with_padding(name):
    model = _tiny_bert()
    ids, mask = _padded_ids()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        pitome.patch(model, algorithm=name, ratio=1.0)
        torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, ref, rtol=0, atol=1e-5)
        pitome.patch(model, algorithm=name, ratio=0.7)
        batch = model(ids, attention_mask=mask).last_hidden_state
        assert pitome.info(model).tokens_per_layer[-1] < 50
        for row, n in enumerate((30, 50, 17)):
            alone = model(ids[row : row + 1, :n]).last_hidden_state
            torch.testing.assert_close(alone[0, 0], batch[row, 0], rtol=1e-4, atol=1e-5)
