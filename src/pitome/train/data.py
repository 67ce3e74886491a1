"""Training and evaluation data for `pitome train`: an image folder / ``hf:`` image dataset, or a text file /
``hf:`` text dataset, each with a collate that turns items into model inputs (pixels, or padded token ids)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..tasks.base import ArrayDataset

__all__ = ["ClassificationData", "image_data", "image_classes", "read_text_sets", "text_data", "pil_transform"]


@dataclass
class ClassificationData:
    train: Any
    val: Any
    collate: Callable[[list], tuple[Any, torch.Tensor]]
    num_classes: int
    text: bool
    val_batches: Optional[list[list[int]]] = None


def pil_transform(size: tuple, mean: Any, std: Any) -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised (3, H, W) float tensor (bilinear resize; for models without their own transform)."""
    mean_t, std_t = torch.tensor(list(mean)).view(3, 1, 1), torch.tensor(list(std)).view(3, 1, 1)

    def transform(image: Any) -> torch.Tensor:
        array = np.asarray(image.convert("RGB").resize((size[1], size[0])), dtype=np.uint8)
        return (torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255.0) - mean_t) / std_t

    return transform


def _stack(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def image_classes(dataset: Any, label_column: str = "label") -> int:
    """Number of classes without decoding any image: an ImageFolder's class folders, or a ``datasets`` column."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    data = getattr(dataset, "data", None)
    feature = getattr(getattr(data, "features", {}), "get", lambda _: None)(label_column)
    if getattr(feature, "num_classes", None):
        return int(feature.num_classes)
    return int(max(data[label_column])) + 1


def image_data(train: str, val: str, split: str, val_split: str, image_column: str,
               label_column: str) -> tuple[ClassificationData, list]:
    """The datasets and their class count; the transform is set later (it comes with the model): fill slot [0]."""
    from ..tasks.image_classification import load_image_dataset

    slot: list = [None]

    def transform(image: Any) -> torch.Tensor:
        return slot[0](image)

    train_set = load_image_dataset(train, transform, split, image_column, label_column)
    val_set = load_image_dataset(val, transform, val_split, image_column, label_column)
    return ClassificationData(train_set, val_set, _stack, image_classes(train_set, label_column), text=False), slot


def read_text_sets(train: str, val: str, split: str, val_split: str, text_column: str,
                   label_column: str) -> tuple[list[tuple[list[str], np.ndarray]], int]:
    """[(texts, labels)] for train and validation, and the class count; labels must be 0..K-1."""
    from ..tasks.text_classification import load_text_data

    sets = []
    for source, which in ((train, split), (val, val_split)):
        examples = load_text_data(source, which, text_column, label_column)
        labels = []
        for index, label in enumerate(examples.labels):
            if isinstance(label, bool) or not (isinstance(label, int) or str(label).isdigit()):
                raise ValueError(f"{source}: label {label!r} of example {index} is not a class index (0, 1, ...)")
            labels.append(int(label))
        sets.append((list(examples.texts), np.asarray(labels, dtype=np.int64)))
    return sets, int(max(int(labels.max()) for _, labels in sets)) + 1


def text_data(sets: list[tuple[list[str], np.ndarray]], count: int, tokenizer: Any, max_length: int,
              eval_batch: int = 32) -> ClassificationData:
    """Tokenised once up front; validation batches length-sorted (little padding)."""
    from ..tasks.offline import text_collate

    tokenized = [(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"], labels)
                 for texts, labels in sets]
    lengths = [len(i) for i in tokenized[1][0]]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return ClassificationData(ArrayDataset(*tokenized[0]), ArrayDataset(*tokenized[1]), text_collate(tokenizer),
                              count, text=True,
                              val_batches=[order[i:i + eval_batch] for i in range(0, len(order), eval_batch)])
