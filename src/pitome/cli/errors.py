"""User errors on the command line: one line on stderr, exit code 2, never a traceback.

Anything a user typed that cannot work raises ``UserError`` (a ``ValueError``, so the Python API's callers
can catch it like the library's own validation errors); ``pitome.cli.main`` prints it as
``pitome VERB: error: MESSAGE`` and returns 2. Bugs keep their tracebacks.
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["UserError", "did_you_mean", "unknown_name", "one_line"]


class UserError(ValueError):
    """Something the user asked for cannot work; the message names the bad value and what is allowed."""


def one_line(text: object) -> str:
    """Collapse a message to one line (library errors sometimes list choices on several lines)."""
    return " ".join(str(text).split())


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(what: str, value: str, choices: Iterable[str], limit: int = 20) -> UserError:
    """``UserError("unknown algorithm 'pitme' (did you mean 'pitome'?); choose from: ...")``."""
    options = sorted(dict.fromkeys(choices))
    listed = ", ".join(options[:limit]) + (f", ... ({len(options)} in all)" if len(options) > limit else "")
    return UserError(f"unknown {what} {value!r}{did_you_mean(value, options)}; choose from: {listed}")
