"""The bench loop: every model x batch size x merge setting, measured interleaved; one row each.

Per row: items/s (median and quartiles of interleaved repetitions), speed-up over the unmerged model (median of
the per-repetition paired ratios, with their quartiles), latency at batch 1, peak memory, GFLOPs per item
(``pitome.flops``), ``flops_kept``, ideal speed-up (unmerged FLOPs / merged FLOPs) and the share of time spent
in the merge steps.
"""

from __future__ import annotations

import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..api import unpatch
from ..flops import FlopsCount, count_macs, flop_counter_macs, run_forward
from ..loading import LoadedModel, load_model
from ..setting import MergeSetting
from ..solver import ModelCost
from .measure import (DTYPE_NAMES, Progress, interleaved, parse_device, parse_dtype, peak_memory, quantile,
                      to_device)
from .settings import apply_setting, resolve_setting

__all__ = ["BenchOptions", "bench", "bench_rows"]

# merge overhead dominates below this many tokens x blocks: small models may run slower merged (said in a note)
SMALL_MODEL_TOKENS = 2000


@dataclass
class BenchOptions:
    """How to measure. ``merge_timing``: time the merge steps (inline on CPU; separate synchronised passes on GPUs).
    ``seq_len``: tokens of the random text inputs."""

    device: str = "cpu"
    dtype: str = "fp32"
    warmup: int = 2
    reps: int = 5
    latency: bool = True
    latency_reps: Optional[int] = None
    memory: bool = True
    merge_timing: bool = True
    check_flops: bool = False
    threads: Optional[int] = None
    progress: bool = True
    seed: int = 0
    seq_len: int = 128

    def validate(self) -> None:
        for key in ("warmup", "reps", "seq_len"):
            value = getattr(self, key)
            least = 0 if key == "warmup" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{key} must be an integer >= {least}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        parse_device(self.device)
        parse_dtype(self.dtype)


def _meta(options: BenchOptions, device: torch.device) -> dict:
    from .. import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"pitome": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "device_name": f"{device.type} ({name})",
            "dtype": DTYPE_NAMES[parse_dtype(options.dtype)], "threads": torch.get_num_threads(),
            "warmup": options.warmup, "reps": options.reps,
            "latency_reps": options.latency_reps or options.reps, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "flops": "GFLOPs = 1e9 multiply-accumulates per item (the papers' convention): blocks analytic from the "
                     "token counts seen, merge steps analytic, stem/head from their layer shapes",
            "timing": "settings interleaved with a rotating start; medians of the repetitions; speed-up = median "
                      "of the paired per-repetition ratios, with quartiles"}


def bench(models: Sequence[Union[str, LoadedModel]], settings: Sequence[MergeSetting], batch_sizes: Sequence[int] = (32,),
          options: Optional[BenchOptions] = None, model_kwargs: Optional[dict] = None, weights: str = "random",
          on_rows: Optional[Callable[[list[dict]], None]] = None) -> "BenchResult":
    """Benchmark every model x batch size x setting; the unmerged model is always measured (added first).

    ``on_rows(rows)`` is called after each model x batch size (the CLI streams them to the results folder).
    """
    from .report import BenchResult

    options = options or BenchOptions()
    options.validate()
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be integers >= 1, got {list(batch_sizes)!r}")
    device, dtype = parse_device(options.device), parse_dtype(options.dtype)
    if options.threads:
        torch.set_num_threads(options.threads)
    settings = list(settings)
    if not any(not s.merges for s in settings):
        settings.insert(0, MergeSetting())
    settings.sort(key=lambda s: s.merges)  # the baseline first
    count = len(settings)
    latency_reps = options.latency_reps or options.reps
    per_batch = count * (1 + max(options.warmup - 1, 0) + options.reps) + (count * options.reps // 2 if
                                                                           device.type != "cpu" else 0)
    total = len(models) * (len(batch_sizes) * per_batch + (count * (latency_reps + 1) if options.latency else 0))
    progress = Progress(total, options.progress)
    rows: list[dict] = []
    try:
        for spec in models:
            loaded = spec if isinstance(spec, LoadedModel) else load_model(spec, weights=weights,
                                                                           model_kwargs=model_kwargs,
                                                                           seed=options.seed)
            rows += bench_rows(loaded, settings, batch_sizes, options, device, dtype, progress, on_rows)
    finally:
        progress.close()
    return BenchResult(rows=rows, meta=_meta(options, device))


def bench_rows(loaded: LoadedModel, settings: list[MergeSetting], batch_sizes: Sequence[int], options: BenchOptions,
               device: torch.device, dtype: torch.dtype, progress: Progress,
               on_rows: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    model = loaded.module.eval().to(device=device, dtype=dtype)
    unpatch(model)
    one = to_device(loaded.random_inputs(1, options.seed, options.seq_len), device, dtype)
    cache: dict[str, ModelCost] = {}

    def cost() -> ModelCost:
        if "cost" not in cache:
            cache["cost"] = ModelCost.from_model(model, one)
        return cache["cost"]

    resolved = [resolve_setting(s, cost) for s in settings]
    flops: list[FlopsCount] = []
    checks: list[Optional[float]] = []
    rows: list[dict] = []
    with torch.inference_mode(), warnings.catch_warnings():
        # r-based budgets found by the solver may ask for more than half the tokens in late blocks; the cap is
        # part of the schedule the solver predicted (and the tokens per layer are reported)
        warnings.filterwarnings("ignore", message=r".*budget asks to remove")
        for setting in resolved:  # FLOPs from the tokens actually seen (batch 1: no padding in these inputs)
            apply_setting(model, setting)
            flops.append(count_macs(model, one))
            checks.append(flop_counter_macs(model, one) if options.check_flops else None)
        latency: list[Optional[float]] = [None] * len(resolved)
        if options.latency:
            reps = options.latency_reps or options.reps
            for setting in resolved:
                apply_setting(model, setting)
                run_forward(model, one)
                progress.step(f"{loaded.name} latency warm-up {setting.label}")
            times = interleaved(model, resolved, one, device, reps, False, progress, f"{loaded.name} latency")
            latency = [1000 * quantile([t for t, _ in times[i]], 0.5) for i in range(len(resolved))]
        for batch in batch_sizes:
            batch_rows = _bench_batch(model, loaded, resolved, flops, checks, latency, batch, options, device, dtype,
                                      progress)
            rows += batch_rows
            if on_rows is not None:
                on_rows(batch_rows)
    unpatch(model)
    return rows


def _bench_batch(model: Any, loaded: LoadedModel, settings: list[MergeSetting], flops: list[FlopsCount],
                 checks: list[Optional[float]], latency: list[Optional[float]], batch: int, options: BenchOptions,
                 device: torch.device, dtype: torch.dtype, progress: Progress) -> list[dict]:
    inputs = to_device(loaded.random_inputs(batch, options.seed, options.seq_len), device, dtype)
    what = f"{loaded.name} b{batch}"
    memory: list[Optional[float]] = [None] * len(settings)
    memory_method = "not measured"
    for index, setting in enumerate(settings):  # warm-up round 1 (measures peak memory when asked)
        apply_setting(model, setting)
        if options.memory and options.warmup > 0:
            memory[index], memory_method = peak_memory(model, inputs, device)
        else:
            run_forward(model, inputs)
        progress.step(f"{what} warm-up {setting.label}")
    if options.warmup > 1:
        interleaved(model, settings, inputs, device, options.warmup - 1, False, progress, f"{what} warm-up")
    inline = options.merge_timing and device.type == "cpu"
    times = interleaved(model, settings, inputs, device, options.reps, inline, progress, what)
    shares: dict[int, list[tuple[float, float]]] = times
    if options.merge_timing and not inline:  # synchronised passes, separate from the throughput timing
        shares = interleaved(model, settings, inputs, device, max(1, options.reps // 2), True, progress,
                             f"{what} merge timing")
    base_seconds = [t for t, _ in times[0]]
    base_time = quantile(base_seconds, 0.5)
    base_macs = flops[0].total_macs
    rows = []
    for index, setting in enumerate(settings):
        seconds = [t for t, _ in times[index]]
        median, q1, q3 = (quantile(seconds, q) for q in (0.5, 0.25, 0.75))
        paired = [b / s for b, s in zip(base_seconds, seconds)]  # same round of the interleaving
        merge_seconds = [m for _, m in shares[index]]
        share = [m / t for t, m in shares[index]]
        count = flops[index]
        speedup = base_time / median
        ideal = base_macs / count.total_macs
        note = setting.note
        tokens_blocks = sum(count.tokens_per_layer)
        if setting.merges and ideal > 1 and speedup < 1 and tokens_blocks < SMALL_MODEL_TOKENS:
            note = (note + "; " if note else "") + ("small model: the merge steps cost more than the tokens they "
                                                    "remove save")
        rows.append({
            "model": loaded.name, "weights": loaded.weights_note, "random_weights": loaded.random,
            "inputs": loaded.input_note(options.seq_len) + " (random)", "device": str(device),
            "dtype": DTYPE_NAMES[dtype], "batch": batch, "variant": setting.label,
            "algorithm": setting.display if setting.merges else None, "budget": setting.budget,
            "ratio": setting.ratio, "r": list(setting.r) if isinstance(setting.r, tuple) else setting.r,
            "preset": setting.preset, "note": note,
            "items_per_s": batch / median, "items_per_s_q1": batch / q3, "items_per_s_q3": batch / q1,
            "time_ms": 1000 * median, "time_ms_min": 1000 * min(seconds), "time_ms_max": 1000 * max(seconds),
            "latency_ms": latency[index], "peak_mem_mb": memory[index], "memory_method": memory_method,
            "gflops": count.gflops, "gflops_merge": count.merge_macs / 1e9, "gflops_stem_head": count.extra_macs / 1e9,
            "flops_kept": count.total_macs / base_macs, "speedup": speedup,
            "speedup_q1": quantile(paired, 0.25), "speedup_q3": quantile(paired, 0.75), "ideal_speedup": ideal,
            "achieved_over_ideal": speedup / ideal,
            "merge_share": None if not options.merge_timing or not setting.merges else quantile(share, 0.5),
            "merge_ms": None if not options.merge_timing or not setting.merges else 1000 * quantile(merge_seconds, 0.5),
            "flop_counter_gflops": None if checks[index] is None else checks[index] / 1e9,
            "tokens_per_layer": list(count.tokens_per_layer), "reps": len(seconds),
        })
    return rows
