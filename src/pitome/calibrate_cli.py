"""`pitome calibrate`: per-block budgets for a FLOPs target, found on a few unlabeled inputs, saved as JSON.

    pitome calibrate --model dinov2-s --data fashion-mnist --flops-reduction 0.55 --out budgets.json
    pitome calibrate --model minilm --data notes.txt --flops-reduction 0.4 --out budgets.json

The JSON is what ``pitome.patch(model, calibrate="budgets.json")`` applies (``pitome.Calibration``);
docs/calibration.md says how it was measured and when it helps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli.errors import UserError
from .cli.flags import add_model_flags, add_runtime_flags, apply_threads, flops_reduction, key_value, positive_int

__all__ = ["add_arguments", "run", "load_inputs"]

OFFLINE_DATA = {"fashion-mnist": "Fashion-MNIST training images (offline)",
                "bbc-news": "BBC News articles (offline)", "random": "seeded random inputs (smoke tests only)"}
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n")[1]
    add_model_flags(parser)
    group = parser.add_argument_group("calibration")
    group.add_argument("--data", required=True, metavar="SOURCE",
                       help="unlabeled inputs: an image folder, a text file (.txt one per line, .jsonl/.csv with "
                            f"--text-column), or {', '.join(OFFLINE_DATA)}")
    group.add_argument("--text-column", default="text", help="column / key of .jsonl / .csv text (default text)")
    group.add_argument("--items", type=positive_int, default=32, metavar="N",
                       help="inputs to calibrate on, drawn with --seed (default 32; 16-64 is the intended range)")
    group.add_argument("--flops-reduction", type=flops_reduction, required=True, metavar="F",
                       help="share of the unmerged model's FLOPs to remove, in (0, 1)")
    group.add_argument("--preset", default=None, help="setting to calibrate (default auto unless --algorithms)")
    group.add_argument("--algorithms", "--algorithm", dest="algorithm", default=None, metavar="NAME",
                       help="the one merging algorithm to calibrate (default: the preset's)")
    group.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                       help="pitome.patch option, repeatable (e.g. prop_attn=true)")
    group.add_argument("--max-forwards", type=positive_int, default=48, metavar="N",
                       help="forwards of the batch the search may use (default 48, + 2 for the unmerged model)")
    group.add_argument("--max-length", type=positive_int, default=256, help="text: truncation (default 256)")
    group.add_argument("--out", required=True, metavar="FILE.json", help="where to write the calibration")
    add_runtime_flags(parser)


def _check(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model loads."""
    if not args.flops_reduction > 0:
        raise UserError(f"--flops-reduction must be in (0, 1), got {args.flops_reduction}")
    if args.algorithm is not None:
        from .algorithms import available_algorithms
        from .cli.errors import unknown_name

        if args.algorithm not in available_algorithms():
            raise unknown_name("algorithm", args.algorithm, available_algorithms())
    if args.max_forwards < 6:
        raise UserError(f"--max-forwards must be at least 6, got {args.max_forwards}")
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise UserError(f"--out must name a .json file, got {args.out!r}")
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out}: folder {str(out.parent)!r} does not exist")
    if args.data not in OFFLINE_DATA:
        path = Path(args.data)
        if not path.exists():
            raise UserError(f"--data {args.data!r}: no such file or folder; give an image folder, a text file "
                            f"({', '.join(TEXT_SUFFIXES)}) or one of {', '.join(OFFLINE_DATA)}")
        if path.is_file() and path.suffix.lower() not in TEXT_SUFFIXES:
            raise UserError(f"--data {args.data!r}: a file must be text ({', '.join(TEXT_SUFFIXES)})")
    from .config import available_presets

    if args.preset is not None and args.preset not in available_presets():
        raise UserError(f"unknown preset {args.preset!r}; choose from: {', '.join(available_presets())}")


def _texts(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import csv

        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    if rows and column not in rows[0]:
        raise UserError(f"--data {path}: no column {column!r} (columns: {', '.join(rows[0])}); set --text-column")
    return [str(row[column]) for row in rows]


def load_inputs(loaded: Any, data: str, items: int, seed: int, text_column: str = "text",
                max_length: int = 256) -> Any:
    """One batch of ``items`` unlabeled inputs for ``loaded`` (a ``pitome.loading.LoadedModel``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if data == "random":
        return loaded.random_inputs(items, seed=seed, seq_len=max_length)
    if loaded.modality == "text":
        if data == "fashion-mnist" or (Path(data).is_dir()):
            raise UserError(f"--data {data}: {loaded.name} is a text model; give text (a file or bbc-news)")
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.name} has no tokenizer; use --data random")
        if data == "bbc-news":
            from . import zoo

            texts = zoo.load_bbc_news()[0]
        else:
            texts = _texts(Path(data), text_column)
        if not texts:
            raise UserError(f"--data {data}: no text found")
        chosen = [texts[i] for i in np.sort(rng.choice(len(texts), min(items, len(texts)), replace=False))]
        return dict(loaded.tokenizer(chosen, padding=True, truncation=True, max_length=max_length,
                                     return_tensors="pt"))
    if data == "bbc-news" or Path(data).is_file():
        raise UserError(f"--data {data}: {loaded.name} is an image model; give images (a folder or fashion-mnist)")
    size = loaded.image_size[0]
    if data == "fashion-mnist":
        from . import zoo

        images = zoo.load_fashion_mnist("train")[0]
        pick = np.sort(rng.choice(len(images), items, replace=False))
        return zoo.images_for_dinov2(images[pick], size=size)  # grey -> RGB, resized, ImageNet-normalised
    from PIL import Image

    files = sorted(p for p in Path(data).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--data {data}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    chosen = [files[i] for i in np.sort(rng.choice(len(files), min(items, len(files)), replace=False))]
    crops = [np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in chosen]
    return loaded.normalize(crops)


def run(args: argparse.Namespace) -> int:
    _check(args)
    apply_threads(args.threads)
    from .calibration import calibrate
    from .loading import load_model

    loaded = load_model(args.model, weights=args.weights, model_kwargs=args.model_kwargs, seed=args.seed,
                        max_length=args.max_length)
    inputs = load_inputs(loaded, args.data, args.items, args.seed, args.text_column, args.max_length)
    print(f"pitome calibrate: {loaded.describe()} on {args.items} inputs from {args.data}, "
          f"-{args.flops_reduction:.0%} FLOPs", flush=True)
    try:
        result = calibrate(loaded.module, inputs, flops_reduction=args.flops_reduction, preset=args.preset,
                           algorithm=args.algorithm, max_forwards=args.max_forwards, seed=args.seed,
                           **dict(args.option))
    except ValueError as error:  # unreachable target, bad option value: the user's to fix
        raise UserError(str(error)) from None
    result.save(args.out)
    print(result.summary())
    print(f"-> {args.out}   (pitome.patch(model, calibrate={args.out!r}))")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["calibrate", *sys.argv[1:]]))
