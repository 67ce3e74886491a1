"""`pitome` command line. Verbs live in their own modules, imported only when used, so ``pitome --help`` and
``pitome --version`` stay fast (no torch import).

Each verb module exposes ``add_arguments(parser)`` and ``run(args) -> int``. User errors (``UserError``, and
argparse's own) print as one line, ``pitome VERB: error: MESSAGE``, with exit code 2; Ctrl-C exits with 130
after the verb has saved what finished.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .errors import UserError, one_line
from .flags import Parser

__all__ = ["main", "VERBS", "UserError"]

VERBS: dict[str, tuple[str, str]] = {
    "bench": ("pitome.bench_cli", "speed, FLOPs and memory of merge settings, side by side"),
    "calibrate": ("pitome.calibrate_cli", "per-block budgets for a FLOPs target from a few unlabeled inputs (JSON)"),
    "eval": ("pitome.tasks.cli", "accuracy and fidelity against FLOPs on real tasks (offline by default)"),
    "spectrum": ("pitome.spectral_cli", "spectral distance of the token graph per block, per algorithm"),
    "visualize": ("pitome.vis_cli", "pictures of which tokens merged"),
    "train": ("pitome.train.cli", "fine-tune with merging on, then evaluate with and without merging"),
}


def _version() -> str:
    from .. import __version__

    return __version__


def build_parser(verb: Optional[str]) -> argparse.ArgumentParser:
    """The top-level parser; only ``verb``'s module is imported (its flags added)."""
    parser = Parser(prog="pitome", description="Token merging for pretrained Transformers (PiToMe, ToMe and "
                                               "baselines). 'pitome VERB --help' for a verb's flags.")
    parser.add_argument("--version", action="version", version=f"pitome {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="VERB", parser_class=Parser)
    for name, (module_name, help_text) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            importlib.import_module(module_name).add_arguments(verb_parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    prog = f"pitome {verb}" if verb in VERBS else "pitome"
    try:
        parser = build_parser(verb if verb in VERBS else None)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        module = importlib.import_module(VERBS[args.command][0])
        return int(module.run(args) or 0)
    except UserError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
