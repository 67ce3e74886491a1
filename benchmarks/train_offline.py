"""Fine-tuning with merging on real weights, offline: does training with merging recover the off-the-shelf drop?

Three numbers at the same merge setting (equal FLOPs for the two merged rows), on the same test items:
- unmerged fine-tuned (A):     fine-tuned without merging, evaluated without merging;
- off-the-shelf merged (B):    the same fine-tuned model, evaluated with merging (no retraining);
- fine-tuned with merging (C): fine-tuned with merging on (same recipe, same data order), evaluated with merging.
Also C evaluated without merging. Paired bootstrap intervals (``pitome.stats``) over the test items for A - B
(the drop), C - B (the gain) and C - (A + B) / 2 (> 0 <=> more than half of the drop recovered).

Setups (``pitome.train.offline``): text = all-MiniLM-L6-v2 + BBC News, full fine-tuning, pitome_text at
keep-ratio 0.7 in all 6 blocks; image = DINOv2-S/14 + Fashion-MNIST, last 2 blocks + head, pitome at keep-ratio
0.8 in all 12 blocks. One fixed recipe per task, chosen before any run (never tuned on the test split).
Neither dataset is one of the paper's. Usage (CPU; a busy shared machine: nice, 1 thread):
    nice -n 5 python benchmarks/train_offline.py --task text --json results/train_text.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from pitome.stats import paired_bootstrap
from pitome.setting import MergeSetting
from pitome.tasks.engine import set_seed
from pitome.train import TrainConfig, Trainer, correct, evaluate
from pitome.train.offline import EVALUATE_ON, RECIPES, offline_setup

def _interval(a: torch.Tensor, b: torch.Tensor) -> dict:
    r = paired_bootstrap(a.numpy(), b.numpy(), scale=100.0)
    return {"diff": r.diff, "low": r.low, "high": r.high}


def run(task: str, train: int, test: int, epochs: int, log: bool = True, unmerged_eval_of_c: bool = True,
        evaluate_on: str = "test", save_models: Optional[Path] = None, load_models: Optional[Path] = None) -> dict:
    """save_models / load_models: a folder for the two trained models, so that the models checked on the dev split
    are the ones evaluated once on the test split (no retraining in between)."""
    recipe = RECIPES[task]
    config = TrainConfig(**{**recipe["config"].__dict__, "epochs": epochs})
    setup = offline_setup(task, train, test, evaluate_on=evaluate_on, seen_test=recipe["seen_test"])
    merged = MergeSetting.make(recipe["algorithm"], ratio=recipe["ratio"])
    unmerged = MergeSetting.make(None)
    say = print if log else (lambda *_: None)
    say(f"{setup.name}: {setup.info}\nrecipe: {config}\nmerge: {merged.label}")
    out: dict = {"task": setup.name, "info": setup.info, "config": config.__dict__, "merge": merged.label,
                 "threads": torch.get_num_threads(), "evaluated_on": evaluate_on}
    trained = json.loads((load_models / "training.json").read_text()) if load_models else {}
    if load_models and trained["config"] != out["config"]:
        raise SystemExit(f"{load_models} holds models trained with {trained['config']}, not {out['config']}")

    def arm(name: str, spec: MergeSetting) -> tuple[torch.nn.Module, dict]:
        set_seed(config.seed)
        model = setup.build()
        file = f"{'merged' if spec.merges else 'unmerged'}.pt"
        if load_models:
            model.load_state_dict(torch.load(load_models / file, weights_only=True))
            say(f"  loaded {name} from {load_models / file}")
            return model, trained[name]
        start = time.perf_counter()
        steps = Trainer(model, config, spec, progress=log).fit(setup.train, setup.collate)
        seconds = time.perf_counter() - start
        rates = [s.samples / s.seconds for s in steps]
        say(f"  trained {name}: {len(steps)} steps in {seconds:.0f} s, median {statistics.median(rates):.2f} "
            f"samples/s, loss {steps[0].loss:.3f} -> {steps[-1].loss:.3f}")
        log_entry = {"steps": len(steps), "seconds": seconds, "median_samples_per_s": statistics.median(rates),
                     "losses": [s.loss for s in steps]}
        if save_models:
            save_models.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), save_models / file)
            trained.update({"config": out["config"], name: log_entry})
            (save_models / "training.json").write_text(json.dumps(trained))
        return model, log_entry

    def score(model: torch.nn.Module, spec: MergeSetting, label: str) -> tuple[torch.Tensor, dict]:
        result = evaluate(model, setup.test, setup.collate, 16, spec, text=setup.text, batches=setup.test_batches)
        hits = correct(result)
        row = {"accuracy": 100 * float(hits.mean()), "gflops": result.gflops, "items_per_s": result.items_per_s,
               "n": len(hits)}
        say(f"  {label}: {row}")
        return hits, row

    model, out["train_unmerged"] = arm("unmerged", unmerged)
    a, out["A_unmerged_finetuned"] = score(model, unmerged, "A unmerged fine-tuned")
    b, out["B_off_the_shelf_merged"] = score(model, merged, "B off-the-shelf merged")
    del model
    model, out["train_merged"] = arm("with merging", merged)
    c, out["C_finetuned_with_merging"] = score(model, merged, "C fine-tuned with merging")
    if unmerged_eval_of_c:
        _, out["C_evaluated_unmerged"] = score(model, unmerged, "C evaluated without merging")
    out["drop_A_minus_B"] = _interval(a, b)
    out["gain_C_minus_B"] = _interval(c, b)
    out["half_recovery_C_minus_mean_AB"] = _interval(c, (a + b) / 2)
    out["C_minus_A"] = _interval(c, a)
    drop = out["drop_A_minus_B"]["diff"]
    out["recovered_fraction"] = out["gain_C_minus_B"]["diff"] / drop if drop else None
    out["half_recovered"] = out["half_recovery_C_minus_mean_AB"]["low"] > 0
    say(json.dumps({k: out[k] for k in ("drop_A_minus_B", "gain_C_minus_B", "half_recovery_C_minus_mean_AB",
                                        "recovered_fraction", "half_recovered")}, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(RECIPES), required=True)
    parser.add_argument("--train", type=int, help="training items (image: per class); default: the recipe's")
    parser.add_argument("--test", type=int, help="test (or dev) items (image: per class; 0 = the whole split); "
                                                 "default: the recipe's")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-c-unmerged", action="store_true", help="do not evaluate C without merging")
    parser.add_argument("--evaluate-on", choices=EVALUATE_ON, default="test",
                        help="dev: items held out of the training split (choose a recipe); test: the test split")
    parser.add_argument("--save-models", type=Path, help="folder to save the two trained models in")
    parser.add_argument("--load-models", type=Path, help="evaluate models saved by --save-models (no training)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.task]
    held_out = recipe["dev"] if args.evaluate_on == "dev" else recipe["test"]
    result = run(args.task, recipe["train"] if args.train is None else args.train,
                 held_out if args.test is None else args.test,
                 args.epochs or recipe["config"].epochs, unmerged_eval_of_c=not args.skip_c_unmerged,
                 evaluate_on=args.evaluate_on, save_models=args.save_models, load_models=args.load_models)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
