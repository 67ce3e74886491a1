"""`pitome spectrum`: spectral distance of the token graph per block, per algorithm, at equal budgets.

Model mode: each algorithm is patched in turn with the same budget (so every algorithm keeps the same number of
tokens at every block), the inputs run through, and at every merging block the metric the merge step saw and its
plan are recorded. Two distances per block (see ``pitome.spectral``):
  per-layer  SD(graph of the tokens entering block l, that block's merge)  -- each algorithm's own tokens;
  cumulative SD(unmerged model's graph at block l, all merges up to block l) -- a common reference.
Synthetic mode: clustered tokens satisfying Theorem 1's assumptions, merged down to one token per cluster.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .cli.errors import UserError
from .cli.flags import add_merge_flags, add_model_flags, add_output_flags, add_runtime_flags, positive_int

__all__ = ["add_arguments", "run", "model_distances", "format_model_tables", "format_synthetic_table",
           "budget_of", "validate_budgets", "number_list"]


def budget_of(budget: Union[float, dict]) -> dict:
    """0.9 -> {'ratio': 0.9}; a dict ({'ratio': x} or {'r': n}) as it is."""
    return dict(budget) if isinstance(budget, dict) else {"ratio": float(budget)}


def budget_text(budget: dict) -> str:
    return f"keep-ratio {budget['ratio']:g}" if "ratio" in budget else f"r={budget['r']}"


def validate_budgets(choices: Any) -> list[dict]:
    """The budgets the picture verbs compare at (FLOPs targets need a solver run: pitome bench has one)."""
    if choices.flops_reductions:
        raise UserError("--flops-reduction is for pitome bench / eval-style sweeps; spectrum and visualize "
                        "compare at --ratios or --r")
    if choices.budgets is not None:
        raise UserError("--budgets (calibrated per-block budgets) is not supported by spectrum / visualize yet")
    return [{"ratio": x} for x in choices.ratios] + [{"r": n} for n in choices.rs]


# --- model mode ---------------------------------------------------------------------------------------------

def _batches(subject: Any, images: Sequence[str], texts: Sequence[str]) -> list[tuple[list[str], Any]]:
    from .images import sample_image, square_crop

    if subject.modality == "image":
        crops = [square_crop(sample_image(name), subject.image_size[0]) for name in images]
        return [(list(images), subject.normalize(crops))]
    if subject.tokenizer is None:
        raise UserError(f"{subject.spec} has no tokenizer; spectrum needs one for text inputs")
    encode = lambda text: dict(subject.tokenizer(text, return_tensors="pt", truncation=True,  # noqa: E731
                                                 max_length=subject.max_length))
    return [([text[:40]], encode(text)) for text in texts]  # one sequence per forward: no padding


def model_distances(
    subject: Any, algorithms: Sequence[str], budget: Union[float, dict], batches: Sequence[tuple[list[str], Any]],
    graph: str = "distance", options: Optional[dict] = None, layers: Optional[Sequence[int]] = None, seed: int = 0,
) -> dict:
    """Per-layer and cumulative SD of every algorithm on every input (lists over inputs, per block).

    subject: a ``pitome.loading.LoadedModel``; budget: a keep-ratio or {'ratio': x} / {'r': n}; options are
    given to the algorithms that accept them."""
    import pitome

    from .cli.flags import options_for
    from .spectral import MergeRecorder, cumulative_distances, layer_distances

    model = subject.module
    options = options or {}
    budget = budget_of(budget)
    reference: list[list] = []
    pitome.patch(model, algorithm="pitome", ratio=1.0, layers=layers)
    try:
        for _, batch in batches:
            with MergeRecorder() as rec:
                subject.forward(batch)
            reference.append(rec.records)
        result: dict = {"per_layer": {}, "cumulative": {}, "tokens": {}}
        for name in algorithms:
            own = {k: v for k, v in options_for(name, options).items() if k not in ("layers", "seed")}
            pitome.patch(model, algorithm=name, **budget, layers=layers, trace_source=True, seed=seed, **own)
            per_layer: dict[int, list[float]] = {}
            cumulative: dict[int, list[float]] = {}
            for (_, batch), ref in zip(batches, reference):
                with MergeRecorder() as rec:
                    subject.forward(batch)
                info = pitome.info(model)
                for layer, values in layer_distances(rec.records, graph).items():
                    per_layer.setdefault(layer, []).extend(values.tolist())
                for layer, values in cumulative_distances(ref, info.source_history, graph).items():
                    cumulative.setdefault(layer, []).extend(values.tolist())
                result["tokens"].setdefault(name, []).append(list(info.tokens_per_layer))
            result["per_layer"][name] = per_layer
            result["cumulative"][name] = cumulative
    finally:
        pitome.unpatch(model)
    return result


def _stats(values: Sequence[float]) -> tuple[float, float, float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std()), float(arr.min()), float(arr.max())


def _cell(values: Sequence[float]) -> str:
    mean, std, _, _ = _stats(values)
    return f"{mean:.4f} ± {std:.4f}"


def format_model_tables(result: dict, algorithms: Sequence[str], num_protected: int) -> str:
    """Markdown: per-layer SD and cumulative SD, mean ± std over inputs, with the tokens per block."""
    tokens = result["tokens"][algorithms[0]][0]
    layers = sorted(result["per_layer"][algorithms[0]])
    lines = []
    for title, key in (("Per-layer SD (graph of the tokens entering the block vs that block's merge)", "per_layer"),
                       ("Cumulative SD (unmerged model's graph at the block vs all merges so far)", "cumulative")):
        lines += [f"**{title}**", "", "| block | tokens in → out | " + " | ".join(algorithms) + " |",
                  "|---|---|" + "---|" * len(algorithms)]
        for layer in layers:
            t_in, t_out = tokens[layer] - num_protected, tokens[layer + 1] - num_protected
            cells = [_cell(result[key][name][layer]) for name in algorithms]
            lines.append(f"| {layer} | {t_in} → {t_out} | " + " | ".join(cells) + " |")
        if key == "per_layer":
            sums = [_cell(np.sum([result[key][name][layer] for layer in layers], axis=0)) for name in algorithms]
            lines.append("| sum | | " + " | ".join(sums) + " |")
        lines.append("")
    first, last = algorithms[0], layers[-1]
    ours = result["cumulative"][first][last]
    wins = [f"{name} {sum(a < b for a, b in zip(ours, result['cumulative'][name][last]))}/{len(ours)}"
            for name in algorithms[1:]]
    if wins:
        lines.append(f"Inputs where {first} has the lower cumulative SD after block {last}: {', '.join(wins)}.")
    return "\n".join(lines)


def _plot_model(result: dict, algorithms: Sequence[str], path: Path, title: str, sub: str) -> None:
    from .plotting import legend_outside, pyplot, save, style, titled

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
    for ax, key, label in ((axes[0], "per_layer", "per-layer SD"), (axes[1], "cumulative", "cumulative SD")):
        for name in algorithms:
            layers = sorted(result[key][name])
            stats = np.array([_stats(result[key][name][l]) for l in layers])
            look = style(name)
            ax.plot(layers, stats[:, 0], label=name, **look)
            ax.fill_between(layers, stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1], alpha=0.15,
                            color=look["color"])
        ax.set_xlabel("block (0 = first)")
        ax.set_ylabel(label + ", mean ± std over inputs (unitless)")
        ax.grid(alpha=0.3)
    titled(fig, title, sub)
    legend_outside(fig, list(axes))
    save(fig, path)


# --- synthetic mode -----------------------------------------------------------------------------------------

TIE = 1e-6  # SD differences below this are rounding (an exact recovery of the clusters gives SD ~1e-7..1e-6)


def format_synthetic_table(results: dict, algorithms: Sequence[str]) -> str:
    """Markdown: final SD per noise level and algorithm, and in how many seeds the first algorithm is lower /
    tied (|difference| <= 1e-6) / higher than each other one."""
    first = algorithms[0]
    head = "| noise | " + " | ".join(f"{a}: mean ± std [min, max]" for a in algorithms)
    head += " | " + " | ".join(f"{first} vs {a}: lower / tie / higher" for a in algorithms[1:]) + " |"
    lines = [head, "|---|" + "---|" * (2 * len(algorithms) - 1)]
    for noise, per_alg in results.items():
        finals = {a: [run[-1] for run in per_alg[a]] for a in algorithms}
        cells = []
        for a in algorithms:
            mean, std, lo, hi = _stats(finals[a])
            cells.append(f"{mean:.2e} ± {std:.1e} [{lo:.1e}, {hi:.1e}]")
        wins = []
        for a in algorithms[1:]:
            diff = [q - p for p, q in zip(finals[first], finals[a])]
            wins.append(f"{sum(d > TIE for d in diff)} / {sum(abs(d) <= TIE for d in diff)} / "
                        f"{sum(d < -TIE for d in diff)}")
        lines.append(f"| {noise:g} | " + " | ".join(cells) + " | " + " | ".join(wins) + " |")
    return "\n".join(lines)


def _plot_synthetic(results: dict, algorithms: Sequence[str], path: Path, title: str) -> None:
    from .plotting import legend_outside, pyplot, save, style, titled

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    dashes = ["-", "--", ":", "-."]
    for i, (noise, per_alg) in enumerate(results.items()):
        for name in algorithms:
            runs = per_alg[name]
            steps = min(len(r) for r in runs)
            mean = np.mean([r[:steps] for r in runs], axis=0)
            look = {**style(name), "linestyle": dashes[i % len(dashes)], "markevery": max(1, steps // 8)}
            ax.plot(range(1, steps + 1), mean, label=f"{name}, noise {noise:g}", **look)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("merge step")
    ax.set_ylabel("SD(G, lifted G), mean over seeds (unitless)")
    ax.grid(alpha=0.3)
    titled(fig, title, "synthetic tokens (no model)", width=70)
    legend_outside(fig, [ax])
    save(fig, path)


def run_synthetic(args: argparse.Namespace, choices: Any, out: Any) -> int:
    import pitome

    from .spectral import synthetic_distances

    sizes = number_list(args.cluster_sizes, "--cluster-sizes")
    noises = number_list(args.noise, "--noise", float, 0)
    ratio = choices.ratios[0] if args.ratios else 0.7
    options = {"margin": args.margin, "margin_decay": 0.0, **choices.options}
    algs = {name: pitome.create_algorithm(name, **{k: v for k, v in options.items()
                                                   if k in pitome.ALGORITHMS[name].option_names()})
            for name in choices.algorithms}
    results = {}
    for noise in noises:
        results[noise] = synthetic_distances(algs, sizes, args.dim, noise, ratio, range(args.seeds), args.graph)
    title = (f"synthetic clusters {sizes} (T={sum(sizes)}, dim {args.dim}), keep-ratio {ratio} per step down to "
             f"{len(sizes)} tokens, {args.seeds} seeds, {args.graph} graph, PiToMe margin {args.margin}")
    table = format_synthetic_table(results, choices.algorithms)
    text = f"{title}\n\nFinal SD (one token per true cluster):\n\n{table}\n"
    print(text)
    out.write_text("spectrum_synthetic.md", text)
    out.write_json("spectrum_synthetic.json", {"sizes": sizes, "dim": args.dim, "ratio": ratio, "graph": args.graph,
                                               "margin": args.margin, "seeds": args.seeds,
                                               "results": {str(k): v for k, v in results.items()}})
    if not args.no_plot:
        _plot_synthetic(results, choices.algorithms, out.path_for("spectrum_synthetic.png"), title)
    print(f"-> {out.path}")
    return 0


def number_list(text: str, flag: str, cast: type = int, least: float = 1) -> list:
    """'3,2,1' -> [3, 2, 1] for comma-separated flags; UserError naming the flag otherwise."""
    try:
        values = [cast(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated {'integers' if cast is int else 'numbers'}, "
                        f"got {text!r}") from None
    if min(values) < least:
        raise UserError(f"{flag} takes values >= {least:g}, got {text!r}")
    return values


# --- command ------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    add_merge_flags(parser, algorithms_default="pitome, tome, random (pitome_text on text)")
    group = parser.add_argument_group("spectrum")
    group.add_argument("--graph", choices=("distance", "similarity"), default="distance",
                       help="edge weights 1 - cos (the paper) or max(cos, 0)")
    group.add_argument("--images", nargs="+", default=None, metavar="IMAGE",
                       help="image files or bundled samples (default: all seven samples)")
    group.add_argument("--texts", nargs="+", default=None, help="texts for text models (default: 8 BBC News articles)")
    group.add_argument("--image-size", type=positive_int, default=None, metavar="PX",
                       help="image side in pixels (default: the model's)")
    group.add_argument("--max-length", type=positive_int, default=128, help="text length in tokens (default 128)")
    group.add_argument("--no-plot", action="store_true", help="skip the PNG plot (no matplotlib needed)")
    add_runtime_flags(parser)
    add_output_flags(parser)
    syn = parser.add_argument_group("synthetic mode (Theorem 1's assumptions A1-A3)")
    syn.add_argument("--synthetic", action="store_true", help="clustered synthetic tokens instead of a model")
    syn.add_argument("--cluster-sizes", default="40,32,25,20,16,12,10,8,6,5,4,3,2,1,1,1",
                     help="true cluster sizes, non-increasing (A3)")
    syn.add_argument("--dim", type=positive_int, default=1024, help="feature dimension")
    syn.add_argument("--noise", default="0.001", help="within-cluster noise level(s), comma-separated (A1: -> 0)")
    syn.add_argument("--seeds", type=positive_int, default=10, help="number of seeds")
    syn.add_argument("--margin", type=float, default=0.5,
                     help="PiToMe margin, constant over steps (A2: between cross- and within-cluster cosine)")


def run(args: argparse.Namespace) -> int:
    from .cli.flags import apply_threads, merge_choices, resolve_device
    from .images import SAMPLE_IMAGES, check_image_names
    from .loading import check_model_spec, load_model
    from .results import ResultsFolder

    ResultsFolder.check_parent(args.out)
    apply_threads(args.threads)
    if args.synthetic:
        choices = merge_choices(args, default_algorithms=("pitome", "tome", "random"), default_ratios=(0.7,))
        number_list(args.cluster_sizes, "--cluster-sizes"), number_list(args.noise, "--noise", float, 0)
        return run_synthetic(args, choices, _folder(args.out, "spectrum-synthetic"))
    spec = check_model_spec(args.model, args.weights)
    text = spec.name == "minilm" or spec.name == "tiny-bert"
    choices = merge_choices(args, text=text, default_algorithms=("pitome_text" if text else "pitome", "tome", "random"))
    budgets = validate_budgets(choices)
    images = args.images or list(SAMPLE_IMAGES)
    check_image_names(images if args.texts is None else [])
    device = resolve_device(args.device)
    args.device = str(device)
    subject = load_model(args.model, weights=args.weights, image_size=args.image_size, max_length=args.max_length,
                         model_kwargs=args.model_kwargs, seed=args.seed, device=device)
    if subject.modality == "text" and args.images:
        raise UserError(f"{args.model} is a text model; give --texts, not --images")
    if subject.modality == "text" and not text:  # the text defaults (PiToMe's text variant)
        choices = merge_choices(args, text=True, default_algorithms=("pitome_text", "tome", "random"))
    if subject.modality == "image":
        check_image_names(images)
        batches, inputs = _batches(subject, images, []), images
    else:
        texts = args.texts or _default_texts()
        batches, inputs = _batches(subject, [], texts), [f"text {i}" for i in range(len(texts))]
    batches = [(names, _to(batch, device)) for names, batch in batches]
    out = _folder(args.out, "spectrum")
    layers = choices.options.get("layers")
    code = 0
    for budget in budgets:
        code = max(code, _run_budget(args, subject, choices, budget, batches, inputs, layers, out, len(budgets) > 1))
    print(f"-> {out.path}")
    return code


def _folder(parent: str, name: str) -> Any:
    from .results import ResultsFolder

    folder = ResultsFolder.create(parent, name)
    print(f"pitome {name.split('-')[0]}: results go to {folder.path}", flush=True)
    return folder


def _to(batch: Any, device: Any) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device)


def _default_texts() -> list[str]:
    from . import zoo

    articles, labels = zoo.load_bbc_news()
    picks = [int(np.flatnonzero(labels == k)[i]) for i in range(2) for k in range(len(zoo.BBC_TOPICS))][:8]
    return [articles[i] for i in picks]


def _run_budget(args: argparse.Namespace, subject: Any, choices: Any, budget: dict, batches: list, inputs: list,
                layers: Any, out: Any, several: bool) -> int:
    import pitome

    from .plotting import subtitle

    algorithms = choices.algorithms
    result = model_distances(subject, algorithms, budget, batches, args.graph, choices.options, layers, args.seed)
    pitome.patch(subject.module, algorithm="pitome", ratio=1.0)
    num_protected = pitome.settings(subject.module).num_protected
    pitome.unpatch(subject.module)
    counts = {name: result["tokens"][name] for name in algorithms}
    equal = all(c == counts[algorithms[0]] for c in counts.values())
    title = (f"{subject.describe()}: {budget_text(budget)}, {args.graph} graph, {len(inputs)} inputs "
             f"({', '.join(inputs)})")
    tables = format_model_tables(result, algorithms, num_protected)
    budget_note = ("equal token counts at every block for all algorithms" if equal
                   else "WARNING: token counts differ between algorithms: " + json.dumps(counts))
    text = f"{title}\n\n{budget_note}; mean ± std over inputs; protected tokens excluded.\n\n{tables}"
    print(text)
    suffix = ("_" + "_".join(f"{k}{v:g}" for k, v in budget.items())) if several else ""
    out.write_text(f"spectrum{suffix}.md", text)
    out.write_json(f"spectrum{suffix}.json", {"title": title, "algorithms": list(algorithms), **budget,
                                              "graph": args.graph, "inputs": inputs, **result})
    if not args.no_plot:
        _plot_model(result, algorithms, out.path_for(f"spectrum{suffix}.png"),
                    f"Spectral distance per block at {budget_text(budget)} ({args.graph} graph, {len(inputs)} inputs)",
                    subtitle(subject.name, subject.weights_note, subject.random, str(args.device)))
    return 0 if equal else 1
