"""`pitome bench`: FLOPs, throughput, latency, memory and merge overhead of merging settings, side by side.

Examples:
  pitome bench --model deit_small_patch16_224 --ratio 0.95 0.9 0.85 --match tome --batch-size 32
  pitome bench --model minilm --algorithm pitome_text --ratio 0.8 --seq-len 256 --json out.json
  pitome bench --model tiny-vit --quick --csv out.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

__all__ = ["add_arguments", "run", "variants_from_args"]

QUICK = dict(warmup=1, reps=2, max_batch=4)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1] (keep-ratio per layer), got {text}")
    return value


def _r(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"r must be an integer >= 0 (tokens removed per layer), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"r must be >= 0, got {text}")
    return value


def _reduction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"FLOPs reduction must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"FLOPs reduction must be in [0, 1) (0.3 = remove 30%), got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"options are KEY=VALUE (e.g. margin=0.8), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _dtype(text: str) -> str:
    from .bench import DTYPES

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from fp32, fp16, bf16")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    what = parser.add_argument_group("models and settings")
    what.add_argument("--model", nargs="+", default=["deit_small_patch16_224"], metavar="NAME",
                      help="timm names (random weights unless --pretrained), openclip:<arch>[/<tag>] (image tower), "
                           "Hugging Face ids or folders, or the built-ins tiny-vit, minilm, dinov2-s "
                           "(default: deit_small_patch16_224)")
    what.add_argument("--model-kwargs", type=_json_object, default=None, metavar="JSON",
                      help="extra arguments for timm / tiny-vit models, e.g. '{\"depth\": 2, \"img_size\": 64}'")
    what.add_argument("--pretrained", action="store_true", help="timm: load pretrained weights (downloads)")
    what.add_argument("--random-init", action="store_true",
                      help="Hugging Face: build the model from its config with random weights")
    what.add_argument("--image-size", type=_positive, default=None, help="image size in pixels (vision models)")
    what.add_argument("--seq-len", type=_positive, default=128, help="sequence length (text models; default 128)")
    what.add_argument("--algorithm", nargs="+", default=["pitome"], metavar="NAME",
                      help="merging algorithms (default: pitome)")
    what.add_argument("--ratio", nargs="+", type=_ratio, default=None, metavar="RHO", help="keep-ratios in (0, 1]")
    what.add_argument("--r", nargs="+", type=_r, default=None, metavar="R", help="tokens removed per layer")
    what.add_argument("--flops-reduction", nargs="+", type=_reduction, default=None, metavar="X",
                      help="solve each algorithm's budget to remove this share of FLOPs (ToMe: r, others: ratio)")
    what.add_argument("--match", nargs="+", default=None, metavar="NAME",
                      help="also run these algorithms at the FLOPs of every other merged row (e.g. --match tome)")
    what.add_argument("--identity", action="store_true",
                      help="also run the patched model with nothing merged (first algorithm, ratio 1.0)")
    what.add_argument("--preset", default=None, help="a preset (official per-family settings), e.g. deit, bert")
    what.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                      help="algorithm option, repeatable (e.g. --option margin=0.8)")
    how = parser.add_argument_group("measurement")
    how.add_argument("--batch-size", nargs="+", type=_positive, default=[32], metavar="B", help="batch sizes (default 32)")
    how.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    how.add_argument("--dtype", type=_dtype, default="fp32", help="fp32, fp16 or bf16 (default fp32)")
    how.add_argument("--warmup", type=_non_negative, default=2, help="warm-up rounds (default 2)")
    how.add_argument("--reps", type=_positive, default=5, help="timed repetitions per variant (default 5)")
    how.add_argument("--latency-reps", type=_positive, default=None, help="repetitions at batch 1 (default --reps)")
    how.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency")
    how.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    how.add_argument("--no-merge-timing", action="store_true", help="skip timing the merge steps")
    how.add_argument("--check-flops", action="store_true",
                     help="also count FLOPs with torch.utils.flop_counter (column flop_counter_gflops)")
    how.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    how.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 2 reps, batch sizes capped at 4")
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="PATH", help="write rows and metadata as JSON")
    out.add_argument("--csv", default=None, metavar="PATH", help="write rows as CSV")
    out.add_argument("--md", default=None, metavar="PATH", help="write the Markdown table to a file")
    out.add_argument("--plot", default=None, metavar="PATH", help="PNG of items/s against GFLOPs (needs matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress display")


def variants_from_args(args: argparse.Namespace) -> list:
    """The variants a command line asks for (budgets solved per model are resolved by the bench)."""
    from .algorithms import algorithm_class
    from .bench import Variant

    options = dict(args.option)
    for name in list(args.algorithm) + list(args.match or []):
        algorithm_class(name)  # unknown names: a clear error listing the available ones
    if args.ratio is None and args.r is None and args.flops_reduction is None:
        args.ratio = [0.9]
    variants = [Variant()]
    if args.identity:
        variants.append(Variant(args.algorithm[0], ratio=1.0, preset=args.preset, options=options,
                                label=f"{args.algorithm[0]} ratio=1 (nothing merged)"))
    merged = []
    for name in args.algorithm:
        merged += [Variant(name, ratio=value, preset=args.preset, options=options) for value in args.ratio or []]
        merged += [Variant(name, r=value, preset=args.preset, options=options) for value in args.r or []]
        merged += [Variant(name, flops_reduction=value, preset=args.preset, options=options)
                   for value in args.flops_reduction or []]
    matched = []
    for name in args.match or []:
        own = {k: v for k, v in options.items() if k in algorithm_class(name).option_names()}
        matched += [Variant(name, equal_flops_to=ref, options=own) for ref in merged if ref.algorithm != name]
    return variants + merged + matched


def run(args: argparse.Namespace) -> int:
    from .bench import BenchOptions, bench, load_model

    try:
        batch_sizes = list(dict.fromkeys(args.batch_size))
        warmup, reps, latency_reps = args.warmup, args.reps, args.latency_reps
        if args.quick:
            batch_sizes = list(dict.fromkeys(min(b, QUICK["max_batch"]) for b in batch_sizes))
            warmup, reps = min(warmup, QUICK["warmup"]), min(reps, QUICK["reps"])
            latency_reps = min(latency_reps or reps, QUICK["reps"])
        options = BenchOptions(device=args.device, dtype=args.dtype, warmup=warmup, reps=reps,
                               latency=not args.no_latency, latency_reps=latency_reps, memory=not args.no_memory,
                               merge_timing=not args.no_merge_timing, check_flops=args.check_flops,
                               threads=args.threads, progress=not args.no_progress)
        options.validate()
        variants = variants_from_args(args)
        models = [load_model(name, pretrained=args.pretrained, random_init=args.random_init,
                             model_kwargs=args.model_kwargs, image_size=args.image_size, seq_len=args.seq_len)
                  for name in args.model]
        result = bench(models, variants, batch_sizes, options)
    except (ValueError, TypeError) as exc:
        print(f"pitome bench: error: {exc}", file=sys.stderr)
        return 2
    print(result.to_markdown())
    for path, write in ((args.json, result.to_json), (args.csv, result.to_csv), (args.md, result.to_markdown)):
        if path:
            write(path)
    if args.plot:
        try:
            result.plot(args.plot)
        except ValueError as exc:
            print(f"pitome bench: error: {exc}", file=sys.stderr)
            return 2
    return 0
