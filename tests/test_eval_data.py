"""Data readers of `pitome eval`: good files parse; malformed ones name the file and the line."""

from __future__ import annotations

import argparse
import json

import pytest

from pitome.tasks import cli
from pitome.tasks.retrieval import read_captions
from pitome.tasks.text_classification import map_labels, read_text_file


def test_csv_tsv_jsonl_read(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",1\nbye,0\n')
    ex = read_text_file(tmp_path / "a.csv")
    assert ex.texts == ["hello, world", "bye"] and ex.labels == ["1", "0"]
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nx y\tpositive\n")
    assert read_text_file(tmp_path / "a.tsv", text_column="sentence").labels == ["positive"]
    (tmp_path / "a.jsonl").write_text('{"text": "a", "label": 2}\n\n{"text": "b", "label": 0}\n')
    assert read_text_file(tmp_path / "a.jsonl").labels == [2, 0]


@pytest.mark.parametrize("name, content, line, words", [
    ("bad.csv", "text,label\nok,1\nonly-one-field\n", 3, "expected 2 fields"),
    ("bad2.csv", "text,label\nok,1\n,0\n", 3, "empty"),
    ("bad3.csv", "txt,label\nok,1\n", 1, "no column 'text'"),
    ("bad4.csv", 'text,label\nok,1\n"unterminated,1\n', 3, "malformed"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', 2, "not valid JSON"),
    ("bad2.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', 2, "no column 'label'"),
    ("bad3.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', 2, "JSON object"),
])
def test_malformed_text_files_name_file_and_line(tmp_path, name, content, line, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        read_text_file(path)
    message = str(info.value)
    assert str(path) in message and f"line {line}" in message and words in message


def test_unknown_file_type(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.csv, \.tsv or \.jsonl"):
        read_text_file(tmp_path / "a.txt")


def test_map_labels():
    assert map_labels(["POSITIVE", "negative", "1"], {"NEGATIVE": 0, "POSITIVE": 1}, 2) == [1, 0, 1]
    with pytest.raises(ValueError, match="'neutral'"):
        map_labels(["neutral"], {"NEGATIVE": 0, "POSITIVE": 1}, 2, "f.csv")
    with pytest.raises(ValueError, match="outside"):
        map_labels([3], None, 2)


def _karpathy(images):
    return json.dumps({"dataset": "flickr30k", "images": images}, indent=1)


def test_karpathy_and_lavis_formats(tmp_path):
    entries = [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "a dog"}, {"raw": "a brown dog"}]},
               {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "a cat"}]},
               {"filename": "c.jpg", "filepath": "sub", "split": "test", "sentences": [{"raw": "a bird"}]}]
    (tmp_path / "k.json").write_text(_karpathy(entries))
    data = read_captions(tmp_path / "k.json", "test")
    assert [p.name for p in data.images] == ["a.jpg", "c.jpg"] and data.images[1].parent.name == "sub"
    assert data.captions == ["a dog", "a brown dog", "a bird"] and data.caption_image == [0, 0, 1]
    (tmp_path / "l.json").write_text(json.dumps([{"image": "x.jpg", "caption": ["one", "two"]},
                                                 {"image": "y.jpg", "caption": "three"}]))
    lavis = read_captions(tmp_path / "l.json")
    assert lavis.caption_image == [0, 0, 1]


def test_malformed_caption_files_name_file_and_line(tmp_path):
    entries = [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}]},
               {"split": "test", "sentences": [{"raw": "y"}]}]
    text = _karpathy(entries)
    (tmp_path / "k.json").write_text(text)
    lines = text.splitlines()
    expected_line = lines.index("  {", lines.index("  {") + 1) + 1
    with pytest.raises(ValueError, match=rf"k\.json, line {expected_line} \(images\[1\]\).*filename"):
        read_captions(tmp_path / "k.json")
    (tmp_path / "broken.json").write_text('{"images": [\n{"filename": "a.jpg",,}\n]}')
    with pytest.raises(ValueError, match=r"broken\.json, line 2: not valid JSON"):
        read_captions(tmp_path / "broken.json")
    (tmp_path / "l.json").write_text('[\n {"image": "a.jpg", "caption": "x"},\n {"image": "b.jpg"}\n]')
    with pytest.raises(ValueError, match=r"l\.json, line 3 \(entry 1\)"):
        read_captions(tmp_path / "l.json")


def test_config_files(tmp_path):
    (tmp_path / "c.yaml").write_text("task: image-classification\nmodel: timm:deit_small_patch16_224\n"
                                     "ratios: [0.9]\noption: {prop_attn: false}\npaper_results: {top1: 79.1}\n")
    args = argparse.Namespace(config=str(tmp_path / "c.yaml"), task=None, ratios=[0.8])
    options = cli.resolve_options(args)
    assert options["task"] == "image-classification" and options["ratios"] == [0.8]
    assert options["option"] == [("prop_attn", False)]
    options.update(data=str(tmp_path), out=str(tmp_path))
    assert cli.validate(options).options_for("pitome") == {"prop_attn": False}
    (tmp_path / "bad.yaml").write_text("task: offline\nmodel: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml, line \d+: invalid YAML"):
        cli.resolve_options(argparse.Namespace(config=str(tmp_path / "bad.yaml")))
    (tmp_path / "unknown.json").write_text('{"tasks": "offline"}')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['tasks'\]"):
        cli.resolve_options(argparse.Namespace(config=str(tmp_path / "unknown.json")))


def test_shipped_configs_parse():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(f for f in folder.glob("*.yaml") if not f.name.startswith("train_"))  # train_*: pitome train
    assert len(files) >= 10
    for file in files:
        options = cli.resolve_options(argparse.Namespace(config=str(file)))
        assert options["task"] in cli.TASKS and options["model"], file
