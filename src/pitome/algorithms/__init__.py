"""Merging algorithms by name. Each one is a small dataclass of options with a ``plan`` method, registered by
the ``@register`` decorator in its own file; importing the modules here fills ``ALGORITHMS``."""

from __future__ import annotations

from typing import Any

from . import crossget, dct, diffrate, evit, kth, mctf, pitome, random_merge, tofu, tome  # noqa: F401  (registers)
from .base import ALGORITHMS, MergeAlgorithm, MergeRequest, register

__all__ = ["MergeAlgorithm", "MergeRequest", "ALGORITHMS", "register", "create_algorithm", "available_algorithms",
           "algorithm_class"]


def available_algorithms() -> list[str]:
    return sorted(ALGORITHMS)


def algorithm_class(name: str) -> type[MergeAlgorithm]:
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(available_algorithms())}")
    return ALGORITHMS[name]


def create_algorithm(name: str, **options: Any) -> MergeAlgorithm:
    return algorithm_class(name).create(**options)
