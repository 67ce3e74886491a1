"""`pitome bench` and its Python API on a tiny model: valid JSON / CSV, sane rows, clear errors.

No timing assertions: only that the figures exist and are consistent with each other.
"""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

import pitome
from pitome import bench_cli
from pitome.bench import BenchOptions, Variant, bench, load_model
from pitome.step import merge_timing

TINY = ["--model", "tiny-vit", "--model-kwargs", '{"depth": 2, "embed_dim": 48}', "--quick", "--no-progress",
        "--threads", "1"]


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pitome bench")
    bench_cli.add_arguments(parser)
    return bench_cli.run(parser.parse_args(argv))


def test_cli_writes_valid_json_and_csv(tmp_path, capsys):
    out_json, out_csv, out_md = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.md"
    code = _run(TINY + ["--ratio", "0.9", "--match", "tome", "--identity", "--json", str(out_json),
                        "--csv", str(out_csv), "--md", str(out_md)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| variant |" in printed and "random init" in printed
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert [r["variant"] for r in rows][:3] == ["unpatched", "pitome ratio=1 (nothing merged)", "pitome ratio=0.9"]
    assert rows[3]["algorithm"] == "tome" and "equal FLOPs" in rows[3]["note"]
    assert data["meta"]["threads"] == 1 and data["meta"]["reps"] == 2
    base, identity, merged, tome = rows
    assert base["speedup"] == 1.0 and base["flops_ratio"] == 1.0 and base["merge_share"] is None
    assert identity["gflops"] == base["gflops"] and identity["tokens_per_layer"] == [65, 65, 65]
    assert merged["tokens_per_layer"] == pitome.predict_token_counts(pitome.resolve_budgets(2, ratio=0.9), 65) and merged["flops_ratio"] < 1
    for row in rows:
        assert row["items_per_s_q1"] <= row["items_per_s"] <= row["items_per_s_q3"]
        assert row["latency_ms"] > 0 and row["peak_mem_mb"] >= 0 and row["batch"] == 4
        assert row["achieved_over_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
        assert row["ideal_speedup"] == pytest.approx(1 / row["flops_ratio"])
    assert 0 <= merged["merge_share"] <= 1 and merged["merge_ms"] > 0
    table = list(csv.DictReader(out_csv.read_text().splitlines()))
    assert len(table) == 4 and table[2]["tokens_per_layer"] == " ".join(map(str, merged["tokens_per_layer"]))
    assert float(table[2]["gflops"]) == pytest.approx(merged["gflops"])
    assert sum(line.startswith("| ") for line in out_md.read_text().splitlines()) == 1 + 4  # header + rows


def test_cli_flops_reduction_and_check(tmp_path):
    out = tmp_path / "b.json"
    code = _run(TINY + ["--algorithm", "pitome", "tome", "--flops-reduction", "0.2", "--check-flops", "--no-latency",
                        "--no-memory", "--batch-size", "2", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["algorithm"] for r in rows] == [None, "pitome", "tome"]
    assert rows[1]["ratio"] is not None and rows[2]["r"] is not None
    for row in rows:
        assert row["flop_counter_gflops"] == pytest.approx(row["gflops"], rel=0.02)
        assert row["latency_ms"] is None and row["peak_mem_mb"] is None
    for row in rows[1:]:
        assert abs((1 - row["flops_ratio"]) - 0.2) < 0.1


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "tiny-vit", "--device", "tpu"], "device"),
    (["--model", "tiny-vit", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "cuda"),
    (["--model", "tiny-vit", "--algorithm", "nope"], "unknown algorithm 'nope'"),
    (["--model", "tiny-vit", "--flops-reduction", "0.9"], "cannot remove"),
    (["--model", "tiny-vit", "--model-kwargs", '{"depthh": 2}'], "does not accept"),
])
def test_cli_bad_values_return_2_with_a_message(argv, message, capsys):
    assert _run(argv + ["--quick", "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "1.5"], "ratio must be in (0, 1]"),
    (["--ratio", "abc"], "ratio must be a number"),
    (["--r", "-2"], "r must be >= 0"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--batch-size", "0"], "positive integer"),
    (["--model-kwargs", "{depth: 2}"], "not valid JSON"),
    (["--flops-reduction", "1.2"], "FLOPs reduction must be in [0, 1)"),
])
def test_cli_bad_arguments_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _run(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_dispatch_through_pitome_main(capsys):
    from pitome.cli import main

    assert main(["bench"] + TINY + ["--no-latency", "--no-memory", "--batch-size", "1"]) == 0
    assert "pitome ratio=0.9" in capsys.readouterr().out


def test_api_rows_plot_and_solved_variants(tmp_path):
    model = load_model("tiny-vit", model_kwargs={"depth": 2})
    reference = Variant("pitome", ratio=0.85)
    result = bench([model], [reference, Variant("tome", equal_flops_to=reference)], batch_sizes=[2, 3],
                   options=BenchOptions(warmup=1, reps=2, latency=False, progress=False, threads=1))
    assert len(result.rows) == 6  # unpatched added, for each batch size
    assert {r["batch"] for r in result.rows} == {2, 3}
    tome = [r for r in result.rows if r["algorithm"] == "tome"][0]
    assert tome["r"] is not None and abs(tome["flops_ratio"] - result.rows[1]["flops_ratio"]) < 0.05
    path = tmp_path / "plot.png"
    pytest.importorskip("matplotlib")
    result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not pitome.is_patched(model.model)


def test_load_model_names_the_weights():
    assert "random init" in load_model("tiny-vit").weights
    with pytest.raises(ValueError, match="tiny-vit"):
        load_model("not a model")


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
