"""Task metrics on fixed predictions / embeddings: top-k accuracy, retrieval recall@k, k-NN, fidelity.

All metrics are percentages (0-100), as in the paper's tables. Pure torch; deterministic tie handling.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["topk_correct", "topk_accuracy", "accuracy", "retrieval_ranks", "retrieval_recall",
           "knn_predict", "cosine_fidelity", "l2_normalize"]

ArrayLike = Union[Tensor, np.ndarray, Sequence]


def _tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def topk_correct(topk_indices: ArrayLike, labels: ArrayLike) -> Tensor:
    """(n, k) bool: whether the label is among the first j+1 predictions, for j = 0..k-1."""
    top, y = _tensor(topk_indices).long(), _tensor(labels).long()
    if top.ndim != 2 or y.ndim != 1 or len(top) != len(y):
        raise ValueError(f"need (n, k) predictions and (n,) labels, got {tuple(top.shape)} and {tuple(y.shape)}")
    return (top == y.unsqueeze(1)).cumsum(dim=1) > 0


def topk_accuracy(topk_indices: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{'top1': %, 'top5': %} from each item's top-k predicted classes (best first)."""
    hits = topk_correct(topk_indices, labels)
    out = {}
    for k in ks:
        if k > hits.shape[1]:
            raise ValueError(f"top-{k} needs at least {k} predictions per item, got {hits.shape[1]}")
        out[f"top{k}"] = _percent(hits[:, k - 1])
    return out


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    p, y = _tensor(predictions).long().flatten(), _tensor(labels).long().flatten()
    if p.shape != y.shape:
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    return _percent(p == y)


def _percent(hits: Tensor) -> float:
    """100 * share of True, exact in float64 (nan for no items)."""
    return 100.0 * int(hits.sum()) / len(hits) if len(hits) else float("nan")


def l2_normalize(x: Tensor, dim: int = -1) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=dim)


def retrieval_ranks(scores: Tensor, query_labels: Tensor, gallery_labels: Tensor, chunk: int = 1024) -> Tensor:
    """Rank (0 = first) of the best-placed relevant gallery item for each query.

    Relevant = same label (Karpathy format: gallery/query labels are image ids). The gallery is ordered by
    descending score with ties broken by gallery index (a stable sort), so results are deterministic.
    """
    ranks = []
    for start in range(0, scores.shape[0], chunk):
        block = scores[start:start + chunk].float()
        order = torch.sort(block, dim=1, descending=True, stable=True).indices
        relevant = gallery_labels[order] == query_labels[start:start + chunk].unsqueeze(1)
        if not bool(relevant.any(dim=1).all()):
            raise ValueError("a query has no relevant item in the gallery; check the caption/image labels")
        ranks.append(relevant.float().argmax(dim=1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def retrieval_recall(
    similarity: ArrayLike, image_labels: ArrayLike, text_labels: ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways and Rsum from an (images x texts) similarity matrix.

    i2t_r{k} (the paper's "Rt", text retrieval): image queries, a hit if a caption of that image is in the
    top k. t2i_r{k} ("Ri", image retrieval): caption queries. rsum = the sum of all six (ks = 1, 5, 10).
    """
    sim = _tensor(similarity).float()
    img, txt = _tensor(image_labels).long(), _tensor(text_labels).long()
    if sim.shape != (len(img), len(txt)):
        raise ValueError(f"similarity is {tuple(sim.shape)} but there are {len(img)} images and {len(txt)} texts")
    i2t = retrieval_ranks(sim, img, txt)
    t2i = retrieval_ranks(sim.t(), txt, img)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = _percent(ranks < k)
    out["rsum"] = sum(v for v in out.values())
    return out


def knn_predict(
    train: ArrayLike, train_labels: ArrayLike, test: ArrayLike, k: int = 20, temperature: float = 0.07,
    num_classes: int | None = None, chunk: int = 1024,
) -> Tensor:
    """Weighted k-NN on cosine similarity (each neighbour votes exp(sim / T)), as in DINO's evaluation.

    Ties between classes go to the smaller class index; neighbour ties to the smaller train index.
    """
    tr, te = l2_normalize(_tensor(train)), l2_normalize(_tensor(test))
    y = _tensor(train_labels).long()
    if len(tr) != len(y):
        raise ValueError(f"{len(tr)} train features for {len(y)} labels")
    k = min(k, len(tr))
    classes = num_classes or int(y.max()) + 1
    preds = []
    for start in range(0, len(te), chunk):
        sim = te[start:start + chunk] @ tr.t()
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
        weights = torch.exp(sim.gather(1, order) / temperature)
        votes = torch.zeros(len(sim), classes).scatter_add_(1, y[order], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def cosine_fidelity(merged: ArrayLike, reference: ArrayLike) -> float:
    """Mean cosine similarity between each merged embedding and the unmerged embedding of the same item."""
    a, b = _tensor(merged).float(), _tensor(reference).float()
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
