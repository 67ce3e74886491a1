"""A 2-process gloo run gives exactly the metrics of a 1-process run (batches are dealt, not re-cut)."""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("timm")

from pitome.tasks.distributed import DistContext, gather_in_order, init_from_env, shard, spawn_local  # noqa: E402

pytestmark = pytest.mark.slow  # compile / export / real assets / processes: minutes

EXACT = ("items", "gflops", "top1", "agreement", "probe_acc", "knn_acc", "fidelity", "r", "tokens_per_layer")


def _sweep(folder: str) -> list[dict]:
    """Tiny DeiT on a synthetic image folder: classification + probe, pitome and ToMe (FLOPs-matched r)."""
    import timm

    from pitome.tasks.base import dataloader_factory, fixed_batches
    from pitome.tasks.engine import EvalModel
    from pitome.tasks.image_classification import ImageClassificationTask, classifier_eval_model, load_image_dataset
    from pitome.tasks.probe import LinearProbe, ProbeTask, embed
    from pitome.tasks.sweep import build_specs, run_sweep

    torch.set_num_threads(1)
    ctx = init_from_env("cpu")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=3).eval()
    from timm.data import create_transform

    data = load_image_dataset(folder, create_transform(input_size=(3, 32, 32)))
    classify = ImageClassificationTask("tiny classification", classifier_eval_model(model), data, batch_size=3)

    def collate(items: list) -> tuple:
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    features = EvalModel(target=model, run=lambda x: model.forward_head(model.forward_features(x), pre_logits=True))
    loader = dataloader_factory(data, collate)
    batches = fixed_batches(len(data), 3)
    train, labels = embed(features, loader, batches, ctx)
    probe = ProbeTask("tiny probe", features, loader, batches, LinearProbe.fit(train.numpy(), labels.numpy()),
                      train, labels, knn_k=3)
    rows = run_sweep([classify, probe], build_specs(["pitome", "tome"], [0.9, 0.75]), ctx)
    ctx.close()
    return rows


def test_two_gloo_processes_match_one(tmp_path):
    from test_eval_sweep import make_image_folder

    folder = str(make_image_folder(tmp_path / "images", classes=3, per_class=5))
    threads = torch.get_num_threads()
    try:
        single = _sweep(folder)
    finally:
        torch.set_num_threads(threads)
    double = spawn_local(_sweep, 2, folder)
    assert double[0] == double[1]  # every rank ends with the same gathered results
    assert len(single) == len(double[0]) == 10
    for one, two in zip(single, double[0]):
        assert "error" not in one and "error" not in two
        for key in EXACT:
            assert one.get(key) == two.get(key), (one["algorithm"], one["budget"], key)


def test_shard_and_gather_single_process():
    ctx = DistContext()
    items = list("abcde")
    assert shard(items, ctx) == list(enumerate(items))
    assert gather_in_order([(1, "b"), (0, "a")], 2, ctx) == ["a", "b"]
    with pytest.raises(RuntimeError, match="lost 1 of 2"):
        gather_in_order([(0, "a")], 2, ctx)
    two = DistContext(rank=1, world=2)
    assert shard(items, two) == [(1, "b"), (3, "d")]


def test_init_from_env_single(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_from_env("cpu")
    assert ctx.world == 1 and ctx.is_main and not ctx.active and ctx.device == torch.device("cpu")
    assert ctx.rank == 0 and not ctx.owns_group  # a single process joins no process group
