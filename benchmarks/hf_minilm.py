"""MiniLM (all-MiniLM-L6-v2, offline wheel) on BBC News articles, CPU: unpatched vs PiToMe and ToMe.

Articles truncated to 512 tokens, batches of 16 padded to their longest article. Variants: PiToMe (preset
"bert": the official text variant, Gaussian energy, top-r / next-r split, m_l = 0.9 - 0.25 l/L, no proportional
attention, plain mean) and ToMe with the same switches (only the matching differs), keep-ratios 0.9 / 0.8 / 0.7,
merging in the first 3 layers and in all 6. Reported per variant:

- tokens:      tokens left for a full-length article (--max-tokens) after the last layer;
- GMACs/seq:   analytic multiply-accumulates per article from its real length and the schedule (ToMe / PiToMe
               papers call these "GFLOPs"); ``padded`` = what the padded batches actually executed, per article;
- seq/s:       articles per second, median over interleaved repetitions (a busy machine slows all rows alike);
- cos:         cosine of the L2-normalised sentence embedding to the unmerged one, mean over articles, with
               size- and mask-weighted mean pooling (``pitome.pool_mean``) and with a plain mean over the
               remaining real tokens (``size_weighted=False``).

BBC News is not one of the paper's datasets (SST-2 / IMDb are not available offline). Usage:
    python benchmarks/hf_minilm.py [--articles 64] [--reps 3] [--threads 2] [--json results/hf_minilm.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import pitome
from pitome import zoo
from pitome.flops import EncoderShape, encoder_macs
from pitome.schedule import predict_token_counts


@dataclass
class Variant:
    label: str
    kwargs: Optional[dict]  # None = unpatched
    layers: str = "-"
    ratio: float = 1.0


def variants(num_layers: int, ratios: list[float]) -> list[Variant]:
    out = [Variant("unpatched", None)]
    for scope, layers in (("first 3", [0, 1, 2]), ("all", list(range(num_layers)))):
        for ratio in ratios:
            out.append(Variant("PiToMe", dict(preset="bert", ratio=ratio, layers=layers), scope, ratio))
            out.append(Variant("ToMe", dict(preset="bert", algorithm="tome", ratio=ratio, layers=layers), scope, ratio))
    return out


def batches(tokenizer, texts: list[str], batch: int, max_tokens: int) -> list[dict]:
    return [tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
            for i in range(0, len(texts), batch)]


def embed_pass(model, data: list[dict]) -> tuple[torch.Tensor, torch.Tensor, float, list[list[int]], list[list[int]]]:
    """Embeddings (size-weighted, unweighted), seconds, executed widths per batch, real tokens per article."""
    weighted, plain, widths, real = [], [], [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for enc in data:
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            if pitome.is_patched(model):
                info = pitome.info(model)
                weighted.append(pitome.pool_mean(info, hidden))
                plain.append(pitome.pool_mean(info, hidden, size_weighted=False))
                widths.append(info.tokens_per_layer)
                real.append(info.valid.sum(dim=1).tolist())
            else:
                pooled = pitome.pool_mean(model, hidden, attention_mask=enc["attention_mask"])
                weighted.append(pooled)
                plain.append(pooled)
                widths.append([hidden.shape[1]] * (model.config.num_hidden_layers + 1))
                real.append(enc["attention_mask"].sum(dim=1).tolist())
    seconds = time.perf_counter() - start
    return (F.normalize(torch.cat(weighted), dim=-1), F.normalize(torch.cat(plain), dim=-1), seconds, widths, real)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = zoo.load_minilm()
    texts, _ = zoo.load_bbc_news()
    picks = np.linspace(0, len(texts) - 1, args.articles).astype(int)  # spread over the 5 topics
    data = batches(tokenizer, [texts[i] for i in picks], args.batch, args.max_tokens)
    lengths = [int(n) for enc in data for n in enc["attention_mask"].sum(dim=1)]
    config = model.config
    num_layers = config.num_hidden_layers
    shape = EncoderShape(dim=config.hidden_size, mlp_hidden=config.intermediate_size)
    rows = variants(num_layers, args.ratios)

    times: dict[str, list[float]] = {v.label + v.layers + str(v.ratio): [] for v in rows}
    results: dict[str, dict] = {}
    reference = None
    for rep in range(args.reps):
        for v in rows:
            key = v.label + v.layers + str(v.ratio)
            pitome.unpatch(model)
            if v.kwargs is not None:
                pitome.patch(model, **v.kwargs)
            weighted, plain, seconds, widths, real = embed_pass(model, data)
            times[key].append(seconds)
            if rep > 0:
                continue
            if reference is None:
                reference = weighted
            budgets = ([s.budget for s in pitome.settings(model).layers] if v.kwargs is not None
                       else [None] * num_layers)
            predicted = [predict_token_counts(budgets, n, num_protected=2) for n in lengths]
            measured = [n for batch in real for n in batch]
            if measured != [p[-1] for p in predicted]:
                raise RuntimeError(f"{v.label} {v.layers} {v.ratio}: real tokens differ from the schedule's prediction")
            executed = sum(encoder_macs(shape, w) * len(enc["attention_mask"]) for w, enc in zip(widths, data))
            results[key] = dict(
                method=v.label, layers=v.layers, ratio=v.ratio,
                tokens_full=predict_token_counts(budgets, args.max_tokens, num_protected=2)[-1],
                gmacs=statistics.mean(encoder_macs(shape, p) for p in predicted) / 1e9,
                gmacs_padded=executed / len(lengths) / 1e9,
                cos=float((weighted * reference).sum(-1).mean()),
                cos_min=float((weighted * reference).sum(-1).min()),
                cos_unweighted=float((plain * reference).sum(-1).mean()),
            )
        print(f"rep {rep + 1}/{args.reps} done", flush=True)
    pitome.unpatch(model)

    base_speed = len(lengths) / statistics.median(times[rows[0].label + rows[0].layers + str(rows[0].ratio)])
    print(f"\nMiniLM-L6 (all-MiniLM-L6-v2) on {len(lengths)} BBC News articles, <= {args.max_tokens} tokens "
          f"(mean {statistics.mean(lengths):.0f}), batch {args.batch}, CPU {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved reps\n")
    header = (f"| method | layers | ratio | tokens ({args.max_tokens} in) | GMACs/seq | GMACs/seq padded "
              "| seq/s | speed-up "
              "| cos (size-wtd) | cos min | cos (unwtd) |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    table = []
    for v in rows:
        key = v.label + v.layers + str(v.ratio)
        r = results[key]
        speed = len(lengths) / statistics.median(times[key])
        r.update(seq_per_s=speed, speedup=speed / base_speed, seconds=times[key])
        table.append(r)
        print(f"| {r['method']} | {r['layers']} | {r['ratio']:.1f} | {r['tokens_full']} | {r['gmacs']:.2f} | "
              f"{r['gmacs_padded']:.2f} | {speed:.1f} | {speed / base_speed:.2f}x | {r['cos']:.4f} | "
              f"{r['cos_min']:.4f} | {r['cos_unweighted']:.4f} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(articles=len(lengths), max_tokens=args.max_tokens, batch=args.batch,
                                             threads=torch.get_num_threads(), rows=table), indent=2))


if __name__ == "__main__":
    main()
