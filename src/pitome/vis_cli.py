"""`pitome visualize`: which tokens merged, side by side per algorithm.

Image models: a PNG with one row per algorithm (groups of patches painted in their mean colour and outlined,
after chosen blocks) and a row with PiToMe's energy score at those blocks, with its colour bar (bright = high
energy = in a large cluster of similar tokens = merged first; dark = isolated = protected), under a title naming
model, weights (random flagged) and budget. Text models: merged words on coloured backgrounds in the terminal
and in an HTML file.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence, Union

import numpy as np

from .cli.errors import UserError
from .cli.flags import add_merge_flags, add_model_flags, add_output_flags, add_runtime_flags, positive_int

__all__ = ["add_arguments", "run", "trace", "image_figure", "image_figure_and_scale", "energy_map", "default_blocks"]

DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog, and the lazy dog does not mind at all because the quick "
                "brown fox is a friend of the lazy dog.")


def default_blocks(num_layers: int) -> list[int]:
    """Four blocks spread over the depth, ending with the last: 12 blocks -> 2, 5, 8, 11."""
    picks = sorted({max(0, (num_layers * k) // 4 - 1) for k in (1, 2, 3, 4)})
    return picks


def trace(subject: Any, batch: Any, name: str, budget: Union[float, dict], options: dict,
          layers: Optional[Sequence[int]], seed: int = 0) -> tuple[Any, list, int, int]:
    """Run one algorithm with source tracing: (MergeInfo, merge records, num_protected, num_layers).

    subject: a ``pitome.loading.LoadedModel``; budget: a keep-ratio or {'ratio': x} / {'r': n}."""
    import pitome

    from .cli.flags import options_for
    from .spectral import MergeRecorder
    from .spectral_cli import budget_of

    own = {k: v for k, v in options_for(name, options).items() if k not in ("layers", "seed")}
    pitome.patch(subject.module, algorithm=name, **budget_of(budget), layers=layers, trace_source=True, seed=seed,
                 **own)
    try:
        with MergeRecorder() as rec:
            subject.forward(batch)
        settings = pitome.settings(subject.module)
        return pitome.info(subject.module), rec.records, settings.num_protected, settings.num_layers
    finally:
        pitome.unpatch(subject.module)


def _source_before(history: Sequence[tuple[int, Any]], block: int, tokens: int) -> np.ndarray:
    from .spectral import source_after

    src = source_after(history, block - 1)
    return np.arange(tokens) if src is None else src[0].cpu().numpy()


def energy_map(records: Sequence[Any], history: Sequence[tuple[int, Any]], block: int,
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
    """The composed grid: input, then per algorithm (``show``, default all runs) the groups after each
    block, then the energy row of the run ``energy_from`` (one colour scale for the row)."""
    return image_figure_and_scale(crop, runs, blocks, energy_from, show)[0]


def image_figure_and_scale(crop: np.ndarray, runs: dict[str, tuple[Any, list, int, int]], blocks: Sequence[int],
                           energy_from: Optional[str], show: Optional[Sequence[str]] = None
                           ) -> tuple[np.ndarray, Optional[tuple[float, float]]]:
    """``image_figure`` and the (low, high) of its energy row's colour scale (None without an energy row)."""
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
    scale = None
    if energy_from is not None:
        info, records, _, _ = runs[energy_from]
        maps = [energy_map(records, info.source_history, block, n0, grid) for block in blocks]
        finite = [m[np.isfinite(m)] for m in maps if m is not None and np.isfinite(m).any()]
        if finite:
            scale = (float(min(f.min() for f in finite)), float(max(f.max() for f in finite)))
        rows.append([None] + [None if m is None else heatmap(m, size, size, lo=scale[0] if scale else None,
                                                             hi=scale[1] if scale else None) for m in maps])
        labels.append(f"{energy_from}\nenergy\n(entering\nthe block)")
    tokens = first_info.tokens_per_layer
    titles = ["input"] + [f"after block {b}: {tokens[b + 1] - h} tok" if b + 1 < len(tokens) else f"block {b}"
                          for b in blocks]
    return compose(rows, labels, titles), scale


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*",
                        help="image files or bundled samples (astronaut, chelsea, coffee, rocket, horse, china, "
                             "flower; default astronaut); for text models, texts")
    add_model_flags(parser)
    add_merge_flags(parser, algorithms_default="pitome, tome (pitome_text, tome on text)")
    group = parser.add_argument_group("visualize")
    group.add_argument("--blocks", default=None, metavar="B,B,...",
                       help="blocks to show (default: 4 spread over the depth; text: every merging block)")
    group.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                       help="image side in pixels (default: the model's)")
    group.add_argument("--max-length", type=positive_int, default=128, help="text length in tokens (default 128)")
    group.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                       help="text models: terminal colours for merged groups (auto: only on a terminal)")
    add_runtime_flags(parser)
    add_output_flags(parser)


def _blocks(text: Optional[str]) -> Optional[list[int]]:
    from .spectral_cli import number_list

    return number_list(text, "--blocks", int, 0) if text else None


def _run_text(args: argparse.Namespace, subject: Any, choices: Any, budgets: list[dict], out: Any) -> int:
    import sys

    from .spectral import source_after
    from .spectral_cli import budget_text
    from .vis import ansi_groups, html_groups, plain_groups

    if subject.tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer; visualize needs one for text")
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    texts = args.inputs or [DEFAULT_TEXT]
    layers = choices.options.get("layers")
    sections = []
    for t_index, text in enumerate(texts):
        batch = dict(subject.tokenizer(text, return_tensors="pt", truncation=True, max_length=subject.max_length))
        tokens = subject.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
        for budget in budgets:
            for name in choices.algorithms:
                info, _, _, num_layers = trace(subject, batch, name, budget, choices.options, layers, args.seed)
                merged = [index for index, _ in info.source_history]
                for block in _blocks(args.blocks) or merged:
                    if block >= num_layers:
                        raise UserError(f"--blocks {block} out of range: the model has blocks 0..{num_layers - 1}")
                    src = source_after(info.source_history, block)
                    source = list(range(len(tokens))) if src is None else src[0].tolist()
                    kept = len(set(source) - {-1})
                    head = f"[{name}, {budget_text(budget)}, after block {block}: {kept} of {len(tokens)} tokens]"
                    print(head)
                    print(ansi_groups(tokens, source) if colour else plain_groups(tokens, source))
                    print()
                    sections.append(html_groups(tokens, source, f"text {t_index}: {head}"))
    path = out.write_text("visualize.html", "<!doctype html><meta charset='utf-8'><title>pitome: merged tokens</title>"
                                            f"<p>{subject.describe()}. Same background colour = merged into one "
                                            f"token.</p>" + "\n".join(sections))
    print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from .cli.flags import apply_threads, merge_choices, resolve_device
    from .images import check_image_names
    from .loading import check_model_spec, load_model
    from .results import ResultsFolder
    from .spectral_cli import validate_budgets

    spec = check_model_spec(args.model, args.weights)
    text = spec.name in ("minilm", "tiny-bert")
    choices = merge_choices(args, text=text)
    budgets = validate_budgets(choices)
    _blocks(args.blocks)
    if not text and args.inputs:
        check_image_names(args.inputs)
    ResultsFolder.check_parent(args.out)
    apply_threads(args.threads)
    device = resolve_device(args.device)
    subject = load_model(args.model, weights=args.weights, image_size=args.image_size, max_length=args.max_length,
                         model_kwargs=args.model_kwargs, seed=args.seed)
    out = ResultsFolder.create(args.out, "visualize")
    print(f"pitome visualize: results go to {out.path}", flush=True)
    if subject.modality == "text":
        if not text:
            choices = merge_choices(args, text=True)
        return _run_text(args, subject, choices, budgets, out)
    check_image_names(args.inputs or ["astronaut"])
    return _run_images(args, subject, choices, budgets, out, str(device))


def _run_images(args: argparse.Namespace, subject: Any, choices: Any, budgets: list[dict], out: Any,
                device: str) -> int:
    from PIL import Image

    from .images import sample_image, square_crop
    from .plotting import subtitle
    from .spectral_cli import budget_text
    from .vis import LABEL_W, PAD, TITLE_H, with_colorbar, with_header

    images = args.inputs or ["astronaut"]
    layers = choices.options.get("layers")
    algorithms = choices.algorithms
    size = subject.image_size[0]
    for budget in budgets:
        for index, name in enumerate(images):
            crop = square_crop(sample_image(name), size)
            batch = subject.normalize([crop])
            runs = {alg: trace(subject, batch, alg, budget, choices.options, layers, args.seed) for alg in algorithms}
            energy_from = next((a for a in algorithms if a.startswith("pitome")), None)
            if energy_from is None:  # the energy row always comes from a PiToMe run
                runs["pitome"] = trace(subject, batch, "pitome", budget, choices.options, layers, args.seed)
                energy_from = "pitome"
            num_layers = next(iter(runs.values()))[3]
            blocks = _blocks(args.blocks) or default_blocks(num_layers)
            bad = [b for b in blocks if not 0 <= b < num_layers]
            if bad:
                raise UserError(f"--blocks {bad} out of range: the model has blocks 0..{num_layers - 1}")
            figure, scale = image_figure_and_scale(crop, runs, blocks, energy_from, show=algorithms)
            if scale is not None:
                top = TITLE_H + PAD + len(algorithms) * (size + PAD)
                figure = with_colorbar(figure, top, size, scale[0], scale[1], "PiToMe energy\n(high = merged\nfirst)")
            figure = with_header(figure, [f"Which tokens merged: {', '.join(algorithms)} at {budget_text(budget)}, "
                                          f"image '{name}'",
                                          subtitle(subject.name, subject.weights_note, subject.random, device)])
            stem = "visualize" + (f"_{index}" if len(images) > 1 else "") + \
                ("_" + "_".join(f"{k}{v:g}" for k, v in budget.items()) if len(budgets) > 1 else "")
            path = out.path_for(f"{stem}.png")
            Image.fromarray(figure).save(path)
            print(f"wrote {path} ({figure.shape[1]}x{figure.shape[0]}): {', '.join(algorithms)} at "
                  f"{budget_text(budget)}, blocks {blocks}, {subject.describe()}")
    return 0
