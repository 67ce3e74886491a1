"""Markdown tables from train_offline.py / train_speed.py JSON files (what docs/training.md shows).

    python benchmarks/train_report.py --accuracy results/train_text.json results/train_image.json \
        --speed results/train_speed_text.json results/train_speed_image.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ci(entry: dict) -> str:
    return f"{entry['diff']:+.1f} [{entry['low']:+.1f}, {entry['high']:+.1f}]"


def _verdict(interval: dict) -> str:
    """'yes' only when the paired interval lies above 0; a positive point estimate alone is not enough."""
    if interval["low"] > 0:
        return "yes"
    return "not shown (interval includes 0)" if interval["diff"] > 0 else "no"


def accuracy_table(results: list[dict]) -> str:
    lines = ["| task (merge setting) | A: unmerged fine-tuned | B: off-the-shelf merged | C: fine-tuned with merging "
             "| C evaluated unmerged | drop A − B | gain C − B | C − (A + B)/2 | recovered | ≥ half? |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, b, c = r["A_unmerged_finetuned"], r["B_off_the_shelf_merged"], r["C_finetuned_with_merging"]
        cu = r.get("C_evaluated_unmerged")
        recovered = r.get("recovered_fraction")
        unmerged_c = f"{cu['accuracy']:.1f}" if cu else "-"
        config = r["config"]
        trains = config["mode"] + (f" {config['last_k']}" if config["mode"] == "last-k" else "")
        split = "dev" if r.get("evaluated_on") == "dev" else "test"
        lines.append(
            f"| {r['task']} ({r['merge']}; trains {trains}, {config['epochs']} ep.; {split} n = {a['n']}) | {a['accuracy']:.1f} ({a['gflops']:.2f} GFLOPs) "
            f"| {b['accuracy']:.1f} ({b['gflops']:.2f}) | {c['accuracy']:.1f} ({c['gflops']:.2f}) "
            f"| {unmerged_c} | ")
        lines[-1] += (f"{_ci(r['drop_A_minus_B'])} | {_ci(r['gain_C_minus_B'])} | "
                      f"{_ci(r['half_recovery_C_minus_mean_AB'])} | "
                      f"{'-' if recovered is None else f'{100 * recovered:.0f}%'} | "
                      f"{_verdict(r['half_recovery_C_minus_mean_AB'])} |")
    return "\n".join(lines)


def speed_table(results: list[dict]) -> str:
    lines = ["| task (merge setting, trained blocks) | reps | samples/s unmerged | samples/s merged | measured speed-up "
             "| FLOPs-predicted | measured / predicted | ≥ 0.85? |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        mode = r["mode"] + (f" {r['last_k']}" if r["mode"] == "last-k" else "")
        ratio = r["measured_over_predicted"]
        lines.append(f"| {r['task']} ({r['merge']}, {mode}) | {r['reps']} | {r['samples_per_s']['unmerged']:.2f} "
                     f"| {r['samples_per_s']['merged']:.2f} | ×{r['measured_speedup']:.2f} "
                     f"| ×{r['predicted_speedup']:.2f} | {ratio:.2f} | {'yes' if ratio >= 0.85 else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", nargs="*", type=Path, default=[])
    parser.add_argument("--speed", nargs="*", type=Path, default=[])
    args = parser.parse_args()
    if args.accuracy:
        print(accuracy_table([json.loads(p.read_text()) for p in args.accuracy]) + "\n")
    if args.speed:
        print(speed_table([json.loads(p.read_text()) for p in args.speed]))


if __name__ == "__main__":
    main()
