"""Merging algorithms by name. Each one is a small dataclass of options with a ``plan`` method."""

from __future__ import annotations

from typing import Any

from .base import MergeAlgorithm, MergeRequest
from .pitome import PiToMe, PiToMeBSM, PiToMeText
from .tome import ToMe

__all__ = ["MergeAlgorithm", "MergeRequest", "ALGORITHMS", "register", "create_algorithm", "available_algorithms"]

ALGORITHMS: dict[str, type[MergeAlgorithm]] = {}


def register(cls: type[MergeAlgorithm]) -> type[MergeAlgorithm]:
    """Make an algorithm selectable by its ``name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty 'name'")
    ALGORITHMS[cls.name] = cls
    return cls


for _cls in (PiToMe, PiToMeText, PiToMeBSM, ToMe):
    register(_cls)

from .crossget import CrossGET  # noqa: E402  baselines and reference points (issue 6)
from .dct import DCT  # noqa: E402
from .diffrate import DiffRate  # noqa: E402
from .evit import EViT  # noqa: E402
from .kth import KthSplit  # noqa: E402
from .mctf import MCTF  # noqa: E402
from .random_merge import RandomMerge  # noqa: E402
from .tofu import ToFu  # noqa: E402

for _cls in (ToFu, DCT, DiffRate, MCTF, CrossGET, RandomMerge, KthSplit, EViT):
    register(_cls)


def available_algorithms() -> list[str]:
    return sorted(ALGORITHMS)


def algorithm_class(name: str) -> type[MergeAlgorithm]:
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(available_algorithms())}")
    return ALGORITHMS[name]


def create_algorithm(name: str, **options: Any) -> MergeAlgorithm:
    return algorithm_class(name).create(**options)
