"""Training with merging on: backward through every adapter and algorithm, dropout, bf16 autocast, exact resume,
parameter selection and validation. (DDP, compile, checkpointing and the CLI: test_train_slow.py.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import pitome  # noqa: E402
from pitome.setting import MergeSetting  # noqa: E402
from pitome.train import TrainConfig, Trainer, epoch_batches, logits_of, call_model, set_trainable  # noqa: E402
from train_models import BUILDERS, FAMILIES, TensorItems, batch, tiny_timm_vit  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy shared machine: more threads spin and slow everything down
    yield
    torch.set_num_threads(threads)


def _gradients(model: torch.nn.Module, inputs, labels) -> dict:
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(logits_of(call_model(model, inputs)), labels).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_through_every_adapter_in_train_mode(family):
    model = BUILDERS[family]().train()
    inputs, labels = batch(family)
    plain = _gradients(model, inputs, labels)
    pitome.patch(model, "pitome", ratio=0.7)
    merged = _gradients(model, inputs, labels)
    counts = pitome.info(model).tokens_per_layer
    assert counts[-1] < counts[0], "merging must be on while training"
    assert set(merged) == set(plain), "merging must not cut any parameter off the gradient"
    assert all(torch.isfinite(g).all() for g in merged.values())
    first = [n for n in merged if ".0." in n or "blocks.0." in n]
    assert first and all(merged[n].abs().sum() > 0 for n in first), "the first block must get gradients"
    with torch.no_grad():  # dropout is live in train() mode: two forwards differ
        assert not torch.equal(logits_of(call_model(model, inputs)), logits_of(call_model(model, inputs)))


@pytest.mark.parametrize("algorithm", pitome.available_algorithms())
def test_train_step_through_every_algorithm(algorithm):
    model = tiny_timm_vit()
    inputs, labels = batch("timm_vit", 8)
    trainer = Trainer(model, TrainConfig(mode="full", batch_size=8, lr=1e-3, seed=0),
                      MergeSetting.make(algorithm, ratio=0.8, seed=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = trainer.fit(TensorItems(inputs, labels), TensorItems.collate)
    assert len(steps) == 1 and steps[0].tokens_per_layer[-1] < steps[0].tokens_per_layer[0]
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "blocks.0.attn.qkv.weight" in moved and "head.weight" in moved
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not pitome.is_patched(model), "the merge setting is removed after training"


def test_bf16_autocast_step_is_finite():
    model = tiny_timm_vit()
    inputs, labels = batch("timm_vit", 8)
    trainer = Trainer(model, TrainConfig(mode="full", batch_size=8, lr=1e-3, amp="bf16"),
                      MergeSetting.make("pitome", ratio=0.8))
    steps = trainer.fit(TensorItems(inputs, labels), TensorItems.collate)
    assert torch.isfinite(torch.tensor(steps[0].loss))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


class _Killed(Exception):
    pass


def _run(tmp_path, resume: bool, family: str = "timm_vit", kill_after: int = 0) -> tuple[torch.nn.Module, list]:
    model = BUILDERS[family]()
    inputs, labels = batch(family, 8)
    config = TrainConfig(mode="last-k", last_k=2, batch_size=4, epochs=2, lr=1e-3, seed=3, checkpoint_every=1)
    trainer = Trainer(model, config, MergeSetting.make("pitome", ratio=0.8), checkpoint_dir=tmp_path)

    def kill(log) -> None:
        if kill_after and log.step + 1 == kill_after:
            raise _Killed

    history = trainer.fit(TensorItems(inputs, labels), TensorItems.collate, resume=resume, on_step=kill)
    return model, [h.loss for h in history]


@pytest.mark.parametrize("family", ["timm_vit", "hf_bert"])
def test_resume_continues_the_same_trajectory(tmp_path, family):
    straight, losses = _run(tmp_path / "a", resume=False, family=family)
    assert len(losses) == 4
    with pytest.raises(_Killed):
        _run(tmp_path / "b", resume=False, family=family, kill_after=3)  # killed mid-epoch 2, after its checkpoint
    resumed, resumed_losses = _run(tmp_path / "b", resume=True, family=family)
    assert resumed_losses == losses  # dropout streams, batch order, optimizer and schedule all restored
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_resume_refuses_other_settings(tmp_path):
    _run(tmp_path, resume=False)
    model = tiny_timm_vit()
    trainer = Trainer(model, TrainConfig(mode="full", batch_size=4, epochs=2, lr=1e-3, seed=3), MergeSetting.make("pitome", ratio=0.8),
                      checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="mode: 'last-k' -> 'full'"):
        trainer.fit(TensorItems(*batch("timm_vit", 8)), TensorItems.collate, resume=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_modes_select_head_last_blocks_or_everything(family):
    model = BUILDERS[family]()
    total = sum(1 for _ in model.parameters())
    head_only = set_trainable(model, "linear")
    last = set_trainable(model, "last-k", 1)
    assert head_only and set(head_only) < set(last)
    assert not any(".0." in n or "blocks.0." in n for n in last)
    assert len(set_trainable(model, "full")) == total


@pytest.mark.parametrize("bad, match", [
    (dict(mode="half"), "mode must be one of"), (dict(batch_size=0), "batch_size"), (dict(lr=-1.0), "lr"),
    (dict(amp="fp8"), "amp must be one of"), (dict(warmup=1.5), "warmup"), (dict(schedule="step"), "schedule"),
    (dict(max_steps=0), "max_steps"), (dict(grad_clip=0), "grad_clip")])
def test_bad_settings_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad).validate()


def test_last_k_must_fit_the_model():
    with pytest.raises(ValueError, match=r"last_k must be an integer in \[1, 4\]"):
        set_trainable(tiny_timm_vit(), "last-k", 9)


def test_epoch_batches_are_seeded_and_drop_the_partial_batch():
    first = epoch_batches(10, 4, seed=0, epoch=0)
    assert first == epoch_batches(10, 4, seed=0, epoch=0) and len(first) == 2
    assert first != epoch_batches(10, 4, seed=0, epoch=1)
    assert len({i for b in first for i in b}) == 8


@pytest.mark.parametrize("name", ["train_deit_s_imagenet.yaml", "train_bert_sst2.yaml"])
def test_paper_training_configs_validate(name):
    from pathlib import Path

    from pitome.cli import build_parser
    from pitome.train import cli

    config = Path(__file__).resolve().parent.parent / "configs" / name
    args = build_parser("train").parse_args(["train", "--config", str(config), "--epochs", "2"])
    cli._apply_config(args)
    assert args.epochs == 2, "the command line wins over the config"
    setting = cli._setting(args, args.task == "text-classification", None)
    assert setting.merges and cli._config(args, None).mode == "full"


def test_config_keys_and_values_are_checked(tmp_path):
    from pitome.cli import build_parser
    from pitome.cli.errors import UserError
    from pitome.train import cli

    for text, match in (("lrr: 1", "unknown key 'lrr'"), ("ratios: [1.5]", "keep-ratio"), ("mode: half", "mode")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        args = build_parser("train").parse_args(["train", "--config", str(path)])
        with pytest.raises(UserError, match=match):
            cli._apply_config(args)


def test_offline_setup_refuses_an_unknown_evaluation_split_before_loading():
    from pitome.train.offline import offline_setup

    with pytest.raises(ValueError, match=r"evaluate_on must be one of \('test', 'dev'\), got 'val'"):
        offline_setup("image", evaluate_on="val")


def _csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return str(path)


def test_text_labels_may_be_names_or_class_indices(tmp_path):
    """Names map to classes in sorted order of the training labels; indices pass through; a validation label the
    training data lacks, or a single class, is a clear error."""
    from pitome.train.data import read_text_sets

    train = _csv(tmp_path / "train.csv", [("a", "sport"), ("b", "business"), ("c", "tech"), ("d", "sport")])
    val = _csv(tmp_path / "val.csv", [("e", "tech"), ("f", "business")])
    sets, count, names = read_text_sets(train, val, "train", "validation", "text", "label")
    assert names == ["business", "sport", "tech"] and count == 3
    assert sets[0][1].tolist() == [1, 0, 2, 1] and sets[1][1].tolist() == [2, 0]

    numeric = _csv(tmp_path / "numeric.csv", [("a", 0), ("b", 2), ("c", 1)])
    sets, count, names = read_text_sets(numeric, numeric, "train", "validation", "text", "label")
    assert names is None and count == 3 and sets[0][1].tolist() == [0, 2, 1]

    unknown = _csv(tmp_path / "unknown.csv", [("e", "weather")])
    with pytest.raises(ValueError, match=r"label 'weather' of example 0 is not a class of the training data "
                                         r"\(classes: business, sport, tech\)"):
        read_text_sets(train, unknown, "train", "validation", "text", "label")
    single = _csv(tmp_path / "single.csv", [("a", "sport"), ("b", "sport")])
    with pytest.raises(ValueError, match=r"the training labels hold one class \(sport\)"):
        read_text_sets(single, single, "train", "validation", "text", "label")


def test_a_validation_image_folder_is_labelled_by_class_name(tmp_path):
    """A validation folder with fewer classes keeps the training folder's numbering; an unknown class is an error."""
    pytest.importorskip("torchvision")
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    from pitome.train.data import image_data

    def folder(name, classes):
        for c in classes:
            (tmp_path / name / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / name / c / "0.png")
        return str(tmp_path / name)

    train = folder("train", ["cat", "dog", "eel"])
    data, _ = image_data(train, folder("val", ["dog", "eel"]), "train", "validation", "image", "label")
    assert [t for _, t in data.val.samples] == [1, 2] and data.val.targets == [1, 2] and data.num_classes == 3
    with pytest.raises(ValueError, match=r"class folder\(s\) zebra are not among the training classes \(cat, dog, eel\)"):
        image_data(train, folder("other", ["dog", "zebra"]), "train", "validation", "image", "label")
