"""Core speed check: DeiT-S (random weights), CPU: unpatched, patched at ratio 1.0, PiToMe 0.9, ToMe at equal FLOPs.

Runs the variants interleaved, several repetitions, and reports medians; speed-ups are ratios within this
one run, so a busy machine slows all rows alike. Usage: python benchmarks/core_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pitome
from pitome.flops import EncoderShape, encoder_macs
from pitome.solver import ModelCost, match_flops


def vit_shape(model: torch.nn.Module) -> EncoderShape:
    block = model.blocks[0]
    return EncoderShape(dim=model.embed_dim, mlp_hidden=block.mlp.fc1.out_features, attn_dim=block.attn.qkv.out_features // 3)


def model_cost(model: torch.nn.Module, tokens: int) -> ModelCost:
    return ModelCost(shape=vit_shape(model), num_layers=len(model.blocks), num_tokens=tokens,
                     num_protected=model.num_prefix_tokens)


def predicted_macs(model: torch.nn.Module, tokens: int, **budget) -> float:
    return model_cost(model, tokens).macs(**budget)


def tome_r_for(model: torch.nn.Module, tokens: int, target_macs: float) -> int:
    """The ToMe r whose FLOPs are closest to a target (``pitome.solver.match_flops``)."""
    return int(match_flops(model_cost(model, tokens), target_macs, "tome", by="r").r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.reps = 8, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    x = torch.randn(args.batch, 3, *model.patch_embed.img_size)
    base_macs = predicted_macs(model, tokens, r=0)
    pitome_macs = predicted_macs(model, tokens, ratio=args.ratio)
    r = tome_r_for(model, tokens, pitome_macs)
    variants = {
        "unpatched": None,
        "patched ratio 1.0": dict(algorithm="pitome", ratio=1.0),
        f"PiToMe ratio {args.ratio}": dict(algorithm="pitome", ratio=args.ratio),
        f"ToMe r={r} (equal FLOPs)": dict(algorithm="tome", r=r),
    }
    macs = {"unpatched": base_macs, "patched ratio 1.0": base_macs,
            f"PiToMe ratio {args.ratio}": pitome_macs, f"ToMe r={r} (equal FLOPs)": predicted_macs(model, tokens, r=r)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for name, kwargs in variants.items():  # warm-up, and check the counted FLOPs match the prediction
            pitome.unpatch(model)
            if kwargs is not None:
                pitome.patch(model, **kwargs)
            model(x)
            if kwargs is not None:
                seen = encoder_macs(vit_shape(model), pitome.info(model).tokens_per_layer)
                assert seen == macs[name], (name, seen, macs[name])
        for _ in range(args.reps):
            for name, kwargs in variants.items():
                pitome.unpatch(model)
                if kwargs is not None:
                    pitome.patch(model, **kwargs)
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    pitome.unpatch(model)
    base_time = statistics.median(times["unpatched"])
    print(f"{args.model}, random weights, CPU, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved repetitions")
    print("| variant | images/s | GFLOPs/img | speed-up | FLOPs ratio | speed-up / FLOPs-predicted |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        t = statistics.median(times[name])
        speedup = base_time / t
        flops_speedup = base_macs / macs[name]
        print(f"| {name} | {args.batch / t:.1f} | {macs[name] / 1e9:.2f} | {speedup:.3f} | "
              f"{macs[name] / base_macs:.3f} | {speedup / flops_speedup:.3f} |")


if __name__ == "__main__":
    main()
