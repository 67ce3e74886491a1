"""What `pitome eval` prints and draws: readable tables, a conclusion per budget, accuracy and fidelity plots.

Column names are the row keys, the same in the table, rows.csv and results.json. FLOPs: ``gflops`` per item and
``flops_kept`` (fraction of the unmerged model's), shown in tables as "0.57 (-43%)". Rows carry ``items_per_s``
of their one pass; it is not a speed-up measurement (not interleaved, not repeated): ``pitome bench`` is.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any, Optional, Sequence

from ..results import flops_cell

__all__ = ["environment", "plot_task", "format_table", "summary_lines", "METRIC_ORDER"]

METRIC_ORDER = ("top1", "top5", "accuracy", "unparsed", "precision", "recall", "f1", "yes_ratio", "perception",
                "cognition", "visual_tokens", "prefill_gflops", "latency_ms", "probe_acc", "knn_acc", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5",
                "i2t_r10", "rsum", "agreement", "fidelity")


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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[dict], metrics: Sequence[str]) -> str:
    """Fixed-width text table; headers are the row keys."""
    header = ["algorithm", "budget", "gflops", "flops_kept", "items_per_s", *metrics]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["algorithm"], r["budget"], "error: " + r["error"][:70]] + [""] * (len(header) - 3))
            continue
        body.append([r["algorithm"], r["budget"], _fmt(r.get("gflops")), flops_cell(r.get("flops_kept")),
                     _fmt(r.get("items_per_s")), *(_fmt(r.get(m)) for m in metrics)])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def _budget_key(row: dict) -> Any:
    return row.get("matched_ratio") or row.get("ratio") or row.get("budget")


def summary_lines(rows: Sequence[dict], primary: str) -> list[str]:
    """One conclusion per budget: best by the task metric and by fidelity, against the unmerged model."""
    base = next((r for r in rows if r.get("algorithm") == "unmerged" and "error" not in r), None)
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        if row.get("algorithm") != "unmerged" and "error" not in row:
            groups.setdefault(_budget_key(row), []).append(row)
    lines = []
    for key, members in groups.items():
        kept = [r["flops_kept"] for r in members if _finite(r.get("flops_kept"))]
        flops = f" ({flops_cell(sum(kept) / len(kept)).split(' ', 1)[1].strip('()')} FLOPs)" if kept else ""
        parts = []
        for metric in (primary, "fidelity"):
            scored = [r for r in members if _finite(r.get(metric))]
            if not scored:
                continue
            best = max(scored, key=lambda r: r[metric])
            ref = f", unmerged {_fmt(base[metric])}" if base is not None and _finite(base.get(metric)) else ""
            parts.append(f"best {metric}: {best['algorithm']} {_fmt(best[metric])}{ref}")
        label = f"ratio {key:g}" if isinstance(key, float) else str(key)
        lines.append(f"  {label}{flops}: " + "; ".join(parts))
    return lines


def plot_task(rows: Sequence[dict], primary: str, path: Path, title: str, sub: str) -> Optional[Path]:
    """The task metric (left) and fidelity to the unmerged model (right) against GFLOPs per item."""
    from ..plotting import legend_outside, metric_label, pyplot, save, style, titled

    metrics = [m for m in (primary, "fidelity" if any("fidelity" in r for r in rows) else "agreement")
               if any(_finite(r.get(m)) for r in rows)]
    points = [r for r in rows if _finite(r.get("gflops"))]
    if not metrics or not points:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name in dict.fromkeys(r["algorithm"] for r in points):
            mine = sorted((r for r in points if r["algorithm"] == name and _finite(r.get(metric))),
                          key=lambda r: r["gflops"])
            if mine:
                ax.plot([r["gflops"] for r in mine], [r[metric] for r in mine], label=name, **style(name))
        ax.set_xlabel(metric_label("gflops"))
        ax.set_ylabel(metric_label(metric))
        ax.grid(alpha=0.3)
    titled(fig, title, sub)
    legend_outside(fig, list(axes[0]))
    return save(fig, path)
