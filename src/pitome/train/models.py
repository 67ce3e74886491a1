"""Classifiers for training: how to call one on a batch, and a head for encoders that come without one.

``EncoderClassifier`` puts a linear head on a pretrained encoder's pooled embedding (MiniLM's size-weighted
mean, DINOv2's class token), so the offline models train like any timm / Hugging Face classifier; pitome
patches the encoder inside it (``patch_target``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["EncoderClassifier", "call_model", "logits_of", "patch_target"]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """A dict of inputs goes in as keyword arguments (Hugging Face), anything else positionally (timm)."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def logits_of(output: Any) -> Tensor:
    """Logits from a model output: Hugging Face ``.logits``, a tuple's first item, or the tensor itself."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot read logits from a {type(output).__name__}")


def patch_target(model: nn.Module) -> nn.Module:
    """The module ``pitome.patch`` is applied to: the encoder inside an ``EncoderClassifier``, else the model."""
    return model.encoder if isinstance(model, EncoderClassifier) else model


class EncoderClassifier(nn.Module):
    """A pretrained encoder + a linear head on its pooled embedding.

    pool: 'mean' (size- and mask-weighted mean of the last hidden states, sentence-embedding models; inputs are a
          dict with input_ids / attention_mask) or 'cls' (the encoder's pooler_output / class token; inputs are
          pixel values).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "cls", dim: int | None = None) -> None:
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        dim = dim or int(encoder.config.hidden_size)
        self.encoder = encoder
        self.pool = pool
        self.head = nn.Linear(dim, num_classes)

    def embed(self, inputs: Any) -> Tensor:
        if self.pool == "mean":
            import pitome

            mask = inputs["attention_mask"]
            out = self.encoder(input_ids=inputs["input_ids"], attention_mask=mask)
            return pitome.pool_mean(self.encoder, out.last_hidden_state, mask)  # patched: the merged mask and sizes
        out = self.encoder(pixel_values=inputs)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def forward(self, inputs: Any = None, **kwargs: Any) -> Tensor:
        return self.head(self.embed(inputs if inputs is not None else kwargs))

