"""pitome: spectrum-preserving token merging (PiToMe), ToMe and baselines for pretrained Transformers."""

from .algorithms import ALGORITHMS, available_algorithms, create_algorithm, register
from .api import info, is_patched, patch, patched, settings, unpatch
from .config import MergeConfig, available_presets
from .plan import MergePlan, build_plan
from .pooling import pool_mean
from .schedule import predict_token_counts, resolve_budgets

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "patched", "is_patched", "info", "settings",
    "MergeConfig", "MergePlan", "build_plan", "ALGORITHMS", "available_algorithms", "available_presets",
    "create_algorithm", "register", "predict_token_counts", "resolve_budgets", "__version__",
    "pool_mean",
]
