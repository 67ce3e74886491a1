"""Peak extra memory of each merging algorithm over the unpatched forward at ~4k tokens.

A timm ViT (ViT-S width: 384, 6 heads; 2 blocks, batch 1, 1024 px with 16 px patches = 4,096 patches + [CLS] =
4,097 tokens, random weights, inference), every algorithm at keep-ratio 0.9. Each variant runs in a fresh
subprocess so the peaks do not mix: on CUDA the peak of ``torch.cuda.max_memory_allocated`` during the forward;
on CPU the rise of the process's peak resident set (``ru_maxrss``) during the forward, after a warm-up forward at
a small size has loaded the kernels (the allocator returns large blocks to the OS, so the rise is the forward's
peak working set). Extra = variant minus unpatched, in MB (10^6 bytes).

Usage: python benchmarks/merge_memory.py [--device cpu|cuda] [--blocks 2] [--img 1024] [--threads 2] [--algorithms ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

import pitome

_CHILD = r"""
import json, resource, sys, timm, torch, pitome
variant, device, blocks, img, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=img, depth=blocks,
                          dynamic_img_size=True).eval().to(device)
if variant != "unpatched":
    pitome.patch(model, algorithm=variant, ratio=0.9)
x = torch.randn(1, 3, img, img, device=device)
with torch.no_grad():
    model(torch.randn(1, 3, 64, 64, device=device))  # warm-up: kernels and lazy state loaded before measuring
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); start = torch.cuda.memory_allocated()
        model(x); torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - start
    else:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model(x)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
tokens = pitome.info(model).tokens_per_layer if variant != "unpatched" else None
print(json.dumps({"peak": peak, "tokens": tokens}))
"""


def measure(variant: str, device: str, blocks: int, img: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", _CHILD, variant, device, str(blocks), str(img), str(threads)],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--img", type=int, default=1024, help="image side (px); tokens = (img/16)^2 + 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--algorithms", nargs="+", default=None, help="default: every registered algorithm")
    args = parser.parse_args()
    tokens = (args.img // 16) ** 2 + 1
    base = measure("unpatched", args.device, args.blocks, args.img, args.threads)["peak"]
    how = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "rise of ru_maxrss"
    print(f"ViT-S width, {args.blocks} blocks, batch 1, {tokens} tokens, keep-ratio 0.9, {args.device} ({how}); "
          f"unpatched forward peak {base / 1e6:.0f} MB\n")
    print("| algorithm | tokens after block 0 | forward peak (MB) | extra over unpatched (MB) |")
    print("|---|---|---|---|")
    for name in args.algorithms or pitome.available_algorithms():
        row = measure(name, args.device, args.blocks, args.img, args.threads)
        after = row["tokens"][1] if row["tokens"] and len(row["tokens"]) > 1 else "-"
        print(f"| {name} | {after} | {row['peak'] / 1e6:.0f} | {(row['peak'] - base) / 1e6:+.0f} |", flush=True)


if __name__ == "__main__":
    main()
