"""Training with merging on: fine-tune any model pitome patches (linear probe, last-k blocks, full fine-tuning).

``Trainer`` runs a plain loop with the merge setting applied for the whole run (DDP under torchrun, autocast,
exact resume); ``evaluate`` scores a classifier with or without merging. See docs/training.md.
The names load on first use (PEP 562), as in ``pitome`` itself: ``pitome train --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module of this package that defines it
_EXPORTS = {
    "MODES": "freeze", "classifier_head": "freeze", "set_trainable": "freeze", "trainable_blocks": "freeze",
    "StepLog": "loop", "TrainConfig": "loop", "Trainer": "loop", "correct": "loop", "epoch_batches": "loop",
    "evaluate": "loop",
    "EncoderClassifier": "models", "call_model": "models", "logits_of": "models", "patch_target": "models",
}

__all__ = ["MODES", "classifier_head", "set_trainable", "trainable_blocks", "StepLog", "TrainConfig", "Trainer",
           "correct", "epoch_batches", "evaluate", "EncoderClassifier", "call_model", "logits_of", "patch_target"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pitome.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
