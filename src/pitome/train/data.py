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
    _align_folder_classes(train_set, val_set, val)
    return ClassificationData(train_set, val_set, _stack, image_classes(train_set, label_column), text=False), slot


def _align_folder_classes(train_set: Any, val_set: Any, val: str) -> None:
    """Validation folders label by class *name*: an image folder numbers its own sub-folders 0, 1, ..., so a
    validation folder with other or fewer classes would silently mislabel. Its labels are mapped to the training
    folder's classes; a class the training folder lacks is an error."""
    train_classes, val_classes = getattr(train_set, "classes", None), getattr(val_set, "classes", None)
    if train_classes is None or val_classes is None or list(val_classes) == list(train_classes):
        return
    unknown = [name for name in val_classes if name not in train_set.class_to_idx]
    if unknown:
        raise ValueError(f"{val}: class folder(s) {', '.join(unknown)} are not among the training classes "
                         f"({', '.join(train_classes)})")
    remap = [train_set.class_to_idx[name] for name in val_classes]
    val_set.samples = [(path, remap[index]) for path, index in val_set.samples]
    val_set.imgs = val_set.samples
    val_set.targets = [target for _, target in val_set.samples]
    val_set.classes, val_set.class_to_idx = list(train_classes), dict(train_set.class_to_idx)


def read_text_sets(train: str, val: str, split: str, val_split: str, text_column: str, label_column: str
                   ) -> tuple[list[tuple[list[str], np.ndarray]], int, Optional[list[str]]]:
    """[(texts, labels)] for train and validation, the class count, and the class names.

    Labels are class indices 0..K-1 (integers or integer strings; names None), or names ('positive', 'sport', ...):
    then class i is the i-th name of the training labels in sorted order, and a validation label must be one of them.
    """
    from ..tasks.text_classification import load_text_data

    loaded = [(source, load_text_data(source, which, text_column, label_column))
              for source, which in ((train, split), (val, val_split))]
    indices = all(_is_index(label) for _, examples in loaded for label in examples.labels)
    names = None if indices else sorted({str(label) for label in loaded[0][1].labels})
    lookup = {name: i for i, name in enumerate(names or [])}
    sets = []
    for source, examples in loaded:
        labels = []
        for index, label in enumerate(examples.labels):
            if isinstance(label, bool):
                raise ValueError(f"{source}: label {label!r} of example {index} is not a class")
            if names is None:
                labels.append(int(label))
            elif str(label) in lookup:
                labels.append(lookup[str(label)])
            else:
                raise ValueError(f"{source}: label {label!r} of example {index} is not a class of the training data "
                                 f"(classes: {', '.join(names)})")
        sets.append((list(examples.texts), np.asarray(labels, dtype=np.int64)))
    count = len(names) if names else int(max(int(labels.max()) for _, labels in sets if len(labels))) + 1
    if count < 2:
        raise ValueError(f"{train}: the training labels hold one class ({names[0] if names else 0}); "
                         f"classification needs at least 2")
    return sets, count, names


def _is_index(label: Any) -> bool:
    return not isinstance(label, bool) and (isinstance(label, (int, np.integer)) or str(label).isdigit())


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
