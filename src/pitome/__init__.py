"""pitome: spectrum-preserving token merging (PiToMe), ToMe and baselines for pretrained Transformers.

The public names load on first use (PEP 562), so ``pitome --help`` / ``--version`` and the command-line
validation do not pay for importing torch.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ALGORITHMS": "algorithms", "available_algorithms": "algorithms", "create_algorithm": "algorithms",
    "register": "algorithms",
    "info": "api", "is_patched": "api", "patch": "api", "patched": "api", "settings": "api", "unpatch": "api",
    "MergeConfig": "config", "available_presets": "config",
    "calibrate": "calibration", "Calibration": "calibration",
    "MergePlan": "plan", "build_plan": "plan",
    "pool_mean": "pooling",
    "predict_token_counts": "schedule", "resolve_budgets": "schedule",
    "UnsupportedModelError": "adapters", "register_adapter": "adapters", "MergeSettings": "config",
    "MergeInfo": "step", "record_merges": "step", "merge_timing": "step",
}

__all__ = [
    "patch", "unpatch", "patched", "is_patched", "info", "settings",
    "MergeConfig", "MergePlan", "build_plan", "ALGORITHMS", "available_algorithms", "available_presets",
    "create_algorithm", "register", "predict_token_counts", "resolve_budgets", "__version__",
    "pool_mean", "UnsupportedModelError", "register_adapter", "MergeInfo", "MergeSettings", "record_merges",
    "merge_timing", "calibrate", "Calibration",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
