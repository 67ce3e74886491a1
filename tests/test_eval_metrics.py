"""Metrics of `pitome eval` on fixed predictions, against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pitome.tasks.metrics import (accuracy, cosine_fidelity, knn_predict, retrieval_ranks, retrieval_recall,
                                  topk_accuracy)
from pitome.tasks.probe import LinearProbe


def test_topk_accuracy_by_hand():
    top = [[3, 1, 2, 0, 4], [0, 2, 1, 3, 4], [4, 3, 2, 1, 0], [1, 0, 2, 3, 4]]
    labels = [3, 1, 0, 2]
    # item 0: rank 1; item 1: rank 3; item 2: rank 5; item 3: rank 3
    assert topk_accuracy(top, labels, ks=(1, 3, 5)) == {"top1": 25.0, "top3": 75.0, "top5": 100.0}
    with pytest.raises(ValueError, match="top-5"):
        topk_accuracy([[1, 2]], [1], ks=(5,))


def test_accuracy_by_hand():
    assert accuracy([0, 1, 1, 2, 0], [0, 1, 2, 2, 1]) == 60.0
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])


def test_retrieval_recall_karpathy_by_hand():
    # 3 images, 6 captions (2 per image); similarity rows = images, columns = captions
    sim = torch.tensor([
        [0.9, 0.1, 0.8, 0.2, 0.0, 0.3],   # image 0: best caption 0 (own) -> rank 0
        [0.7, 0.6, 0.5, 0.1, 0.65, 0.2],  # image 1: own captions 2 (0.5), 3 (0.1); ranks: 0,4,1,2 -> own at 3
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # image 2: own captions 4, 5 -> caption 5 first -> rank 0
    ])
    caption_image = [0, 0, 1, 1, 2, 2]
    out = retrieval_recall(sim, [0, 1, 2], caption_image)
    # i2t ranks: [0, 3, 0] -> R@1 2/3, R@5 3/3, R@10 3/3
    assert math.isclose(out["i2t_r1"], 200 / 3) and out["i2t_r5"] == 100.0 and out["i2t_r10"] == 100.0
    # t2i: caption columns; caption 0 -> images by score [0 (0.9), 1, 2] own 0 -> rank 0
    # caption 1: scores [0.1, 0.6, 0.2] own image 0 -> rank 2; caption 2: [0.8, 0.5, 0.3] own 1 -> rank 1
    # caption 3: [0.2, 0.1, 0.4] own 1 -> rank 2; caption 4: [0.0, 0.65, 0.5] own 2 -> rank 1
    # caption 5: [0.3, 0.2, 0.6] own 2 -> rank 0 => R@1 = 2/6
    assert math.isclose(out["t2i_r1"], 100 / 3) and out["t2i_r5"] == 100.0
    assert math.isclose(out["rsum"], 200 / 3 + 100 + 100 + 100 / 3 + 100 + 100)


def test_retrieval_ties_are_broken_by_index_and_missing_relevance_is_an_error():
    sim = torch.zeros(2, 2)
    ranks = retrieval_ranks(sim, torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert ranks.tolist() == [0, 1]
    with pytest.raises(ValueError, match="no relevant"):
        retrieval_recall(sim, [0, 1], [0, 0])
    with pytest.raises(ValueError, match="images"):
        retrieval_recall(torch.zeros(3, 2), [0, 1], [0, 1])


def test_class_level_relevance():
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.4, 0.35]])
    out = retrieval_recall(sim, image_labels=[0, 1, 1], text_labels=[0, 1], ks=(1,))
    # images: 0 -> caption 0 ok; 1 -> caption 1 ok; 2 -> caption 0 (wrong class) -> 2/3
    assert math.isclose(out["i2t_r1"], 200 / 3)
    # captions: caption 0 -> image 0 ok; caption 1 -> image 2 (0.35, class 1) ok
    assert out["t2i_r1"] == 100.0


def test_knn_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 1.0]])
    pred = knn_predict(train, labels, test, k=2)
    assert pred[:2].tolist() == [0, 1]
    # the third point is equidistant from the two classes' nearest neighbours -> tie -> smaller class
    assert knn_predict(train[[0, 2]], labels[[0, 2]], test[2:], k=2).tolist() == [0]


def test_cosine_fidelity():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert cosine_fidelity(a, b) == 0.5
    with pytest.raises(ValueError):
        cosine_fidelity(a, b[:1])


def test_linear_probe_separable_and_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 0.3, (20, 3)), rng.normal(2, 0.3, (20, 3)), rng.normal((4, -4, 0), 0.3, (20, 3))])
    y = np.repeat([0, 1, 2], 20)
    probe = LinearProbe.fit(x, y)
    assert accuracy(probe.predict(x), y) == 100.0
    probe.save(tmp_path / "p.npz")
    again = LinearProbe.load(tmp_path / "p.npz")
    assert torch.equal(again.logits(x), probe.logits(x))
    binary = LinearProbe.fit(x[:40], y[:40])
    assert binary.weight.shape[0] == 2 and accuracy(binary.predict(x[:40]), y[:40]) == 100.0
