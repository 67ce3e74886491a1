"""Training with merging under DDP (2 gloo processes) and torch.compile: the same trajectory as plain training."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")

from pitome.tasks.distributed import init_from_env, spawn_local  # noqa: E402
from pitome.setting import MergeSetting  # noqa: E402
from pitome.train import TrainConfig, Trainer  # noqa: E402
from train_models import TensorItems, batch, tiny_timm_vit  # noqa: E402


def _trajectory(compile_backend: str | None = None) -> tuple[list[float], list[torch.Tensor]]:
    """3 steps of full fine-tuning with PiToMe at keep-ratio 0.8; global batch 4 (split over the processes)."""
    torch.set_num_threads(1)
    ctx = init_from_env("cpu")
    model = tiny_timm_vit(dropout=0.0)  # dropout streams differ per process by design
    config = TrainConfig(mode="full", batch_size=4, epochs=2, max_steps=3, lr=1e-3, seed=0, compile=compile_backend)
    trainer = Trainer(model, config, MergeSetting.make("pitome", ratio=0.8), ctx=ctx)
    history = trainer.fit(TensorItems(*batch("timm_vit", 8)), TensorItems.collate)
    ctx.close()
    return [h.loss for h in history], [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
def test_two_gloo_processes_follow_the_one_process_trajectory():
    losses, params = _trajectory()
    for rank_losses, rank_params in spawn_local(_trajectory, 2):
        assert len(rank_losses) == 3
        assert max(abs(a - b) for a, b in zip(rank_losses, losses)) <= 1e-5, (rank_losses, losses)
        assert max(float((a - b).abs().max()) for a, b in zip(rank_params, params)) <= 1e-5


@pytest.mark.slow
def test_compiled_training_step_follows_eager():
    torch._dynamo.reset()
    eager_losses, eager_params = _trajectory()
    compiled_losses, compiled_params = _trajectory("aot_eager")  # forward and backward graphs traced, no codegen
    assert max(abs(a - b) for a, b in zip(compiled_losses, eager_losses)) <= 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(compiled_params, eager_params)) <= 1e-5
