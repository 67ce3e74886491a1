"""What a task gives the sweep: a model to run, the data in batches, and how to score a pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from .engine import EvalModel, PassResult

__all__ = ["Task", "dataloader_factory", "fixed_batches", "ArrayDataset", "iter_json_lines"]


class Task:
    """One evaluation (model x data x metric). Subclasses fill the attributes and the three methods.

    name:      honest display name, e.g. "BBC News topic, MiniLM-L6 probe" (never a dataset it is not).
    primary:   metric key plotted against GFLOPs.
    pass_key:  tasks with the same key share their passes (same model, data and batches).
    model:     the ``EvalModel`` to run.
    batches:   the dataset split into batches of indices (fixed, so every process count sees the same batches).
    """

    name: str = ""
    primary: str = ""
    pass_key: str = ""
    model: EvalModel
    batches: list[list[int]]

    def loader(self, batches: list[list[int]]) -> Iterable[tuple[Any, Any]]:
        """(inputs, labels) for exactly these batches, in order."""
        raise NotImplementedError

    def lengths(self) -> Optional[list[int]]:
        """Tokens entering the first block per item when unmerged (for FLOPs matching); None = fixed size."""
        return None

    def metrics(self, result: PassResult, reference: Optional[PassResult]) -> dict[str, float]:
        """Metrics of one pass; ``reference`` is the unmerged pass of the same data when the sweep has one."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Model, data, subset sizes and caveats, recorded in the results folder and printed."""
        return {"task": self.name}


def dataloader_factory(dataset: Any, collate: Any, workers: int = 0) -> Any:
    """``loader(batches)`` for ``Task.loader``: a DataLoader over exactly those batches of ``dataset``."""

    def make(batches: list[list[int]]) -> Iterable[tuple[Any, Any]]:
        from torch.utils.data import DataLoader

        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                          persistent_workers=False)

    return make


def fixed_batches(count: int, batch_size: int, order: Optional[list[int]] = None) -> list[list[int]]:
    """Consecutive batches of ``batch_size`` over ``order`` (default 0..count-1); the last may be short."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    items = list(range(count)) if order is None else list(order)
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


class ArrayDataset:
    """(item, label) pairs from two sequences (images as uint8 arrays, texts as strings, ...)."""

    def __init__(self, items: Any, labels: Any) -> None:
        if len(items) != len(labels):
            raise ValueError(f"{len(items)} items but {len(labels)} labels")
        self.items, self.labels = items, labels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.items[index], self.labels[index]


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file, blank lines skipped; errors name the file and line."""
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: each line must be a JSON object")
            yield number, record
