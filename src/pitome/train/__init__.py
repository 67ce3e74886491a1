"""Training with merging on: fine-tune any model pitome patches (linear probe, last-k blocks, full fine-tuning).

``Trainer`` runs a plain loop with the merge setting applied for the whole run (DDP under torchrun, autocast,
exact resume); ``evaluate`` scores a classifier with or without merging. See docs/training.md.
"""

from .freeze import MODES, classifier_head, set_trainable, trainable_blocks
from .loop import StepLog, TrainConfig, Trainer, correct, epoch_batches, evaluate
from .models import EncoderClassifier, call_model, logits_of, patch_target

__all__ = ["MODES", "classifier_head", "set_trainable", "trainable_blocks", "StepLog", "TrainConfig", "Trainer",
           "correct", "epoch_batches", "evaluate", "EncoderClassifier", "call_model", "logits_of", "patch_target"]
