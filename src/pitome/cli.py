"""`pitome` command line: subcommands live in their own modules, imported only when used.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("pitome.bench_cli", "FLOPs, throughput, latency, memory and merge overhead, side by side"),
    "eval": ("pitome.tasks.cli", "accuracy-vs-FLOPs on the paper's tasks and the offline default tasks"),
    "spectrum": ("pitome.spectral_cli", "spectral distance of the token graph per layer, per algorithm"),
    "visualize": ("pitome.vis_cli", "pictures of which tokens merged"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pitome", description="Token merging for pretrained Transformers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("pitome"):
                continue  # subcommand not available in this version
            raise
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
