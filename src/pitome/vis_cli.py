"""`pitome visualize`: which tokens merged, side by side per algorithm.

Image models: a PNG with one row per algorithm (groups of patches painted in their mean colour and outlined,
after chosen blocks) and a row with PiToMe's energy score at those blocks (bright = high energy = in a large
cluster of similar tokens = merged first; dark = isolated = protected). Text models: merged words on coloured
backgrounds in the terminal and in an HTML file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .spectral_cli import (SAMPLE_IMAGES, Subject, load_subject, options_for, parse_options, sample_image,
                           split_names, square_crop)

__all__ = ["add_arguments", "run", "trace", "image_figure", "energy_map", "default_blocks"]


def default_blocks(num_layers: int) -> list[int]:
    """Four blocks spread over the depth, ending with the last: 12 blocks -> 2, 5, 8, 11."""
    picks = sorted({max(0, (num_layers * k) // 4 - 1) for k in (1, 2, 3, 4)})
    return picks


def trace(subject: Subject, batch: Any, name: str, ratio: float, options: dict, layers: Optional[Sequence[int]],
          seed: int = 0) -> tuple[Any, list, int, int]:
    """Run one algorithm with source tracing: (MergeInfo, merge records, num_protected, num_layers)."""
    import pitome
    from .spectral import MergeRecorder

    pitome.patch(subject.model, algorithm=name, ratio=ratio, layers=layers, trace_source=True, seed=seed,
                 **options_for(name, options))
    try:
        with MergeRecorder() as rec:
            subject.forward(batch)
        settings = pitome.settings(subject.model)
        return pitome.info(subject.model), rec.records, settings.num_protected, settings.num_layers
    finally:
        pitome.unpatch(subject.model)


def _source_before(history: Sequence[tuple[int, torch.Tensor]], block: int, tokens: int) -> np.ndarray:
    from .spectral import source_after

    src = source_after(history, block - 1)
    return np.arange(tokens) if src is None else src[0].cpu().numpy()


def energy_map(records: Sequence[Any], history: Sequence[tuple[int, torch.Tensor]], block: int,
               num_tokens: int, grid: tuple[int, int]) -> Optional[np.ndarray]:
    """PiToMe's energy of the tokens entering ``block``'s merge, painted on the original patches (sample 0)."""
    from .algorithms.base import unit_rows
    from .algorithms.pitome import PiToMe, energy_scores
    from .vis import patch_values

    rec = next((r for r in records if r.layer == block), None)
    if rec is None or not isinstance(rec.algorithm, PiToMe):
        return None
    alg = rec.algorithm
    k = unit_rows(rec.metric[:1, rec.num_protected:])
    sim = k @ k.transpose(1, 2)
    margin = alg.layer_margin(block, rec.num_layers)
    energy = energy_scores(sim, margin, alg.energy, alg.alpha)[0].numpy()
    return patch_values(energy, _source_before(history, block, num_tokens), rec.num_protected, grid)


def image_figure(crop: np.ndarray, runs: dict[str, tuple[Any, list, int, int]], blocks: Sequence[int],
                 energy_from: Optional[str], show: Optional[Sequence[str]] = None) -> np.ndarray:
    """The composed PNG array: input, then per algorithm (``show``, default all runs) the groups after each
    block, then the energy row of the run ``energy_from``."""
    from .spectral import source_after
    from .vis import compose, grid_shape, heatmap, paint_groups, patch_labels

    size = crop.shape[0]
    first_info, _, h, _ = next(iter(runs.values()))
    n0 = first_info.source.shape[1]
    grid = grid_shape(n0 - h, size, size)
    rows, labels = [], []
    for name in show or list(runs):
        info = runs[name][0]
        row: list = [crop if not rows else None]
        for block in blocks:
            src = source_after(info.source_history, block)
            src_np = np.arange(n0) if src is None else src[0].cpu().numpy()
            row.append(paint_groups(crop, patch_labels(src_np, h, grid)))
        rows.append(row)
        labels.append(name)
    if energy_from is not None:
        info, records, _, _ = runs[energy_from]
        row = [None]
        for block in blocks:
            values = energy_map(records, info.source_history, block, n0, grid)
            row.append(None if values is None else heatmap(values, size, size))
        rows.append(row)
        labels.append(f"{energy_from}\nenergy\n(entering\nthe block)")
    tokens = first_info.tokens_per_layer
    titles = ["input"] + [f"after block {b}: {tokens[b + 1] - h} tok" if b + 1 < len(tokens) else f"block {b}"
                          for b in blocks]
    return compose(rows, labels, titles)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*",
                        help=f"image file or bundled sample ({', '.join(SAMPLE_IMAGES)}); for text models, texts")
    parser.add_argument("--model", default="dinov2-s", help="dinov2-s | minilm | timm:NAME | hf:PATH_OR_ID")
    parser.add_argument("--algorithms", default=None,
                        help="comma-separated (default pitome,tome; pitome_text,tome for text models)")
    parser.add_argument("--ratio", type=float, default=None, help="keep-ratio per merging block (default 0.9; "
                                                                  "0.8 for text)")
    parser.add_argument("--layers", default=None, help="comma-separated blocks that merge (default all)")
    parser.add_argument("--blocks", default=None, help="blocks to show (default: 4 spread over the depth; "
                                                      "text: every merging block)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="algorithm option, given to the algorithms that accept it (repeatable)")
    parser.add_argument("--random-init", action="store_true", help="timm: random weights instead of pretrained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output file (default visualize.png / visualize.html)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="text models: terminal colours for merged groups (auto: only on a terminal)")


def _run_text(args: argparse.Namespace, subject: Subject, layers: Optional[list[int]]) -> int:
    import sys

    from .spectral import source_after
    from .vis import ansi_groups, html_groups, plain_groups

    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())

    algorithms = split_names(args.algorithms or "pitome_text,tome")
    ratio = 0.8 if args.ratio is None else args.ratio
    texts = args.inputs or ["The quick brown fox jumps over the lazy dog, and the lazy dog does not mind at all "
                            "because the quick brown fox is a friend of the lazy dog."]
    options = parse_options(args.option)
    sections = []
    for t_index, text in enumerate(texts):
        batch = subject.encode(text)
        tokens = subject.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
        for name in algorithms:
            info, _, _, num_layers = trace(subject, batch, name, ratio, options, layers, args.seed)
            merged = [index for index, _ in info.source_history]
            blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else merged
            for block in blocks:
                src = source_after(info.source_history, block)
                source = list(range(len(tokens))) if src is None else src[0].tolist()
                kept = len(set(source) - {-1})
                head = f"[{name}, ratio {ratio}, after block {block}: {kept} of {len(tokens)} tokens]"
                print(head)
                print(ansi_groups(tokens, source) if colour else plain_groups(tokens, source))
                print()
                sections.append(html_groups(tokens, source, f"text {t_index}: {head}"))
    out = Path(args.out or "visualize.html")
    out.write_text("<!doctype html><meta charset='utf-8'><title>pitome: merged tokens</title>"
                   f"<p>{subject.name}. Same background colour = merged into one token.</p>" + "\n".join(sections))
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    subject = load_subject(args.model, args.size, pretrained=not args.random_init, max_length=args.max_length)
    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    if subject.kind == "text":
        return _run_text(args, subject, layers)
    from PIL import Image

    algorithms = split_names(args.algorithms or "pitome,tome")
    ratio = 0.9 if args.ratio is None else args.ratio
    options = parse_options(args.option)
    images = args.inputs or ["astronaut"]
    out = Path(args.out or "visualize.png")
    for index, name in enumerate(images):
        crop = square_crop(sample_image(name), subject.size)
        batch = subject.image_tensor([crop])
        runs = {alg: trace(subject, batch, alg, ratio, options, layers, args.seed) for alg in algorithms}
        energy_from = next((a for a in algorithms if a.startswith("pitome")), None)
        if energy_from is None:  # the energy row always comes from a PiToMe run
            runs["pitome"] = trace(subject, batch, "pitome", ratio, options, layers, args.seed)
            energy_from = "pitome"
        num_layers = next(iter(runs.values()))[3]
        blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else default_blocks(num_layers)
        bad = [b for b in blocks if not 0 <= b < num_layers]
        if bad:
            raise ValueError(f"--blocks {bad} out of range: the model has blocks 0..{num_layers - 1}")
        figure = image_figure(crop, runs, blocks, energy_from, show=algorithms)
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{index}{out.suffix}")
        Image.fromarray(figure).save(path)
        print(f"wrote {path} ({figure.shape[1]}x{figure.shape[0]}): {', '.join(algorithms)} at ratio {ratio}, "
              f"blocks {blocks}, {subject.name}")
    return 0
