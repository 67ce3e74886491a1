"""`pitome eval`: task harnesses (image / text classification, image-text retrieval, probes), sweeps at equal
FLOPs, multi-process runs, and the offline default on real weights and data installed from package registries.

Names load on first use (PEP 562): ``pitome eval --help`` imports neither torch nor a harness.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"EvalModel": "engine", "MergeSpec": "engine", "PassResult": "engine", "run_pass": "engine",
            "build_specs": "sweep", "default_algorithms": "sweep", "match_r": "sweep", "run_sweep": "sweep"}

__all__ = ["EvalModel", "MergeSetting", "MergeSpec", "PassResult", "run_pass", "build_specs", "default_algorithms",
           "match_r", "run_sweep"]


def __getattr__(name: str) -> Any:
    if name == "MergeSetting":
        from ..setting import MergeSetting

        return MergeSetting
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pitome.tasks' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
