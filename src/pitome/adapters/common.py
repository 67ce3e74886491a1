"""The toolkit every adapter builds on (whatever the model library): naming, tagging and swapping modules under
one patched model, the root mixin that owns a forward's merge state, attention signals for attention-ranking
algorithms, and intermediate outputs (merged, or unmerged back to the input grid).

Model-library specifics live elsewhere: ``hf_common`` (transformers), and each family's own file.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import MergeSettings
from ..step import AdapterState, ForwardState, RootKey, activate, remember_entry, replay
from .base import clear_tags, get_tag, root_state, set_tags, swap_class

__all__ = ["class_names", "original_class", "original_name", "tag", "swap", "bind_root", "model_device",
           "store_info", "relay_info", "RootMixin", "PatchedBlock", "uses_checkpointing", "run_block", "as_additive",
           "split_heads_mean", "first_token_attention", "received_attention", "mean_attention", "attention_mode",
           "intermediates_mode", "taken_blocks", "intermediates_unmerged", "IntermediatesState", "intermediates_state",
           "bind_call"]


# --- names, tags, swapping ----------------------------------------------------------------------------------

def class_names(obj: Any) -> set[str]:
    """Names of the classes in obj's MRO (matching by name survives library refactors and our swapped classes)."""
    return {c.__name__ for c in type(obj).__mro__}


def original_class(module: nn.Module) -> type:
    """The class of a module as its library built it (also when pitome has swapped its class). An attribute
    lookup, not the class __dict__ (a mapping proxy makes torch.compile break the graph); only swapped classes,
    which nothing subclasses, define it."""
    return getattr(type(module), "_pitome_original_class", type(module))


def original_name(module: nn.Module) -> str:
    return original_class(module).__name__


def tag(module: nn.Module, key: RootKey, layer: Optional[int] = None) -> None:
    """Mark a module as part of the patched model ``key`` (every swapped or hooked module is tagged)."""
    set_tags(module, key=key, layer=layer)


def swap(module: nn.Module, mixin: type, key: RootKey, layer: Optional[int] = None) -> None:
    tag(module, key, layer)
    swap_class(module, mixin)


def bind_root(model: nn.Module, key: RootKey, settings: MergeSettings, mixin: type) -> None:
    """Make ``model`` a root: a forward started from it owns a fresh merge state for the patched model ``key``."""
    set_tags(model, settings=settings)
    swap(model, mixin, key)


def model_device(model: nn.Module) -> Optional[torch.device]:
    for param in model.parameters():
        return param.device
    return None


# --- blocks ------------------------------------------------------------------------------------------------------

class PatchedBlock:
    """Mixin for a block (B, N, C first argument): the library's own forward outside a merge state; inside one,
    ``_pitome_block`` (the block with its merge step) between the state's begin_block and end_block. Activation
    checkpointing: see ``run_block``."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return run_block(self, x, self._pitome_body, super().forward, *args, **kwargs)

    def _pitome_body(self, state: ForwardState, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        layer = get_tag(self, "layer")
        state.begin_block(layer, x)
        return state.end_block(layer, self._pitome_block(state, layer, x, *args, **kwargs))

    def _pitome_block(self, state: ForwardState, layer: int, x: Tensor, *args: Any,
                      **kwargs: Any) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def run_block(module: nn.Module, x: Tensor, body: Callable[..., Any], plain: Callable[..., Any], *args: Any,
              **kwargs: Any) -> Any:
    """Run a patched block: ``body(state, x, ...)`` inside a forward; ``plain(x, ...)`` (the library's own forward)
    outside one — except while autograd recomputes a checkpointed block: then ``body`` runs from a copy of the
    state the block entered with (remembered in the forward), so it rebuilds the same merge plans, and the state
    it leaves is remembered for the next block of the same checkpointed segment."""
    state = root_state(module)
    if state is not None:
        if state.checkpointing:
            remember_entry(get_tag(module, "key"), x, state)
        return body(state, x, *args, **kwargs)
    key = get_tag(module, "key")
    if key is None or not key.replay:
        return plain(x, *args, **kwargs)
    with replay(key, x) as state:
        if state is None:
            return plain(x, *args, **kwargs)
        out = body(state, x, *args, **kwargs)
        remember_entry(key, out, state)
        return out


# --- roots: the per-forward owner --------------------------------------------------------------------------------

def store_info(model: nn.Module, state: ForwardState) -> None:
    """Keep the latest forward's MergeInfo (without an internally tracked source map unless asked for)."""
    info = state.info()
    if not state.settings.config.trace_source:
        info = dataclasses.replace(info, source=None, source_history=[])
    set_tags(model, last=info)


def relay_info(outer: nn.Module, inner: nn.Module, call: Callable[[], Any]) -> Any:
    """Run ``call`` (a forward of ``outer`` that runs the patched ``inner``) and hand inner's MergeInfo to outer,
    so ``pitome.info`` works on the model the user holds (task heads, two-tower models)."""
    clear_tags(outer, "last")
    out = call()
    set_tags(outer, last=get_tag(inner, "last"))
    return out


def uses_checkpointing(model: nn.Module) -> bool:
    """Whether this forward will be recomputed block by block in the backward pass (timm ``set_grad_checkpointing``,
    Hugging Face ``gradient_checkpointing_enable``, open_clip ``set_grad_checkpointing``)."""
    return model.training and torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
        getattr(m, "gradient_checkpointing", False) is True or getattr(m, "grad_checkpointing", False) is True
        for m in model.modules())


class RootMixin:
    """Owner of the per-forward merge state: any patched model part a forward can start from.

    ``_pitome_run(fn, ...)`` runs fn under this model's state (a fresh one for the outermost call, the owner),
    with ``_pitome_enter`` before it (checks, the adapter's own state) and ``_pitome_exit`` after it (e.g. unmerge
    the output), and keeps the MergeInfo on the owner.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._pitome_run(super().forward, *args, **kwargs)

    def _pitome_enter(self, state: ForwardState, owner: bool, fn: Callable[..., Any], args: tuple,
                      kwargs: dict) -> None:
        """Before fn (default: the owner notes whether blocks will be recomputed by activation checkpointing)."""
        if owner:
            state.checkpointing = uses_checkpointing(self)

    def _pitome_exit(self, state: ForwardState, owner: bool, out: Any) -> Any:
        """After fn: post-process its output (default: unchanged)."""
        return out

    def _pitome_run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with activate(get_tag(self, "key"), get_tag(self, "settings"), model_device(self)) as (state, owner):
            self._pitome_enter(state, owner, fn, args, kwargs)
            out = self._pitome_exit(state, owner, fn(*args, **kwargs))
            if owner:
                store_info(self, state)
            return out


# --- attention signals ----------------------------------------------------------------------------------------

def as_additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Attention masks come as bool (True = attend) or additive floats; give additive floats."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def split_heads_mean(projection: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*d) projection output -> (B, N, d) mean over heads (the keys metric of PiToMe / ToMe)."""
    batch, tokens, width = projection.shape
    return projection.view(batch, tokens, num_heads, width // num_heads).mean(dim=2)


def first_token_attention(query0: Tensor, keys: Tensor, num_heads: int, scaling: float,
                          mask: Optional[Tensor]) -> Tensor:
    """(B, N) attention that token 0 pays to every token, averaged over heads, in float32 (float64 kept).

    query0: (B, 1, H*d) query projection of token 0; keys: (B, N, H*d); mask: additive or bool layer mask,
    (B, 1, Q, N) or (B, 1, 1, N), or None. For algorithms that rank tokens by [CLS] attention.
    """
    return received_attention(query0, keys, num_heads, scaling, None if mask is None else mask[:, :, :1, :])


def received_attention(queries: Tensor, keys: Tensor, heads: int, scaling: float, mask: Optional[Tensor]) -> Tensor:
    """(B, N) attention each token receives, averaged over heads and over all query tokens, in float32
    (float64 kept). queries: (B, Q, H*d), keys: (B, N, H*d), mask as for ``first_token_attention``."""
    batch, tokens, width = keys.shape
    q = queries.view(batch, -1, heads, width // heads).transpose(1, 2)  # (B, H, Q, d)
    k = keys.view(batch, tokens, heads, width // heads).transpose(1, 2)  # (B, H, N, d)
    wide = torch.promote_types(keys.dtype, torch.float32)
    return mean_attention(q, k, scaling, as_additive(mask, wide), wide)


# Attention logits materialised at once by mean_attention (16 MiB in float32): without a bound, 'mean' attention
# (MCTF) at 4,097 tokens held heads x T x T probabilities twice beside the fused attention (~800 MB for ViT-S).
ATTENTION_CHUNK_ELEMENTS = 1 << 22


def mean_attention(q: Tensor, k: Tensor, scaling: float, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """(B, N) softmax(q k^T * scaling + bias) averaged over heads and queries, in ``dtype``; q: (B, H, Q, d),
    k: (B, H, N, d), bias: additive, broadcastable to (B, H, Q, N). Blocks of query rows bound the memory to
    ~ATTENTION_CHUNK_ELEMENTS logits; a single block (short sequences) is the plain formula."""
    batch, heads, queries, _ = q.shape
    kt = k.to(dtype).transpose(-2, -1)
    rows = max(1, ATTENTION_CHUNK_ELEMENTS // max(1, batch * heads * kt.shape[-1]))
    if queries <= rows:
        return _attention_probs(q.to(dtype), kt, scaling, bias).mean(dim=(1, 2))
    total = q.new_zeros((batch, kt.shape[-1]), dtype=dtype)
    for start in range(0, queries, rows):
        part = bias if bias is None or bias.dim() < 2 or bias.shape[-2] == 1 else bias[..., start:start + rows, :]
        total = total + _attention_probs(q[:, :, start:start + rows].to(dtype), kt, scaling, part).sum(dim=(1, 2))
    return total / (heads * queries)


def _attention_probs(q: Tensor, kt: Tensor, scaling: float, bias: Optional[Tensor]) -> Tensor:
    logits = (q @ kt) * scaling
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits.softmax(dim=-1)


def attention_mode(state: ForwardState, layer: int) -> Optional[str]:
    """'cls' / 'mean' when this layer's algorithm ranks tokens by attention, else None."""
    spec = state.settings.layers[layer]
    if not (state.settings.needs_attention and spec.merges and spec.algorithm.needs_attention):
        return None
    return getattr(spec.algorithm, "attention_from", "cls") if state.settings.num_protected > 0 else "mean"


# --- intermediate outputs ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class IntermediatesState(AdapterState):
    """A forward that returns intermediate block outputs; ``unmerge``: copy them back to the input tokens."""

    unmerge: bool = False


def intermediates_mode(output_fmt: str, unmerge: Optional[bool]) -> bool:
    """Whether intermediates are unmerged: the caller's ``unmerge``; by default only for 'NCHW' (a grid needs
    every input token). Merged tokens cannot be laid out as a grid: 'NCHW' with unmerge=False is refused."""
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    if unmerge is None:
        return output_fmt == "NCHW"
    if output_fmt == "NCHW" and not unmerge:
        raise ValueError("pitome: output_fmt='NCHW' needs every input token on the grid, but unmerge=False asks for "
                         "merged tokens; pass unmerge=True (merged tokens copied back to their positions) or "
                         "output_fmt='NLC' (merged tokens, a different count per block)")
    return bool(unmerge)


def bind_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name, defaults filled in (the library's own signature, whatever its version)."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def intermediates_state(state: ForwardState, unmerge: bool) -> IntermediatesState:
    """The forward's IntermediatesState (made if the adapter has none yet), asking for unmerging if ``unmerge``;
    set before the blocks run, so the source map is kept from the first block."""
    if not isinstance(state.adapter, IntermediatesState):
        state.adapter = IntermediatesState()
    if unmerge:
        state.adapter.unmerge = state.adapter.needs_source = True
    return state.adapter


def taken_blocks(num_blocks: int, indices: Optional[Any]) -> list[int]:
    """The blocks whose outputs ``forward_intermediates(indices=...)`` returns, in the order returned:
    None = all, an int n = the last n, a sequence = those blocks (negative indices from the end)."""
    if indices is None:
        return list(range(num_blocks))
    if isinstance(indices, int):
        return list(range(num_blocks - indices, num_blocks))
    return sorted({int(i) % num_blocks for i in indices})


def intermediates_unmerged(state: ForwardState, spatial: Sequence[Tensor], prefix: Optional[Sequence[Tensor]],
                           blocks: Sequence[int]) -> tuple[list[Tensor], Optional[list[Tensor]]]:
    """Copy merged intermediates (B, N_i, C) back to the input tokens through the source map after each block.

    spatial / prefix: the outputs of the blocks ``blocks`` split after the protected (prefix) tokens, as the
    library returns them. Protected tokens keep their slots, so the prefix part is unchanged.
    """
    h = 0 if prefix is None else prefix[0].shape[1]
    out_spatial, out_prefix = [], []
    for index, layer in enumerate(blocks):
        full = spatial[index] if prefix is None else torch.cat([prefix[index], spatial[index]], dim=1)
        source = state.source_after(layer)
        if source is not None:
            full = state.unmerge(full, source=source)
        out_spatial.append(full[:, h:])
        out_prefix.append(full[:, :h])
    return out_spatial, (None if prefix is None else out_prefix)
