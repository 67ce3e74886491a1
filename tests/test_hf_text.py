"""Hugging Face text encoders (BERT, RoBERTa, DistilBERT, task heads): exactness, padding, masks, heads, errors.

Tiny random-weight models built from config objects; no downloads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import pitome
from pitome.adapters import UnsupportedModelError
from pitome.algorithms import ALGORITHMS, MergeAlgorithm, MergeRequest
from pitome.plan import MergePlan, build_plan

transformers = pytest.importorskip("transformers")

LAYERS = 4
BACKENDS = ("sdpa", "eager")
FAMILIES = ("bert", "distilbert", "roberta")
ALGOS = ("pitome", "pitome_text", "tome")


def _config(family: str, backend: str, **extra):
    if family == "distilbert":
        sizes = dict(dim=64, n_layers=LAYERS, n_heads=4, hidden_dim=128)
        cls = transformers.DistilBertConfig
    else:
        sizes = dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128)
        cls = {"roberta": transformers.RobertaConfig, "xlm_roberta": transformers.XLMRobertaConfig,
               "camembert": transformers.CamembertConfig}.get(family, transformers.BertConfig)
    return cls(**{**sizes, "vocab_size": 100, "attn_implementation": backend, **extra})


def _model(family: str, backend: str = "sdpa", head: str = "Model", seed: int = 0, **extra):
    prefix = {"bert": "Bert", "distilbert": "DistilBert", "roberta": "Roberta", "xlm_roberta": "XLMRoberta",
              "camembert": "Camembert"}[family]
    torch.manual_seed(seed)
    return getattr(transformers, prefix + head)(_config(family, backend, **extra)).eval()


def _pad_id(family: str) -> int:
    return 1 if family in ("roberta", "xlm_roberta", "camembert") else 0


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, length), generator=g)
    ids[:, 0] = 3  # [CLS]-like first token
    ids[:, -1] = 4  # [SEP]-like last token
    return ids


def _padded_batch(family: str, lengths=(30, 50, 17), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.full((len(lengths), width), _pad_id(family))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = _ids(1, n, seed + row)[0]
        mask[row, :n] = 1
    return ids, mask


# --- merging off: exactly the unpatched model ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["Model", "ForSequenceClassification"])
def test_ratio_one_reproduces_unpatched(family, backend, head):
    model = _model(family, backend, head)
    ids, mask = _padded_batch(family)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        pitome.patch(model, ratio=1.0)
        out = model(ids, attention_mask=mask)
    assert torch.allclose(out[0], ref[0], atol=1e-5, rtol=0)
    if head == "Model" and family != "distilbert":
        assert torch.allclose(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
    assert pitome.info(model).tokens_per_layer == [ids.shape[1]] * (LAYERS + 1)


@pytest.mark.parametrize("family", ["xlm_roberta", "camembert"])
def test_ratio_one_roberta_relatives(family):
    model = _model(family)
    ids, mask = _padded_batch(family)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        pitome.patch(model, ratio=1.0)
        assert torch.allclose(model(ids, attention_mask=mask).last_hidden_state, ref, atol=1e-5, rtol=0)
        pitome.patch(model, ratio=0.7)
        assert model(ids, attention_mask=mask).last_hidden_state.shape[1] < ids.shape[1]


# --- padding invariance with merging on -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_invariance(family, backend):
    model = _model(family, backend)
    ids, mask = _padded_batch(family, lengths=(30, 50, 17))
    for algorithm in ALGOS:
        pitome.patch(model, algorithm=algorithm, ratio=0.7)
        with torch.no_grad():
            batch_out = model(ids, attention_mask=mask)
            batch_pool = pitome.pool_mean(model, batch_out.last_hidden_state)
            for row, n in enumerate((30, 50, 17)):
                alone = model(ids[row : row + 1, :n])
                alone_pool = pitome.pool_mean(model, alone.last_hidden_state)
                assert torch.allclose(alone_pool[0], batch_pool[row], atol=1e-5, rtol=0), (algorithm, row)
                assert torch.allclose(alone.last_hidden_state[0, 0], batch_out.last_hidden_state[row, 0], atol=1e-5)
                if family != "distilbert":
                    assert torch.allclose(alone.pooler_output[0], batch_out.pooler_output[row], atol=1e-5)
        assert pitome.info(model).tokens_per_layer[-1] < 50


# --- counts, masks, sizes layer by layer ------------------------------------------------------------------------

def test_counts_masks_and_sizes_are_consistent():
    model = _model("bert")
    lengths = (30, 50, 17)
    ids, mask = _padded_batch("bert", lengths)
    pitome.patch(model, algorithm="pitome", ratio=0.8, trace_source=True)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    info = pitome.info(model)
    budgets = pitome.resolve_budgets(LAYERS, ratio=0.8)
    # [CLS] protected, [SEP] frozen: the budget counts [SEP] (the official rule), the merges spare it
    predicted = [pitome.predict_token_counts(budgets, n, num_protected=1, frozen=1) for n in lengths]
    assert info.tokens_per_layer[0] == 50
    # padding never merges; slots holding only padding are dropped, so the widest sample sets the width
    assert info.tokens_per_layer == [max(p[i] for p in predicted) for i in range(LAYERS + 1)]
    assert info.tokens_per_layer[-1] == out.last_hidden_state.shape[1]
    assert info.valid.sum(dim=1).tolist() == [p[-1] for p in predicted]
    # layer by layer: real tokens per sample as predicted
    assert len(info.source_history) == LAYERS
    for layer, source in info.source_history:
        real_slots = [len(set(source[row, :n].tolist())) for row, n in enumerate(lengths)]
        assert real_slots == [p[layer + 1] for p in predicted]
    # sizes: every real token counted once, padding slots only hold padding
    real_size = (info.size * info.valid).sum(dim=1)
    assert real_size.tolist() == [float(n) for n in lengths]
    members = info.source_matrix()  # (B, N, N0)
    assert torch.equal(members.sum(dim=2).float(), info.size)
    assert torch.equal(info.valid, (members & mask.bool()[:, None, :]).any(dim=2))
    # [CLS] stays slot 0 alone; the last real token ([SEP]) is never merged
    for row, n in enumerate(lengths):
        assert info.source[row, 0] == 0 and info.size[row, 0] == 1
        assert info.size[row, info.source[row, n - 1]] == 1


def test_pool_mean_equals_masked_mean_without_merging():
    model = _model("bert")
    ids, mask = _padded_batch("bert")
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask).last_hidden_state
        pitome.patch(model, ratio=1.0)
        patched_hidden = model(ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    expected = (hidden * m).sum(1) / m.sum(1)
    assert torch.allclose(pitome.pool_mean(model, patched_hidden), expected, atol=1e-6)
    pitome.unpatch(model)
    assert torch.allclose(pitome.pool_mean(model, hidden, attention_mask=mask), expected, atol=1e-6)
    with pytest.raises(ValueError, match="tokens"):
        merged_info = _info_of(model, ids, mask)
        pitome.pool_mean(merged_info, hidden[:, : merged_info.size.shape[1] + 1])
    with pytest.raises(TypeError, match="MergeInfo"):
        pitome.pool_mean("model", hidden)


def _info_of(model, ids, mask):
    pitome.patch(model, ratio=0.5)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    return pitome.info(model)


def test_pool_mean_weights_merged_tokens_by_size():
    model = _model("bert")
    ids = _ids(1, 40)
    pitome.patch(model, algorithm="tome", ratio=0.5)
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
    info = pitome.info(model)
    assert info.size.max() > 1
    expected = (hidden * info.size.unsqueeze(-1)).sum(1) / info.size.sum(1, keepdim=True)
    assert torch.allclose(pitome.pool_mean(info, hidden), expected, atol=1e-6)
    assert not torch.allclose(pitome.pool_mean(info, hidden), hidden.mean(1), atol=1e-4)
    assert torch.allclose(pitome.pool_mean(info, hidden, size_weighted=False), hidden.mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="size_weighted"):
        pitome.pool_mean(info, hidden, size_weighted="yes")


# --- heads and poolers on merged sequences ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_classification_head_on_merged_tokens(family):
    model = _model(family, head="ForSequenceClassification", num_labels=3)
    ids, mask = _padded_batch(family)
    pitome.patch(model, algorithm="pitome", ratio=0.6)
    out = model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 3) and torch.isfinite(out.loss)
    out.loss.backward()  # gradients flow through merged tokens
    info = pitome.info(model)
    assert info.tokens_per_layer[-1] < ids.shape[1]
    # the classifier's view of row 0 does not depend on the padding around it
    alone = model(ids[:1, :30]).logits
    assert torch.allclose(alone[0], out.logits[0], atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("head", ["ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"])
def test_token_level_heads_get_original_length(family, head):
    model = _model(family, head=head)
    ids, mask = _padded_batch(family)
    pitome.patch(model, ratio=0.6)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    first = out.start_logits if head == "ForQuestionAnswering" else out.logits
    assert first.shape[:2] == ids.shape
    assert pitome.info(model).tokens_per_layer[-1] < ids.shape[1]
    if head == "ForTokenClassification":
        labels = torch.zeros_like(ids)
        assert torch.isfinite(model(ids, attention_mask=mask, labels=labels).loss)


def test_multiple_choice_and_bert_pooler():
    model = _model("bert", head="ForMultipleChoice")
    ids = _ids(2 * 3, 24).view(2, 3, 24)
    pitome.patch(model, ratio=0.7)
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (2, 3)
    assert pitome.info(model).tokens_per_layer[-1] < 24


def test_hidden_states_and_attentions_are_reported():
    model = _model("bert", "eager")
    ids, mask = _padded_batch("bert")
    pitome.patch(model, ratio=0.7)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    counts = pitome.info(model).tokens_per_layer
    assert [h.shape[1] for h in out.hidden_states] == counts
    assert [a.shape[-1] for a in out.attentions] == counts[:-1]


def test_return_dict_false_and_token_type_ids():
    model = _model("bert")
    ids, mask = _padded_batch("bert")
    pitome.patch(model, ratio=0.7)
    with torch.no_grad():
        out = model(ids, mask, torch.zeros_like(ids), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape[1] == pitome.info(model).tokens_per_layer[-1]


# --- presets, options -----------------------------------------------------------------------------------------------

def test_bert_preset_merges_first_three_layers():
    model = _model("bert", num_hidden_layers=6)
    ids = _ids(1, 64)
    pitome.patch(model, preset="bert", ratio=0.8)
    settings = pitome.settings(model)
    assert [s.merges for s in settings.layers] == [True, True, True, False, False, False]
    algo = settings.layers[0].algorithm
    assert (algo.name, algo.energy, algo.split) == ("pitome_text", "gaussian", "top_next")
    assert algo.layer_margin(2, 6) == pytest.approx(0.9 - 0.25 * 2 / 6)
    with torch.no_grad():
        model(ids)
    counts = pitome.info(model).tokens_per_layer
    assert counts[:4] == pitome.predict_token_counts(pitome.resolve_budgets(6, ratio=0.8, layers=[0, 1, 2]),
                                                    64, num_protected=2)[:4]
    assert counts[3:] == [counts[3]] * 4


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_hidden_metric_and_prop_attn(family):
    model = _model(family)
    ids, mask = _padded_batch(family)
    outputs = {}
    for metric in ("keys", "hidden"):
        pitome.patch(model, ratio=0.6, metric=metric, prop_attn=True)
        with torch.no_grad():
            outputs[metric] = pitome.pool_mean(model, model(ids, attention_mask=mask).last_hidden_state)
        assert torch.isfinite(outputs[metric]).all()
    assert not torch.allclose(outputs["keys"], outputs["hidden"])


def test_chunked_feed_forward_with_merged_lengths():
    model = _model("bert", chunk_size_feed_forward=4)
    ids = _ids(1, 40)
    with torch.no_grad():
        ref = model(ids).last_hidden_state
        pitome.patch(model, ratio=1.0)
        assert torch.allclose(model(ids).last_hidden_state, ref, atol=1e-5)
        pitome.patch(model, ratio=0.7)
        assert model(ids).last_hidden_state.shape[1] < 40


# --- [CLS]-attention algorithms -------------------------------------------------------------------------------------

@dataclass
class _KeepMostAttended(MergeAlgorithm):
    """Test algorithm: merges the r least [CLS]-attended candidates into the most attended one."""

    name: ClassVar[str] = "_test_cls_attention"
    needs_attention: ClassVar[bool] = True
    seen: ClassVar[list] = []

    def plan(self, request: MergeRequest) -> MergePlan:
        attention = request.attention
        type(self).seen.append(attention)
        scores = attention[:, request.num_protected :].clone()
        cand = request.candidates
        if cand is not None:
            scores = scores.masked_fill(~cand, float("inf"))
        order = torch.argsort(scores, dim=1, stable=True)
        tokens = scores.shape[1]
        target = torch.arange(tokens).repeat(scores.shape[0], 1)
        best = torch.argmax(scores.masked_fill(scores == float("inf"), -1.0), dim=1)
        for row in range(scores.shape[0]):
            target[row, order[row, : int(request.r[row])]] = best[row]
        return build_plan(target, torch.arange(tokens, dtype=torch.float32).expand_as(scores), request.num_protected,
                          request.valid)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_token_attention_is_provided(backend):
    ALGORITHMS[_KeepMostAttended.name] = _KeepMostAttended
    try:
        model = _model("bert", backend)
        ids, mask = _padded_batch("bert")
        _KeepMostAttended.seen.clear()
        pitome.patch(model, algorithm=_KeepMostAttended.name, ratio=0.8, layers=[0, 2])
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert len(_KeepMostAttended.seen) == 2
        first = _KeepMostAttended.seen[0]
        assert first.shape == (3, 50)
        assert torch.allclose(first.sum(dim=1), torch.ones(3), atol=1e-5)
        assert (first[0, 30:] == 0).all()  # padding gets no attention
        # matches the eager attention probabilities of layer 0, query [CLS], mean over heads
        pitome.unpatch(model)
        model.set_attn_implementation("eager")
        with torch.no_grad():
            probs = model(ids, attention_mask=mask, output_attentions=True).attentions[0]
        assert torch.allclose(first, probs[:, :, 0].mean(dim=1), atol=1e-5)
    finally:
        ALGORITHMS.pop(_KeepMostAttended.name, None)


# --- patch / unpatch / copy / errors ------------------------------------------------------------------------------

def _fingerprint(model):
    return ([type(m) for m in model.modules()],
            [sorted(k for k in m.__dict__ if k.startswith("_pitome")) for m in model.modules()],
            [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()])


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_exactly(family):
    model = _model(family, head="ForSequenceClassification")
    ids, mask = _padded_batch(family)
    before = _fingerprint(model)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    pitome.patch(model, ratio=0.6)
    assert _fingerprint(model) != before
    pitome.unpatch(model)
    assert _fingerprint(model) == before
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
    with pitome.patched(model, ratio=0.6):
        assert pitome.is_patched(model)
    assert _fingerprint(model) == before


def test_deepcopy_is_independent():
    model = _model("bert", head="ForSequenceClassification")
    ids, mask = _padded_batch("bert")
    pitome.patch(model, ratio=0.6)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = clone(ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert pitome.info(clone).tokens_per_layer == pitome.info(model).tokens_per_layer
    pitome.unpatch(clone)
    assert pitome.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, a)
        assert clone(ids, attention_mask=mask).logits.shape == a.shape
    assert pitome.info(model).tokens_per_layer[-1] < ids.shape[1]


def test_torch_save_and_load_of_a_whole_patched_model(tmp_path):
    model = _model("bert", head="ForSequenceClassification")
    ids, mask = _padded_batch("bert")
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        pitome.patch(model, ratio=0.6)
        merged = model(ids, attention_mask=mask).logits
    torch.save(model, tmp_path / "bert.pt")
    loaded = torch.load(tmp_path / "bert.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, merged)
        pitome.unpatch(loaded)
        assert not pitome.is_patched(loaded)
        assert torch.equal(loaded(ids, attention_mask=mask).logits, plain)


def test_unsupported_models_list_what_is_supported():
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="BertModel.*DistilBertModel"):
        pitome.patch(gpt2)
    decoder = _model("bert", is_decoder=True)
    with pytest.raises(UnsupportedModelError, match="decoder"):
        pitome.patch(decoder)


def test_unsupported_attention_backend_and_version(monkeypatch):
    model = _model("bert")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        pitome.patch(model)
    model.config._attn_implementation = "sdpa"
    import sys

    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.46.0")
    with pytest.raises(UnsupportedModelError, match=r"transformers >=5.0,<6, found 4.46.0"):
        pitome.patch(model)
    assert not pitome.is_patched(model)


def test_bad_masks_are_rejected():
    model = _model("bert")
    ids, mask = _padded_batch("bert")
    pitome.patch(model, ratio=0.7)
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=left)
    with pytest.raises(ValueError, match="2-D padding attention_mask"):
        model(ids, attention_mask=mask[:, None, None, :])


def test_compact_padding_keeps_real_tokens_in_order():
    from pitome.config import build_config, resolve
    from pitome.step import ForwardState

    state = ForwardState(settings=resolve(build_config(1, ratio=0.5), 1, 1))
    state.merged = True
    state.valid = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)  # row 0 not a prefix
    state.frozen = torch.tensor([[0, 0, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    state.size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0], [1.0, 3.0, 1.0, 0.0, 1.0]])
    state.source = torch.tensor([[0, 1, 2, 2, 3, 4], [0, 1, 1, 1, 2, 4]])
    x = torch.arange(10.0).view(2, 5, 1)
    out = state.compact_padding(x)
    assert out[..., 0].tolist() == [[0.0, 2.0, 3.0], [5.0, 6.0, 7.0]]
    assert state.valid.tolist() == [[True, True, True], [True, True, False]]
    assert state.frozen.tolist() == [[False, False, True], [False, True, False]]
    assert state.size.tolist() == [[1.0, 2.0, 1.0], [1.0, 3.0, 1.0]]
    assert state.source.tolist() == [[0, -1, 1, 1, 2, -1], [0, 1, 1, 1, 2, -1]]


@pytest.mark.parametrize("head", ["Model", "ForSequenceClassification"])
def test_save_pretrained_of_a_patched_model_saves_the_library_class(tmp_path, head):
    """config.json names the transformers class (not pitome's patched one), the saved weights load into it
    unchanged, and the model stays patched."""
    model = _model("bert", head=head)
    ids = _ids(2, 20)
    pitome.patch(model, algorithm="pitome_text", ratio=0.8)
    merged_out = model(ids)[0]
    model.save_pretrained(tmp_path)
    assert type(model).__name__ == f"PiToMeBert{head}" and pitome.is_patched(model)
    torch.testing.assert_close(model(ids)[0], merged_out)  # still merging
    import json
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [f"Bert{head}"]
    loaded = getattr(transformers, f"AutoModel{'' if head == 'Model' else 'For' + head[3:]}").from_pretrained(
        tmp_path).eval()
    assert type(loaded).__name__ == f"Bert{head}"
    pitome.unpatch(model)
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)
