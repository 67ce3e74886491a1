"""Benchmarks: what a merge setting buys on this hardware, and why (``pitome bench`` is the CLI).

    measure.py   devices, dtypes, interleaved timing, peak memory, progress
    settings.py  applying a ``MergeSetting`` and solving per-model budgets
    run.py       the loop over models x batch sizes x settings, one row each
    report.py    Markdown / JSON / CSV / PNG

Models load through ``pitome.loading`` (the spec grammar every verb shares).
"""

from ..loading import BUILTINS as BUILTIN_MODELS
from ..loading import LoadedModel, load_model
from ..setting import MergeSetting
from .measure import DTYPES, parse_device, parse_dtype
from .report import BenchResult, format_markdown, plot_throughput
from .run import BenchOptions, bench
from .settings import Variant, apply_setting, resolve_setting

__all__ = ["BenchOptions", "BenchResult", "LoadedModel", "MergeSetting", "Variant", "bench", "load_model",
           "apply_setting", "resolve_setting", "format_markdown", "plot_throughput", "BUILTIN_MODELS", "DTYPES",
           "parse_device", "parse_dtype"]
