"""The per-layer merge step and the per-forward state it updates.

A fresh ``ForwardState`` is created when a patched model's forward starts and is found by the model's
blocks through a context variable keyed by the model: nothing lives in shared lists, so a patched model is
re-entrant, deep-copyable and usable from several threads at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from .algorithms.base import MergeRequest
from .config import MergeSettings
from .plan import MergePlan, compaction_plan

__all__ = ["AdapterState", "ForwardState", "remember_entry", "replay", "MergeInfo", "RootKey", "activate", "current_state", "record_merges",
           "MergeTimer", "merge_timing", "log_size_bias"]


def log_size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention's additive bias per token: log(size), -inf for empty slots (size 0)."""
    return torch.log(size.clamp_min(1e-30)).masked_fill(size <= 0, float("-inf")).to(dtype)


class RootKey:
    """Identity of one patched model; shared by its blocks (deepcopy copies it once per model).

    ``traced`` holds the state of a forward being traced by torch.compile (dynamo cannot trace
    ContextVar.set; a compiled graph has no Python state at run time, so this slot is only used while tracing).
    ``replay`` holds, while activation checkpointing is on, the state each block entered with, keyed by the
    block's input tensor (see ``remember_entry`` / ``replay``).
    """

    __slots__ = ("traced", "replay")

    def __init__(self) -> None:
        self.traced: Optional["ForwardState"] = None
        self.replay: dict[tuple, "ForwardState"] = {}


_ACTIVE: contextvars.ContextVar[dict] = contextvars.ContextVar("pitome_active_states", default={})
# Optional observer of every merge step (spectral analysis, visualisation); None = off, one lookup per step.
_RECORDER: contextvars.ContextVar[Optional[Callable[..., None]]] = contextvars.ContextVar("pitome_recorder", default=None)
# Optional merge-overhead timer (``merge_timing``, used by benchmarks); None = off, one lookup per plan / apply.
_TIMER: contextvars.ContextVar[Optional["MergeTimer"]] = contextvars.ContextVar("pitome_timer", default=None)


class MergeTimer:
    """Seconds spent in ``ForwardState.plan`` / ``apply`` (the merge steps) while ``merge_timing`` is active.

    On CUDA / MPS each timed call synchronises before and after, so the time is the merge's own work.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        _synchronize(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        _synchronize(device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def _synchronize(device: Optional[torch.device]) -> None:
    if device is None:
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Time a merge-step method when a ``merge_timing`` context is active; a plain call otherwise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        timer = _TIMER.get()
        return fn(*args, **kwargs) if timer is None else timer.call(fn, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def merge_timing() -> Iterator[MergeTimer]:
    """Accumulate the time spent in merge steps (plan + apply) of forwards run inside this context."""
    timer = MergeTimer()
    token = _TIMER.set(timer)
    try:
        yield timer
    finally:
        _TIMER.reset(token)


@dataclass
class MergeInfo:
    """What a user can read after a forward (``pitome.info(model)``).

    tokens_per_layer: tokens entering each block, then the tokens leaving the last block.
    size:             (B, N) float32 number of original tokens in each output token (None if nothing merged).
    source:           (B, N0) long, output slot holding each original token (-1 = dropped); needs trace_source.
    source_history:   [(block index, source map after that block's merge)] with trace_source.
    valid:            (B, N) bool padding mask of the output tokens (None without padding).
    """

    tokens_per_layer: list[int]
    size: Optional[Tensor]
    source: Optional[Tensor]
    source_history: list[tuple[int, Tensor]]
    valid: Optional[Tensor]
    settings: Any = field(default=None, repr=False, compare=False)       # the MergeSettings of that forward
    flops_kept: Optional[float] = field(default=None, repr=False, compare=False)  # set by pitome.info

    def __repr__(self) -> str:
        """'MergeInfo(197→60 tokens over 12 blocks, -43% FLOPs (pitome, ratio 0.9), batch 8)'."""
        from .describe import info_text

        return info_text(self, self.settings, self.flops_kept)

    def source_matrix(self) -> Tensor:
        """Dense (B, N, N0) bool: row = output token, column = original token it contains."""
        if self.source is None:
            raise ValueError("no source map: patch with trace_source=True")
        return source_to_matrix(self.source, len(self.size[0]) if self.size is not None else int(self.source.max()) + 1)


def source_to_matrix(source: Tensor, num_out: int) -> Tensor:
    batch, n0 = source.shape
    out = torch.zeros(batch, num_out + 1, n0, dtype=torch.bool, device=source.device)
    idx = torch.where(source < 0, num_out, source)
    out.scatter_(1, idx.unsqueeze(1), True)
    return out[:, :num_out]


@dataclass
class AdapterState:
    """Base of an adapter's own per-forward fields (``ForwardState.adapter``); adapters subclass it.

    needs_source: keep a source map even without trace_source (the adapter unmerges its output).
    """

    needs_source: bool = False


@dataclass
class ForwardState:
    """Sizes, masks and sources of the tokens of one forward, updated by each merge step."""

    settings: MergeSettings
    size: Optional[Tensor] = None
    valid: Optional[Tensor] = None
    frozen: Optional[Tensor] = None
    source: Optional[Tensor] = None
    metric: Optional[Tensor] = None
    attention: Optional[Tensor] = None
    tokens_per_layer: list[int] = field(default_factory=list)
    source_history: list[tuple[int, Tensor]] = field(default_factory=list)
    generator: Optional[torch.Generator] = None
    merged: bool = False
    final_tokens: Optional[int] = None
    # frozen tokens per sample when every sample has the same number and it is known without reading the data
    # (a text input without padding mask: its last token); keeps budgets Python ints (compile, export)
    frozen_count: Optional[int] = None
    # the adapter's own per-forward fields (one typed slot; a dataclass, so torch.compile traces it)
    adapter: Optional[AdapterState] = None
    # activation checkpointing is on (set by the root): blocks remember the state they enter with, so their
    # recomputation in the backward pass rebuilds the same merge plans
    checkpointing: bool = False

    # -- per block ----------------------------------------------------------------------------------
    # Every patched block calls begin_block on entry and end_block on exit. Everything a block changes lives in
    # this dataclass (no context variables, no module attributes), so a block's entry state can be snapshotted
    # and restored (e.g. for activation checkpointing) with dataclasses.replace.
    def begin_block(self, layer: int, x: Tensor) -> None:
        """Start the source map at the first block when asked for (trace_source, or an adapter that unmerges)."""
        if self.source is None and (self.settings.config.trace_source
                                    or (self.adapter is not None and self.adapter.needs_source)):
            self.source = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        self.tokens_per_layer.append(x.shape[1])

    def snapshot(self) -> "ForwardState":
        """A copy a block can run from again (activation checkpointing): the same sizes, masks, source map and
        adapter fields (tensors are replaced, never changed in place, so sharing them is safe), its own lists,
        and a generator at the same position (seeded baselines draw the same numbers again)."""
        generator = None
        if self.generator is not None:
            generator = torch.Generator(device=self.generator.device)
            generator.set_state(self.generator.get_state())
        return dataclasses.replace(self, tokens_per_layer=list(self.tokens_per_layer),
                                   source_history=list(self.source_history), generator=generator,
                                   adapter=copy.copy(self.adapter))

    def end_block(self, layer: int, x: Tensor) -> Tensor:
        """Record the block's output token count (the last one is ``info().tokens_per_layer[-1]``)."""
        self.final_tokens = x.shape[1]
        return x

    def layer_merges(self, layer: int) -> bool:
        return self.settings.layers[layer].merges

    def wants_keys(self, layer: int) -> bool:
        return self.settings.config.metric == "keys" and self.layer_merges(layer)

    def size_bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        """(B, 1, 1, N) additive attention bias log(size) for proportional attention; None while unneeded."""
        if not self.merged or self.size is None:
            return None
        if not self.settings.config.prop_attn and self.valid is None:
            return None
        if self.settings.config.prop_attn:
            return log_size_bias(self.size, dtype)[:, None, None, :]
        return torch.zeros_like(self.size).masked_fill(self.size <= 0, float("-inf")).to(dtype)[:, None, None, :]

    def merge(self, layer: int, x: Tensor, hidden_metric: Optional[Tensor] = None) -> Tensor:
        """Apply block ``layer``'s merge to the hidden states x (B, N, C); returns the merged states."""
        spec = self.settings.layers[layer]
        if not spec.merges:
            return x
        metric = self.metric if self.settings.config.metric == "keys" else hidden_metric
        if metric is None:
            metric = x
        self.metric = None
        plan = self.plan(layer, x, metric)
        recorder = _RECORDER.get()
        if recorder is not None:
            recorder(self, layer, metric, plan)
        if plan is None:
            return x
        return self.apply(layer, plan, x)

    @_timed
    def plan(self, layer: int, x: Tensor, metric: Tensor) -> Optional[MergePlan]:
        spec = self.settings.layers[layer]
        h = self.settings.num_protected
        batch, tokens, _ = x.shape
        mergeable = tokens - h
        valid = self.valid[:, h:] if self.valid is not None else None
        frozen = self.frozen[:, h:] if self.frozen is not None else None
        with torch.no_grad():
            if valid is None and (frozen is None or self.frozen_count is not None):
                frozen_count = self.frozen_count or 0
                r_int = spec.remove_count(mergeable - frozen_count, frozen_count, warn_layer=layer)
                if r_int <= 0:
                    return None
                r = torch.full((batch,), r_int, dtype=torch.long, device=x.device)
                r_max = r_min = r_int
            else:
                real = valid if valid is not None else torch.ones(batch, mergeable, dtype=torch.bool, device=x.device)
                still = (real & frozen) if frozen is not None else torch.zeros_like(real)
                count = (real & ~still).sum(dim=1)
                r = spec.remove_counts(count, still.sum(dim=1), warn_layer=layer)
                r_max = int(r.max())
                if r_max <= 0:
                    return None
                r_min = int(r.min())
        size = self.size[:, h:] if self.size is not None else None
        attention = self.attention
        self.attention = None
        request = MergeRequest(
            metric=metric.detach(), r=r, r_max=r_max, r_min=r_min, num_protected=h, valid=valid,
            frozen=frozen, size=size, attention=attention, layer=layer,
            num_layers=self.settings.num_layers, generator=self.generator,
        )
        # outside no_grad: the metric is detached (the choice of tokens has no gradient), but merge weights taken
        # from attention (evit, mctf) keep theirs, as in those methods' training
        return spec.algorithm.plan(request)

    @_timed
    def apply(self, layer: int, plan: MergePlan, x: Tensor) -> Tensor:
        x, self.size = plan.merge(x, self.size, self.settings.config.size_weighted)
        if self.valid is not None:
            self.valid = plan.any(self.valid)
        if self.frozen is not None:
            self.frozen = plan.any(self.frozen)
        if self.source is not None:
            self.source = plan.compose_source(self.source)
            self.source_history.append((layer, self.source))
        self.merged = True
        return x

    def compact_padding(self, x: Tensor) -> Tensor:
        """Shrink a padded batch to its widest sample after a merge: slots holding only padding (or nothing) go.

        Padding never merges, so without this a short sequence keeps all its pad tokens and sets the batch width.
        Applied as a plan (``compaction_plan``) to x, sizes, masks and the source map (dropped pad tokens get
        source -1); features move exactly (one member per slot). Padding is masked out of attention, so results
        do not change.
        """
        if self.valid is None or not self.merged:
            return x
        plan = compaction_plan(self.valid)
        if plan is None:
            return x
        size = self.size if self.size is not None else torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        x, self.size = plan.merge(x, size, size_weighted=False)  # one member per slot: x moves exactly
        self.valid = plan.any(self.valid)
        if self.frozen is not None:
            self.frozen = plan.any(self.frozen)
        if self.source is not None:
            before, self.source = self.source, plan.compose_source(self.source)
            if self.source_history and self.source_history[-1][1] is before:
                self.source_history[-1] = (self.source_history[-1][0], self.source)
        return x

    def source_after(self, layer: int) -> Optional[Tensor]:
        """The source map of the tokens leaving block ``layer`` (None: nothing merged up to there = identity)."""
        found = None
        for merged_at, source in self.source_history:
            if merged_at <= layer:
                found = source
        return found

    def unmerge(self, x: Tensor, source: Optional[Tensor] = None, fill_mean_from: Optional[int] = None) -> Tensor:
        """Copy each merged token of x back to every original position it holds (length N0 again).

        source: the map x's tokens come from (default: the current one). Dropped tokens (pruning baselines) get
        zeros, or, with ``fill_mean_from=h``, the size-weighted mean of x's tokens after the first h, so that a
        plain mean over those positions equals the size-weighted mean of the surviving tokens.
        """
        source = self.source if source is None else source
        if source is None or source.shape[0] != x.shape[0]:
            raise RuntimeError("pitome: no source map to unmerge with")
        out = MergePlan(assign=source, num_out=x.shape[1]).unmerge(x)
        if fill_mean_from is None:
            return out
        h = fill_mean_from
        size = self.size[:, h:] if self.size is not None else torch.ones(x.shape[0], x.shape[1] - h, device=x.device)
        weight = size.to(x.dtype).unsqueeze(-1)
        mean = (x[:, h:] * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.where((source < 0).unsqueeze(-1), mean.expand_as(out), out)

    def info(self) -> MergeInfo:
        counts = list(self.tokens_per_layer)
        if self.final_tokens is not None:
            counts.append(self.final_tokens)
        return MergeInfo(tokens_per_layer=counts, size=self.size, source=self.source,
                         source_history=list(self.source_history), valid=self.valid, settings=self.settings)


@contextlib.contextmanager
def record_merges(callback: Callable[..., None]) -> Iterator[None]:
    """Call ``callback(state, layer, metric, plan)`` at each merging block run inside this context.

    ``metric`` is what the algorithm saw (B, N, d), ``plan`` its MergePlan (None when nothing merged),
    ``state.size`` the sizes before the merge. For analysis tools; costs one lookup per step when unused.
    """
    token = _RECORDER.set(callback)
    try:
        yield
    finally:
        _RECORDER.reset(token)


def current_state(key: RootKey) -> Optional[ForwardState]:
    traced = key.traced  # set only while torch.compile traces a whole forward
    if traced is not None:
        return traced
    return _ACTIVE.get().get(key)


@contextlib.contextmanager
def activate(key: RootKey, settings: MergeSettings, device: Optional[torch.device] = None) -> Iterator[tuple[ForwardState, bool]]:
    """Use the state of the running forward of this model, or start a fresh one.

    Yields (state, started): ``started`` is True for the outermost call, which owns the state.
    """
    existing = current_state(key)
    if existing is not None:
        yield existing, False
        return
    state = ForwardState(settings=settings)
    if settings.config.seed is not None:
        state.generator = torch.Generator(device=device or "cpu")
        state.generator.manual_seed(settings.config.seed)
    if torch.compiler.is_compiling():
        key.traced = state
        try:
            yield state, True
        finally:
            key.traced = None
        return
    from .caller_warnings import collect_caps

    token = _ACTIVE.set({**_ACTIVE.get(), key: state})
    try:
        with collect_caps():  # budget caps of all blocks: one warning per forward, at the caller's line
            yield state, True
    finally:
        _ACTIVE.reset(token)


# --- activation checkpointing ---------------------------------------------------------------------------------
# A checkpointed block runs twice: in the forward (under the forward's state) and again in the backward pass, when
# autograd recomputes it from its saved input — outside any forward. The first run remembers a copy of the state
# the block entered with, keyed by the input tensor (the recomputation gets that tensor, or a detached alias of its
# storage); the second runs from a copy of it and so rebuilds the same plans. An entry lives as long as its tensor.

def _entry_key(x: Tensor) -> tuple:
    return (x.data_ptr(), x.device, x.dtype, tuple(x.shape), tuple(x.stride()))


def remember_entry(key: RootKey, x: Tensor, state: ForwardState) -> None:
    """Keep a copy of ``state`` for the block that starts from ``x`` (until ``x`` is freed)."""
    entry = _entry_key(x)
    key.replay[entry] = state.snapshot()
    weakref.finalize(x, key.replay.pop, entry, None)


@contextlib.contextmanager
def replay(key: RootKey, x: Tensor) -> Iterator[Optional[ForwardState]]:
    """Outside a forward: the state remembered for a block starting from ``x`` (a fresh copy, active for the
    block's hooks for the duration), or None when there is none (the block runs unmerged, as the library's)."""
    saved = key.replay.get(_entry_key(x)) if key.replay else None
    if saved is None:
        yield None
        return
    state = saved.snapshot()
    token = _ACTIVE.set({**_ACTIVE.get(), key: state})
    try:
        yield state
    finally:
        _ACTIVE.reset(token)
