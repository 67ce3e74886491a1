"""Warnings that point at the user's line, not at pitome's or torch's internals, and that come once per
forward instead of once per block."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from typing import Iterator, Optional

__all__ = ["warn_at_caller", "collect_caps", "report_cap"]

_INTERNAL = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                  for m in (sys.modules[__name__.rpartition(".")[0]], contextlib) if getattr(m, "__file__", None))
_CAPS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("pitome_caps", default=None)


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_INTERNAL) or path == os.path.abspath(contextlib.__file__) or \
        f"{os.sep}torch{os.sep}" in path


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside pitome, torch and contextlib (the user's call)."""
    frame = sys._getframe(1)
    level = 2
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


@contextlib.contextmanager
def collect_caps() -> Iterator[None]:
    """Gather budget caps during one forward; one warning at the end names the first and lists the others."""
    caps: list[tuple[int, int, int]] = []
    token = _CAPS.set(caps)
    try:
        yield
    finally:
        _CAPS.reset(token)
        if caps:
            layer, requested, allowed = caps[0]
            others = sorted({c[0] for c in caps[1:]} - {layer})
            more = f"; also capped in block(s) {', '.join(map(str, others))}" if others else ""
            warn_at_caller(f"layer {layer}: budget asks to remove {requested} tokens but only {allowed} can be merged "
                           f"in one step; capped to {allowed}{more} (pitome.info(model).tokens_per_layer has the "
                           f"counts)")


def report_cap(requested: int, allowed: int, layer: int) -> None:
    """A block's budget was capped: recorded for the running forward's warning, or warned at once."""
    caps = _CAPS.get()
    if caps is not None:
        caps.append((layer, requested, allowed))
    else:
        warn_at_caller(f"layer {layer}: budget asks to remove {requested} tokens but only {allowed} can be merged "
                       f"in one step; capped to {allowed}")
