"""Image-text retrieval with a dual encoder: recall@1/5/10 both ways and Rsum, merging in the image encoder.

Data: the Karpathy split files used for Flickr30k / COCO (``dataset_flickr30k.json``: {"images": [{"filename",
"filepath"?, "split", "sentences": [{"raw"}]}]}) or LAVIS-style annotation lists ([{"image", "caption"}]).
Models: Hugging Face ``CLIPModel`` (``hf:openai/clip-vit-base-patch16``), open_clip when installed
(``openclip:ViT-B-16/laion2b_s34b_b88k``), or any pair of embedding functions (the offline dual encoder).
Captions are embedded once without merging; the image encoder runs once per merge setting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Task
from .engine import EvalModel, PassResult
from .metrics import cosine_fidelity, l2_normalize, retrieval_recall

__all__ = ["CaptionData", "read_captions", "RetrievalTask", "train_projections", "DualEncoder", "load_dual_encoder",
           "ImageFiles"]


@dataclass
class CaptionData:
    """Images, captions, and which image each caption belongs to (an index into ``images``)."""

    images: list[Path]
    captions: list[str]
    caption_image: list[int]


def _entry_lines(text: str, array_start: int, count: int) -> list[int]:
    """Line number where each element of the JSON array opening at ``array_start`` begins."""
    decoder = json.JSONDecoder()
    lines, pos = [], array_start + 1
    for _ in range(count):
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        try:
            pos = decoder.raw_decode(text, pos)[1]
        except json.JSONDecodeError:
            break
    return lines + [0] * (count - len(lines))


def read_captions(path: str | Path, split: str = "test", image_root: Optional[str | Path] = None) -> CaptionData:
    """Read a Karpathy split file or a LAVIS annotation list; errors name the file and the line."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    images: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    if isinstance(data, dict) and "images" in data:
        entries = data["images"]
        if not isinstance(entries, list):
            raise ValueError(f"{path}: 'images' must be a list")
        key = text.find('"images"')
        lines = _entry_lines(text, text.find("[", key), len(entries))
        for number, entry in enumerate(entries):
            where = f"{path}, line {lines[number]} (images[{number}])"
            if not isinstance(entry, dict) or "filename" not in entry or "sentences" not in entry:
                raise ValueError(f"{where}: each image needs 'filename' and 'sentences' (Karpathy format)")
            if entry.get("split", split) != split and not (split == "train" and entry.get("split") == "restval"):
                continue
            sentences = entry["sentences"]
            if not isinstance(sentences, list) or not sentences:
                raise ValueError(f"{where}: 'sentences' must be a non-empty list")
            image_index = len(images)
            images.append(root / entry.get("filepath", "") / entry["filename"])
            for sentence in sentences:
                raw = sentence.get("raw") if isinstance(sentence, dict) else sentence
                if not isinstance(raw, str) or not raw.strip():
                    raise ValueError(f"{where}: a sentence has no 'raw' text")
                captions.append(raw.strip())
                owner.append(image_index)
    elif isinstance(data, list):
        lines = _entry_lines(text, text.find("["), len(data))
        for number, entry in enumerate(data):
            where = f"{path}, line {lines[number]} (entry {number})"
            if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
                raise ValueError(f"{where}: each entry needs 'image' and 'caption' (LAVIS annotation format)")
            caps = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                raise ValueError(f"{where}: 'caption' must be a string or a non-empty list of strings")
            image_index = len(images)
            images.append(root / entry["image"])
            captions.extend(c.strip() for c in caps)
            owner.extend([image_index] * len(caps))
    else:
        raise ValueError(f"{path}, line 1: expected a Karpathy split file ({{'images': [...]}}) or a list of "
                         "{'image', 'caption'} entries")
    if not images:
        raise ValueError(f"{path}: no images in split {split!r}")
    return CaptionData(images, captions, owner)


class ImageFiles:
    """(image, index) pairs from paths, through a transform (PIL image -> tensor)."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], Tensor]) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), index
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read image ({error})") from None


@dataclass
class DualEncoder:
    """What retrieval needs from a model: the image module to patch, and two embedding functions."""

    image_target: torch.nn.Module
    embed_images: Callable[[Tensor], Tensor]       # pixel batch -> (B, d)
    embed_texts: Callable[[list[str]], Tensor]     # captions -> (B, d)
    transform: Callable[[Any], Tensor]             # PIL image -> (3, H, W)
    name: str


def load_dual_encoder(spec: str, device: torch.device | str = "cpu", weights: str = "pretrained") -> DualEncoder:
    """An image-text model from ``pitome.loading`` (``hf:`` CLIP-style or ``openclip:ARCH/TAG``) as two embedders."""
    from ..cli.errors import UserError
    from ..loading import load_model

    loaded = load_model(spec, weights=weights, head="dual", device=device)
    model = loaded.full
    if model is None or loaded.tokenizer is None:
        raise UserError(f"retrieval needs an image-text model with a tokenizer (hf: CLIP-style or openclip:), "
                        f"got {spec}")
    if loaded.library == "openclip":
        tokenizer = loaded.tokenizer
        return DualEncoder(loaded.module, lambda p: model.encode_image(p),
                           lambda b: model.encode_text(tokenizer(b).to(device)), loaded.transform, loaded.describe())

    def images(pixels: Tensor) -> Tensor:
        return _features(model.get_image_features(pixel_values=pixels))

    def texts(batch: list[str]) -> Tensor:
        enc = loaded.tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(device)
        return _features(model.get_text_features(**enc))

    return DualEncoder(model, images, texts, loaded.transform, loaded.describe())


def _features(out: Any) -> Tensor:
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    if isinstance(out, Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot find embeddings in {type(out).__name__}")


class RetrievalTask(Task):
    """Merged image embeddings against unmerged caption embeddings; relevance = same ``labels``.

    Karpathy data: image label = image index, caption label = its image's index. Class-level data (the offline
    task): labels are classes, so any image of the caption's class is relevant.
    """

    primary = "rsum"

    def __init__(self, name: str, model: EvalModel, loader: Any, batches: list[list[int]], text_features: Tensor,
                 image_labels: Tensor, text_labels: Tensor, image_head: Optional[Callable[[Tensor], Tensor]] = None,
                 text_head: Optional[Callable[[Tensor], Tensor]] = None, pass_key: str = "",
                 info: Optional[dict] = None) -> None:
        self.name, self.model, self._loader, self.batches = name, model, loader, batches
        self.text_features, self.image_labels, self.text_labels = text_features, image_labels, text_labels
        self.image_head, self.text_head = image_head, text_head
        self.pass_key = pass_key or name
        self._info = info or {}

    def loader(self, batches: list[list[int]]) -> Any:
        return self._loader(batches)

    def _project(self, features: Tensor, head: Optional[Callable[[Tensor], Tensor]]) -> Tensor:
        with torch.no_grad():
            return l2_normalize(head(features.float()) if head is not None else features.float())

    def metrics(self, result: PassResult, reference: Optional[PassResult]) -> dict[str, float]:
        images = self._project(result.outputs, self.image_head)
        texts = self._project(self.text_features, self.text_head)
        out = retrieval_recall(images @ texts.t(), self.image_labels, self.text_labels)
        if reference is not None and "fidelity" not in out:
            out["fidelity"] = cosine_fidelity(result.outputs, reference.outputs)
        return out

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "images": len(self.image_labels), "captions": len(self.text_labels),
                "merging": "image encoder only; captions embedded once without merging", **self._info}


def train_projections(
    image_features: Tensor, image_labels: Tensor, text_features: Tensor, text_labels: Tensor, dim: int = 256,
    steps: int = 300, lr: float = 1e-2, seed: int = 0,
) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """Two linear maps trained with a symmetric contrastive loss where every same-label pair is a positive.

    Every image is contrasted with every distinct caption (full batch); the temperature is learned (CLIP-style).
    """
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.Linear(image_features.shape[1], dim)
    txt = torch.nn.Linear(text_features.shape[1], dim)
    for layer in (img, txt):
        torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5, generator=gen)
        torch.nn.init.zeros_(layer.bias)
    log_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    opt = torch.optim.Adam([*img.parameters(), *txt.parameters(), log_scale], lr=lr)
    x, t = image_features.float(), text_features.float()
    positive = (image_labels.long().unsqueeze(1) == text_labels.long().unsqueeze(0)).float()
    if not bool((positive.sum(1) > 0).all() and (positive.sum(0) > 0).all()):
        raise ValueError("every image label needs a caption with the same label and vice versa")
    for _ in range(steps):
        logits = l2_normalize(img(x)) @ l2_normalize(txt(t)).t() * log_scale.clamp(max=4.6).exp()
        i2t = -(positive * logits.log_softmax(dim=1)).sum(1) / positive.sum(1)
        t2i = -(positive * logits.log_softmax(dim=0)).sum(0) / positive.sum(0)
        loss = i2t.mean() + t2i.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return img.eval(), txt.eval()


def build_retrieval_task(options: dict, ctx: Any, batch_size: int) -> RetrievalTask:
    """The CLI's retrieval task: a dual encoder, a caption file and its images (captions embedded once)."""
    from .base import dataloader_factory, fixed_batches

    if not options.get("captions"):
        raise ValueError("retrieval needs --captions (a Karpathy split file or a LAVIS annotation list)")
    data = read_captions(options["captions"], options.get("split") or "test", options.get("images"))
    limit = options.get("limit")
    if limit:
        keep = set(range(min(limit, len(data.images))))
        pairs = [(c, o) for c, o in zip(data.captions, data.caption_image) if o in keep]
        data = CaptionData(data.images[: len(keep)], [c for c, _ in pairs], [o for _, o in pairs])
    encoder = load_dual_encoder(options["model"], ctx.device, options.get("weights") or "pretrained")
    with torch.no_grad():
        texts = torch.cat([encoder.embed_texts(data.captions[i:i + batch_size]).float().cpu()
                           for i in range(0, len(data.captions), batch_size)])
    model = EvalModel(target=encoder.image_target, run=encoder.embed_images, name=encoder.name)

    def collate(items: list) -> tuple[Tensor, Tensor]:
        return torch.stack([x for x, _ in items]), torch.tensor([i for _, i in items])

    loader = dataloader_factory(ImageFiles(data.images, encoder.transform), collate, options.get("workers") or 0)
    name = options.get("name") or f"{encoder.name} on {Path(options['captions']).name} ({options.get('split') or 'test'})"
    return RetrievalTask(name, model, loader, fixed_batches(len(data.images), batch_size), texts,
                         torch.arange(len(data.images)), torch.as_tensor(data.caption_image),
                         info={"model": encoder.name, "data": str(options["captions"])})
