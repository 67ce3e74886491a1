"""Tiny random-weight classifiers of every family pitome patches, with dropout, and a batch for each (no downloads).

Shared by the training tests (backward, autocast, DDP, compile, checkpointing, the CLI)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

FAMILIES = ("timm_vit", "hf_bert", "hf_vit", "hf_clip_vision")


def tiny_timm_vit(seed: int = 0, dropout: float = 0.1, **overrides: Any) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=3,
                  drop_rate=dropout, proj_drop_rate=dropout, attn_drop_rate=0.0)
    return VisionTransformer(**{**kwargs, **overrides})


def tiny_hf_bert(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, num_labels=3, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return transformers.BertForSequenceClassification(config)


def tiny_hf_vit(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=4, num_labels=3, hidden_dropout_prob=dropout)
    return transformers.ViTForImageClassification(config)


def tiny_hf_clip_vision(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                  patch_size=4, attention_dropout=dropout)  # CLIP has no other dropout
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    return transformers.CLIPForImageClassification(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                                           num_labels=3))


BUILDERS: dict[str, Callable[..., nn.Module]] = {"timm_vit": tiny_timm_vit, "hf_bert": tiny_hf_bert,
                                                 "hf_vit": tiny_hf_vit, "hf_clip_vision": tiny_hf_clip_vision}


def batch(family: str, size: int = 4, seed: int = 1) -> tuple[Any, torch.Tensor]:
    """(inputs, labels): pixels for vision models; right-padded ids + attention mask for BERT."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (size,), generator=g)
    if family != "hf_bert":
        return torch.randn(size, 3, 32, 32, generator=g), labels
    lengths = [20, 13, 17, 9, 20, 11, 15, 6][:size] + [12] * max(0, size - 8)
    width = max(lengths)
    ids = torch.zeros(size, width, dtype=torch.long)
    mask = torch.zeros(size, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(5, 100, (length,), generator=g)
        ids[row, 0], ids[row, length - 1] = 3, 4
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}, labels


class TensorItems:
    """Dataset of (input, label) items cut from one batch, and the collate that stacks them back."""

    def __init__(self, inputs: Any, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if isinstance(self.inputs, dict):
            return {k: v[index] for k, v in self.inputs.items()}, int(self.labels[index])
        return self.inputs[index], int(self.labels[index])

    @staticmethod
    def collate(items: list) -> tuple[Any, torch.Tensor]:
        first = items[0][0]
        labels = torch.tensor([label for _, label in items])
        if isinstance(first, dict):
            return {k: torch.stack([x[k] for x, _ in items]) for k in first}, labels
        return torch.stack([x for x, _ in items]), labels
