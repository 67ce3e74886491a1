"""Text classification: accuracy of a Hugging Face sequence classifier on CSV / TSV / JSONL files or a
``datasets`` dataset. Batches are sorted by length (little padding); FLOPs are those of the padded batches.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import ArrayDataset, Task, dataloader_factory, fixed_batches, iter_json_lines
from .hf_data import import_datasets
from .engine import EvalModel, PassResult
from .metrics import accuracy

__all__ = ["TextExamples", "read_text_file", "load_text_data", "TextClassificationTask",
           "map_labels"]


@dataclass
class TextExamples:
    texts: list[str]
    labels: list[Any]
    pairs: Optional[list[str]] = None
    source: str = ""


def _check_columns(path: Path, line: int, present: Sequence[str], wanted: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(f"{path}, line {line}: no column {', '.join(map(repr, missing))}; "
                         f"found {', '.join(map(repr, present))}")


def read_text_file(path: str | Path, text_column: str = "text", label_column: str = "label",
                   pair_column: Optional[str] = None) -> TextExamples:
    """CSV (``.csv``), TSV (``.tsv``) with a header, or JSON Lines (``.jsonl``); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    wanted = [text_column, label_column] + ([pair_column] if pair_column else [])
    texts: list[str] = []
    labels: list[Any] = []
    pairs: list[str] = []
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for line_no, row in iter_json_lines(path):
            _check_columns(path, line_no, list(row), wanted)
            _append(path, line_no, row, texts, labels, pairs, text_column, label_column, pair_column)
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",", strict=True)
            try:
                fields = reader.fieldnames or []
            except csv.Error as error:
                raise ValueError(f"{path}, line 1: malformed {suffix[1:].upper()} header ({error})") from None
            _check_columns(path, 1, fields, wanted)
            while True:
                start = reader.line_num + 1  # a quoted field may span lines: report where the record starts
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:
                    raise ValueError(f"{path}, line {start}: malformed {suffix[1:].upper()} ({error})") from None
                if None in row or any(v is None for v in row.values()):
                    raise ValueError(f"{path}, line {start}: expected {len(fields)} fields ({', '.join(fields)})")
                _append(path, start, row, texts, labels, pairs, text_column, label_column, pair_column)
    else:
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv or .jsonl")
    if not texts:
        raise ValueError(f"{path}: no examples")
    return TextExamples(texts, labels, pairs if pair_column else None, str(path))


def _append(path: Path, line: int, row: dict, texts: list, labels: list, pairs: list, text_column: str,
            label_column: str, pair_column: Optional[str]) -> None:
    text = row[text_column]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{path}, line {line}: empty or non-text {text_column!r}")
    label = row[label_column]
    if label is None or (isinstance(label, str) and not label.strip()):
        raise ValueError(f"{path}, line {line}: missing {label_column!r}")
    texts.append(text)
    labels.append(label.strip() if isinstance(label, str) else label)
    if pair_column:
        pair = row[pair_column]
        if not isinstance(pair, str):
            raise ValueError(f"{path}, line {line}: {pair_column!r} must be text")
        pairs.append(pair)


def load_text_data(data: str, split: str = "validation", text_column: str = "text", label_column: str = "label",
                   pair_column: Optional[str] = None) -> TextExamples:
    """A file (see ``read_text_file``) or ``hf:<dataset>[:<config>]`` (e.g. ``hf:glue:sst2``, ``hf:imdb``)."""
    if not data.startswith("hf:"):
        return read_text_file(data, text_column, label_column, pair_column)
    datasets = import_datasets()
    name, _, config = data[3:].partition(":")
    loaded = datasets.load_dataset(name, config or None, split=split)
    wanted = [text_column, label_column] + ([pair_column] if pair_column else [])
    missing = [c for c in wanted if c not in loaded.column_names]
    if missing:
        raise ValueError(f"{data}: no column {missing}; columns: {loaded.column_names}")
    return TextExamples(list(loaded[text_column]), list(loaded[label_column]),
                        list(loaded[pair_column]) if pair_column else None, data)


def map_labels(labels: Sequence[Any], label2id: Optional[dict], num_labels: int, source: str = "") -> list[int]:
    """Integers (or integer strings) pass through; names map through the model's ``label2id`` (case-insensitive)."""
    lookup = {str(k).lower(): int(v) for k, v in (label2id or {}).items()}
    out = []
    for index, label in enumerate(labels):
        if isinstance(label, bool):
            raise ValueError(f"{source}: label {label!r} of example {index} is not a class")
        if isinstance(label, int) or (isinstance(label, str) and label.lstrip("-").isdigit()):
            value = int(label)
        elif str(label).lower() in lookup:
            value = lookup[str(label).lower()]
        else:
            raise ValueError(f"{source}: label {label!r} of example {index} is not a class of the model "
                             f"(classes: {sorted(lookup) or list(range(num_labels))})")
        if not 0 <= value < num_labels:
            raise ValueError(f"{source}: label {value} of example {index} is outside the model's {num_labels} classes")
        out.append(value)
    return out


class TextClassificationTask(Task):
    """Accuracy (%) of a sequence classifier; length-sorted batches, dynamic padding, ``max_length`` truncation."""

    primary = "accuracy"

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, examples: TextExamples, batch_size: int = 32,
                 max_length: int = 512, limit: Optional[int] = None, workers: int = 0,
                 info: Optional[dict] = None) -> None:
        count = len(examples.texts) if not limit else min(limit, len(examples.texts))
        config = getattr(model, "config", None)
        num_labels = int(getattr(config, "num_labels", 0) or 0)
        labels = map_labels(examples.labels[:count], getattr(config, "label2id", None), num_labels or 10**9,
                            examples.source)
        args = [examples.texts[:count]] + ([examples.pairs[:count]] if examples.pairs else [])
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        encoded = [{k: enc[k][i] for k in keys} for i in range(count)]
        self.name, self.tokenizer, self.pass_key = name, tokenizer, name
        self._lengths = [len(item["input_ids"]) for item in encoded]
        order = sorted(range(count), key=lambda i: (-self._lengths[i], i))
        self.batches = fixed_batches(count, batch_size, order)
        self._loader = dataloader_factory(ArrayDataset(encoded, labels), self._collate, workers)
        self._info = {"max_length": max_length, "mean_tokens": sum(self._lengths) / max(count, 1), **(info or {})}

        def run(inputs: dict) -> Tensor:
            return model(**inputs).logits.argmax(dim=-1)

        self.model = EvalModel(target=model, run=run, seq_len=lambda inputs: int(inputs["input_ids"].shape[1]),
                               name=type(model).__name__)

    def _collate(self, items: list) -> tuple[dict, Tensor]:
        padded = self.tokenizer.pad([dict(item) for item, _ in items], return_tensors="pt")
        return dict(padded), torch.tensor([label for _, label in items])

    def loader(self, batches: list[list[int]]) -> Any:
        return self._loader(batches)

    def lengths(self) -> Optional[list[int]]:
        return self._lengths

    def metrics(self, result: PassResult, reference: Optional[PassResult]) -> dict[str, float]:
        out = {"accuracy": accuracy(result.outputs, result.labels)}
        if reference is not None:
            out["agreement"] = accuracy(result.outputs, reference.outputs)
        return out

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "items": sum(map(len, self.batches)), **self._info}
