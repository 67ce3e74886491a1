"""Analytic FLOPs of Transformer encoders from the token counts a forward actually saw.

Counted as multiply-accumulates (MACs), the convention of the ToMe / PiToMe papers and fvcore
("GFLOPs" in their tables); ``torch.utils.flop_counter`` counts 2 per MAC.

What is counted, per item of a batch:
- blocks (analytic, ``block_macs``): q/k/v and output projections and QK^T + AV on the tokens entering the
  block; the MLP on the tokens left after the block's merge; widths read from the model's own modules;
- merge steps (analytic): each algorithm's ``merge_macs(tokens, dim)`` (PiToMe: the T x T similarity,
  ToMe: (T/2)^2), on the mergeable tokens of the metric width (keys: head dim; hidden states: model dim);
- stem and head: every ``nn.Linear`` / ``nn.ConvNd`` outside the blocks (patch embedding, pooler,
  classifier, projections), from the shapes seen in the same forward.
Not counted (as fvcore / FlopCounterMode): norms, activations, softmax, embeddings lookups, gathers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["EncoderShape", "block_macs", "encoder_macs", "find_blocks", "encoder_shape", "metric_width",
           "merge_step_macs", "decoder_prefill_macs", "FlopsCount", "count_macs", "flop_counter_macs", "run_forward",
           "batch_size_of"]


@dataclass(frozen=True)
class EncoderShape:
    """Widths of a standard pre-norm encoder block.

    mlp_matrices: weight matrices of width dim x mlp_hidden in the MLP (2 for fc1 + fc2; 3 for SwiGLU).
    heads:        attention heads (the key metric averages over heads: its width is attn_dim / heads).
    """

    dim: int
    mlp_hidden: int
    attn_dim: Optional[int] = None  # heads * head_dim, when it differs from dim
    heads: Optional[int] = None
    mlp_matrices: int = 2

    @property
    def inner(self) -> int:
        return self.attn_dim or self.dim

    @property
    def head_dim(self) -> int:
        return self.inner // self.heads if self.heads else self.inner


def block_macs(shape: EncoderShape, tokens_in: int, tokens_after_merge: Optional[int] = None) -> int:
    """One block: qkv + output projection and QK^T + AV on the tokens entering it; MLP after the merge."""
    n = tokens_in
    m = n if tokens_after_merge is None else tokens_after_merge
    c, a = shape.dim, shape.inner
    attention = 3 * n * c * a + n * a * c + 2 * n * n * a
    mlp = shape.mlp_matrices * m * c * shape.mlp_hidden
    return attention + mlp


def encoder_macs(shape: EncoderShape, tokens_per_layer: Sequence[int]) -> int:
    """All blocks, from the counts entering each block followed by the count leaving the last one.

    The merge inside block l happens before its MLP, so the MLP sees the count entering block l + 1.
    """
    counts = list(tokens_per_layer)
    return sum(block_macs(shape, counts[i], counts[i + 1]) for i in range(len(counts) - 1))


def decoder_prefill_macs(config: Any, tokens: int) -> int:
    """A decoder-only language model's blocks on a prompt of ``tokens`` (LLaVA's prefill), from its config.

    Same convention as ``block_macs``: q / k / v / o projections (k and v at the grouped key-value width), QK^T and
    AV over all token pairs, the MLP (``mlp_matrices`` 3 for the SwiGLU of Llama / Mistral / Qwen); embeddings and
    the LM head are not counted.
    """
    dim, layers = int(config.hidden_size), int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or dim // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    shape = EncoderShape(dim=dim, mlp_hidden=int(config.intermediate_size), attn_dim=heads * head_dim, heads=heads,
                         mlp_matrices=3)
    grouped_kv = 2 * tokens * dim * (kv_heads * head_dim - shape.inner)  # k and v narrower than q under GQA
    return layers * (block_macs(shape, tokens) + grouped_kv)


# --- reading a model -------------------------------------------------------------------------------------

_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads")
_BLOCK_PATHS = ("blocks", "encoder.layer", "encoder.layers", "transformer.layer", "vision_model.encoder.layers",
                "text_model.encoder.layers")


def _get_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _is_block_list(obj: Any) -> bool:
    if not isinstance(obj, (nn.ModuleList, nn.Sequential)) or len(obj) == 0:
        return False
    first = type(obj[0])
    return all(type(b) is first for b in obj) and any(isinstance(m, nn.Linear) for m in obj[0].modules())


def find_blocks(model: nn.Module) -> nn.Module:
    """The list of Transformer blocks: the adapter's answer for a model pitome supports, else a known path, else
    the largest list of identical modules."""
    from .adapters import UnsupportedModelError, find_adapter

    try:
        return find_adapter(model).blocks(model)
    except (UnsupportedModelError, NotImplementedError):
        pass
    lists = [m for m in model.modules() if _is_block_list(m)]
    for path in _BLOCK_PATHS:
        obj = _get_path(model, path)
        if _is_block_list(obj):
            return obj
    if not lists:
        raise ValueError(f"cannot find the Transformer blocks of a {type(model).__name__}: no list of identical "
                         f"modules with Linear layers")
    return max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters()))


def _heads(block: nn.Module, model: Optional[nn.Module]) -> Optional[int]:
    for module in block.modules():
        for attr in _HEAD_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    config = getattr(model, "config", None)
    value = getattr(config, "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else None


def block_shape(block: nn.Module, model: Optional[nn.Module] = None) -> EncoderShape:
    """Widths of one block from its own Linear layers (attention ones have 'attn' / 'attention' in their name)."""
    linears = [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    attn = [m for name, m in linears if _ATTENTION_NAME.search(name)]
    mlp = [m for name, m in linears if not _ATTENTION_NAME.search(name)]
    where = type(block).__name__
    mha = [m for m in block.modules() if isinstance(m, nn.MultiheadAttention)]
    if mha and mha[0]._qkv_same_embed_dim:  # packed in_proj (open_clip): q/k/v as three dim -> dim projections
        dim = mha[0].embed_dim
        attn = [nn.Linear(dim, dim, bias=False, device="meta") for _ in range(3)] + [mha[0].out_proj]
        mlp = [m for m in mlp if m is not mha[0].out_proj]
    if len(attn) < 2 or not mlp:
        raise ValueError(f"cannot read the widths of a {where}: expected attention projections (names with "
                         f"'attn'/'attention') and MLP layers, found {[n for n, _ in linears]}")
    dim = attn[0].in_features
    inner = sum(m.out_features for m in attn[:-1]) // 3
    attn_macs = sum(m.in_features * m.out_features for m in attn)
    if attn[-1].in_features != inner or attn[-1].out_features != dim or attn_macs != 4 * dim * inner:
        raise ValueError(f"cannot read the widths of a {where}: pitome.flops expects q/k/v projections "
                         f"{dim} -> {inner} and an output projection {inner} -> {dim}")
    hidden = mlp[-1].in_features
    mlp_macs = sum(m.in_features * m.out_features for m in mlp)
    if mlp[-1].out_features != dim or mlp_macs % (dim * hidden):
        raise ValueError(f"cannot read the widths of a {where}: MLP layers {[(m.in_features, m.out_features) for m in mlp]}"
                         f" are not multiples of {dim} x {hidden}")
    return EncoderShape(dim=dim, mlp_hidden=hidden, attn_dim=inner, heads=_heads(block, model),
                        mlp_matrices=mlp_macs // (dim * hidden))


def encoder_shape(model: nn.Module) -> EncoderShape:
    """Widths of a model's blocks (timm ViTs, Hugging Face BERT-like / ViT / Dinov2 / CLIP towers, ...)."""
    return block_shape(find_blocks(model)[0], model)


def metric_width(shape: EncoderShape, metric: str) -> int:
    """Width of the similarity features: keys averaged over heads (head dim) or hidden states (model dim)."""
    return shape.head_dim if metric == "keys" else shape.dim


def merge_step_macs(settings: Any, shape: EncoderShape, tokens_in: Sequence[Optional[int]]) -> int:
    """MACs of the merge steps of a patched model (per item), from the tokens entering each block.

    settings: ``pitome.settings(model)``; tokens_in[l] None = block l did not run. A step costs its
    algorithm's ``merge_macs(T, d)`` when it removes at least one token (as ``ForwardState.plan``).
    """
    width = metric_width(shape, settings.config.metric)
    total = 0
    for layer, tokens in enumerate(tokens_in):
        spec = settings.layers[layer] if layer < len(settings.layers) else None
        if tokens is None or spec is None or not spec.merges:
            continue
        mergeable = tokens - settings.num_protected
        if spec.remove_count(mergeable) > 0:
            total += int(spec.algorithm.merge_macs(mergeable, width))
    return total


# --- counting a forward ----------------------------------------------------------------------------------

def run_forward(model: nn.Module, inputs: Any) -> Any:
    """model(**inputs) for a dict, model(*inputs) for a tuple / list, model(inputs) otherwise."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _first_tensor(obj: Any) -> Optional[Tensor]:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def batch_size_of(inputs: Any) -> int:
    tensor = _first_tensor(inputs)
    if tensor is None or tensor.dim() == 0:
        raise ValueError("inputs must hold at least one batched tensor (batch dimension first)")
    return int(tensor.shape[0])


@dataclass(frozen=True)
class FlopsCount:
    """MACs per item of one forward. ``tokens_per_layer``: entering each block, then leaving the last one."""

    tokens_per_layer: list[int]
    block_macs: int
    merge_macs: int
    extra_macs: int
    shape: Optional[EncoderShape] = field(default=None, compare=False)

    @property
    def total_macs(self) -> int:
        return self.block_macs + self.merge_macs + self.extra_macs

    @property
    def gflops(self) -> float:
        """Total in GFLOPs as the papers write it (GMACs)."""
        return self.total_macs / 1e9


def _hidden_tokens(args: tuple, kwargs: dict) -> Optional[int]:
    x = kwargs.get("hidden_states", kwargs.get("x"))
    if not isinstance(x, Tensor):
        x = next((a for a in args if isinstance(a, Tensor)), None)
    return int(x.shape[1]) if isinstance(x, Tensor) and x.dim() == 3 else None


def count_macs(model: nn.Module, inputs: Any) -> FlopsCount:
    """Run one forward (no grad) and count its MACs per item from the token counts each block saw.

    Works on patched and unpatched models: hooks read the tokens entering each block and leaving it.
    """
    from .api import is_patched, settings as merge_settings

    blocks = find_blocks(model)
    shape = block_shape(blocks[0], model)
    batch = batch_size_of(inputs)
    tokens_in: list[Optional[int]] = [None] * len(blocks)
    tokens_out: list[Optional[int]] = [None] * len(blocks)
    extra = [0]
    inside = {id(m) for m in blocks.modules()}
    handles = []

    def enter(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            tokens_in[index] = _hidden_tokens(args, kwargs)
        return hook

    def leave(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            out = _first_tensor(output)
            tokens_out[index] = int(out.shape[1]) if out is not None and out.dim() == 3 else None
        return hook

    def linear(module: nn.Linear, args: tuple, output: Tensor) -> None:
        extra[0] += output.numel() * module.in_features

    def conv(module: nn.modules.conv._ConvNd, args: tuple, output: Tensor) -> None:
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        extra[0] += output.numel() * (module.in_channels // module.groups) * kernel

    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(block.register_forward_hook(leave(index), with_kwargs=True))
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear))
        elif isinstance(module, nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(conv))
    try:
        with torch.no_grad():
            run_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    ran = [i for i, t in enumerate(tokens_in) if t is not None]
    if not ran:
        raise ValueError(f"no block of the {type(model).__name__} ran (or none received (B, N, C) hidden states)")
    macs = sum(block_macs(shape, tokens_in[i], tokens_out[i] if tokens_out[i] is not None else tokens_in[i])
               for i in ran)
    merges = merge_step_macs(merge_settings(model), shape, tokens_in) if is_patched(model) else 0
    last = ran[-1]
    counts = [tokens_in[i] for i in ran] + [tokens_out[last] if tokens_out[last] is not None else tokens_in[last]]
    return FlopsCount(tokens_per_layer=counts, block_macs=macs, merge_macs=merges,
                      extra_macs=extra[0] // batch, shape=shape)


def flop_counter_macs(model: nn.Module, inputs: Any) -> float:
    """MACs per item by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on one forward, as a check.

    FlopCounterMode has no formula for the CPU fused attention kernel; it is added here (same formula as
    its CUDA SDPA kernels) so CPU and GPU counts agree.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    custom = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        custom[op] = cpu_sdpa
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        run_forward(model, inputs)
    return counter.get_total_flops() / 2 / batch_size_of(inputs)
