"""Results that survive: a run's folder is created (and printed) at start, rows are appended as they finish.

    folder = ResultsFolder.create("pitome-results", "eval offline")   # ./pitome-results/20261130-081500-eval-offline
    folder.write_json("config.json", {...})
    folder.append(row)            # rows.jsonl gets one line, rows.csv is rewritten (columns may grow)
    folder.path_for("plot.png")

A run killed after k rows leaves k rows in ``rows.jsonl`` and ``rows.csv``. JSON values that are not finite
(NaN, inf) are written as null; lists and dicts go to the CSV as JSON text.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from .cli.errors import UserError

__all__ = ["ResultsFolder", "slug", "clean", "flops_cell", "ROWS_JSONL", "ROWS_CSV"]

ROWS_JSONL = "rows.jsonl"
ROWS_CSV = "rows.csv"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "run"


def clean(value: Any) -> Any:
    """JSON-safe: non-finite floats -> None, tuples -> lists, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def flops_cell(kept: Any) -> str:
    """``flops_kept`` as every table shows it: 0.568 -> '0.57 (-43%)' (the fraction kept, and the change)."""
    if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not math.isfinite(kept):
        return "-"
    return f"{kept:.2f} ({(kept - 1) * 100:+.0f}%)".replace("(+0%)", "(±0%)").replace("(-0%)", "(±0%)")


def _csv_cell(value: Any) -> Any:
    value = clean(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else value


class ResultsFolder:
    """One run's output folder; ``rows`` holds what was appended so far."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []
        self._columns: list[str] = []

    @classmethod
    def create(cls, parent: Union[str, Path], name: str, stamp: Optional[str] = None) -> "ResultsFolder":
        """A new folder ``parent/<date>-<time>-<name>`` (suffix -2, -3... if taken). Unwritable parent: UserError."""
        stamp = stamp or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(parent).expanduser() / f"{stamp}-{slug(name)}"
        candidate, n = base, 1
        while True:
            try:
                candidate.mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                candidate = base.with_name(f"{base.name}-{n}")
            except OSError as exc:
                raise UserError(f"cannot create the results folder in {parent}: {exc.strerror or exc}") from None
        if not os.access(candidate, os.W_OK):
            raise UserError(f"cannot write to the results folder {candidate}")
        return cls(candidate.resolve())

    @staticmethod
    def check_parent(parent: Union[str, Path]) -> None:
        """Fail early (before loading anything) when ``parent`` cannot hold a results folder."""
        path = Path(parent).expanduser()
        probe = path
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise UserError(f"--out {parent}: {probe} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UserError(f"--out {parent}: {probe} is not writable")

    def discard_if_empty(self) -> bool:
        """Remove the folder when a run failed before its first row (keeps no empty folders); True if removed."""
        if self.rows:
            return False
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
        return True

    def path_for(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: Any) -> Path:
        path = self.path / name
        path.write_text(json.dumps(clean(data), indent=2, default=str) + "\n", encoding="utf-8")
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text, encoding="utf-8")
        return path

    def append(self, row: dict) -> None:
        """Add one finished row: a line in rows.jsonl (flushed to disk), rows.csv rewritten atomically."""
        row = dict(row)
        self.rows.append(row)
        with (self.path / ROWS_JSONL).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean(row), default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._columns.extend(k for k in row if k not in self._columns)
        self._write_csv()

    def extend(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.append(row)

    def _write_csv(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self._columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})
        tmp = self.path / (ROWS_CSV + ".tmp")
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
        os.replace(tmp, self.path / ROWS_CSV)

    @staticmethod
    def read_rows(path: Union[str, Path]) -> list[dict]:
        """The rows of a results folder (from rows.jsonl; a torn last line from a kill is skipped)."""
        rows = []
        for line in (Path(path) / ROWS_JSONL).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def __str__(self) -> str:
        return str(self.path)
