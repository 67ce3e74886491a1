"""`pitome eval [TASK]`: accuracy against FLOPs for merging algorithms x keep-ratios, one results folder per run.

TASK: offline (default; real weights and data from package registries, no network), image-classification,
text-classification, retrieval, probe, vqa (LLaVA-1.5-style models on VQAv2 / GQA / VizWiz / TextVQA / ScienceQA /
POPE / MME; docs/vqa.md). ``--config FILE`` (YAML or JSON, keys = option names) sets defaults that
command-line options override; configs/ holds the paper's setups. Under ``torchrun --nproc_per_node K`` the
batches are dealt to K processes and the results gathered (gloo on cpu, nccl on cuda).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

TASKS = ("offline", "image-classification", "text-classification", "retrieval", "probe", "vqa")

DEFAULTS: dict[str, Any] = {
    "task": "offline", "algorithms": None, "ratios": [0.9, 0.8, 0.7], "tome_budget": "r", "preset": None,
    "option": [], "no_unmerged": False, "model": None, "data": None, "train_data": None, "captions": None,
    "images": None, "split": None, "train_split": "train", "text_column": "text", "pair_column": None,
    "label_column": "label", "image_column": "image", "max_length": 512, "batch_size": None, "limit": None,
    "workers": 0, "device": None, "seed": 0, "out": "results", "no_progress": False, "quick": False,
    "cache": None, "threads": None, "offline_tasks": ["text", "image", "retrieval"], "random_weights": False,
    "model_kwargs": None, "knn_k": 20, "name": None,
    "benchmark": None, "max_new_tokens": None, "prompt_template": "llava_v1", "ocr": False, "lm_prop_attn": False,
    "dtype": None,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  pitome eval                                   # offline default (BBC News, Fashion-MNIST; no network)\n"
        "  pitome eval offline --quick                   # a few items, seconds\n"
        "  pitome eval --config configs/deit_s_imagenet.yaml --data /data/imagenet/val\n"
        "  pitome eval text-classification --model hf:textattack/bert-base-uncased-SST-2 --data hf:glue:sst2\n"
        "  pitome eval vqa --model hf:llava-hf/llava-1.5-7b-hf --benchmark gqa --data /data/gqa/testdev_balanced_questions.json --images /data/gqa/images\n"
        "  torchrun --nproc_per_node 2 -m pitome.cli eval offline\n")
    parser.add_argument("task", nargs="?", choices=TASKS, default=None, help="what to evaluate (default: offline)")
    add = parser.add_argument
    add("--config", help="YAML/JSON file with any of these options (command line wins)")
    add("--algorithms", nargs="+", help="default: pitome (pitome_text on text), tome, every registered baseline")
    add("--ratios", nargs="+", type=float, help="keep-ratios per layer (default 0.9 0.8 0.7)")
    add("--tome-budget", choices=("r", "ratio"), help="ToMe: fixed r at equal FLOPs (default) or the keep-ratio")
    add("--preset", help="pitome.patch preset for every algorithm (e.g. deit, mae, clip, bert)")
    add("--option", action="append", metavar="KEY=VALUE",
        help="pitome.patch argument for every algorithm, JSON value (e.g. prop_attn=false, layers=[0,1,2])")
    add("--no-unmerged", action="store_true", default=None, help="skip the unmerged reference")
    add("--model", help="timm:<name>, hf:<id or folder>, openclip:<arch>/<tag> (retrieval)")
    add("--model-kwargs", help="JSON keyword arguments for the model constructor")
    add("--random-weights", action="store_true", default=None, help="timm: random weights (smoke tests only)")
    add("--data", help="image folder, .csv/.tsv/.jsonl file, or hf:<dataset>[:<config>]")
    add("--train-data", help="probe: training images (folder or hf:)")
    add("--captions", help="retrieval: Karpathy split file or LAVIS annotation list")
    add("--images", help="retrieval: image root folder (default: the caption file's folder)")
    add("--split", help="dataset split (default: validation; retrieval: test)")
    add("--train-split", help="probe: training split of an hf: dataset")
    add("--text-column")
    add("--pair-column", help="second text of sentence-pair tasks")
    add("--label-column")
    add("--image-column")
    add("--max-length", type=int, help="text: truncation length (default 512)")
    add("--batch-size", type=int)
    add("--limit", type=int, help="first N items only")
    add("--workers", type=int, help="data-loading worker processes")
    add("--knn-k", type=int, help="probe: neighbours of the k-NN classifier (default 20)")
    add("--benchmark", help="vqa: vqav2, gqa, vizwiz, textvqa, scienceqa, pope or mme")
    add("--max-new-tokens", type=int, help="vqa: reply length limit (default 16)")
    add("--prompt-template", help="vqa: llava_v1 (LLaVA-1.5's evaluation, default), llava_hf or plain")
    add("--ocr", action="store_true", default=None, help="vqa/textvqa: add the reference OCR tokens to the prompt")
    add("--lm-prop-attn", action="store_true", default=None,
        help="vqa: proportional attention for merged visual tokens inside the language model (ours; off by default)")
    add("--dtype", choices=("float32", "float16", "bfloat16"), help="vqa: model dtype (default: float16 on cuda)")
    add("--offline-tasks", nargs="+", choices=("text", "image", "retrieval"), help="offline: which tasks")
    add("--quick", action="store_true", default=None, help="offline: a few items per task (smoke run)")
    add("--cache", help="cache folder (default $PITOME_CACHE or ~/.cache/pitome)")
    add("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    add("--threads", type=int, help="torch CPU threads")
    add("--seed", type=int)
    add("--name", help="results folder suffix")
    add("--out", help="parent folder of the results folder (default ./results)")
    add("--no-progress", action="store_true", default=None, help="no progress bars")


def _load_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a .json config") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{path}{line}: invalid YAML ({error})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config is a mapping of option names to values")
    config = {k.replace("-", "_"): v for k, v in data.items()}
    documentation = {"description", "paper", "notes", "paper_results"}
    unknown = sorted(set(config) - set(DEFAULTS) - documentation)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
    if isinstance(config.get("option"), dict):
        config["option"] = [f"{k}={json.dumps(v)}" for k, v in config["option"].items()]
    return config


def resolve_options(args: argparse.Namespace) -> dict:
    """Defaults, then the config file, then the command line."""
    options = dict(DEFAULTS)
    if getattr(args, "config", None):
        options.update(_load_config(args.config))
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    if options["task"] not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {options['task']!r}")
    return options


def _patch_kwargs(options: dict) -> dict:
    kwargs: dict = {}
    if options.get("preset"):
        kwargs["preset"] = options["preset"]
    for item in options.get("option") or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return kwargs


def _log(ctx: Any) -> Any:
    def say(text: str) -> None:
        if ctx.is_main:
            print(text, flush=True)
    return say


def run(args: argparse.Namespace) -> int:
    try:
        options = resolve_options(args)
    except ValueError as error:
        print(f"pitome eval: {error}", file=sys.stderr)
        return 2
    return evaluate(options)


def evaluate(options: dict) -> int:
    """Run one `pitome eval` configuration (the dict of ``DEFAULTS`` keys); returns the exit code."""
    import torch

    from .distributed import init_from_env
    from .engine import set_seed

    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    ctx = init_from_env(options.get("device"))
    say = _log(ctx)
    set_seed(int(options["seed"]))
    started = time.perf_counter()
    try:
        tasks, specs, title = _build(options, ctx, say)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"pitome eval: {error}", file=sys.stderr)
        ctx.close()
        return 2
    from .report import format_table, plot_rows, results_dir, slug, write_results
    from .sweep import run_sweep

    descriptions = [task.describe() for task in tasks]
    for info in descriptions:
        say(f"\n## {info['task']}")
        for key, value in info.items():
            if key != "task":
                say(f"   {key}: {value}")
    say("")
    rows = run_sweep(tasks, specs, ctx, progress=not options["no_progress"], log=say)
    elapsed = time.perf_counter() - started
    if ctx.is_main:
        folder = results_dir(options["out"], options.get("name") or title)
        config = {"options": options, "world_size": ctx.world, "device": str(ctx.device),
                  "seconds": round(elapsed, 1)}
        write_results(folder, rows, config, descriptions)
        for task in tasks:
            if hasattr(task, "write_predictions"):  # generative tasks: the replies themselves
                task.write_predictions(folder)
        for task in tasks:
            mine = [r for r in rows if r["task"] == task.name]
            metrics = [k for k in _metric_order(task) if any(k in r for r in mine)]
            print(f"\n### {task.name}\n{format_table(mine, metrics)}")
            plot_rows(mine, task.primary, folder / f"{slug(task.name)}.png", task.name)
        print(f"\n{len(rows)} rows in {elapsed:.0f} s with {ctx.world} process(es) -> {folder}")
    ctx.barrier()
    ctx.close()
    return 1 if any("error" in r for r in rows) else 0


def _metric_order(task: Any) -> list[str]:
    return ["top1", "top5", "accuracy", "unparsed", "precision", "recall", "f1", "yes_ratio", "perception",
            "cognition", "visual_tokens", "prefill_gflops", "latency_ms", "probe_acc", "knn_acc", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5",
            "i2t_r10", "rsum", "agreement", "fidelity"]


def _build(options: dict, ctx: Any, say: Any) -> tuple[list, Any, str]:
    from .sweep import build_specs, default_algorithms

    task = options["task"]
    ratios = options["ratios"]
    kwargs = _patch_kwargs(options)
    include = not options["no_unmerged"]
    if task == "offline":
        from pathlib import Path as _P

        from .offline import DEFAULT_SIZES, QUICK_SIZES, build_offline_tasks, offline_specs

        sizes = QUICK_SIZES if options["quick"] else DEFAULT_SIZES
        say(f"pitome eval offline: subset sizes {sizes}")
        tasks = build_offline_tasks(sizes, ctx, not options["no_progress"], say,
                                    _P(options["cache"]) if options.get("cache") else None, int(options["seed"]),
                                    options["offline_tasks"])
        return tasks, offline_specs(options["algorithms"], ratios, options["tome_budget"], include, **kwargs), \
            "offline"
    if not options.get("model"):
        raise ValueError(f"{task} needs --model")
    model_kwargs = json.loads(options["model_kwargs"]) if isinstance(options.get("model_kwargs"), str) \
        else (options.get("model_kwargs") or {})
    text = task == "text-classification"
    names = options["algorithms"] or default_algorithms(text=text)
    specs = build_specs(names, ratios, options["tome_budget"], include, kwargs)
    batch = options["batch_size"] or (32 if text else 64)
    name = options.get("name")
    if task == "image-classification":
        from .image_classification import ImageClassificationTask, classifier_eval_model, load_image_dataset, \
            load_image_model

        if not options.get("data"):
            raise ValueError("image-classification needs --data (an image folder or hf:<dataset>)")
        model, transform, kind = load_image_model(options["model"], ctx.device, not options["random_weights"],
                                                  model_kwargs)
        data = load_image_dataset(options["data"], transform, options["split"] or "validation",
                                  options["image_column"], options["label_column"])
        weights = "random weights" if options["random_weights"] else "pretrained weights"
        title = name or f"{options['model']} on {options['data']}"
        return [ImageClassificationTask(title, classifier_eval_model(model, kind), data, batch, options["workers"],
                                        options["limit"], {"model": f"{options['model']} ({weights})",
                                                           "data": options["data"]})], specs, title
    if text:
        from .text_classification import TextClassificationTask, load_text_classifier, load_text_data

        if not options.get("data"):
            raise ValueError("text-classification needs --data (.csv/.tsv/.jsonl or hf:<dataset>)")
        examples = load_text_data(options["data"], options["split"] or "validation", options["text_column"],
                                  options["label_column"], options["pair_column"])
        model, tokenizer = load_text_classifier(options["model"], ctx.device)
        title = name or f"{options['model']} on {options['data']}"
        return [TextClassificationTask(title, model, tokenizer, examples, batch, options["max_length"],
                                       options["limit"], options["workers"],
                                       {"model": options["model"], "data": options["data"]})], specs, title
    if task == "retrieval":
        from .retrieval import build_retrieval_task

        task_obj = build_retrieval_task(options, ctx, batch)
        return [task_obj], specs, task_obj.name
    if task == "vqa":
        from .vqa import build_vqa_task

        task_obj = build_vqa_task(options, ctx)
        return [task_obj], specs, task_obj.name
    if task == "probe":
        from .probe import build_image_probe_task

        task_obj = build_image_probe_task(options, ctx, batch, model_kwargs, not options["no_progress"])
        return [task_obj], specs, task_obj.name
    raise ValueError(f"unknown task {task!r}")
