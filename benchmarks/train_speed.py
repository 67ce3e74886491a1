"""Training throughput with merging on vs off, against the speed-up the FLOPs predict (offline models, CPU).

Each repetition times ``--steps`` optimizer steps (forward, backward, AdamW) per arm, the arms interleaved so a
busy machine slows both alike; samples/s is the median over repetitions (one warm-up step per arm first).

Predicted speed-up = training MACs unmerged / merged, from the token counts each block saw: a block costs its
forward MACs (``flops.block_macs``) x 3 when it trains (forward + backward for inputs and weights) and x 1 when
it is frozen (forward only; no backward runs below the first trainable block). Embeddings, head and the merge
steps' own work are not counted (the paper's convention) — so measured/predicted < 1 shows that overhead.

    nice -n 5 python benchmarks/train_speed.py --task image --reps 5 --json results/train_speed_image.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import pitome
from pitome.flops import block_macs, encoder_shape
from pitome.setting import MergeSetting
from pitome.tasks.engine import set_seed
from pitome.train import Trainer, patch_target, trainable_blocks
from pitome.train.offline import RECIPES, offline_setup


def training_macs(shape, tokens: list[int], trainable: set[int]) -> int:
    """MACs of one training step per item: forward of every block, backward (2x) of the trainable ones."""
    return sum(block_macs(shape, tokens[i], tokens[i + 1]) * (3 if i in trainable else 1)
               for i in range(len(tokens) - 1))


def measure(task: str, reps: int, steps: int, batch_size: int) -> dict:
    recipe = RECIPES[task]  # the same algorithm, ratio and trained blocks as the accuracy runs
    config = recipe["config"]
    setup = offline_setup(task, train_items=4 * batch_size if task == "text" else max(1, 4 * batch_size // 10 + 1))
    set_seed(0)
    model = setup.build()
    trainer = Trainer(model, config)
    target = patch_target(model)
    order = list(range(len(setup.train)))
    batches = [setup.collate([setup.train[i] for i in order[k * batch_size:(k + 1) * batch_size]])
               for k in range(steps)]
    arms = {"unmerged": MergeSetting.make(None), "merged": MergeSetting.make(recipe["algorithm"], ratio=recipe["ratio"])}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    tokens: dict[str, list[int]] = {}
    model.train()
    for rep in range(reps + 1):  # rep 0 = warm-up, not recorded
        for name, spec in arms.items():
            with spec.applied(target):
                if rep == 0:
                    trainer.step(*batches[0])
                    if spec.merges:
                        tokens[name] = list(pitome.info(target).tokens_per_layer)
                    continue
                start = time.perf_counter()
                for inputs, labels in batches:
                    trainer.step(inputs, labels)
                rates[name].append(steps * batch_size / (time.perf_counter() - start))
    tokens["unmerged"] = [tokens["merged"][0]] * len(tokens["merged"])  # every block sees the input length
    shape = encoder_shape(target)
    trainable = set(trainable_blocks(model, config.mode, config.last_k))
    macs = {name: training_macs(shape, tokens[name], trainable) for name in arms}
    median = {name: statistics.median(values) for name, values in rates.items()}
    measured = median["merged"] / median["unmerged"]
    predicted = macs["unmerged"] / macs["merged"]
    return {"task": setup.name, "merge": arms["merged"].label, "mode": config.mode, "last_k": config.last_k,
            "batch_size": batch_size, "steps_per_rep": steps, "reps": reps, "threads": torch.get_num_threads(),
            "samples_per_s": median, "all_samples_per_s": rates, "tokens_per_layer": tokens,
            "training_gmacs_per_item": {k: v / 1e9 for k, v in macs.items()}, "measured_speedup": measured,
            "predicted_speedup": predicted, "measured_over_predicted": measured / predicted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("text", "image"), required=True)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per arm per repetition")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.task, args.reps, args.steps, args.batch_size)
    print(json.dumps({k: v for k, v in result.items() if k != "all_samples_per_s"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
