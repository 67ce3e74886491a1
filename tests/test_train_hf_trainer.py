"""Hugging Face Trainer on a patched model (docs/training.md's example): it trains with merging on, and its
checkpoints and saved model load with ``from_pretrained`` as the transformers class, with the trained weights."""

from __future__ import annotations

import json

import pytest
import torch

import pitome

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it


class _Articles(torch.utils.data.Dataset):
    """16 token sequences of different lengths ([CLS]-like first, [SEP]-like last token), two labels."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(5, 100, (12 + i % 5,), generator=torch.Generator().manual_seed(i))
        ids[0], ids[-1] = 3, 4
        return {"input_ids": ids, "labels": i % 2}


def _collate(items: list[dict]) -> dict:
    """Right padding with an attention mask, as DataCollatorWithPadding does."""
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        mask[row, : len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["labels"] for item in items])}


def test_hf_trainer_trains_a_patched_bert_with_merging_and_its_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    pitome.patch(model, algorithm="pitome_text", ratio=0.8)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    merges: list[int] = []
    args = transformers.TrainingArguments(str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                                          save_steps=2, report_to=[], use_cpu=True, learning_rate=1e-3,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Articles(), data_collator=_collate)
    with pitome.record_merges(lambda state, layer, metric, plan: merges.append(layer)):
        result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len(merges) >= 3 * 2, "every training step merged in both blocks"
    assert pitome.is_patched(model)
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items()), "the weights trained"

    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    assert type(loaded) is transformers.BertForSequenceClassification
    batch = _collate([_Articles()[i] for i in range(4)])
    batch.pop("labels")
    pitome.unpatch(model)
    model.eval()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
