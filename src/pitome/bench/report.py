"""What bench writes: Markdown tables with a conclusion per model and batch, JSON / CSV rows, a throughput plot.

Column names are the row keys in every format. FLOPs: ``gflops`` and ``flops_kept`` ("0.57 (-43%)" in tables).
Speed-ups carry their spread (quartiles of the paired per-repetition ratios) and the repetition count.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..results import clean, flops_cell

__all__ = ["BenchResult", "format_markdown", "conclusions", "plot_throughput"]


@dataclass
class BenchResult:
    """Rows (one dict per model x batch size x setting) and metadata; writers for Markdown, JSON, CSV, PNG."""

    rows: list[dict]
    meta: dict

    def to_json(self, path: Optional[Union[str, Path]] = None) -> str:
        text = json.dumps(clean({"meta": self.meta, "rows": self.rows}), indent=2, default=str)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_csv(self, path: Optional[Union[str, Path]] = None) -> str:
        buffer = io.StringIO()
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
        if path is not None:
            Path(path).write_text(buffer.getvalue())
        return buffer.getvalue()

    def to_markdown(self, path: Optional[Union[str, Path]] = None) -> str:
        text = format_markdown(self.rows, self.meta)
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, path: Union[str, Path]) -> Path:
        return plot_throughput(self.rows, self.meta, path)


def _fmt(value: Any, spec: str = ".2f", none: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def _groups(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["batch"], row["device"], row["dtype"]), []).append(row)
    return groups


def conclusions(rows: Sequence[dict]) -> list[str]:
    """Per model and batch: the fastest merged setting, its speed-up with spread, and its FLOPs."""
    lines = []
    for (model, batch, device, dtype), members in _groups(rows).items():
        merged = [r for r in members if r["algorithm"] is not None and r["flops_kept"] < 1]
        if not merged:
            continue
        best = max(merged, key=lambda r: r["speedup"])
        verdict = "fastest" if best["speedup_q1"] > 1 else "no merged setting is clearly faster; best"
        lines.append(f"{model} b{batch} {device} {dtype}: {verdict} {best['variant']}: {best['speedup']:.2f}x "
                     f"(quartiles {best['speedup_q1']:.2f}-{best['speedup_q3']:.2f}, {best['reps']} interleaved reps) "
                     f"at {flops_cell(best['flops_kept'])} FLOPs kept"
                     + ("; RANDOM weights: speed only, no accuracy" if best.get("random_weights") else ""))
    return lines


def format_markdown(rows: Sequence[dict], meta: dict) -> str:
    """One table per model, batch size, device and dtype, then the conclusions."""
    lines = [f"pitome bench: {meta.get('device_name', '')}, torch {meta.get('torch')}, "
             f"{meta.get('threads')} CPU threads, warm-up {meta.get('warmup')}, median of {meta.get('reps')} "
             f"interleaved repetitions (items_per_s: quartiles in brackets; speedup: quartiles of the paired "
             f"per-repetition ratios). gflops = 1e9 multiply-accumulates per item (the papers' convention), incl. "
             f"merge steps, stem and head.", ""]
    check = any(r.get("flop_counter_gflops") is not None for r in rows)
    for (model, batch, device, dtype), members in _groups(rows).items():
        first = members[0]
        weights = ("RANDOM weights: " if first.get("random_weights") else "") + first["weights"]
        lines += [f"**{model}** ({weights}; {first['inputs']}, {first['tokens_per_layer'][0]} tokens), "
                  f"{device} {dtype}, batch {batch}", ""]
        head = ["variant", "items_per_s", "speedup", "ideal_speedup", "achieved_over_ideal", "gflops", "flops_kept",
                "latency_ms", "peak_mem_mb", "merge_share", "merge_ms", "tokens"]
        if check:
            head.insert(6, "flop_counter_gflops")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in members:
            tokens = row["tokens_per_layer"]
            cells = {
                "variant": row["variant"],
                "items_per_s": f"{_fmt(row['items_per_s'], '.1f')} ({_fmt(row['items_per_s_q1'], '.1f')}–"
                               f"{_fmt(row['items_per_s_q3'], '.1f')})",
                "speedup": f"{_fmt(row['speedup'], '.2f')} ({_fmt(row['speedup_q1'], '.2f')}–"
                           f"{_fmt(row['speedup_q3'], '.2f')})",
                "ideal_speedup": _fmt(row["ideal_speedup"], ".2f"),
                "achieved_over_ideal": _fmt(row["achieved_over_ideal"], ".2f"),
                "gflops": _fmt(row["gflops"], ".3f"), "flops_kept": flops_cell(row["flops_kept"]),
                "flop_counter_gflops": _fmt(row.get("flop_counter_gflops"), ".3f"),
                "latency_ms": _fmt(row["latency_ms"], ".1f"), "peak_mem_mb": _fmt(row["peak_mem_mb"], ".1f"),
                "merge_share": _fmt(row["merge_share"], ".1%"), "merge_ms": _fmt(row["merge_ms"], ".2f"),
                "tokens": f"{tokens[0]}→{tokens[-1]}",
            }
            lines.append("| " + " | ".join(cells[k] for k in head) + " |")
        notes = [f"{row['variant']}: {row['note']}" for row in members if row.get("note")]
        if notes:
            lines.append("")
            lines.extend(f"- {note}" for note in notes)
        lines.append("")
    found = conclusions(rows)
    if found:
        lines += ["**Conclusion**", ""] + [f"- {line}" for line in found] + [""]
    return "\n".join(lines)


def plot_throughput(rows: Sequence[dict], meta: dict, path: Union[str, Path]) -> Path:
    """PNG: items/s (with quartile bars) against GFLOPs per item; one panel per model and batch size."""
    from ..plotting import legend_outside, metric_label, pyplot, save, style, subtitle, titled

    plt = pyplot()
    groups = _groups(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.0), squeeze=False)
    for ax, ((model, batch, device, dtype), members) in zip(axes[0], groups.items()):
        for name in dict.fromkeys(r["algorithm"] or "unmerged" for r in members):
            mine = sorted((r for r in members if (r["algorithm"] or "unmerged") == name), key=lambda r: r["gflops"])
            xs, ys = [r["gflops"] for r in mine], [r["items_per_s"] for r in mine]
            err = [[y - r["items_per_s_q1"] for y, r in zip(ys, mine)], [r["items_per_s_q3"] - y for y, r in zip(ys, mine)]]
            kwargs = style(name)
            ax.errorbar(xs, ys, yerr=err, label=name, capsize=2, **kwargs)
        first = members[0]
        ax.set_title("\n".join([f"{model}, batch {batch}", ("RANDOM weights" if first.get("random_weights")
                                                             else "pretrained")]), fontsize=9)
        ax.set_xlabel(metric_label("gflops"))
        ax.set_ylabel(metric_label("items_per_s"))
        ax.grid(alpha=0.3)
    first = rows[0]
    titled(fig, "Throughput against FLOPs (median of interleaved repetitions; bars: quartiles)",
           subtitle(first["model"] if len(groups) == 1 else f"{len(groups)} model/batch panels", first["weights"],
                    bool(first.get("random_weights")), f"{meta.get('device_name', first['device'])} {first['dtype']}",
                    extra=f"{meta.get('reps')} reps, {meta.get('threads')} threads"))
    legend_outside(fig, list(axes[0]))
    return save(fig, path)
