"""Image classification: top-1 / top-5 of a timm or Hugging Face classifier on an ImageNet-style folder
(one sub-folder per class, sorted names = class indices, as ImageNet's synset folders) or a ``datasets`` dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .base import Task, dataloader_factory, fixed_batches
from .hf_data import import_datasets
from .engine import EvalModel, PassResult
from .metrics import topk_accuracy

__all__ = ["ImageClassificationTask", "load_image_dataset", "classifier_eval_model"]

# models load through pitome.loading.load_model(spec, head="classifier")


class _HFImageDataset:
    def __init__(self, data: Any, transform: Callable, image_column: str, label_column: str) -> None:
        self.data, self.transform = data, transform
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        row = self.data[int(index)]
        return self.transform(row[self.image_column].convert("RGB")), int(row[self.label_column])


def load_image_dataset(data: str, transform: Callable, split: str = "validation", image_column: str = "image",
                       label_column: str = "label") -> Any:
    """An ImageNet-style folder (``torchvision.datasets.ImageFolder``) or ``hf:<dataset>[:<config>]``."""
    if data.startswith("hf:"):
        datasets = import_datasets()
        name, _, config = data[3:].partition(":")
        loaded = datasets.load_dataset(name, config or None, split=split)
        for column in (image_column, label_column):
            if column not in loaded.column_names:
                raise ValueError(f"{data}: no column {column!r}; columns: {loaded.column_names}")
        return _HFImageDataset(loaded, transform, image_column, label_column)
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"{data}: not a folder (expected one sub-folder per class) nor 'hf:<dataset>'")
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root), transform=transform)


def classifier_eval_model(model: nn.Module, kind: str = "timm", topk: int = 5) -> EvalModel:
    """Runs the classifier and keeps each item's top-k class indices (best first)."""
    def run(pixels: Tensor) -> Tensor:
        out = model(pixels) if kind == "timm" else model(pixel_values=pixels).logits
        return out.topk(min(topk, out.shape[-1]), dim=-1).indices

    return EvalModel(target=model, run=run, name=type(model).__name__)


def _collate(items: list) -> tuple[Tensor, Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


class ImageClassificationTask(Task):
    """top1 / top5 (%) of a classifier on labelled images."""

    primary = "top1"

    def __init__(self, name: str, model: EvalModel, dataset: Any, batch_size: int = 64, workers: int = 0,
                 limit: Optional[int] = None, info: Optional[dict] = None) -> None:
        count = len(dataset) if not limit else min(limit, len(dataset))
        self.name, self.model, self.dataset = name, model, dataset
        self.batches = fixed_batches(count, batch_size)
        self.pass_key = name
        self._loader = dataloader_factory(dataset, _collate, workers)
        self._info = info or {}

    def loader(self, batches: list[list[int]]) -> Any:
        return self._loader(batches)

    def metrics(self, result: PassResult, reference: Optional[PassResult]) -> dict[str, float]:
        ks = (1, 5) if result.outputs.shape[1] >= 5 else (1,)
        out = topk_accuracy(result.outputs, result.labels, ks)
        if reference is not None:
            out["agreement"] = 100.0 * (result.outputs[:, 0] == reference.outputs[:, 0]).float().mean().item()
        return out

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "items": sum(map(len, self.batches)), **self._info}
