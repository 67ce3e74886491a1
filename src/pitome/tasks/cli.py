"""`pitome eval [TASK]`: accuracy and fidelity against FLOPs for merging algorithms x budgets.

TASK: offline (default; real weights and data from package registries, no network), image-classification,
text-classification, retrieval, probe, vqa (LLaVA-1.5-style models on VQAv2 / GQA / VizWiz / TextVQA / ScienceQA /
POPE / MME; docs/vqa.md). ``--config FILE`` (YAML or JSON, keys = flag names) sets defaults that
command-line flags override; configs/ holds the paper's setups. Everything is validated before a model loads;
the results folder is created and printed at start and every row is appended to rows.jsonl / rows.csv as it
finishes, so an interrupted run keeps what it finished. Under ``torchrun --nproc_per_node K -m pitome.cli eval``
the batches are dealt to K processes and the results gathered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..cli.errors import UserError, one_line
from ..cli.flags import (Parser, read_config_file, add_merge_flags, add_model_flags, add_output_flags, add_runtime_flags, json_file,
                         json_object, non_negative_int, positive_int)
from .hf_data import check_hf_data
from .vqa_data import BENCHMARKS, TEMPLATES

TASKS = ("offline", "image-classification", "text-classification", "retrieval", "probe", "vqa")
OFFLINE_TASKS = ("text", "image", "retrieval")

DEFAULTS: dict[str, Any] = {
    "task": "offline", "algorithms": None, "ratios": None, "r": None, "flops_reduction": None, "budgets": None,
    "tome_budget": "r", "preset": None, "option": [], "no_unmerged": False, "model": None, "weights": "pretrained",
    "model_kwargs": None, "data": None, "train_data": None, "captions": None, "images": None, "split": None,
    "train_split": "train", "text_column": "text", "pair_column": None, "label_column": "label",
    "image_column": "image", "max_length": 512, "batch_size": None, "limit": None, "workers": 0, "device": "auto",
    "threads": None, "seed": 0, "out": "pitome-results", "name": None, "no_progress": False, "quick": False,
    "cache": None, "offline_tasks": list(OFFLINE_TASKS), "knn_k": 20,
    "benchmark": None, "max_new_tokens": 16, "prompt_template": "llava_v1", "ocr": False, "lm_prop_attn": False,
    "dtype": None,
}
DEFAULT_RATIOS = (0.9, 0.8, 0.7)
_DOCUMENTATION_KEYS = {"description", "paper", "notes", "paper_results"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  pitome eval                                   # offline default (BBC News, Fashion-MNIST; no network)\n"
        "  pitome eval offline --quick                   # a few items per task (smoke run)\n"
        "  pitome eval --config configs/deit_s_imagenet.yaml --data /data/imagenet/val\n"
        "  pitome eval text-classification --model hf:textattack/bert-base-uncased-SST-2 --data hf:glue:sst2\n"
        "  pitome eval vqa --model hf:llava-hf/llava-1.5-7b-hf --benchmark gqa --data gqa/testdev_balanced_questions.json "
        "--images gqa/images\n"
        "  torchrun --nproc_per_node 2 -m pitome.cli eval offline\n")
    parser.add_argument("task", nargs="?", choices=TASKS, default=None, help="what to evaluate (default: offline)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="YAML/JSON file with any of these flags (the command line wins)")
    add_model_flags(parser, default=None, what="offline: fixed models; others: ")
    add_merge_flags(parser, ratios_default=DEFAULT_RATIOS,
                    algorithms_default="pitome (pitome_text on text), tome, every baseline; offline adds auto")
    group = parser.add_argument_group("eval")
    add = group.add_argument
    add("--tome-budget", choices=("r", "ratio"), help="ToMe: fixed r at equal FLOPs (default) or the keep-ratio")
    add("--no-unmerged", action="store_true", default=None, help="skip the unmerged reference")
    add("--data", help="image folder, .csv/.tsv/.jsonl file, or hf:DATASET[:CONFIG]")
    add("--train-data", help="probe: training images (folder or hf:)")
    add("--captions", help="retrieval: Karpathy split file or LAVIS annotation list")
    add("--images", help="retrieval / vqa: image root folder (default: the caption / annotation file's folder)")
    add("--split", help="dataset split (default: validation; retrieval: test)")
    add("--train-split", help="probe: training split of an hf: dataset")
    add("--text-column")
    add("--pair-column", help="second text of sentence-pair tasks")
    add("--label-column")
    add("--image-column")
    add("--max-length", type=positive_int, help="text: truncation length in tokens (default 512)")
    add("--batch-size", type=positive_int, help="default 32 (text), 64 (images)")
    add("--limit", type=positive_int, help="first N items only")
    add("--workers", type=non_negative_int, help="data-loading worker processes")
    add("--knn-k", type=positive_int, help="probe: neighbours of the k-NN classifier (default 20)")
    add("--offline-tasks", nargs="+", choices=OFFLINE_TASKS, help="offline: which tasks (default all three)")
    add("--quick", action="store_true", default=None,
        help="offline: a few items per task (smoke run; every algorithm and ratio still runs: minutes on a CPU)")
    add("--cache", help="cache folder (default $PITOME_CACHE or ~/.cache/pitome)")
    vqa = parser.add_argument_group("vqa (LLaVA-1.5-style models; docs/vqa.md)").add_argument
    vqa("--benchmark", choices=BENCHMARKS, help="the benchmark whose format, prompt and metric to use")
    vqa("--max-new-tokens", type=positive_int, help="reply length limit in tokens (default 16)")
    vqa("--prompt-template", choices=tuple(TEMPLATES), help="llava_v1 (LLaVA-1.5's evaluation, default), llava_hf, plain")
    vqa("--ocr", action="store_true", default=None, help="textvqa: add the reference OCR tokens to the prompt")
    vqa("--lm-prop-attn", action="store_true", default=None,
        help="proportional attention for merged visual tokens inside the language model (ours; off by default)")
    vqa("--dtype", choices=("float32", "float16", "bfloat16"), help="model dtype (default: float16 on cuda, else float32)")
    add("--name", help="results folder suffix")
    add_runtime_flags(parser)
    add_output_flags(parser, default=DEFAULTS["out"])
    # None = not given: the config file, then DEFAULTS fill in (see resolve_options)
    parser.set_defaults(**{key: None for key in DEFAULTS})


# --- options: defaults < config file < command line ---------------------------------------------------------

def _read_config(path: Path) -> dict:
    data = read_config_file(path)
    config = {str(k).replace("-", "_"): v for k, v in data.items() if k not in _DOCUMENTATION_KEYS}
    if "random_weights" in config:  # the former spelling
        config["weights"] = "random" if config.pop("random_weights") else "pretrained"
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; known: {', '.join(sorted(DEFAULTS))}")
    return config


def _config_argv(config: dict) -> list[str]:
    """The config as command-line flags, so it is validated exactly like the command line."""
    argv: list[str] = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if key == "task":
            argv.insert(0, str(value))
        elif isinstance(value, bool):
            argv += [flag] if value else []
        elif key == "option":
            items = value.items() if isinstance(value, dict) else [str(v).split("=", 1) for v in value]
            for k, v in items:
                argv += [flag, f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
        elif key == "model_kwargs":
            argv += [flag, value if isinstance(value, str) else json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def resolve_options(args: argparse.Namespace) -> dict:
    """Defaults, then the config file, then the command line (all through the same validation)."""
    options = dict(DEFAULTS)
    if getattr(args, "config", None):
        config = _read_config(Path(args.config))
        parser = Parser(prog="config")
        add_arguments(parser)
        try:
            from_config = parser.parse_args(_config_argv(config))
        except UserError as error:
            raise UserError(f"{args.config}: {error}") from None
        options.update({k: v for k, v in vars(from_config).items() if k in DEFAULTS and v is not None})
    options.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    if isinstance(options["model_kwargs"], str):
        options["model_kwargs"] = json_object(options["model_kwargs"])
    return options


def validate(options: dict) -> Any:
    """Everything that can be checked before loading: returns the validated merge choices."""
    from ..cli.flags import merge_choices
    from ..loading import check_model_spec
    from ..results import ResultsFolder

    task = options["task"]
    need = {"image-classification": ("model", "data"), "text-classification": ("model", "data"),
            "retrieval": ("model", "captions"), "probe": ("model", "data", "train_data"),
            "vqa": ("model", "benchmark", "data")}.get(task, ())
    missing = [f"--{key.replace('_', '-')}" for key in need if not options.get(key)]
    if missing:
        raise UserError(f"{task} needs {' and '.join(missing)}")
    if task == "offline" and options.get("model"):
        raise UserError("offline uses its fixed models (MiniLM-L6, DINOv2-S); --model is for the other tasks")
    if options.get("model"):
        check_model_spec(options["model"], options["weights"])
    for key in ("data", "train_data", "captions", "images"):
        value = options.get(key)
        if value and not str(value).startswith("hf:") and not Path(value).exists():
            raise UserError(f"--{key.replace('_', '-')} {value}: no such file or folder")
        try:
            check_hf_data(str(value) if value else None)
        except ValueError as exc:
            raise UserError(f"--{key.replace('_', '-')} {exc}") from None
    if options.get("budgets") is not None:
        json_file(str(options["budgets"]))
    ResultsFolder.check_parent(options["out"])
    args = argparse.Namespace(**{k: options.get(k) for k in ("algorithms", "ratios", "r", "flops_reduction", "preset",
                                                            "option", "budgets")})
    text = task == "text-classification"
    return merge_choices(args, text=text, default_algorithms=_default_algorithms(options, text),
                         default_ratios=DEFAULT_RATIOS)


def _default_algorithms(options: dict, text: bool) -> list[str]:
    if options.get("algorithms"):
        return []
    from .sweep import default_algorithms

    names = default_algorithms(text=text)
    return names + ["auto"] if options["task"] == "offline" else names


def run(args: argparse.Namespace) -> int:
    options = resolve_options(args)
    choices = validate(options)
    if choices.flops_reductions:
        raise UserError("pitome eval compares at keep-ratios (--ratios) or r (--r); --flops-reduction is for "
                        "pitome bench and pitome calibrate")
    return evaluate(options, choices)


# --- the run ------------------------------------------------------------------------------------------------

def evaluate(options: dict, choices: Any = None) -> int:
    """Run one `pitome eval` configuration (the dict of ``DEFAULTS`` keys); returns the exit code."""
    from ..cli.flags import apply_threads, resolve_device
    from ..results import ResultsFolder
    from .distributed import init_from_env
    from .engine import set_seed
    from .report import METRIC_ORDER, environment, format_table, plot_task, summary_lines

    choices = choices or validate(options)
    apply_threads(options.get("threads"))
    device = resolve_device(options["device"])
    ctx = init_from_env(str(device))
    say = (lambda text: print(text, flush=True)) if ctx.is_main else (lambda text: None)
    set_seed(int(options["seed"]))
    started = time.perf_counter()
    folder = None
    if ctx.is_main:
        folder = ResultsFolder.create(options["out"], options.get("name") or f"eval-{options['task']}")
        say(f"pitome eval {options['task']}: results go to {folder.path}")
    rows: list[dict] = []
    try:
        tasks, specs, title, model_note = _build(options, choices, ctx, say)
        descriptions = [task.describe() for task in tasks]
        if folder is not None:
            folder.write_json("config.json", {"options": options, "world_size": ctx.world, "device": str(ctx.device),
                                              "tasks": descriptions, "environment": environment(),
                                              "items_per_s": "one pass per row, not interleaved or repeated: "
                                                             "not a speed-up measurement (see pitome bench)"})
        for info in descriptions:
            say(f"\n## {info['task']}")
            for key, value in info.items():
                if key != "task":
                    say(f"   {key}: {value}")
        say("")
        from .sweep import run_sweep

        rows = run_sweep(tasks, specs, ctx, progress=not options["no_progress"], log=say,
                         on_row=folder.append if folder is not None else None)
    except KeyboardInterrupt:
        if folder is not None:
            print(f"\npitome eval: interrupted; {len(folder.rows)} finished row(s) kept in {folder.path}",
                  file=sys.stderr)
        ctx.close()
        return 130
    except (ValueError, FileNotFoundError, ImportError, OSError) as error:
        ctx.close()
        where = "" if folder is None or folder.discard_if_empty() else f" (finished rows in {folder.path})"
        raise UserError(f"{one_line(error)}{where}") from None
    elapsed = time.perf_counter() - started
    if folder is not None:
        folder.write_json("results.json", {"tasks": descriptions, "rows": rows})
        for task in tasks:
            if hasattr(task, "write_predictions"):  # generative tasks: the replies themselves
                task.write_predictions(folder.path)
        sub = f"{model_note}, {ctx.device}, {ctx.world} process(es)"
        for task in tasks:
            mine = [r for r in rows if r["task"] == task.name]
            metrics = [k for k in METRIC_ORDER if any(k in r for r in mine)]
            print(f"\n### {task.name}\n{format_table(mine, metrics)}")
            print(f"\nconclusion per budget ({task.primary} and fidelity; speed: pitome bench):")
            print("\n".join(summary_lines(mine, task.primary)))
            items = next((r["items"] for r in mine if "items" in r), None)
            try:
                plot_task(mine, task.primary, folder.path_for(f"{_slug(task.name)}.png"), task.name,
                          f"{sub}, {items} test items" if items else sub)
            except UserError as error:  # no matplotlib: tables and rows are still there
                print(f"(no plot: {error})")
        print(f"\n{len(rows)} rows in {elapsed:.0f} s with {ctx.world} process(es) -> {folder.path}")
    ctx.barrier()
    ctx.close()
    return 1 if any("error" in r for r in rows) else 0


def _slug(text: str) -> str:
    from ..results import slug

    return slug(text)


# --- tasks --------------------------------------------------------------------------------------------------

def _common(choices: Any) -> dict:
    return {"preset": choices.preset} if choices.preset else {}


def _per_algorithm(choices: Any, names: Any) -> dict:
    """Each algorithm gets the --option values it accepts (patch-level ones go to all)."""
    from .sweep import default_algorithms

    every = set(names or []) | set(default_algorithms(text=True)) | set(default_algorithms()) | {"auto"}
    return {name: choices.options_for(name) for name in every}


def _build_offline(options: dict, choices: Any, ctx: Any, say: Callable[[str], None]) -> tuple:
    from .offline import DEFAULT_SIZES, QUICK_SIZES, build_offline_tasks, offline_specs

    sizes = QUICK_SIZES if options["quick"] else DEFAULT_SIZES
    say(f"pitome eval offline: subset sizes {sizes}")
    tasks = build_offline_tasks(sizes, ctx, not options["no_progress"], say,
                                Path(options["cache"]) if options.get("cache") else None, int(options["seed"]),
                                options["offline_tasks"])
    algorithms = split_given(options)
    specs = offline_specs(algorithms, choices.ratios, options["tome_budget"], not options["no_unmerged"],
                          per_algorithm=_per_algorithm(choices, algorithms), rs=choices.rs, **_common(choices))
    return tasks, specs, "offline", "MiniLM-L6 and DINOv2-S, pretrained (offline wheels)"


def split_given(options: dict) -> Any:
    from ..cli.flags import split_names

    return split_names(options.get("algorithms")) or None


def _specs(options: dict, choices: Any) -> list:
    from .sweep import build_specs

    return build_specs(choices.algorithms, choices.ratios, options["tome_budget"], not options["no_unmerged"],
                       _common(choices), _per_algorithm(choices, choices.algorithms), rs=choices.rs)


def _load(options: dict, ctx: Any, head: str) -> Any:
    from ..loading import load_model

    return load_model(options["model"], weights=options["weights"], head=head, device=ctx.device,
                      model_kwargs=options.get("model_kwargs"), max_length=options["max_length"],
                      seed=int(options["seed"]))


def _build_image_classification(options: dict, choices: Any, ctx: Any, say: Callable[[str], None]) -> tuple:
    from .image_classification import ImageClassificationTask, classifier_eval_model, load_image_dataset

    loaded = _load(options, ctx, "classifier")
    data = load_image_dataset(options["data"], loaded.transform, options["split"] or "validation",
                              options["image_column"], options["label_column"])
    title = options.get("name") or f"{options['model']} on {options['data']}"
    task = ImageClassificationTask(title, classifier_eval_model(loaded.module, loaded.library), data,
                                   options["batch_size"] or 64, options["workers"], options["limit"],
                                   {"model": loaded.describe(), "data": options["data"]})
    return [task], _specs(options, choices), title, loaded.describe()


def _build_text_classification(options: dict, choices: Any, ctx: Any, say: Callable[[str], None]) -> tuple:
    from .text_classification import TextClassificationTask, load_text_data

    examples = load_text_data(options["data"], options["split"] or "validation", options["text_column"],
                              options["label_column"], options["pair_column"])
    loaded = _load(options, ctx, "classifier")
    if loaded.modality != "text" or loaded.tokenizer is None:
        raise UserError(f"{options['model']} is not a text classifier with a tokenizer")
    title = options.get("name") or f"{options['model']} on {options['data']}"
    task = TextClassificationTask(title, loaded.module, loaded.tokenizer, examples, options["batch_size"] or 32,
                                  options["max_length"], options["limit"], options["workers"],
                                  {"model": loaded.describe(), "data": options["data"]})
    return [task], _specs(options, choices), title, loaded.describe()


def _build_retrieval(options: dict, choices: Any, ctx: Any, say: Callable[[str], None]) -> tuple:
    from .retrieval import build_retrieval_task

    task = build_retrieval_task(options, ctx, options["batch_size"] or 64)
    return [task], _specs(options, choices), task.name, task.describe().get("model", options["model"])


def _build_probe(options: dict, choices: Any, ctx: Any, say: Callable[[str], None]) -> tuple:
    from .probe import build_image_probe_task

    task = build_image_probe_task(options, ctx, options["batch_size"] or 64, options.get("model_kwargs") or {},
                                  not options["no_progress"])
    return [task], _specs(options, choices), task.name, task.describe().get("model", options["model"])


def _build_vqa(options: dict, choices: Any, ctx: Any, say: Callable[[str], None]) -> tuple:
    from .vqa import build_vqa_task

    task = build_vqa_task(options, ctx)
    return [task], _specs(options, choices), task.name, task.describe().get("model", options["model"])


# task name -> builder(options, merge choices, distributed context, log) -> (tasks, specs, title, model note)
BUILDERS: dict[str, Callable[..., tuple]] = {
    "offline": _build_offline, "image-classification": _build_image_classification,
    "text-classification": _build_text_classification, "retrieval": _build_retrieval, "probe": _build_probe,
    "vqa": _build_vqa,
}


def _build(options: dict, choices: Any, ctx: Any, say: Callable[[str], None]) -> tuple:
    return BUILDERS[options["task"]](options, choices, ctx, say)
