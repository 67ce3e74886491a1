"""A small, plain training loop for patched models: merging on while training, exact resume, DDP, autocast.

Why not a framework: the loop is ~100 lines, and owning it keeps what matters here exact and visible — the
merge setting is applied around the whole run (``MergeSetting.applied``), a K-process run sees the same global
batches as a 1-process run (each global batch is split across ranks, DDP averages the gradients), and a resumed
run continues the same trajectory (batch order is a function of seed and epoch; optimizer, scheduler, scaler and
every rank's RNG state are checkpointed). HF Trainer needs ``accelerate`` and owns the loop; see
docs/training.md for using pitome inside it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..tasks.base import dataloader_factory, fixed_batches
from ..tasks.distributed import DistContext
from ..setting import MergeSetting
from ..tasks.engine import EvalModel, PassResult, _to_device, progress_bar, run_pass
from .freeze import MODES, classifier_head, set_trainable
from .models import call_model, logits_of, patch_target

__all__ = ["TrainConfig", "StepLog", "Trainer", "evaluate", "correct", "epoch_batches", "AMP_DTYPES", "CHECKPOINT_NAME"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT_NAME = "checkpoint.pt"
# fields that change the trajectory: a resumed run must agree on them
_TRAJECTORY = ("mode", "last_k", "epochs", "max_steps", "batch_size", "lr", "head_lr", "weight_decay", "warmup",
               "schedule", "grad_clip", "amp", "seed")  # (compile changes no number beyond float noise)


@dataclass
class TrainConfig:
    """How to train. lr applies to the body, head_lr (default: lr) to the classification head.

    warmup:           fraction of the steps with a linear learning-rate ramp, then ``schedule`` decays to 0.
    batch_size:       the global batch (split across processes under torchrun; must divide evenly).
    checkpoint_every: steps between checkpoints (0 = at the end of every epoch only; needs a checkpoint folder).
    amp:              None (fp32), 'bf16' (CPU and CUDA) or 'fp16' (CUDA, with loss scaling).
    compile:          None, or a ``torch.compile`` backend for the training step ('inductor', 'aot_eager', ...).
    """

    mode: str = "full"
    last_k: int = 1
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: Optional[float] = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    schedule: str = "cosine"
    grad_clip: Optional[float] = 1.0
    amp: Optional[str] = None
    seed: int = 0
    checkpoint_every: int = 0
    compile: Optional[str] = None

    def validate(self) -> "TrainConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("epochs", "batch_size", "last_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None, got {self.max_steps!r}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.warmup, (int, float)) or not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {self.amp!r}")
        if self.compile is not None:
            if not isinstance(self.compile, str) or self.compile not in torch.compiler.list_backends(exclude_tags=()):
                common = sorted({*torch.compiler.list_backends(), "eager", "aot_eager"})
                raise ValueError(f"compile must be None or a torch.compile backend (e.g. {', '.join(common)}; "
                                 f"all: torch.compiler.list_backends(exclude_tags=())), got {self.compile!r}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        return self


@dataclass
class StepLog:
    """One optimizer step: the global-batch mean loss, learning rate, and the token counts the forward saw."""

    step: int
    epoch: int
    loss: float
    lr: float
    samples: int
    seconds: float
    tokens_per_layer: Optional[list[int]] = None

    def row(self) -> dict:
        return asdict(self)


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a permutation seeded by (seed, epoch), last partial batch dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(count).tolist()
    return [order[i:i + batch_size] for i in range(0, count - batch_size + 1, batch_size)]


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


class Trainer:
    """Fine-tune ``model`` (a classifier returning logits) under one merge setting.

    spec:  the merge setting while training (``MergeSetting()`` = unmerged); applied to
           ``patch_target(model)`` for the whole run, removed afterwards.
    ctx:   the process group (``tasks.distributed.init_from_env``); K processes train one model with DDP.
    checkpoint_dir: where ``checkpoint.pt`` goes (None = no checkpoints).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, spec: Optional[MergeSetting] = None,
                 ctx: Optional[DistContext] = None, checkpoint_dir: Optional[Path] = None,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
                 progress: bool = False) -> None:
        self.config = config.validate()
        self.ctx = ctx or DistContext()
        if config.batch_size % self.ctx.world:
            raise ValueError(f"batch_size {config.batch_size} does not split evenly over {self.ctx.world} processes")
        self.model, self.spec = model, spec or MergeSetting()
        self.target = patch_target(model)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.loss_fn, self.progress = loss_fn, progress
        self.trainable = set_trainable(model, config.mode, config.last_k if config.mode == "last-k" else None)
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=config.amp == "fp16")
        self.step_count = 0
        self.history: list[StepLog] = []
        self._net: Optional[nn.Module] = None

    # -- setup ----------------------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        head = {id(p) for p in classifier_head(self.model).parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for param in self.model.parameters():
            if param.requires_grad:
                groups.setdefault((id(param) in head, param.ndim >= 2), []).append(param)
        c = self.config
        return torch.optim.AdamW([{"params": params, "lr": (c.head_lr or c.lr) if is_head else c.lr,
                                   "weight_decay": c.weight_decay if decays else 0.0}
                                  for (is_head, decays), params in sorted(groups.items())])

    def _scheduler(self, total: int) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = int(self.config.warmup * total)
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(step, total, warmup, self.config.schedule))

    def _network(self) -> nn.Module:
        """The module the steps call: DDP-wrapped under torchrun, compiled if asked (built once per run)."""
        if self._net is None:
            net: nn.Module = self.model
            if self.ctx.active:
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
                net = DistributedDataParallel(net, device_ids=ids)
            if self.config.compile:
                net = torch.compile(net, backend=self.config.compile)
            self._net = net
        return self._net

    # -- one step -------------------------------------------------------------------------------------------
    def step(self, inputs: Any, labels: Tensor) -> Tensor:
        """Forward (under autocast), backward, clip, optimizer step on this process's share; returns its loss."""
        net = self._network()
        device = self.ctx.device
        inputs, labels = _to_device(inputs, device), labels.to(device)
        amp = AMP_DTYPES.get(self.config.amp or "")
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = logits_of(call_model(net, inputs))
        loss = self.loss_fn(logits.float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {float(loss)} at step {self.step_count}; lower the learning rate "
                                     "or use bf16 instead of fp16")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def _global_loss(self, loss: Tensor) -> float:
        if not self.ctx.active:
            return float(loss)
        total = loss.detach().double().reshape(1).clone()
        dist.all_reduce(total)
        return float(total) / self.ctx.world

    def local_part(self, batch: Sequence[int]) -> list[int]:
        per = len(batch) // self.ctx.world
        return list(batch[self.ctx.rank * per:(self.ctx.rank + 1) * per])

    # -- the run --------------------------------------------------------------------------------------------
    def total_steps(self, count: int) -> int:
        per_epoch = count // self.config.batch_size
        if per_epoch < 1:
            raise ValueError(f"{count} training items are fewer than one batch of {self.config.batch_size}")
        total = per_epoch * self.config.epochs
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def fit(self, dataset: Any, collate: Callable[[list], tuple[Any, Tensor]], resume: bool = False,
            on_step: Optional[Callable[[StepLog], None]] = None) -> list[StepLog]:
        """Train on ``dataset`` (items for ``collate``) with the merge setting on; returns the step logs."""
        c = self.config
        total = self.total_steps(len(dataset))
        per_epoch = len(dataset) // c.batch_size
        scheduler = self._scheduler(total)
        torch.manual_seed(c.seed + self.ctx.rank)  # dropout: one stream per process, saved in checkpoints
        if resume:
            self._load(scheduler)
        import pitome

        self.model.train()
        bar = progress_bar(range(self.step_count, total), total - self.step_count, f"train {self.spec.label}",
                           self.progress and self.ctx.is_main)
        with self.spec.applied(self.target):
            for step in bar:
                epoch, within = divmod(step, per_epoch)
                batch = self.local_part(epoch_batches(len(dataset), c.batch_size, c.seed, epoch)[within])
                inputs, labels = collate([dataset[i] for i in batch])
                start = time.perf_counter()
                loss = self.step(inputs, labels)
                scheduler.step()
                value = self._global_loss(loss)
                seconds = time.perf_counter() - start
                tokens = list(pitome.info(self.target).tokens_per_layer) if self.spec.merges else None
                log = StepLog(step, epoch, value, self.optimizer.param_groups[0]["lr"], c.batch_size, seconds, tokens)
                self.history.append(log)
                self.step_count = step + 1
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{value:.4f}")
                if on_step is not None:
                    on_step(log)
                end_of_epoch = self.step_count % per_epoch == 0 or self.step_count == total
                if self.checkpoint_dir is not None and (
                        end_of_epoch or (c.checkpoint_every and self.step_count % c.checkpoint_every == 0)):
                    self._save(scheduler)
        self.model.eval()
        return self.history

    # -- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        if self.checkpoint_dir is None:
            raise ValueError("no checkpoint folder was given")
        return self.checkpoint_dir / CHECKPOINT_NAME

    def _save(self, scheduler: Any) -> None:
        rng = [torch.get_rng_state()]
        if self.ctx.active:
            rng = [None] * self.ctx.world  # type: ignore[list-item]
            dist.all_gather_object(rng, torch.get_rng_state())
        if self.ctx.is_main:
            path = self.checkpoint_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "step": self.step_count, "rng": rng, "config": asdict(self.config),
                     "merge": self.spec.label, "history": [h.row() for h in self.history]}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint
        self.ctx.barrier()

    def _load(self, scheduler: Any) -> None:
        path = self.checkpoint_path()
        if not path.is_file():
            return  # nothing to resume: start from step 0
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved, now = state["config"], asdict(self.config)
        differ = [k for k in _TRAJECTORY if saved.get(k) != now.get(k)]
        if differ or state.get("merge") != self.spec.label:
            what = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
            if state.get("merge") != self.spec.label:
                what = ", ".join(filter(None, [what, f"merge: {state.get('merge')!r} -> {self.spec.label!r}"]))
            raise ValueError(f"{path} was written with different settings ({what}); resume with the same settings "
                             "or start in a new folder")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step"])
        self.history = [StepLog(**row) for row in state.get("history", [])]
        rng = state["rng"]
        torch.set_rng_state(rng[self.ctx.rank] if self.ctx.rank < len(rng) else rng[0])


def _sequence_length(inputs: Any) -> int:
    return int(inputs["input_ids"].shape[1])


def evaluate(model: nn.Module, dataset: Any, collate: Callable[[list], tuple[Any, Tensor]], batch_size: int,
             spec: Optional[MergeSetting] = None, ctx: Optional[DistContext] = None, progress: bool = False,
             text: bool = False, batches: Optional[list[list[int]]] = None) -> PassResult:
    """Logits of every item under ``spec`` (per-item MACs and wall time included); ``text``: padded inputs."""
    model.eval()
    evaluator = EvalModel(target=patch_target(model), run=lambda inputs: logits_of(call_model(model, inputs)),
                          seq_len=_sequence_length if text else None)
    return run_pass(evaluator, dataloader_factory(dataset, collate),
                    batches if batches is not None else fixed_batches(len(dataset), batch_size),
                    spec or MergeSetting(), ctx, progress)


def correct(result: PassResult) -> Tensor:
    """Per-item 0/1 correctness of a classification pass."""
    return (result.outputs.argmax(dim=-1) == result.labels).double()
