"""`pitome train [TASK]`: fine-tune a classifier with merging on, then evaluate it with and without merging.

TASK: offline-text (default; MiniLM-L6 + BBC News, no network), offline-image (DINOv2-S + Fashion-MNIST),
image-classification (--model timm:/hf:/tiny-vit/dinov2-s, --data FOLDER or hf:, --val-data ...),
text-classification (--model hf:/minilm, --data FILE or hf:, --val-data ...). One merge setting per run
(--algorithms A --ratios X, or --r R, or --preset P). A results folder holds config.json, train_log.jsonl
(one line per step), checkpoint.pt (resume with --resume FOLDER), model.pt and the evaluation rows.
Under ``torchrun --nproc_per_node K`` the same command trains one model with DDP (gloo on cpu, nccl on cuda).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

from ..cli.errors import UserError, one_line
from ..cli.flags import (read_config_file, add_merge_flags, add_model_flags, add_output_flags, add_runtime_flags, apply_threads,
                         merge_choices, non_negative_int, positive_int, resolve_device)
from ..tasks.hf_data import check_hf_data

__all__ = ["add_arguments", "run", "TASKS"]

TASKS = ("offline-text", "offline-image", "image-classification", "text-classification")
_TRAINING = ("mode", "last_k", "epochs", "max_steps", "batch_size", "lr", "head_lr", "weight_decay", "warmup",
             "schedule", "grad_clip", "amp", "compile", "checkpoint_every")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  pitome train                                     # MiniLM-L6 + BBC News, pitome_text ratio 0.7 (offline)\n"
        "  pitome train offline-image --max-steps 20\n"
        "  pitome train image-classification --model timm:deit_small_patch16_224 --data /imagenet/train \\\n"
        "      --val-data /imagenet/val --mode full --algorithms pitome --ratios 0.9125 --epochs 30 --amp bf16\n"
        "  pitome train --resume pitome-results/20261130-090000-train-offline-text   # continue a killed run\n"
        "  torchrun --nproc_per_node 2 -m pitome.cli train offline-image\n")
    parser.add_argument("task", nargs="?", choices=TASKS, default=None, help="what to train (default offline-text)")
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of flag values (keys = flag names); the "
                                                        "command line wins; configs/train_*.yaml hold the paper's")
    add_model_flags(parser, default=None, what="classifier to fine-tune (image-/text-classification): ")
    add_merge_flags(parser, ratios_default=(0.9,), algorithms_default="pitome (pitome_text for text); offline "
                                                                      "tasks: their recipe")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="SOURCE", help="training data: image folder (one sub-folder per class), "
                                                       ".csv/.tsv/.jsonl text file, or hf:DATASET[:CONFIG]")
    data.add_argument("--val-data", metavar="SOURCE", help="evaluation data (same kinds; default: --data)")
    data.add_argument("--split", default="train", help="hf: split to train on (default train)")
    data.add_argument("--val-split", default="validation", help="hf: split to evaluate on (default validation)")
    data.add_argument("--text-column", default="text")
    data.add_argument("--label-column", default="label")
    data.add_argument("--image-column", default="image")
    data.add_argument("--max-length", type=positive_int, default=None, help="text: tokens per item (default 256)")
    data.add_argument("--train-items", type=non_negative_int, default=None,
                      help="offline tasks: training items (image: per class; 0 = all)")
    data.add_argument("--test-items", type=non_negative_int, default=None,
                      help="offline tasks: test items (image: per class; 0 = all)")
    train = parser.add_argument_group("training (defaults: the offline recipe, else pitome.train.TrainConfig)")
    train.add_argument("--mode", choices=("linear", "last-k", "full"), default=None,
                       help="linear probe (head), last-k blocks + head, or full fine-tuning")
    train.add_argument("--last-k", type=positive_int, default=None, help="blocks trained in --mode last-k")
    train.add_argument("--epochs", type=positive_int, default=None)
    train.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps")
    train.add_argument("--batch-size", type=positive_int, default=None, help="global batch (split over processes)")
    train.add_argument("--lr", type=_float, default=None, help="learning rate of the body")
    train.add_argument("--head-lr", type=_float, default=None, help="learning rate of the head (default --lr)")
    train.add_argument("--weight-decay", type=_float, default=None)
    train.add_argument("--warmup", type=_float, default=None, help="fraction of steps with linear warm-up")
    train.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=None)
    train.add_argument("--grad-clip", type=_float, default=None, help="max gradient norm (0 = off)")
    train.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast dtype (default fp32)")
    train.add_argument("--compile", metavar="BACKEND", default=None, help="torch.compile backend, e.g. inductor")
    train.add_argument("--checkpoint-every", type=non_negative_int, default=None,
                       help="steps between checkpoints (default: end of each epoch)")
    train.add_argument("--resume", metavar="FOLDER", default=None,
                       help="continue the run in this results folder from its checkpoint (same settings)")
    train.add_argument("--eval-batch-size", type=positive_int, default=32)
    add_runtime_flags(parser)
    add_output_flags(parser)
    _ACTIONS.clear()
    _ACTIONS.update({a.dest: a for a in parser._actions if a.dest not in ("help", "config")})


_ACTIONS: dict[str, argparse.Action] = {}  # flag destination -> its argparse action (for --config files)
_DOCUMENTATION = ("description", "paper", "notes", "paper_results")


def _apply_config(args: argparse.Namespace) -> None:
    """Fill the flags the command line left at their defaults from ``--config`` (values checked like flags)."""
    path = Path(args.config)
    data = read_config_file(path)
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest in _DOCUMENTATION:
            continue
        action = _ACTIONS.get(dest)
        if action is None:
            raise UserError(f"{path}: unknown key {key!r}; keys are flag names: {', '.join(sorted(_ACTIONS))}")
        if getattr(args, dest) != action.default:
            continue  # the command line wins
        setattr(args, dest, _config_value(path, key, value, action))


def _config_value(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """A config value through the flag's own type check and choices (lists for multi-value flags)."""
    multiple = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if isinstance(action, argparse._AppendAction) and isinstance(value, dict):
        value = [f"{k}={json.dumps(v)}" for k, v in value.items()]
    items = value if isinstance(value, list) else [value]
    if not multiple and isinstance(value, list):
        raise UserError(f"{path}: {key} takes one value, got a list")
    out = []
    for item in items:
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(item, bool):
                raise UserError(f"{path}: {key} is true or false, got {item!r}")
            return item
        if action.type is not None:
            try:
                item = action.type(item if isinstance(item, str) else json.dumps(item) if isinstance(item, (dict, list))
                                   else str(item))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UserError(f"{path}: {key}: {one_line(exc)}") from None
        if action.choices is not None and item not in action.choices:
            raise UserError(f"{path}: {key} must be one of {list(action.choices)}, got {item!r}")
        out.append(item)
    return out if multiple else out[0]


# --- validation (nothing loads before this passes) -------------------------------------------------------

def _recipe(task: str) -> Optional[dict]:
    if not task.startswith("offline-"):
        return None
    from .offline import RECIPES

    return RECIPES[task.split("-", 1)[1]]


def _config(args: argparse.Namespace, recipe: Optional[dict]) -> Any:
    from dataclasses import asdict

    from .loop import TrainConfig

    values = asdict(recipe["config"]) if recipe else asdict(TrainConfig())
    for key in _TRAINING:
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    if values["grad_clip"] == 0:
        values["grad_clip"] = None
    values["seed"] = args.seed
    try:
        return TrainConfig(**values).validate()
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _setting(args: argparse.Namespace, text: bool, recipe: Optional[dict]) -> Any:
    defaults = dict(default_algorithms=[recipe["algorithm"]], default_ratios=[recipe["ratio"]]) if recipe else \
        dict(default_algorithms=["pitome_text" if text else "pitome"], default_ratios=(0.9,))
    settings = merge_choices(args, text=text, **defaults).settings(unmerged=False)
    if len(settings) != 1:
        raise UserError(f"pitome train trains with one merge setting; the flags give {len(settings)} "
                        f"({', '.join(s.label for s in settings)}): pass one algorithm and one budget")
    if settings[0].solved:
        raise UserError("--flops-reduction is not supported by pitome train yet; give --ratios or --r")
    return settings[0]


def _check_sources(args: argparse.Namespace, task: str) -> None:
    from ..loading import check_model_spec

    if task.startswith("offline-"):
        for flag in ("model", "data", "val_data"):
            if getattr(args, flag, None):
                raise UserError(f"--{flag.replace('_', '-')} does not apply to {task} (it has its own model and "
                                f"data); use image-classification or text-classification")
        return
    if not args.model:
        raise UserError(f"{task} needs --model (e.g. timm:deit_small_patch16_224, hf:bert-base-uncased)")
    if not args.data:
        raise UserError(f"{task} needs --data (training data)")
    check_model_spec(args.model, args.weights)
    for source in (args.data, args.val_data):
        if source and not source.startswith("hf:") and not Path(source).exists():
            raise UserError(f"no such file or folder: {source}")
        try:
            check_hf_data(source)
        except ValueError as exc:
            raise UserError(str(exc)) from None


def _validate(args: argparse.Namespace) -> tuple[str, Any, Any]:
    if getattr(args, "config", None):
        _apply_config(args)
    task = args.task or "offline-text"
    text = task in ("offline-text", "text-classification")
    recipe = _recipe(task)
    _check_sources(args, task)
    setting = _setting(args, text, recipe)
    config = _config(args, recipe)
    if recipe and args.train_items is not None:  # offline subsets: the size is known before anything loads
        _check_enough(args.train_items * (1 if text else 10), config.batch_size,
                      f"--train-items {args.train_items}" + ("" if text else " (per class, x 10 classes)"))
    if args.resume:
        folder = Path(args.resume)
        if not (folder / "checkpoint.pt").is_file():
            raise UserError(f"--resume {args.resume}: no checkpoint.pt in that folder")
    else:
        from ..results import ResultsFolder

        ResultsFolder.check_parent(args.out)
    return task, setting, config


def _check_enough(items: int, batch_size: int, what: str) -> None:
    """At least one full batch: the loop drops a last partial batch, so fewer items would train nothing."""
    if items < batch_size:
        raise UserError(f"{what} gives {items} training items, fewer than one batch (--batch-size {batch_size}); "
                        f"give more items or a smaller --batch-size")


# --- the run -------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    task, setting, config = _validate(args)
    apply_threads(args.threads)
    device = resolve_device(args.device)
    from ..tasks.distributed import init_from_env
    from ..tasks.engine import set_seed

    ctx = init_from_env(str(device))
    try:
        set_seed(args.seed)
        try:
            model, data, describe = _load(args, task, ctx.device)
        except (ValueError, FileNotFoundError, ImportError) as exc:
            raise UserError(one_line(exc)) from None
        _check_enough(len(data.train), config.batch_size, "the training data")
        return _train_and_evaluate(args, task, setting, config, model, data, describe, ctx)
    finally:
        ctx.close()


def _load(args: argparse.Namespace, task: str, device: Any) -> tuple[Any, Any, dict]:
    """(classifier on device, ClassificationData, description)."""
    from .data import ClassificationData, image_data, pil_transform, read_text_sets, text_data
    from .models import EncoderClassifier

    max_length = args.max_length or 256
    if task.startswith("offline-"):
        from .offline import offline_setup

        kind = task.split("-", 1)[1]
        recipe = _recipe(task)
        setup = offline_setup(kind, recipe["train"] if args.train_items is None else args.train_items,
                              recipe["test"] if args.test_items is None else args.test_items, args.seed, max_length,
                              seen_test=recipe["seen_test"])
        data = ClassificationData(setup.train, setup.test, setup.collate, 0, setup.text, setup.test_batches)
        return setup.build().to(device), data, {"task": setup.name, **setup.info}
    from ..loading import load_model

    val = args.val_data or args.data
    if task == "image-classification":
        data, slot = image_data(args.data, val, args.split, args.val_split, args.image_column, args.label_column)
        names = None  # class folders: the dataset's own order
    else:
        sets, count, names = read_text_sets(args.data, val, args.split, args.val_split, args.text_column,
                                            args.label_column)
        data = None
    count = data.num_classes if data is not None else count
    spec = args.model
    builtin = spec in ("dinov2-s", "minilm")
    kwargs = dict(args.model_kwargs or {})
    if not builtin:
        if spec.startswith("timm:") or spec == "tiny-vit":
            kwargs.setdefault("num_classes", count)
        elif spec.startswith("openclip:"):
            raise UserError(f"{spec}: open_clip models have no classifier head; use a timm or Hugging Face model")
        else:
            kwargs.setdefault("num_labels", count)
            if names:  # saved with the model: pitome eval maps names back
                kwargs.setdefault("id2label", dict(enumerate(names)))
                kwargs.setdefault("label2id", {name: i for i, name in enumerate(names)})
            if args.weights == "pretrained" and spec != "tiny-bert":
                kwargs.setdefault("ignore_mismatched_sizes", True)
    loaded = load_model(spec, weights=args.weights, head="classifier", device="cpu", max_length=max_length,
                        model_kwargs=kwargs, seed=args.seed)
    model = loaded.module
    if builtin:
        model = EncoderClassifier(model, count, pool="mean" if loaded.modality == "text" else "cls")
    if task == "image-classification":
        if loaded.modality != "image":
            raise UserError(f"{spec} is a {loaded.modality} model; image-classification needs an image model")
        slot[0] = loaded.transform or pil_transform(loaded.image_size, loaded.mean, loaded.std)
    else:
        if loaded.modality != "text":
            raise UserError(f"{spec} is an {loaded.modality} model; text-classification needs a text model")
        if loaded.tokenizer is None:
            raise UserError(f"{spec} comes without a tokenizer; use a Hugging Face model with one (or minilm)")
        data = text_data(sets, count, loaded.tokenizer, max_length, args.eval_batch_size)
    describe = {"task": task, "model": loaded.describe(), "data": f"train {args.data} ({len(data.train)} items), "
                f"evaluate {val} ({len(data.val)} items), {count} classes"}
    if names:
        describe["classes"] = names
    return model.to(device), data, describe


def _train_and_evaluate(args: argparse.Namespace, task: str, setting: Any, config: Any, model: Any, data: Any,
                        describe: dict, ctx: Any) -> int:
    from ..results import ResultsFolder
    from ..setting import MergeSetting
    from .loop import Trainer, correct, evaluate

    say = print if ctx.is_main else (lambda *_: None)
    folder = _folder(args, task, ctx)
    say(f"pitome train {task}: results -> {folder}")
    for key, value in describe.items():
        say(f"   {key}: {value}")
    say(f"   training with merging: {setting.label}; {config}")
    if ctx.is_main:
        folder.write_json("config.json", {"task": task, "setting": setting.to_dict(), "train": config.__dict__,
                                          "describe": describe, "world_size": ctx.world, "device": str(ctx.device),
                                          "argv": {k: v for k, v in vars(args).items() if k != "func"}})
    log_path = folder.path_for("train_log.jsonl")

    def on_step(log: Any) -> None:
        if ctx.is_main:
            with log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(log.row()) + "\n")

    trainer = Trainer(model, config, setting, ctx, checkpoint_dir=folder.path, progress=not args.no_progress)
    started = time.perf_counter()
    history = trainer.fit(data.train, data.collate, resume=bool(args.resume), on_step=on_step)
    seconds = time.perf_counter() - started
    if ctx.is_main:
        import torch

        torch.save(model.state_dict(), folder.path_for("model.pt"))
    if history:
        say(f"trained {len(history)} steps (to step {trainer.step_count}) in {seconds:.0f} s; loss "
            f"{history[0].loss:.4f} -> {history[-1].loss:.4f}")
    for evaluated in (setting, MergeSetting()):
        result = evaluate(model, data.val, data.collate, args.eval_batch_size, evaluated, ctx,
                          progress=not args.no_progress, text=data.text, batches=data.val_batches)
        row = {"task": task, "trained_with": setting.label, "evaluated_with": evaluated.label,
               "accuracy": 100 * float(correct(result).mean()), "items": result.items, "gflops": result.gflops,
               "items_per_s": result.items_per_s, "steps": trainer.step_count,
               "final_loss": history[-1].loss if history else None}
        if ctx.is_main:
            folder.append(row)
        say(f"   evaluated {evaluated.label:>30}: accuracy {row['accuracy']:.2f}%  GFLOPs/item {row['gflops']:.3f}  "
            f"{row['items_per_s']:.1f} items/s")
    ctx.barrier()
    return 0


def _folder(args: argparse.Namespace, task: str, ctx: Any) -> Any:
    """The results folder: --resume's, or a new one made by the main process and shared with the others."""
    from ..results import ResultsFolder

    if args.resume:
        return ResultsFolder(Path(args.resume).resolve())
    path = [str(ResultsFolder.create(args.out, f"train {task}").path) if ctx.is_main else None]
    if ctx.active:
        import torch.distributed as dist

        dist.broadcast_object_list(path, src=0)
    return ResultsFolder(path[0])
