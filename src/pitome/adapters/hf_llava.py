"""Hugging Face LLaVA (``LlavaForConditionalGeneration``, ``LlavaModel``; transformers 5.x): merging in the
CLIP / SigLIP vision tower hands fewer visual tokens to the language model.

How the pieces stay consistent:
- Feature layer: LLaVA reads ``hidden_states[vision_feature_layer]`` (e.g. -2) of the tower; a patched tower's
  hidden states are the merged ones, so the visual tokens are those left after the blocks before that layer.
  With a list of feature layers (concatenated along channels) no block between them may merge (checked).
- Class token: the 'default' strategy drops token 0. CLIP's class token is protected (always slot 0); a SigLIP
  tower (no class token) gets token 0 protected under 'default', so the token dropped is the same as unmerged.
- Image placeholders: the processor expands each ``<image>`` into (H/p)(W/p) [+1] image tokens. A patched model
  shortens every run of image tokens to the merged count before the language model sees it (``forward`` and
  ``generate``; labels, attention mask and padding follow). Images may merge to different counts: shorter rows
  are re-padded, on the left for ``generate``. ``generate`` returns the sequences with the prompt
  exactly as given, so ``out[:, input_ids.shape[1]:]`` are still the new tokens. Prompts already built with the
  merged count (``image_token_count``) are left as they are.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import MergeSettings
from ..step import RootKey
from .base import UnsupportedModelError, get_tag, root_state
from .common import bind_root, class_names, original_class, original_name
from .hf_clip import VISION_TOWERS, patch_vision_tower
from .hf_common import SUPPORTED_TRANSFORMERS, HFAdapter, HFRoot, register_output_capture

__all__ = ["HFLlavaAdapter", "image_token_count", "LLAVA_MODELS"]

LLAVA_MODELS = ("LlavaForConditionalGeneration", "LlavaModel")


def _llava_model(model: nn.Module) -> nn.Module:
    """The ``LlavaModel`` (vision tower + projector + language model) inside or equal to ``model``."""
    return model.model if "LlavaForConditionalGeneration" in class_names(model) else model


def _strategy(model: nn.Module, given: Optional[str] = None) -> str:
    return given if given is not None else model.config.vision_feature_select_strategy


def _feature_layers(model: nn.Module, given: Any = None) -> Any:
    return given if given is not None else model.config.vision_feature_layer


def _count_after(settings: MergeSettings, tokens: int, blocks: int) -> int:
    """Tokens left after the first ``blocks`` blocks on an unpadded input (the merge step's own arithmetic)."""
    return settings.token_counts(tokens)[blocks]


def _resolve(index: int, num_layers: int) -> int:
    total = num_layers + 1
    if not -total <= index < total:
        raise ValueError(f"vision_feature_layer {index} is out of range for a tower with {num_layers} layers")
    return index % total


def _check_feature_layers(settings: MergeSettings, layers: Any) -> None:
    """Concatenated feature layers need equal token counts: no merging block between the first and last one."""
    if isinstance(layers, int):
        return
    picked = sorted(_resolve(int(i), settings.num_layers) for i in layers)
    merging = [b for b in range(picked[0], picked[-1]) if settings.layers[b].merges]
    if merging:
        raise ValueError(
            f"pitome: vision_feature_layer={list(layers)} concatenates hidden states of different depths, but blocks "
            f"{merging} merge tokens between them; restrict merging to blocks before {picked[0]} with layers=..."
        )


def image_token_count(model: nn.Module, image_size: Optional[Sequence[int]] = None) -> int:
    """Image tokens per image that a patched LLaVA hands to the language model (for building prompts).

    image_size: (height, width) of the pixel values; default: the vision tower's configured size.
    """
    llava = _llava_model(model)
    settings = get_tag(llava, "settings")
    if settings is None:
        raise ValueError("model is not patched; call pitome.patch(model, ...) first")
    tower = llava.vision_tower
    cfg = tower.config
    height, width = image_size if image_size is not None else (cfg.image_size, cfg.image_size)
    tokens = (height // cfg.patch_size) * (width // cfg.patch_size) + VISION_TOWERS[original_name(tower)]
    layer = _feature_layers(llava)
    if not isinstance(layer, int):
        layer = min(_resolve(int(i), settings.num_layers) for i in layer)
    count = _count_after(settings, tokens, _resolve(int(layer), settings.num_layers))
    return count - (1 if _strategy(llava) == "default" else 0)


# --- shortening the image placeholder runs -------------------------------------------------------------------

def _runs(row: Tensor, image_token: int) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive image tokens in a 1-D id tensor."""
    is_image = (row == image_token).tolist()
    runs, start = [], None
    for i, flag in enumerate(is_image + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def _keep_mask(input_ids: Tensor, image_token: int, full: int, per_image: Sequence[int]) -> Tensor:
    """Keep the first ``per_image[i]`` placeholders of image i's run of ``full`` (images in row-major order)."""
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    image = 0
    for b in range(input_ids.shape[0]):
        for start, length in _runs(input_ids[b], image_token):
            if length % full:
                raise ValueError(
                    f"pitome: a run of {length} image tokens is not a multiple of the {full} tokens per image the "
                    f"unmerged model expects (nor already the merged counts); build prompts with the "
                    f"processor, or with pitome.adapters.hf_llava.image_token_count(model) tokens per image"
                )
            for offset in range(start, start + length, full):
                keep[b, offset + per_image[image]: offset + full] = False
                image += 1
    return keep


def _compact(tensors: dict[str, Optional[Tensor]], keep: Tensor, pads: dict[str, int],
             left: bool) -> dict[str, Optional[Tensor]]:
    """Drop the positions not kept from each (B, L) tensor, re-padding rows that end up shorter."""
    lengths = keep.sum(dim=1)
    width = int(lengths.max())
    out: dict[str, Optional[Tensor]] = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        new = torch.full((t.shape[0], width), pads[name], dtype=t.dtype, device=t.device)
        for b in range(t.shape[0]):
            row = t[b][keep[b]]
            if left:
                new[b, width - row.shape[0]:] = row
            else:
                new[b, : row.shape[0]] = row
        out[name] = new
    return out


def _shorten(llava: nn.Module, features: Any, input_ids: Tensor, attention_mask: Optional[Tensor],
             labels: Optional[Tensor], full: int, left: bool = False) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Shorten each image's placeholder run to its merged count (no-op when they already match).

    Rows that end up shorter are re-padded: on the left when ``left`` (generation) or when the caller padded on
    the left, on the right otherwise; images may merge to different counts.
    """
    per_image = [f.shape[0] for f in features.pooler_output]
    image_token = llava.config.image_token_id
    placeholders = int((input_ids == image_token).sum())
    if all(n == full for n in per_image) or placeholders == sum(per_image):
        return input_ids, attention_mask, labels
    if placeholders != full * len(per_image):
        merged = sorted(set(per_image))
        raise ValueError(
            f"pitome: the prompts hold {placeholders} image tokens for {len(per_image)} image(s); expected "
            f"{full} per image (unmerged, as the processor builds them) or the merged count(s) {merged} per image"
        )
    keep = _keep_mask(input_ids, image_token, full, per_image)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"pitome: attention_mask of shape {tuple(attention_mask.shape)} does not match "
                             f"input_ids {tuple(input_ids.shape)}")
        keep &= attention_mask.to(keep.device) != 0  # old padding goes too; rows are re-padded to the new width
        left = left or bool((attention_mask[:, 0] == 0).any())
    pad_id = getattr(llava.config.text_config, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (getattr(llava.config, "pad_token_id", None) or 0)
    if attention_mask is None and bool((keep.sum(dim=1) != keep.sum(dim=1)[0]).any()):
        attention_mask = torch.ones_like(input_ids)
    new = _compact({"ids": input_ids, "mask": attention_mask, "labels": labels}, keep,
                   {"ids": int(pad_id), "mask": 0, "labels": -100}, left)
    return new["ids"], new["mask"], new["labels"]


# --- model level ---------------------------------------------------------------------------------------------------

def _full_count(llava: nn.Module, strategy: Optional[str]) -> int:
    """Image tokens per image without merging (what the processor put in the prompt), from the latest tower run."""
    state = root_state(llava)
    tokens = state.tokens_per_layer[0]
    return tokens - (1 if _strategy(llava, strategy) == "default" else 0)


_SIGNATURES: dict[type, inspect.Signature] = {}


def _bind(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    cls = original_class(model)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    bound = _SIGNATURES[cls].bind_partial(model, *args, **kwargs).arguments
    bound.pop("self", None)
    extra = bound.pop("kwargs", {})
    return {**bound, **extra}


class _LlavaModelRoot(HFRoot):
    """Mixin for ``LlavaModel``: image features under the tower's merge state; placeholder runs shortened."""

    def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
        return self._pitome_run(self._pitome_image_features, *args, **kwargs)

    def _pitome_image_features(self, pixel_values: Tensor, vision_feature_layer: Any = None,
                               vision_feature_select_strategy: Optional[str] = None, image_sizes: Any = None,
                               **kwargs: Any) -> Any:
        settings = get_tag(self, "settings")
        _check_feature_layers(settings, _feature_layers(self, vision_feature_layer))
        if image_sizes is not None and any(s.merges for s in settings.layers):
            raise NotImplementedError("pitome: LLaVA variants that split features by image_sizes are not supported")
        return super().get_image_features(pixel_values, vision_feature_layer=vision_feature_layer,
                                          vision_feature_select_strategy=vision_feature_select_strategy,
                                          image_sizes=image_sizes, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._pitome_run(self._pitome_forward, *args, **kwargs)

    def _pitome_forward(self, *args: Any, **kwargs: Any) -> Any:
        call = _bind(self, args, kwargs)
        call = _encode_and_shorten(self, call)
        return super().forward(**call)


def _encode_and_shorten(llava: nn.Module, call: dict, left: bool = False) -> dict:
    """Run the vision tower first when pixel values are given, then shorten the prompt to the merged count."""
    pixel_values = call.get("pixel_values")
    if pixel_values is None:
        return call
    input_ids = call.get("input_ids")
    if input_ids is None:
        raise NotImplementedError("pitome: a patched LLaVA needs input_ids (not inputs_embeds) with pixel_values, "
                                  "so that the image placeholder runs can be shortened to the merged count")
    features = llava.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=call.get("vision_feature_layer"),
        vision_feature_select_strategy=call.get("vision_feature_select_strategy"),
        image_sizes=call.get("image_sizes"), return_dict=True,
    )
    full = _full_count(llava, call.get("vision_feature_select_strategy"))
    ids, mask, labels = _shorten(llava, features, input_ids, call.get("attention_mask"), call.get("labels"), full,
                                 left)
    if ids is not input_ids and call.get("position_ids") is not None:
        raise ValueError("pitome: position_ids cannot be kept when the image tokens are shortened; "
                         "pass position_ids=None")
    call = dict(call, input_ids=ids, attention_mask=mask, pixel_values=None, mm_encoder_outputs={"image": features})
    if "labels" in call or labels is not None:
        call["labels"] = labels
    return call


class _LlavaGenerationRoot(HFRoot):
    """Mixin for ``LlavaForConditionalGeneration``: forward and generate with shortened image placeholder runs."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._pitome_run(self._pitome_forward, *args, **kwargs)

    def _pitome_forward(self, *args: Any, **kwargs: Any) -> Any:
        call = _encode_and_shorten(self.model, _bind(self, args, kwargs))
        return super().forward(**call)

    def generate(self, inputs: Optional[Tensor] = None, generation_config: Any = None, **kwargs: Any) -> Any:
        return self._pitome_run(self._pitome_generate, inputs, generation_config, **kwargs)

    def _pitome_generate(self, inputs: Optional[Tensor], generation_config: Any, **kwargs: Any) -> Any:
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if kwargs.get("pixel_values") is None or input_ids is None:
            return super().generate(input_ids, generation_config, **kwargs)
        call = _encode_and_shorten(self.model, dict(kwargs, input_ids=input_ids), left=True)
        new_ids = call.pop("input_ids")
        call.pop("pixel_values", None)
        call.pop("labels", None)
        out = super().generate(new_ids, generation_config, **call)
        if new_ids is input_ids:
            return out
        return _restore_prompt(out, input_ids, new_ids.shape[1])


def _restore_prompt(out: Any, prompt: Tensor, short_length: int) -> Any:
    """Give back the sequences with the caller's prompt (the generated tokens follow it as usual)."""
    def fix(seq: Tensor) -> Tensor:
        repeat = seq.shape[0] // prompt.shape[0]
        return torch.cat([prompt.repeat_interleave(repeat, dim=0).to(seq.device), seq[:, short_length:]], dim=1)

    if isinstance(out, Tensor):
        return fix(out)
    if getattr(out, "sequences", None) is not None:
        out.sequences = fix(out.sequences)
    return out


class HFLlavaAdapter(HFAdapter):
    name = "hf_llava"
    roots = LLAVA_MODELS
    family = "vision"
    supports = (f"Hugging Face LLaVA (transformers {SUPPORTED_TRANSFORMERS}): LlavaForConditionalGeneration / "
                f"LlavaModel with a {' or '.join(VISION_TOWERS)} vision tower (attn 'sdpa' or 'eager')")

    def _tower(self, model: nn.Module) -> nn.Module:
        tower = _llava_model(model).vision_tower
        if original_name(tower) not in VISION_TOWERS:
            raise UnsupportedModelError(f"LLaVA vision tower {original_name(tower)} is not supported; supported "
                                        f"towers: {', '.join(VISION_TOWERS)}")
        return tower

    def num_layers(self, model: nn.Module) -> int:
        return len(self._tower(model).encoder.layers)

    def blocks(self, model: nn.Module) -> nn.Module:
        return self._tower(model).encoder.layers

    def num_protected(self, model: nn.Module) -> int:
        protected = VISION_TOWERS[original_name(self._tower(model))]
        if protected == 0 and _strategy(_llava_model(model)) == "default":
            return 1  # 'default' drops token 0: keep it the same token as without merging
        return protected

    def patch(self, model: nn.Module, settings: MergeSettings) -> None:
        llava = _llava_model(model)
        tower = self._tower(model)
        _check_feature_layers(settings, _feature_layers(llava))
        key = RootKey()
        patch_vision_tower(model, tower, key, settings)
        bind_root(llava, key, settings, _LlavaModelRoot)
        if llava is not model:
            bind_root(model, key, settings, _LlavaGenerationRoot)
        register_output_capture(model)
