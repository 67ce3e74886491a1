"""The loop every harness shares: run a model over batches under one merge setting, measure FLOPs and speed.

A harness hands over an ``EvalModel`` (the module pitome patches, a function from a collated batch to per-item
outputs) and the data; ``run_pass`` runs this process's share of the batches under a ``MergeSpec`` and
gathers per-item outputs, labels and MACs in dataset order on every process.

FLOPs are the paper's convention (multiply-accumulates of the encoder blocks, patch embedding and heads
excluded) from the token counts the forward actually saw (``pitome.info(model).tokens_per_layer``); with
padded text batches that is the padded length (batches are length-sorted to keep padding small).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..flops import EncoderShape, encoder_macs
from .distributed import DistContext, all_max, gather_in_order, shard

__all__ = ["MergeSpec", "EvalModel", "PassResult", "run_pass", "encoder_shape", "progress_bar", "set_seed"]


@dataclass(frozen=True)
class MergeSpec:
    """One merge setting of a sweep: algorithm (None = unmerged), budget, and the other ``pitome.patch`` args.

    ratio / r:     the budget as ``pitome.patch`` takes it.
    match_ratio:   instead of a budget, "the r whose FLOPs match keep-ratio ``match_ratio``" (ToMe's native
                   fixed-r schedule at equal FLOPs); resolved into ``r`` before running.
    kwargs:        everything else for ``pitome.patch`` (preset, layers, prop_attn, algorithm options, ...).
    name:          what result rows call this setting (default: the algorithm), e.g. "auto" for preset='auto'.
    """

    algorithm: Optional[str] = None
    ratio: Optional[float] = None
    r: Any = None
    match_ratio: Optional[float] = None
    kwargs: tuple = ()
    name: Optional[str] = None

    @staticmethod
    def make(algorithm: Optional[str], ratio: Optional[float] = None, r: Any = None,
             match_ratio: Optional[float] = None, name: Optional[str] = None, **kwargs: Any) -> "MergeSpec":
        items = tuple(sorted((k, _freeze(v)) for k, v in kwargs.items() if v is not None))
        return MergeSpec(algorithm, _freeze(ratio), _freeze(r), match_ratio, items, name)

    @property
    def display(self) -> str:
        return "unmerged" if not self.merges else (self.name or self.algorithm)

    @property
    def merges(self) -> bool:
        return self.algorithm is not None

    @property
    def options(self) -> dict:
        return {k: _thaw(v) for k, v in self.kwargs}

    @property
    def budget(self) -> str:
        if not self.merges:
            return "-"
        if isinstance(self.ratio, tuple):  # per-block keep-ratios (e.g. pitome.calibrate)
            return "ratio=[" + ", ".join(f"{v:g}" for v in self.ratio) + "]"
        if self.ratio is not None:
            return f"ratio={self.ratio:g}"
        if self.r is not None:
            text = f"r={_thaw(self.r)}"
            return text + (f" (FLOPs of ratio {self.match_ratio:g})" if self.match_ratio is not None else "")
        return f"r=? (FLOPs of ratio {self.match_ratio:g})"

    @property
    def label(self) -> str:
        return "unmerged" if not self.merges else f"{self.display} {self.budget}"

    def with_r(self, r: int) -> "MergeSpec":
        return MergeSpec(self.algorithm, None, r, self.match_ratio, self.kwargs, self.name)

    @contextlib.contextmanager
    def applied(self, target: nn.Module) -> Iterator[nn.Module]:
        """Patch ``target`` for the duration (unmerged: make sure it is not patched)."""
        import pitome

        if not self.merges:
            if pitome.is_patched(target):
                raise RuntimeError("the model is already patched; an unmerged pass needs the original model")
            yield target
            return
        if self.ratio is None and self.r is None:
            raise ValueError(f"{self.label}: the budget is not resolved yet (match_ratio needs a FLOPs match)")
        with pitome.patched(target, self.algorithm, ratio=self.ratio, r=_thaw(self.r), **self.options):
            yield target


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and not (len(value) == 2 and isinstance(value[1], float)):
        return [_thaw(v) for v in value]
    return value


@dataclass
class EvalModel:
    """What a harness runs.

    target:   the module ``pitome.patch`` is applied to (e.g. a vision tower).
    run:      collated inputs -> per-item outputs (B, ...) on any device; called under ``torch.no_grad``.
    seq_len:  inputs -> tokens entering the first block when unmerged (text: padded length); None = the token
              count seen by a merging-off forward of the first batch (fixed-size inputs such as images).
    shape:    widths for FLOPs; None = read from the target (``encoder_shape``).
    """

    target: nn.Module
    run: Callable[[Any], Tensor]
    seq_len: Optional[Callable[[Any], int]] = None
    shape: Optional[EncoderShape] = None
    name: str = ""

    def encoder_shape(self) -> Optional[EncoderShape]:
        if self.shape is None:
            self.shape = encoder_shape(self.target)
        return self.shape


@dataclass
class PassResult:
    """Per-item outputs, labels and MACs of one pass over the data, in dataset order."""

    spec: MergeSpec
    outputs: Tensor
    labels: Optional[Tensor]
    macs: Optional[Tensor]
    seconds: float
    tokens_per_layer: Optional[list[int]] = None
    extra: dict = field(default_factory=dict)

    @property
    def items(self) -> int:
        return len(self.outputs)

    @property
    def gflops(self) -> float:
        return float(self.macs.double().mean()) / 1e9 if self.macs is not None and len(self.macs) else math.nan

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else math.nan


def encoder_shape(model: nn.Module) -> Optional[EncoderShape]:
    """Block widths read from the model's own modules (``pitome.flops.encoder_shape``); None if unreadable."""
    from ..flops import encoder_shape as read_shape

    try:
        return read_shape(model)
    except ValueError:
        return None


def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress_bar(iterable: Any, total: Optional[int], desc: str, enabled: bool) -> Any:
    """tqdm when installed and enabled, else the iterable itself."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, dict):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _head(inputs: Any, count: int) -> Any:
    """The first ``count`` items of a batch (tensor, dict or list of tensors), for a cheap warm-up forward."""
    if isinstance(inputs, Tensor):
        return inputs[:count]
    if isinstance(inputs, dict):
        return {k: _head(v, count) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_head(v, count) for v in inputs)
    return inputs


def _tokens_after_forward(model: EvalModel, spec: MergeSpec, inputs: Any, probe: Optional[list[int]]) -> Optional[list[int]]:
    if spec.merges:
        from ..adapters.base import get_tag

        last = get_tag(model.target, "last")
        return list(last.tokens_per_layer) if last is not None else None
    if probe is None:
        return None
    if model.seq_len is None:
        return list(probe)
    return [int(model.seq_len(inputs))] * len(probe)


def _probe_tokens(model: EvalModel, inputs: Any) -> Optional[list[int]]:
    """Token counts of a merging-off forward (patched at ratio 1, which equals the unpatched model)."""
    import pitome
    from ..adapters.base import UnsupportedModelError

    try:
        with pitome.patched(model.target, "tome", r=0):
            model.run(inputs)
            return list(pitome.info(model.target).tokens_per_layer)
    except UnsupportedModelError:
        return None


def run_pass(
    model: EvalModel,
    loader_factory: Callable[[list[list[int]]], Any],
    batches: Sequence[Sequence[int]],
    spec: MergeSpec,
    ctx: Optional[DistContext] = None,
    progress: bool = False,
    warmup: bool = True,
    desc: str = "",
) -> PassResult:
    """Run ``model`` over this process's share of ``batches`` (lists of dataset indices) under ``spec``.

    loader_factory(my_batches) must yield ``(inputs, labels)`` for exactly those batches, in that order
    (a DataLoader with ``batch_sampler=my_batches``). Every batch is the same in a 1- and a K-process run, so
    the gathered outputs are identical.
    """
    ctx = ctx or DistContext()
    mine = shard(list(batches), ctx)
    local: list[tuple[int, tuple]] = []
    seconds = 0.0
    first_tokens: Optional[list[int]] = None
    shape = model.encoder_shape()
    probe: Optional[list[int]] = None
    with torch.no_grad(), spec.applied(model.target):
        loader = loader_factory([list(b) for _, b in mine])
        iterator = progress_bar(loader, len(mine), desc or spec.label, progress and ctx.is_main)
        for position, ((index, _), (inputs, labels)) in enumerate(zip(mine, iterator)):
            inputs = _to_device(inputs, ctx.device)
            if position == 0:
                if not spec.merges:
                    probe = _probe_tokens(model, _head(inputs, 2))  # doubles as the warm-up forward
                elif warmup:
                    model.run(_head(inputs, 2))
            _sync(ctx.device)
            start = time.perf_counter()
            outputs = model.run(inputs)
            _sync(ctx.device)
            seconds += time.perf_counter() - start
            tokens = _tokens_after_forward(model, spec, inputs, probe)
            if first_tokens is None:
                first_tokens = tokens
            macs = None
            if tokens is not None and shape is not None:
                macs = torch.full((len(outputs),), float(encoder_macs(shape, tokens)), dtype=torch.float64)
            lab = None if labels is None else torch.as_tensor(labels)
            local.append((index, (outputs.detach().cpu(), lab, macs)))
    gathered = gather_in_order(local, len(batches), ctx)
    outputs = torch.cat([g[0] for g in gathered]) if gathered else torch.zeros(0)
    labels_all = None if not gathered or gathered[0][1] is None else torch.cat([g[1] for g in gathered])
    macs_all = None if not gathered or any(g[2] is None for g in gathered) else torch.cat([g[2] for g in gathered])
    return PassResult(spec=spec, outputs=outputs, labels=labels_all, macs=macs_all,
                      seconds=all_max(seconds, ctx), tokens_per_layer=first_tokens)
