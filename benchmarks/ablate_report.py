"""Markdown tables from the ablation's cached runs (``benchmarks/ablate.py report``).

Every difference is paired (same items): percentage points for accuracies, with a bootstrap 95% interval and the
exact McNemar p-value; cosine differences with a bootstrap interval. A setting is called better / worse only
when the interval excludes zero and p < 0.05 (``pitome.stats.compare``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from pitome.stats import compare

import ablate

RESAMPLES = 5000


def load_records(split: Optional[str] = None) -> "OrderedDict[tuple, dict]":
    """Latest record per (task, split, ratio, config), in first-seen order."""
    out: "OrderedDict[tuple, dict]" = OrderedDict()
    path = ablate._record_path()
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("stage") == "factors" and entry.get("base") is None:  # runs recorded before 'base' existed
            entry["base"] = "official+pa"
        if split is not None and entry["split"] != split:
            continue
        key = (entry["task"], entry["split"], entry["ratio"], entry["config"])
        out[key] = entry
    return out


class Metrics:
    """Per-item metrics of recorded runs, loaded lazily."""

    def __init__(self) -> None:
        self.cache: dict[str, dict] = {}
        self.refs: dict[tuple, dict] = {}

    def get(self, entry: dict) -> dict[str, np.ndarray]:
        name = entry["file"]
        if name not in self.cache:
            task = ablate.TASKS[entry["task"]]
            bench = ablate.get_bench(task.bench)
            run = torch.load(ablate._cache_dir() / name, map_location="cpu", weights_only=False)
            ref = self.reference(bench, entry["split"])
            self.cache[name] = {**ablate.per_item(bench, entry["split"], run, ref), "gflops": run["gflops"], "r": run["r"],
                                 "ratio": run["ratio"]}
        return self.cache[name]

    def reference(self, bench: "ablate.Bench", split: str) -> dict:
        key = (bench.name, split)
        if key not in self.refs:
            self.refs[key] = ablate.reference_run(bench, split)
        return self.refs[key]

    def unmerged(self, task: "ablate.TaskDef", split: str) -> dict:
        bench = ablate.get_bench(task.bench)
        ref = self.reference(bench, split)
        return {**ablate.per_item(bench, split, ref, ref), "gflops": ref["gflops"]}


def _pct(x: np.ndarray) -> str:
    return f"{100 * x.mean():.1f}"


def _delta(a: np.ndarray, b: np.ndarray, scale: float, digits: int) -> str:
    c = compare(a, b, resamples=RESAMPLES, scale=scale)
    mark = {"better": " **+**", "worse": " **−**", "tie": ""}[c.verdict]
    return c.text(digits) + mark


def table(metrics: Metrics, records: dict, task: str, split: str, ratio: float, rows: Sequence[str],
          baselines: Sequence[tuple[str, Callable[[str, dict], Optional[str]]]], show_r: bool = False) -> list[str]:
    """One markdown table: a row per config; for each baseline column, Δacc [CI] p and Δcos [CI]."""
    tdef = ablate.TASKS[task]
    vision = tdef.bench == "vision"
    head = ["setting", "GFLOPs", "acc %", "agree %", "cos"] + (["i2t R@1"] if vision else [])
    for title, _ in baselines:
        head += [f"Δacc vs {title}", f"Δcos vs {title}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in rows:
        entry = records.get((task, split, ratio, name))
        if entry is None:
            continue
        m = metrics.get(entry)
        label = name + (f" (r={m['r']})" if show_r and m.get("r") is not None else "")
        if m.get("ratio") is not None and abs(m["ratio"] - ratio) > 1e-9:
            label += f" (ratio {m['ratio']:g})"
        cells = [label, f"{m['gflops']:.2f}", _pct(m["acc"]), _pct(m["agree"]), f"{m['cos'].mean():.3f}"]
        if vision:
            cells.append(_pct(m["i2t"]))
        for _, pick in baselines:
            other = pick(name, entry)
            base = records.get((task, split, ratio, other)) if other else None
            if base is None or other == name:
                cells += ["—", "—"]
                continue
            b = metrics.get(base)
            cells += [_delta(m["acc"], b["acc"], 100.0, 1), _delta(m["cos"], b["cos"], 1.0, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def same_pa_tome(name: str, entry: dict) -> str:
    return "tome+pa" if entry.get("resolved", {}).get("prop_attn", True) else "tome"


def fixed(other: str) -> Callable[[str, dict], str]:
    return lambda name, entry: other


def unmerged_line(metrics: Metrics, task: str, split: str) -> str:
    u = metrics.unmerged(ablate.TASKS[task], split)
    extra = f", i2t R@1 {_pct(u['i2t'])}%" if "i2t" in u else ""
    return f"Unmerged: {_pct(u['acc'])}% at {u['gflops']:.2f} GFLOPs/item{extra}."


STRONGEST_TOME = {"text": "tome", "vision": "tome+pa"}  # the better ToMe per family on dev (core tables)


def _ratios(records: dict, task: str, names: Optional[set] = None) -> list[float]:
    return sorted({k[2] for k in records if k[0] == task and (names is None or k[3] in names)}, reverse=True)


def section(metrics: Metrics, records: dict, split: str, stage: Optional[str], title: str,
            compare_with: Callable[[str, Optional[str]], list], filter_base: bool = True) -> list[str]:
    """Tables for the records of one stage: per task, per base (factors), per keep-ratio."""
    out: list[str] = []
    chosen = {k: e for k, e in records.items() if stage is None or e.get("stage") == stage}
    if not chosen:
        return out
    out += [f"## {title}", ""]
    for task in OrderedDict.fromkeys(k[0] for k in chosen):
        tdef = ablate.TASKS[task]
        out += [f"### {tdef.title}", "", unmerged_line(metrics, task, split), ""]
        bases = list(OrderedDict.fromkeys(e.get("base") for k, e in chosen.items() if k[0] == task))
        for base in bases if filter_base else [None]:
            rows = [k[3] for k, e in chosen.items() if k[0] == task and (not filter_base or e.get("base") == base)]
            rows = list(OrderedDict.fromkeys(rows))
            if base is not None:
                out += [f"Changes to **{base}**, one at a time:", ""]
            for ratio in _ratios(chosen, task, set(rows)):
                out += [f"keep-ratio {ratio:g}:", ""]
                out += table(metrics, records, task, split, ratio, rows, compare_with(task, base), show_r=True)
                out.append("")
    return out


def summary(metrics: Metrics, records: dict, split: str, rows: Sequence[tuple[str, str]]) -> list[str]:
    """One line per task and budget: accuracy (cosine) of each setting, and auto against the better ToMe."""
    head = ["task", "keep-ratio", "GFLOPs"] + [title for _, title in rows] + [
        f"auto − {o} (Δ{k})" for k in ("acc", "cos") for o in ("official", "ToMe", "ToMe+PA")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in ablate.TASKS:
        for ratio in _ratios(records, task, {name for name, _ in rows}):
            got = {name: records.get((task, split, ratio, name)) for name, _ in rows}
            if any(v is None for v in got.values()):
                continue
            m = {name: metrics.get(entry) for name, entry in got.items()}
            cells = [ablate.TASKS[task].title, f"{ratio:g}", f"{m['auto']['gflops']:.2f}"]
            cells += [f"{_pct(m[name]['acc'])} ({m[name]['cos'].mean():.3f})" for name, _ in rows]
            for key, scale, digits in (("acc", 100.0, 1), ("cos", 1.0, 3)):
                for other in ("official", "tome", "tome+pa"):
                    cells.append(_delta(m["auto"][key], m[other][key], scale, digits))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(args: Any) -> Optional[str]:
    records = load_records(args.split)
    metrics = Metrics()

    def core_cmp(task: str, base: Optional[str]) -> list:
        return [("ToMe (same prop. attn)", same_pa_tome), ("ToMe + prop. attn", fixed("tome+pa"))]

    def factor_cmp(task: str, base: Optional[str]) -> list:
        strongest = STRONGEST_TOME[ablate.TASKS[task].bench]
        return [(f"{base}", fixed(base)), (strongest, fixed(strongest))]

    def final_cmp(task: str, base: Optional[str]) -> list:
        return [("tome", fixed("tome")), ("tome+pa", fixed("tome+pa"))]

    out: list[str] = []
    final = [("auto", "auto"), ("official", "official PiToMe"), ("tome", "ToMe"), ("tome+pa", "ToMe + prop. attn")]
    lines = summary(metrics, records, args.split, final)
    if len(lines) > 2:
        out += [f"## Summary ({args.split}): accuracy % (mean cosine to the unmerged embedding)", ""] + lines + [""]
    out += section(metrics, records, args.split, "core", "Core comparison at equal FLOPs", core_cmp, False)
    out += section(metrics, records, args.split, "factors", "One design choice at a time", factor_cmp)
    out += section(metrics, records, args.split, "custom", "Candidates and final settings", final_cmp, False)
    text = "\n".join(out) + "\n"
    if getattr(args, "doc", None):
        return text
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as fh:
            fh.write(text)


MARKER = "<!-- tables below: generated by `python benchmarks/ablate.py report --doc docs/ablation.md` -->"


def write_doc(path: str) -> None:
    """Keep the hand-written part of ``path`` (above the marker); regenerate the held-out and dev tables below it."""
    import argparse
    from pathlib import Path

    doc = Path(path)
    head = doc.read_text().split(MARKER)[0].rstrip() + "\n\n" if doc.is_file() else ""
    parts = [head + MARKER, ""]
    for split, title in (("heldout2", "Held-out-2 results (a fresh split, added and looked at once, at the very end)"),
                         ("heldout", "Held-out results (looked at only at the end; see the caveat on the text split)"),
                         ("dev", "Dev results (every comparison and choice was made on these)")):
        text = write_report(argparse.Namespace(split=split, out="-", doc=True)) or ""
        demoted = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
        parts += [f"## {title}", "", demoted, ""]
    doc.write_text("\n".join(parts).rstrip() + "\n")


# --- docs/calibration.md: calibrated per-block budgets against uniform schedules at equal FLOPs ----------------

CALIBRATION_ROWS = (("auto (calibrated)", "calibrated auto"), ("auto", "uniform auto"),
                    ("tome+pa", "ToMe + prop. attn"), ("tome", "ToMe"), ("tome+pa (calibrated)", "calibrated ToMe + PA"))
CALIBRATION_PAIRS = (("auto (calibrated)", "auto"), ("auto (calibrated)", "tome+pa"), ("auto (calibrated)", "tome"),
                     ("tome+pa (calibrated)", "tome+pa"), ("auto (calibrated)", "tome+pa (calibrated)"))


def calibration_tables(split: str) -> str:
    """Per family: accuracy (cosine) of every setting at each FLOPs budget, then the paired differences."""
    records = load_records(split)
    metrics = Metrics()
    out: list[str] = []
    for task in (t for t, d in ablate.TASKS.items() if d.budget == "reduction"):
        budgets = _ratios(records, task)
        if not budgets:
            continue
        tdef = ablate.TASKS[task]
        out += [f"### {tdef.title} ({split})", "", unmerged_line(metrics, task, split), ""]
        head = ["FLOPs target", "GFLOPs (spread)"] + [title for _, title in CALIBRATION_ROWS]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        deltas = ["| FLOPs target | comparison | Δacc (points) [95% CI] McNemar p | Δcos [95% CI] |", "|---|---|---|---|"]
        base = metrics.unmerged(tdef, split)["gflops"]
        for budget in budgets:
            got = {name: records.get((task, split, budget, name)) for name, _ in CALIBRATION_ROWS}
            m = {name: metrics.get(entry) for name, entry in got.items() if entry is not None}
            if not m:
                continue
            flops = [v["gflops"] for v in m.values()]
            spread = (max(flops) - min(flops)) / min(flops)
            cells = [f"−{budget:.0%}", f"{np.mean(flops):.2f} (−{1 - np.mean(flops) / base:.1%}, ±{spread / 2:.1%})"]
            cells += [f"{_pct(m[name]['acc'])} ({m[name]['cos'].mean():.3f})" if name in m else "—"
                      for name, _ in CALIBRATION_ROWS]
            lines.append("| " + " | ".join(cells) + " |")
            titles = dict(CALIBRATION_ROWS)
            for a, b in CALIBRATION_PAIRS:
                if a in m and b in m:
                    deltas.append(f"| −{budget:.0%} | {titles[a]} − {titles[b]} | "
                                  f"{_delta(m[a]['acc'], m[b]['acc'], 100.0, 1)} | {_delta(m[a]['cos'], m[b]['cos'], 1.0, 3)} |")
        out += lines + ["", "Paired differences (same items):", ""] + deltas + [""]
    return "\n".join(out) + "\n"
