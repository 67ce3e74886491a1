"""`pitome bench`: speed, FLOPs, latency, memory and merge overhead of merge settings, side by side.

Examples:
  pitome bench                                         # DINOv2-S (offline weights), pitome and tome at ratio 0.9
  pitome bench --model timm:deit_small_patch16_224 --weights random --ratios 0.95 0.9 --match tome
  pitome bench --model minilm --algorithms pitome_text --ratios 0.8 --seq-len 256
  pitome bench --model tiny-vit --quick                # smoke run, about a minute on a CPU
"""

from __future__ import annotations

import argparse
import sys

from .cli.errors import UserError, one_line
from .cli.flags import (add_merge_flags, add_model_flags, add_output_flags, add_runtime_flags, non_negative_int,
                        positive_int)

__all__ = ["add_arguments", "run", "settings_from_args"]

QUICK = dict(warmup=1, reps=2, max_batch=4)
DTYPE_NAMES = ("fp32", "fp16", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    add_model_flags(parser, multiple=True)
    add_merge_flags(parser, algorithms_default="pitome, tome")
    what = parser.add_argument_group("bench")
    what.add_argument("--match", nargs="+", default=None, metavar="NAME",
                      help="also run these algorithms at the FLOPs of every other merged row (e.g. --match tome)")
    what.add_argument("--identity", action="store_true",
                      help="also run the patched model with nothing merged (first algorithm, ratio 1.0)")
    what.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                      help="image side in pixels (vision models; default: the model's)")
    what.add_argument("--seq-len", type=positive_int, default=128, metavar="N",
                      help="tokens per random text input (text models; default 128)")
    what.add_argument("--batch-size", nargs="+", type=positive_int, default=[32], metavar="B",
                      help="batch sizes (default 32)")
    what.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="default fp32")
    what.add_argument("--warmup", type=non_negative_int, default=2, help="warm-up rounds (default 2)")
    what.add_argument("--reps", type=positive_int, default=5, help="timed repetitions per setting (default 5)")
    what.add_argument("--latency-reps", type=positive_int, default=None, help="repetitions at batch 1 (default --reps)")
    what.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency")
    what.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    what.add_argument("--no-merge-timing", action="store_true", help="skip timing the merge steps")
    what.add_argument("--check-flops", action="store_true",
                      help="also count FLOPs with torch.utils.flop_counter (column flop_counter_gflops)")
    what.add_argument("--quick", action="store_true",
                      help="smoke run: 1 warm-up, 2 reps, batch sizes capped at 4 (about a minute on a CPU)")
    what.add_argument("--no-plot", action="store_true", help="no PNG (no matplotlib needed)")
    add_runtime_flags(parser)
    add_output_flags(parser)


def settings_from_args(args: argparse.Namespace) -> list:
    """The merge settings a command line asks for (solved budgets are resolved per model by the bench)."""
    from .algorithms import available_algorithms
    from .cli.errors import unknown_name
    from .cli.flags import merge_choices, split_names
    from .setting import MergeSetting

    choices = merge_choices(args, default_algorithms=("pitome", "tome"))
    match = split_names(args.match)
    for name in match:
        if name not in available_algorithms():
            raise unknown_name("algorithm", name, available_algorithms())
    settings = choices.settings(unmerged=True)
    if args.identity:
        first = choices.algorithms[0]
        settings.append(MergeSetting.make(None if first == "auto" else first, ratio=1.0,
                                          preset="auto" if first == "auto" else choices.preset,
                                          note="nothing merged", **choices.options_for(first)))
    merged = [s for s in settings[1:] if s.note != "nothing merged"]
    for name in match:
        settings += [MergeSetting.make(name, equal_flops_to=ref, **choices.options_for(name))
                     for ref in merged if ref.algorithm != name]
    return settings


def run(args: argparse.Namespace) -> int:
    from .bench import BenchOptions, bench
    from .cli.flags import apply_threads, resolve_device
    from .loading import check_model_spec, load_model
    from .results import ResultsFolder

    batch_sizes = list(dict.fromkeys(args.batch_size))
    warmup, reps, latency_reps = args.warmup, args.reps, args.latency_reps
    if args.quick:
        batch_sizes = list(dict.fromkeys(min(b, QUICK["max_batch"]) for b in batch_sizes))
        warmup, reps = min(warmup, QUICK["warmup"]), min(reps, QUICK["reps"])
        latency_reps = min(latency_reps or reps, QUICK["reps"])
    # validate everything before loading anything
    settings = settings_from_args(args)
    for spec in args.model:
        check_model_spec(spec, args.weights)
    device = resolve_device(args.device)
    ResultsFolder.check_parent(args.out)
    apply_threads(args.threads)
    options = BenchOptions(device=str(device), dtype=args.dtype, warmup=warmup, reps=reps,
                           latency=not args.no_latency, latency_reps=latency_reps, memory=not args.no_memory,
                           merge_timing=not args.no_merge_timing, check_flops=args.check_flops,
                           threads=args.threads, progress=not args.no_progress, seed=args.seed, seq_len=args.seq_len)
    models = [load_model(spec, weights=args.weights, model_kwargs=args.model_kwargs, image_size=args.image_size,
                         max_length=args.seq_len, seed=args.seed) for spec in args.model]
    folder = ResultsFolder.create(args.out, "bench")
    print(f"pitome bench: results go to {folder.path}", flush=True)
    folder.write_json("settings.json", {"models": args.model, "weights": args.weights,
                                        "settings": [s.to_dict() for s in settings], "batch_sizes": batch_sizes})
    try:
        result = bench(models, settings, batch_sizes, options, on_rows=folder.extend)
    except KeyboardInterrupt:
        print(f"pitome bench: interrupted; {len(folder.rows)} finished row(s) kept in {folder.path}", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as exc:  # e.g. an image size the model cannot take
        where = "" if folder.discard_if_empty() else f" (finished rows in {folder.path})"
        raise UserError(f"{one_line(exc)[:300]}{where}") from None
    print(result.to_markdown())
    result.to_json(folder.path_for("results.json"))
    result.to_markdown(folder.path_for("table.md"))
    if not args.no_plot:
        try:
            result.plot(folder.path_for("bench.png"))
        except UserError as error:
            print(f"(no plot: {error})")
    print(f"{len(result.rows)} rows -> {folder.path}")
    return 0
