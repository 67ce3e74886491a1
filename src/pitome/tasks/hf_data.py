"""``hf:<dataset>[:<config>]`` data: the optional ``datasets`` package, imported one way with one message.

Kept free of torch so the command line's argument checks (``--help`` included) stay fast.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

__all__ = ["check_hf_data", "import_datasets"]

HF_DATASETS_MISSING = "needs the 'datasets' package (pip install datasets), which is not installed"


def check_hf_data(spec: Optional[str]) -> None:
    """Before anything loads: an ``hf:`` data spec needs the ``datasets`` package."""
    if spec and spec.startswith("hf:") and importlib.util.find_spec("datasets") is None:
        raise ValueError(f"{spec} {HF_DATASETS_MISSING}")


def import_datasets() -> Any:
    """The ``datasets`` package for ``hf:`` data, or a clear error saying how to get it."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"hf: data {HF_DATASETS_MISSING}") from None
    return datasets
