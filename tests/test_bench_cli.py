"""`pitome bench` and its Python API on a tiny model: valid JSON / CSV rows in a results folder, clear errors.

No timing assertions: only that the figures exist and are consistent with each other.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import pitome
from pitome.bench import BenchOptions, bench
from pitome.cli import main
from pitome.loading import load_model
from pitome.results import ResultsFolder
from pitome.setting import MergeSetting
from pitome.step import merge_timing

TINY = ["--model", "tiny-vit", "--model-kwargs", '{"depth": 2, "embed_dim": 48}', "--quick", "--no-progress",
        "--threads", "1", "--device", "cpu", "--no-plot"]


def _run(argv: list[str]) -> int:
    return main(["bench"] + argv)


def _folder(out: Path) -> Path:
    folders = list(out.iterdir())
    assert len(folders) == 1
    return folders[0]


def test_cli_writes_rows_json_csv_and_table(tmp_path, capsys):
    code = _run(TINY + ["--algorithms", "pitome", "--ratios", "0.9", "--match", "tome", "--identity",
                        "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    folder = _folder(tmp_path)
    assert printed.startswith(f"pitome bench: results go to {folder}")
    assert "| variant |" in printed and "RANDOM weights" in printed and "**Conclusion**" in printed
    data = json.loads((folder / "results.json").read_text())
    rows = data["rows"]
    assert [r["variant"] for r in rows][:3] == ["unmerged", "pitome ratio=0.9", "pitome ratio=1"]
    assert rows[3]["algorithm"] == "tome" and "equal FLOPs" in rows[3]["note"]
    assert data["meta"]["threads"] == 1 and data["meta"]["reps"] == 2
    base, merged, identity, tome = rows
    assert identity["note"] == "nothing merged"
    assert base["speedup"] == 1.0 and base["flops_kept"] == 1.0 and base["merge_share"] is None
    assert identity["gflops"] == base["gflops"] and identity["tokens_per_layer"] == [65, 65, 65]
    assert merged["tokens_per_layer"] == pitome.predict_token_counts(pitome.resolve_budgets(2, ratio=0.9), 65)
    assert merged["flops_kept"] < 1
    for row in rows:
        assert row["items_per_s_q1"] <= row["items_per_s"] <= row["items_per_s_q3"]
        assert row["speedup_q1"] <= row["speedup_q3"] and row["reps"] == 2
        assert row["latency_ms"] > 0 and row["peak_mem_mb"] >= 0 and row["batch"] == 4
        assert row["achieved_over_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
        assert row["ideal_speedup"] == pytest.approx(1 / row["flops_kept"])
    assert 0 <= merged["merge_share"] <= 1 and merged["merge_ms"] > 0
    assert ResultsFolder.read_rows(folder) == json.loads(json.dumps(rows))  # streamed rows = final rows
    table = list(csv.DictReader((folder / "rows.csv").read_text().splitlines()))
    assert len(table) == 4 and json.loads(table[1]["tokens_per_layer"]) == merged["tokens_per_layer"]
    assert float(table[1]["gflops"]) == pytest.approx(merged["gflops"])
    assert sum(line.startswith("| ") for line in (folder / "table.md").read_text().splitlines()) == 1 + 4


def test_cli_flops_reduction_and_check(tmp_path):
    code = _run(TINY + ["--algorithms", "pitome", "tome", "--flops-reduction", "0.2", "--check-flops", "--no-latency",
                        "--no-memory", "--batch-size", "2", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((_folder(tmp_path) / "results.json").read_text())["rows"]
    assert [r["algorithm"] for r in rows] == [None, "pitome", "tome"]
    assert rows[1]["ratio"] is not None and rows[2]["r"] is not None
    for row in rows:
        assert row["flop_counter_gflops"] == pytest.approx(row["gflops"], rel=0.02)
        assert row["latency_ms"] is None and row["peak_mem_mb"] is None
    for row in rows[1:]:
        assert abs((1 - row["flops_kept"]) - 0.2) < 0.1


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "tiny-vit", "--device", "tpu"], "device"),
    (["--model", "tiny-vit", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "cuda"),
    (["--model", "tiny-vit", "--algorithms", "nope"], "unknown algorithm 'nope'"),
    (["--model", "tiny-vit", "--flops-reduction", "0.9", "--device", "cpu"], "cannot remove"),
    (["--model", "tiny-vit", "--model-kwargs", '{"depthh": 2}', "--device", "cpu"], "does not accept"),
    (["--ratios", "1.5"], "keep-ratio is in (0, 1]"),
    (["--ratios", "abc"], "keep-ratio is a number"),
    (["--r", "-2"], "r is an integer >= 0"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--batch-size", "0"], "integer >= 1"),
    (["--model-kwargs", "{depth: 2}"], "not valid JSON"),
    (["--flops-reduction", "1.2"], "FLOPs reduction is in [0, 1)"),
])
def test_cli_bad_values_return_2_with_one_line(argv, message, capsys, tmp_path):
    assert _run(argv + ["--quick", "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_api_rows_plot_and_solved_settings(tmp_path):
    model = load_model("tiny-vit", model_kwargs={"depth": 2})
    reference = MergeSetting.make("pitome", ratio=0.85)
    result = bench([model], [reference, MergeSetting.make("tome", equal_flops_to=reference)], batch_sizes=[2, 3],
                   options=BenchOptions(warmup=1, reps=2, latency=False, progress=False, threads=1))
    assert len(result.rows) == 6  # unmerged added, for each batch size
    assert {r["batch"] for r in result.rows} == {2, 3}
    tome = [r for r in result.rows if r["algorithm"] == "tome"][0]
    assert tome["r"] is not None and abs(tome["flops_kept"] - result.rows[1]["flops_kept"]) < 0.05
    pytest.importorskip("matplotlib")
    path = result.plot(tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not pitome.is_patched(model.module)


def test_merge_timer_counts_plan_and_apply(make_vit, images):
    model = make_vit()
    x = images()
    pitome.patch(model, ratio=0.9)
    with torch.no_grad():
        model(x)  # no timer: nothing accumulates anywhere
        with merge_timing() as timer:
            model(x)
    assert timer.calls == 2 * 4 and timer.seconds > 0  # plan + apply in each of the 4 blocks
    pitome.patch(model, ratio=1.0)
    with torch.no_grad(), merge_timing() as idle:
        model(x)
    assert idle.calls == 4  # plans that merge nothing, no apply
