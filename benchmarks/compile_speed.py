"""Does token merging still pay off under torch.compile? DeiT-S (random weights), CPU by default.

Variants: unpatched, PiToMe at one keep-ratio, ToMe at equal FLOPs; each eager and compiled (inductor, one model
copy per variant so no variant forces another to recompile). Compilation happens in the warm-up; the timed
repetitions run interleaved and the table reports medians, so all speed-ups are ratios within this one run.
Usage: python benchmarks/compile_speed.py [--batch 32] [--reps 7] [--ratio 0.9] [--mode default|max-autotune]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import pitome
from core_speed import predicted_macs, tome_r_for  # benchmarks/core_speed.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval().to(args.device)
    tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    x = torch.randn(args.batch, 3, *base.patch_embed.img_size, device=args.device)
    r = tome_r_for(base, tokens, predicted_macs(base, tokens, ratio=args.ratio))
    settings = {"unpatched": None, f"PiToMe ratio {args.ratio}": dict(algorithm="pitome", ratio=args.ratio),
                f"ToMe r={r} (equal FLOPs)": dict(algorithm="tome", r=r)}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    runners, compile_s = {}, {}
    with torch.inference_mode():
        for name, kwargs in settings.items():
            model = copy.deepcopy(base)
            if kwargs:
                pitome.patch(model, **kwargs)
            runners[f"{name}, eager"] = model
            compiled = torch.compile(model, mode=args.mode, fullgraph=True)
            start = time.perf_counter()
            compiled(x)
            sync()
            compile_s[f"{name}, compiled"] = time.perf_counter() - start
            runners[f"{name}, compiled"] = compiled
            print(f"compiled {name} in {compile_s[f'{name}, compiled']:.0f} s", flush=True)
        for name, run in runners.items():  # warm-up, and check compiled == eager
            out = run(x)
            if name.endswith("compiled"):
                eager = runners[name.replace("compiled", "eager")](x)
                print(f"{name}: max |compiled - eager| = {(out - eager).abs().max().item():.2e}")
        times: dict[str, list[float]] = {name: [] for name in runners}
        names = list(runners)
        for rep in range(args.reps):
            for k in range(len(names)):
                name = names[(rep + k) % len(names)]
                sync()
                start = time.perf_counter()
                runners[name](x)
                sync()
                times[name].append(time.perf_counter() - start)
    base_rate = args.batch / statistics.median(times["unpatched, eager"])
    macs = {name: predicted_macs(base, tokens, **{k: v for k, v in (kwargs or {"r": 0}).items() if k != "algorithm"})
            for name, kwargs in settings.items()}
    print(f"\n{args.model}, {args.device}, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"compile mode {args.mode!r}, median of {args.reps} interleaved reps\n")
    print("| variant | items/s | speed-up vs unpatched eager | speed-up vs its own eager | block GMACs/item |")
    print("|---|---|---|---|---|")
    for name in names:
        rate = args.batch / statistics.median(times[name])
        eager_rate = args.batch / statistics.median(times[name.replace("compiled", "eager")])
        setting = name.rsplit(", ", 1)[0]
        print(f"| {name} | {rate:.1f} | {rate / base_rate:.3f}x | {rate / eager_rate:.3f}x | {macs[setting] / 1e9:.2f} |")


if __name__ == "__main__":
    main()
