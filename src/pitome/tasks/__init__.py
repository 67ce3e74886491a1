"""`pitome eval`: task harnesses (image / text classification, image-text retrieval, probes), sweeps at equal
FLOPs, multi-process runs, and the offline default on real weights and data installed from package registries.

Imports nothing heavy: each harness imports its model libraries where used.
"""

from ..setting import MergeSetting
from .engine import EvalModel, MergeSpec, PassResult, run_pass
from .sweep import build_specs, default_algorithms, match_r, run_sweep

__all__ = ["EvalModel", "MergeSetting", "MergeSpec", "PassResult", "run_pass", "build_specs", "default_algorithms", "match_r",
           "run_sweep"]
