"""Probe tasks for encoders without a head: a linear probe and k-NN trained on unmerged features, evaluated
on features computed with merging on, plus feature fidelity (cosine to the unmerged embedding of each item).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .base import Task
from ..setting import MergeSetting
from .engine import EvalModel, PassResult, run_pass
from .metrics import accuracy, cosine_fidelity, knn_predict

__all__ = ["LinearProbe", "ProbeTask", "embed"]


@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features; stored as plain arrays (cacheable as .npz)."""

    weight: np.ndarray   # (classes, dim)
    bias: np.ndarray     # (classes,)
    mean: np.ndarray     # (dim,)
    scale: np.ndarray    # (dim,)

    @classmethod
    def fit(cls, features: Any, labels: Any, c: float = 1.0, max_iter: int = 2000, seed: int = 0) -> "LinearProbe":
        """sklearn's LogisticRegression (L2, lbfgs) when installed, else the same objective in torch (LBFGS)."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"need (n, dim) features and (n,) labels, got {x.shape} and {y.shape}")
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        z = (x - mean) / scale
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError:
            weight, bias = _fit_torch(z, y, c, max_iter, seed)
        else:
            model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
            model.fit(z, y)
            weight, bias = model.coef_, model.intercept_
            if weight.shape[0] == 1:  # binary: sklearn stores one row
                weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
        return cls(weight.astype(np.float32), bias.astype(np.float32), mean.astype(np.float32), scale.astype(np.float32))

    def logits(self, features: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        z = (x - torch.from_numpy(self.mean)) / torch.from_numpy(self.scale)
        return z @ torch.from_numpy(self.weight).t() + torch.from_numpy(self.bias)

    def predict(self, features: Any) -> torch.Tensor:
        return self.logits(features).argmax(dim=1)

    def save(self, path: Path) -> None:
        np.savez(path, weight=self.weight, bias=self.bias, mean=self.mean, scale=self.scale)

    @classmethod
    def load(cls, path: Path) -> "LinearProbe":
        with np.load(path) as data:
            return cls(data["weight"], data["bias"], data["mean"], data["scale"])


def _fit_torch(z: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    x = torch.as_tensor(z, dtype=torch.float64)
    t = torch.as_tensor(y)
    classes = int(t.max()) + 1
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.t() + b, t, reduction="sum") + 0.5 / c * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def embed(model: EvalModel, loader_factory: Any, batches: Sequence[Sequence[int]], ctx: Any = None,
          progress: bool = False, desc: str = "embedding") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Unmerged embeddings and labels of a whole dataset (e.g. the probe's training split)."""
    result = run_pass(model, loader_factory, batches, MergeSetting(), ctx, progress, warmup=False, desc=desc)
    return result.outputs, result.labels


class ProbeTask(Task):
    """Accuracy of a linear probe and a k-NN classifier (fit on unmerged train features) on merged features.

    metrics: probe_acc, knn_acc (%), fidelity (mean cosine to the unmerged embedding; needs the unmerged pass).
    """

    primary = "probe_acc"

    def __init__(self, name: str, model: EvalModel, loader: Any, batches: list[list[int]], probe: LinearProbe,
                 train_features: torch.Tensor, train_labels: torch.Tensor, pass_key: str = "", knn_k: int = 20,
                 info: Optional[dict] = None, lengths: Optional[list[int]] = None) -> None:
        self.name, self.model, self._loader, self.batches = name, model, loader, batches
        self.probe, self.knn_k = probe, knn_k
        self.train_features, self.train_labels = train_features, train_labels
        self.pass_key = pass_key or name
        self._info = info or {}
        self._lengths = lengths

    def loader(self, batches: list[list[int]]) -> Any:
        return self._loader(batches)

    def lengths(self) -> Optional[list[int]]:
        return self._lengths

    def metrics(self, result: PassResult, reference: Optional[PassResult]) -> dict[str, float]:
        if result.labels is None:
            raise ValueError(f"{self.name}: the data has no labels; a probe needs them")
        features = result.outputs.float()
        out = {"probe_acc": accuracy(self.probe.predict(features.numpy()), result.labels),
               "knn_acc": accuracy(knn_predict(self.train_features, self.train_labels, features, k=self.knn_k,
                                               num_classes=len(self.probe.bias)), result.labels)}
        if reference is not None:
            out["fidelity"] = cosine_fidelity(features, reference.outputs)
        return out

    def describe(self) -> dict[str, Any]:
        test = sum(map(len, self.batches))
        return {"task": self.name, "train_items": len(self.train_features), "test_items": test,
                "accuracy_noise": f"+-{196 * (0.25 / max(test, 1)) ** 0.5:.1f} points (95% binomial interval at "
                                  f"50% accuracy, {test} items); fidelity is the finer comparison",
                "probe": "logistic regression (L2, C=1) on standardised unmerged train features",
                "knn": f"weighted k-NN, k={self.knn_k}, cosine, T=0.07, unmerged train features", **self._info}


def _image_encoder(spec: str, device: Any, weights: str, model_kwargs: dict) -> tuple[EvalModel, Any]:
    """Pooled features of an image model from ``pitome.loading`` (timm without its head; HF pooler / class token)."""
    from ..cli.errors import UserError
    from ..loading import load_model

    loaded = load_model(spec, weights=weights, head="features", device=device, model_kwargs=model_kwargs)
    if loaded.modality != "image" or loaded.transform is None:
        raise UserError(f"probe needs an image model with its preprocessing (timm: or hf:), got {spec}")
    model = loaded.module
    if loaded.library == "timm":
        return EvalModel(target=model, run=model, name=spec), loaded.transform

    def run(pixels: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    return EvalModel(target=model, run=run, name=spec), loaded.transform


def build_image_probe_task(options: dict, ctx: Any, batch_size: int, model_kwargs: dict,
                           progress: bool) -> ProbeTask:
    """The CLI's probe task: features of --train-data (unmerged) fit the probe; --data is evaluated."""
    from .base import dataloader_factory, fixed_batches
    from .image_classification import load_image_dataset

    if not options.get("train_data") or not options.get("data"):
        raise ValueError("probe needs --train-data and --data (image folders or hf:<dataset>)")
    model, transform = _image_encoder(options["model"], ctx.device, options.get("weights") or "pretrained",
                                      model_kwargs)
    columns = (options["image_column"], options["label_column"])
    train = load_image_dataset(options["train_data"], transform, options.get("train_split") or "train", *columns)
    test = load_image_dataset(options["data"], transform, options.get("split") or "validation", *columns)

    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])

    workers = options.get("workers") or 0
    limit = options.get("limit")
    features, labels = embed(model, dataloader_factory(train, collate, workers),
                             fixed_batches(len(train), batch_size), ctx, progress, desc="train features")
    probe = LinearProbe.fit(features.numpy(), labels.numpy(), seed=int(options.get("seed") or 0))
    count = min(limit, len(test)) if limit else len(test)
    name = options.get("name") or f"{options['model']} probe on {options['data']}"
    return ProbeTask(name, model, dataloader_factory(test, collate, workers), fixed_batches(count, batch_size), probe,
                     features, labels, knn_k=int(options.get("knn_k") or 20),
                     info={"model": options["model"], "train_data": options["train_data"], "data": options["data"]})
