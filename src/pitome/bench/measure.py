"""How bench measures: devices and dtypes, interleaved timing, peak memory, progress on one status line.

Timing: the settings of one model and batch size run interleaved (rep 1 of every setting, then rep 2, ...,
with a rotating start), so a busy machine slows all of them alike; medians and quartiles are reported.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..flops import run_forward
from ..setting import MergeSetting
from ..step import merge_timing
from .settings import apply_setting

__all__ = ["DTYPES", "DTYPE_NAMES", "parse_device", "parse_dtype", "synchronize", "Progress", "to_device",
           "peak_memory", "quantile", "timed_forward", "interleaved"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def parse_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'mps', checked to be available here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} is not available here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist; {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} is not available here (torch.backends.mps.is_available() is False)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or mps")
    return device


def parse_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in DTYPE_NAMES:
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16")
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()



class Progress:
    """One status line on a terminal (stderr); on pipes a line at most every few seconds."""

    def __init__(self, total: int, enabled: bool = True, stream: Any = None) -> None:
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.perf_counter()

    def step(self, message: str, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if not self.enabled or (not self.tty and now - self.last < 5.0 and self.done < self.total):
            return
        self.last = now
        text = f"[{self.done:>4}/{self.total} {100 * self.done / self.total:3.0f}% {now - self.start:6.1f}s] {message}"
        if self.tty:
            self.stream.write("\r\033[K" + text[:150])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()



def to_device(inputs: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(inputs, dict):
        return {k: to_device(v, device, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(v, device, dtype) for v in inputs)
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)
    return inputs


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (the profiler's start/stop log lines)."""
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_memory(model: nn.Module, inputs: Any, device: torch.device) -> tuple[Optional[float], str]:
    """Peak memory above the resting level during one forward (weights and inputs excluded), in MiB."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_forward(model, inputs)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "torch.cuda.max_memory_allocated"
    if device.type == "cpu":
        with quiet_stderr(), torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
            run_forward(model, inputs)
        events = sorted(((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                         for e in prof.function_events), key=lambda item: item[0])
        current = peak = 0
        for _, delta in events:
            current += delta
            peak = max(peak, current)
        return peak / 2**20, "torch profiler, CPU tensor allocations"
    return None, "n/a on this device"


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def timed_forward(model: nn.Module, inputs: Any, device: torch.device, timed_merges: bool) -> tuple[float, float]:
    """Seconds of one forward, and seconds inside merge steps (0 when not timed)."""
    synchronize(device)
    if timed_merges:
        with merge_timing() as timer:
            start = time.perf_counter()
            run_forward(model, inputs)
            synchronize(device)
            elapsed = time.perf_counter() - start
        return elapsed, timer.seconds
    start = time.perf_counter()
    run_forward(model, inputs)
    synchronize(device)
    return time.perf_counter() - start, 0.0


def interleaved(model: nn.Module, variants: Sequence[MergeSetting], inputs: Any, device: torch.device, reps: int,
                 timed_merges: bool, progress: Progress, what: str) -> dict[int, list[tuple[float, float]]]:
    """reps rounds over all variants with a rotating start; {variant index: [(seconds, merge seconds)]}."""
    out: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(variants))}
    count = len(variants)
    for rep in range(reps):
        for k in range(count):
            index = (rep + k) % count
            apply_setting(model, variants[index])
            out[index].append(timed_forward(model, inputs, device, timed_merges))
            progress.step(f"{what} rep {rep + 1}/{reps} {variants[index].label}")
    return out


