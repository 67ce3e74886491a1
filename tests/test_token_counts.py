"""One token-count rule: what ``pitome.predict_token_counts`` says is what a forward does, for every algorithm.

With padding, prediction is per sample: each sample's real tokens follow the prediction for its own length
(``frozen=1`` for a text model's final [SEP]); the batch is as wide as its widest sample.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import pitome
from pitome.schedule import resolve_budgets
from pitome.step import record_merges

BUDGETS = [dict(ratio=0.3), dict(ratio=0.5), dict(ratio=0.9), dict(r=[8, 0, 30, 5]), dict(r=20)]


def _label(budget: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in budget.items())


@pytest.mark.parametrize("budget", BUDGETS, ids=_label)
@pytest.mark.parametrize("algorithm", pitome.available_algorithms())
def test_timm_counts_equal_the_prediction(algorithm, budget, make_vit, images):
    model = make_vit()
    pitome.patch(model, algorithm=algorithm, seed=0, **budget)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # budgets above an algorithm's cap warn; the cap is what is tested
        model(images(2))
    counts = pitome.info(model).tokens_per_layer
    assert counts == pitome.predict_token_counts(pitome.settings(model), 65)
    assert counts == pitome.predict_token_counts(resolve_budgets(4, **budget), 65, 1, algorithm=algorithm)


def test_the_prediction_knows_each_algorithms_cap():
    """dct / kth / evit / diffrate can remove more than half the tokens in one step (4-block ViT, ratio 0.4)."""
    budgets = resolve_budgets(4, ratio=0.4)
    assert pitome.predict_token_counts(budgets, 65, 1, algorithm="dct") == [65, 27, 12, 6, 3]
    assert pitome.predict_token_counts(budgets, 65, 1, algorithm="tome") == [65, 33, 17, 9, 5]


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS, ids=_label)
@pytest.mark.parametrize("algorithm", pitome.available_algorithms())
def test_padded_text_counts_per_sample_equal_the_prediction(algorithm, budget):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    model = transformers.BertModel(config).eval()
    lengths = (30, 50, 17)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    gen = torch.Generator().manual_seed(1)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, 100, (n,), generator=gen)
        mask[row, :n] = 1
    pitome.patch(model, algorithm=algorithm, seed=0, **budget)
    entering: dict[int, list[int]] = {}

    def record(state, layer, metric, plan):
        entering[layer] = state.valid.sum(dim=1).tolist()

    with warnings.catch_warnings(), torch.no_grad(), record_merges(record):
        warnings.simplefilter("ignore")
        model(input_ids=ids, attention_mask=mask)
    predicted = [pitome.predict_token_counts(pitome.settings(model), n, frozen=1) for n in lengths]
    for layer, counts in entering.items():
        assert counts == [p[layer] for p in predicted], (layer, counts)
    info = pitome.info(model)
    assert info.valid.sum(dim=1).tolist() == [p[-1] for p in predicted]
    assert info.tokens_per_layer == [max(p[i] for p in predicted) for i in range(5)]


@pytest.mark.parametrize("length", [8, 12, 16, 17, 24, 33])
@pytest.mark.parametrize("ratio", [0.6, 0.7, 0.8, 0.9])
def test_bert_preset_follows_the_official_rule(length, ratio):
    """Official BERT code: r = floor(T - T * rho) with T the tokens after [CLS], the final [SEP] included
    (it stays unmerged). 16 tokens at rho 0.8: 16 -> 13 -> 11 -> 9."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    model = transformers.BertModel(config).eval()
    pitome.patch(model, preset="bert", ratio=ratio)
    ids = torch.randint(5, 100, (1, length), generator=torch.Generator().manual_seed(length))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # no cap applies at these settings: the rule alone decides
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    expected = [length]
    for _ in range(3):  # the preset merges in the first 3 blocks
        t = expected[-1] - 1
        expected.append(expected[-1] - math.floor(t - t * ratio))
    assert pitome.info(model).tokens_per_layer == expected + [expected[-1]]
    if (length, ratio) == (16, 0.8):
        assert expected == [16, 13, 11, 9]
