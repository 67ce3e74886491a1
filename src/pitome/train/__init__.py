"""Training with merging on: fine-tune any model pitome patches (linear probe, last-k blocks, full fine-tuning).

``Trainer`` runs a plain loop with the merge setting applied for the whole run (DDP under torchrun, autocast,
exact resume); ``evaluate`` scores a classifier with or without merging. See docs/training.md.
The names load on first use (PEP 562), as in ``pitome`` itself: ``pitome train --help`` does not import torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# public name -> the module of this package that defines it
_EXPORTS = {
    "MODES": "freeze", "classifier_head": "freeze", "set_trainable": "freeze", "trainable_blocks": "freeze",
    "StepLog": "loop", "TrainConfig": "loop", "Trainer": "loop", "correct": "loop", "epoch_batches": "loop",
    "evaluate": "loop",
    "EncoderClassifier": "models", "call_model": "models", "logits_of": "models", "patch_target": "models",
}

__all__ = ["MODES", "classifier_head", "set_trainable", "trainable_blocks", "StepLog", "TrainConfig", "Trainer",
           "correct", "epoch_batches", "evaluate", "EncoderClassifier", "call_model", "logits_of", "patch_target"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
