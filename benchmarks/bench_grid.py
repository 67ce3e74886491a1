"""Speed grid (issue 4): DeiT-S and ViT-B with random weights, and ViT-B at 384 px for the merge overhead.

Rows per model: unpatched, patched with nothing merged (ratio 1.0), PiToMe at ratios 0.95 / 0.9 / 0.85, and ToMe
at equal FLOPs to each PiToMe row (r found by pitome.solver). ViT-B/16 at 384 px (577 tokens): unpatched,
PiToMe 0.9 and ToMe at equal FLOPs, to compare the merge steps' own cost at a longer sequence.
Variants run interleaved with a rotating start; medians are reported; the targets are checked at the end:
  - patched ratio 1.0 >= 0.98 x unpatched throughput;
  - every merged row >= 0.85 of its ideal speed-up (ideal = unpatched FLOPs / merged FLOPs);
  - PiToMe's merge time per forward <= 1.5 x ToMe's at equal FLOPs at 197 tokens, <= 2 x at 577 tokens.

CPU:  python benchmarks/bench_grid.py --out results/bench_cpu
GPU:  python benchmarks/bench_grid.py --device cuda --dtype fp16 --batch 256 --batch-384 256 --reps 10 --out results/bench_gpu
Smoke: python benchmarks/bench_grid.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pitome.algorithms import MergeRequest, create_algorithm
from pitome.bench import BenchOptions, BenchResult, bench, parse_device, parse_dtype
from pitome.loading import load_model
from pitome.setting import MergeSetting

PITOME_RATIOS = (0.95, 0.9, 0.85)
MODELS_224 = ("deit_small_patch16_224", "vit_base_patch16_224")
MODEL_384 = "vit_base_patch16_384"


IDENTITY = "patched, nothing merged"


def grid_variants(ratios: tuple[float, ...], identity: bool = True) -> list[MergeSetting]:
    variants = [MergeSetting()]
    if identity:
        variants.append(MergeSetting.make("pitome", ratio=1.0, note=IDENTITY))
    pitome_rows = [MergeSetting.make("pitome", ratio=r) for r in ratios]
    tome_rows = [MergeSetting.make("tome", equal_flops_to=ref) for ref in pitome_rows]
    return variants + pitome_rows + tome_rows


def check_targets(result: BenchResult) -> list[str]:
    """PASS / FAIL lines for the issue's targets."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for row in result.rows:
        groups.setdefault((row["model"], row["batch"]), []).append(row)
    for (model, batch), rows in groups.items():
        tokens = rows[0]["tokens_per_layer"][0]
        for row in rows:
            if row["note"] == IDENTITY:
                ok = row["speedup"] >= 0.98
                lines.append(f"{'PASS' if ok else 'FAIL'} {model} b{batch}: patched ratio 1.0 at {row['speedup']:.3f}x "
                             f"unpatched (target >= 0.98)")
            elif row["algorithm"] is not None and row["flops_kept"] < 1:
                ok = row["achieved_over_ideal"] >= 0.85
                lines.append(f"{'PASS' if ok else 'FAIL'} {model} b{batch}: {row['variant']} reaches "
                             f"{row['achieved_over_ideal']:.3f} of its ideal speed-up (target >= 0.85)")
        limit = 1.5 if tokens <= 197 else 2.0
        pitome_rows = [r for r in rows if r["algorithm"] == "pitome" and r["flops_kept"] < 1]
        for prow in pitome_rows:
            trow = next((r for r in rows if r["algorithm"] == "tome"
                         and r["note"] == f"equal FLOPs to {prow['variant']} (solver)"), None)
            if trow is None or not trow["merge_ms"]:
                continue
            ratio = prow["merge_ms"] / trow["merge_ms"]
            lines.append(f"{'PASS' if ratio <= limit else 'FAIL'} {model} b{batch} ({tokens} tokens): PiToMe merge "
                         f"time {prow['merge_ms']:.1f} ms vs ToMe {trow['merge_ms']:.1f} ms per forward = {ratio:.2f}x "
                         f"at {prow['variant']} (target <= {limit}x)")
    return lines


def merge_step_table(cases: list[tuple[int, int, int]], device: str, dtype: str, reps: int = 15) -> str:
    """One merge step in isolation (plan + apply on random keys), PiToMe vs ToMe removing the same count."""
    dev, dt = parse_device(device), parse_dtype(dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    lines = ["| tokens | batch | r | ToMe plan ms | PiToMe plan ms | apply ms | PiToMe / ToMe step (plan + apply) |",
             "|---|---|---|---|---|---|---|"]
    for tokens, batch, dim in cases:
        g = torch.Generator().manual_seed(0)
        metric = torch.randn(batch, tokens, 64, generator=g).to(dev, dt)
        x = torch.randn(batch, tokens, dim, generator=g).to(dev, dt)
        size = torch.ones(batch, tokens, device=dev)
        r = int((tokens - 1) * 0.1)
        request = MergeRequest(metric=metric, r=torch.full((batch,), r, device=dev), r_max=r, r_min=r, num_protected=1)
        tome, pitome_alg = create_algorithm("tome"), create_algorithm("pitome")
        plan = pitome_alg.plan(request)
        jobs = {"tome": lambda: tome.plan(request), "pitome": lambda: pitome_alg.plan(request),
                "apply": lambda: plan.merge(x, size)}
        times: dict[str, list[float]] = {k: [] for k in jobs}
        with torch.inference_mode():
            for _ in range(reps + 1):
                for key, job in jobs.items():
                    sync(); start = time.perf_counter(); job(); sync()
                    times[key].append(time.perf_counter() - start)
        ms = {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}
        step = (ms["pitome"] + ms["apply"]) / (ms["tome"] + ms["apply"])
        lines.append(f"| {tokens} | {batch} | {r} | {ms['tome']:.2f} | {ms['pitome']:.2f} | {ms['apply']:.2f} | "
                     f"{step:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch", type=int, default=32, help="batch size at 224 px (default 32)")
    parser.add_argument("--batch-vitb", type=int, default=None, help="batch size for ViT-B at 224 px (default --batch)")
    parser.add_argument("--batch-384", type=int, default=None, help="batch size at 384 px (default: 8 on CPU, "
                                                                     "--batch otherwise)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--reps-vitb", type=int, default=None, help="repetitions for ViT-B (default --reps)")
    parser.add_argument("--reps-384", type=int, default=None, help="repetitions at 384 px (default --reps)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--skip-384", action="store_true")
    parser.add_argument("--skip-step", action="store_true", help="skip the single merge-step micro-benchmark")
    parser.add_argument("--quick", action="store_true", help="smoke run: DeiT-S batch 4, ViT-B-384 batch 1, 1-2 reps")
    parser.add_argument("--out", default=None, help="folder for bench.md / bench.json / bench.csv")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    batch_384 = args.batch_384 or (8 if cpu else args.batch)
    models = list(MODELS_224)
    reps = {m: args.reps for m in models}
    reps["vit_base_patch16_224"] = args.reps_vitb or args.reps
    reps_384 = args.reps_384 or args.reps
    if args.quick:
        models, args.batch, batch_384, reps_384 = ["deit_small_patch16_224"], 4, 1, 1
        reps = {models[0]: 2}
    start = time.perf_counter()
    results = []
    for name in models:
        options = BenchOptions(device=args.device, dtype=args.dtype, warmup=args.warmup, reps=reps[name],
                               latency=not args.no_latency, memory=not args.no_memory, threads=args.threads)
        batch = args.batch_vitb if name == "vit_base_patch16_224" and args.batch_vitb else args.batch
        results.append(bench([load_model(name, weights="random")], grid_variants(PITOME_RATIOS), [batch], options))
    if not args.skip_384:
        options = BenchOptions(device=args.device, dtype=args.dtype, warmup=args.warmup, reps=reps_384,
                               latency=False, memory=not args.no_memory, threads=args.threads)
        results.append(bench([load_model(MODEL_384, weights="random")], grid_variants((0.9,), identity=False), [batch_384], options))
    merged = BenchResult(rows=[row for res in results for row in res.rows], meta=results[0].meta)
    merged.meta["reps"] = ", ".join(f"{res.rows[0]['model']}: {res.meta['reps']}" for res in results)
    table = merged.to_markdown()
    targets = check_targets(merged)
    report = table + "\nTargets:\n" + "\n".join(f"- {line}" for line in targets)
    if not args.skip_step:
        if args.threads:
            torch.set_num_threads(args.threads)
        cases = [(197, args.batch, 384), (577, batch_384, 768)]
        report += "\n\nOne merge step in isolation (keys of width 64, PiToMe ratio 0.9's first-block r):\n\n" + \
            merge_step_table(cases, args.device, args.dtype, reps=3 if args.quick else 15)
    report += \
        f"\n\nTotal time {time.perf_counter() - start:.0f} s.\n"
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text(report)
        merged.to_json(out / "bench.json")
        merged.to_csv(out / "bench.csv")


if __name__ == "__main__":
    main()
