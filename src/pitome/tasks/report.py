"""Results of a run: a folder with the full configuration, JSON, CSV, PNG plots and readable tables."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import platform
import re
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["results_dir", "environment", "write_results", "plot_rows", "format_table", "slug"]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "run"


def results_dir(base: str | Path, name: str) -> Path:
    """A new folder ``base/<date>-<time>-<name>`` (a numeric suffix if it exists already)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(base) / f"{stamp}-{slug(name)}"
    candidate, n = folder, 1
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def environment() -> dict[str, Any]:
    """Versions and machine, recorded with every run."""
    import numpy
    import torch

    import pitome

    env: dict[str, Any] = {"pitome": pitome.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
                           "python": platform.python_version(), "platform": platform.platform(),
                           "threads": torch.get_num_threads(),
                           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for name in ("timm", "transformers", "sklearn"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return env


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_results(folder: Path, rows: Sequence[dict], config: dict, tasks: Sequence[dict] = ()) -> dict[str, Path]:
    """config.json (the full configuration + environment), results.json and results.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"config": folder / "config.json", "json": folder / "results.json", "csv": folder / "results.csv"}
    paths["config"].write_text(json.dumps(_clean({**config, "environment": environment()}), indent=2, default=str))
    paths["json"].write_text(json.dumps(_clean({"tasks": list(tasks), "rows": list(rows)}), indent=2, default=str))
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return paths


def plot_rows(rows: Sequence[dict], metric: str, path: Path, title: str) -> Optional[Path]:
    """Metric against GFLOPs per item: one curve per algorithm, the unmerged model as a star.

    Returns None (and writes nothing) when matplotlib is not installed or no row has the metric.
    """
    points = [r for r in rows if isinstance(r.get(metric), (int, float)) and isinstance(r.get("gflops"), (int, float))
              and math.isfinite(r[metric]) and math.isfinite(r["gflops"])]
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for name in dict.fromkeys(r["algorithm"] for r in points):
        mine = sorted((r for r in points if r["algorithm"] == name), key=lambda r: r["gflops"])
        xs, ys = [r["gflops"] for r in mine], [r[metric] for r in mine]
        if name == "unmerged":
            ax.scatter(xs, ys, marker="*", s=160, color="black", zorder=5, label="unmerged")
        else:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("GFLOPs per item (MACs of the encoder blocks)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[dict], metrics: Sequence[str]) -> str:
    """A fixed-width text table: algorithm, budget, GFLOPs, items/s, speed-up, then the given metrics."""
    header = ["algorithm", "budget", "GFLOPs", "FLOPs x", "items/s", "speed-up", *metrics]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["algorithm"], r["budget"], "error: " + r["error"][:60]] + [""] * (len(header) - 3))
            continue
        flops_x = 1 / r["flops_ratio"] if r.get("flops_ratio") else None
        body.append([r["algorithm"], r["budget"], _fmt(r.get("gflops")), _fmt(flops_x), _fmt(r.get("items_per_s")),
                     _fmt(r.get("speedup")), *(_fmt(r.get(m)) for m in metrics)])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in body]
    return "\n".join(lines)
