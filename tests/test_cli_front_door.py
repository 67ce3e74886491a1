"""The command line as one tool: bad invocations are one line + exit 2 (never a traceback), every verb takes the
same model specs and merge flags, eval keeps finished rows when interrupted, help is fast."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pitome.cli import VERBS, build_parser, main
from pitome.results import ResultsFolder

SRC = str(Path(__file__).resolve().parents[1] / "src")

BAD = [
    # bench
    ["bench", "--model", "timm:does_not_exist"], ["bench", "--algorithms", "pitme"], ["bench", "--ratios", "2"],
    ["bench", "--image-size", "0"], ["bench", "--out", "{file}/sub"], ["bench", "--model", "tiny-vit", "--image-size", "7"],
    ["bench", "--option", "margin"], ["bench", "--preset", "deitt"], ["bench", "--batch-size", "0"],
    ["bench", "--dtype", "fp8"], ["bench", "--device", "gpu"], ["bench", "--model", "hf:./no/such/folder"],
    ["bench", "--model", "tim:deit_tiny_patch16_224"], ["bench", "--match", "tomee"],
    # eval
    ["eval", "offline", "--algorithms", "pitme"], ["eval", "--batch-size", "0"], ["eval", "--max-length", "0"],
    ["eval", "--limit", "-5"], ["eval", "offline", "--option", "margin=abc"],
    ["eval", "image-classification", "--model", "timm:does_not_exist", "--data", "{dir}"],
    ["eval", "image-classification", "--data", "{dir}"],
    ["eval", "text-classification", "--model", "tiny-bert", "--data", "/no/such/file.csv"],
    ["eval", "--config", "/no/such/config.yaml"], ["eval", "--config", "{bad_yaml}"], ["eval", "--config", "{bad_key}"],
    ["eval", "--out", "{file}/sub"], ["eval", "tasks"], ["eval", "--ratios", "0"], ["eval", "offline", "--model", "tiny-vit"],
    ["eval", "offline", "--budgets", "/no/such/budgets.json"], ["eval", "--option", "prop_attn"],
    ["eval", "offline", "--flops-reduction", "0.3"],
    # spectrum
    ["spectrum", "--images", "astronot"], ["spectrum", "--ratios", "2"], ["spectrum", "--image-size", "5"],
    ["spectrum", "--model", "timm:does_not_exist"], ["spectrum", "--out", "{file}"],
    ["spectrum", "--synthetic", "--cluster-sizes", "a,b"], ["spectrum", "--flops-reduction", "0.3"],
    ["spectrum", "--graph", "cosine"],
    # visualize
    ["visualize", "no_such_file.png"], ["visualize", "--ratios", "2"], ["visualize", "--model", "timm:does_not_exist"],
    ["visualize", "--blocks", "x"], ["visualize", "--out", "{file}"], ["visualize", "--algorithms", "tome,pitme"],
    ["visualize", "--weights", "randomly"],
    # calibrate
    ["calibrate", "--data", "random", "--out", "{dir}/b.json"], ["calibrate", "--flops-reduction", "0.4", "--out", "b.json"],
    ["calibrate", "--data", "random", "--flops-reduction", "1.5", "--out", "{dir}/b.json"],
    ["calibrate", "--data", "/no/such/folder", "--flops-reduction", "0.4", "--out", "{dir}/b.json"],
    ["calibrate", "--model", "timm:does_not_exist", "--data", "random", "--flops-reduction", "0.4", "--out", "{dir}/b.json"],
    ["calibrate", "--data", "random", "--flops-reduction", "0.4", "--out", "{file}/sub/b.json"],
    ["calibrate", "--data", "random", "--flops-reduction", "0.4", "--algorithms", "pitme", "--out", "{dir}/b.json"],
    # train
    ["train", "image-classification", "--data", "{dir}"], ["train", "offline-text", "--ratios", "2"],
    ["train", "offline-text", "--algorithms", "pitme"], ["train", "offline-text", "--mode", "everything"],
    ["train", "offline-text", "--algorithms", "pitome", "tome"], ["train", "offline-text", "--model", "tiny-vit"],
    ["train", "offline-image", "--train-items", "1"], ["train", "offline-text", "--compile", "nope"], ["train", "offline-text", "--train-items", "20", "--batch-size", "32"],
    # the entry point
    ["benhc"], ["--verbose"], ["bench", "--algo", "tome"],
]


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    file = tmp_path / "a_file"
    file.write_text("x")
    (tmp_path / "bad.yaml").write_text("ratios: [0.9\n")
    (tmp_path / "key.yaml").write_text("ratio: 0.9\n")
    return {"file": str(file), "dir": str(tmp_path), "bad_yaml": str(tmp_path / "bad.yaml"),
            "bad_key": str(tmp_path / "key.yaml")}


def test_there_are_at_least_30_bad_invocations_across_the_verbs():
    assert len(BAD) >= 30 and {argv[0] for argv in BAD} >= set(VERBS)


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_invocation_is_one_line_and_exit_2(argv, paths, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the repository
    argv = [a.format(**paths) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pitome") and "error: " in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and p.name[:2] == "20"]  # no results folder left


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["eval", "offline", "--algorithms", "pitme"], ["visualize", "no_such_file.png"],
                                  ["spectrum", "--model", "timm:does_not_exist"], ["bench", "--ratios", "2"]])
def test_bad_invocation_in_a_real_process(argv, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pitome.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": SRC}, timeout=300)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


SPECS = ["timm:vit_tiny_patch16_224", "hf:google/vit-base-patch16-224", "openclip:ViT-B-16/laion2b_s34b_b88k",
         "dinov2-s", "minilm", "tiny-vit", "deit_small_patch16_224"]


SWEEPING = [verb for verb in VERBS if verb != "calibrate"]  # calibrate finds the budgets: no --ratios / --r


@pytest.mark.parametrize("spec", SPECS)
def test_calibrate_parses_the_same_model_and_setting_flags(spec):
    argv = ["calibrate", "--model", spec, "--weights", "random", "--data", "random", "--flops-reduction", "0.4",
            "--preset", "auto", "--algorithms", "tome", "--option", "prop_attn=false", "--device", "cpu", "--threads",
            "1", "--seed", "0", "--out", "b.json"]
    args = build_parser("calibrate").parse_args(argv)
    assert args.model == spec and args.weights == "random" and args.option == [("prop_attn", False)]
    assert args.algorithm == "tome"


@pytest.mark.parametrize("verb", SWEEPING)
@pytest.mark.parametrize("spec", SPECS)
def test_every_verb_parses_the_same_model_and_merge_flags(verb, spec):
    argv = [verb, "--model", spec, "--weights", "random", "--algorithms", "pitome,tome", "kth", "--ratios", "0.9", "0.8",
            "--r", "4", "--preset", "auto", "--option", "prop_attn=false", "--device", "cpu", "--threads", "1",
            "--seed", "0", "--out", "somewhere"]
    args = build_parser(verb).parse_args(argv)
    assert args.command == verb
    assert (args.model if verb != "bench" else args.model[0]) == spec
    assert args.algorithms == ["pitome,tome", "kth"] and args.ratios == [0.9, 0.8] and args.r == [4]
    assert args.option == [("prop_attn", False)] and args.out == "somewhere" and args.weights == "random"


def _folder(out: Path) -> Path:
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1
    return folders[0]


@pytest.mark.parametrize("verb", [verb for verb in SWEEPING if verb != "train"])  # train: one setting, below
def test_every_verb_runs_on_a_tiny_model_with_the_same_flags(verb, tmp_path, capsys):
    pytest.importorskip("timm")
    pytest.importorskip("PIL")
    common = ["--model", "tiny-vit", "--model-kwargs", '{"depth": 2}', "--algorithms", "pitome,tome", "--ratios", "0.8",
              "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "out")]
    extra = {"bench": ["--quick", "--no-progress", "--no-latency", "--no-memory", "--no-plot"],
             "eval": ["image-classification", "--data", str(_image_folder(tmp_path / "images")), "--no-progress",
                      "--batch-size", "4"],
             "spectrum": ["--images", str(tmp_path / "images" / "c0" / "0.png"), "--no-plot"],
             "visualize": [str(tmp_path / "images" / "c0" / "0.png"), "--blocks", "0,1"]}[verb]
    if verb != "eval":
        _image_folder(tmp_path / "images")
    code = main([verb] + extra + common)
    assert code in (0, 1)  # eval: 1 when some row failed, spectrum: 1 when token counts differ; neither here
    out = capsys.readouterr().out
    folder = _folder(tmp_path / "out")
    assert f"results go to {folder}" in out
    assert any(folder.iterdir())


def test_train_and_calibrate_run_on_a_tiny_model_with_the_same_flags(tmp_path, capsys):
    pytest.importorskip("timm")
    pytest.importorskip("PIL")
    images = str(_image_folder(tmp_path / "images"))
    common = ["--model", "tiny-vit", "--model-kwargs", '{"depth": 2}', "--device", "cpu", "--threads", "1"]
    budgets = tmp_path / "budgets.json"
    assert main(["calibrate", "--data", images, "--flops-reduction", "0.3", "--max-forwards", "6",
                 "--out", str(budgets)] + common) == 0
    assert json.loads(budgets.read_text())
    code = main(["train", "image-classification", "--data", images, "--max-steps", "2", "--batch-size", "2",
                 "--algorithms", "tome", "--budgets", str(budgets), "--no-progress", "--out", str(tmp_path / "out")]
                + common)
    assert code == 0
    folder = _folder(tmp_path / "out")
    assert str(folder) in capsys.readouterr().out and any(folder.iterdir())


def test_train_with_fewer_items_than_one_batch_is_a_one_line_error(tmp_path, capsys):
    """Found after the data is read (a folder's size is not known before), before any training step or results folder."""
    pytest.importorskip("timm")
    pytest.importorskip("PIL")
    images = str(_image_folder(tmp_path / "images"))
    code = main(["train", "image-classification", "--model", "tiny-vit", "--model-kwargs", '{"depth": 2}', "--data",
                 images, "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "the training data gives 4 training items, fewer than one batch (--batch-size 8)" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _image_folder(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    if root.exists():
        return root
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_eval_interrupted_keeps_finished_rows(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    import pitome.tasks.sweep as sweep

    real = sweep.run_pass
    calls = {"n": 0}

    def interrupted_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "run_pass", interrupted_after_two)
    code = main(["eval", "image-classification", "--model", "tiny-vit", "--model-kwargs", '{"depth": 2}',
                 "--data", str(_image_folder(tmp_path / "images")), "--algorithms", "pitome", "tome",
                 "--ratios", "0.9", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 130
    folder = _folder(tmp_path / "out")
    rows = ResultsFolder.read_rows(folder)
    assert [r["algorithm"] for r in rows] == ["unmerged", "pitome"]
    assert (folder / "rows.csv").read_text().count("\n") == 3  # header + 2 rows
    assert f"2 finished row(s) kept in {folder}" in capsys.readouterr().err
    assert json.loads((folder / "config.json").read_text())["options"]["task"] == "image-classification"


@pytest.mark.slow
def test_eval_killed_mid_run_leaves_rows_on_disk(tmp_path):
    pytest.importorskip("timm")
    data = _image_folder(tmp_path / "images")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pitome.cli", "eval", "image-classification", "--model", "tiny-vit",
            "--data", str(data), "--algorithms", "pitome", "tome", "kth", "random", "--ratios", "0.95", "0.9", "0.8",
            "0.7", "0.6", "0.5", "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(out)]
    process = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    rows: list = []
    for _ in range(480):  # poll for at most ~4 minutes
        if process.poll() is not None:
            break
        time.sleep(0.5)
        folders = list(out.iterdir()) if out.exists() else []
        if folders and (folders[0] / "rows.jsonl").exists():
            rows = ResultsFolder.read_rows(folders[0])
            if len(rows) >= 3:
                break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert len(rows) >= 3
    assert len(ResultsFolder.read_rows(_folder(out))) >= len(rows)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == "pitome 0.1.0"


@pytest.mark.slow
def test_help_does_not_import_torch():
    code = ("import sys\nfrom pitome.cli import main\n"
            "for argv in (['--help'], ['--version'], ['bench', '--help'], ['eval', '--help'], ['spectrum', '--help'], "
            "['visualize', '--help'], ['calibrate', '--help'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": SRC}, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "NO-TORCH", result.stderr
    for flag in ("--algorithms", "--ratios", "--model", "--out", "--weights", "--device"):
        assert result.stdout.count(flag) >= 4  # in every verb's help


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed here")
@pytest.mark.parametrize("argv", [["train", "text-classification", "--model", "minilm", "--data", "hf:imdb"],
                                  ["eval", "text-classification", "--model", "minilm", "--data", "hf:imdb"]])
def test_hf_data_without_the_datasets_package_is_a_one_line_error_before_loading(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "hf:imdb needs the 'datasets' package (pip install datasets)" in err
