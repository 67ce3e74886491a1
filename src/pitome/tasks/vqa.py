"""Visual question answering with LLaVA-1.5-style models (the paper's Table 3): greedy, batched generation on a
benchmark's questions, scored with the benchmark's own metric (``vqa_metrics``).

Merging happens in the vision tower (``pitome.patch`` on the LLaVA model); the language model gets fewer visual
tokens. Each pass records, per question, the visual tokens that reached the language model, the prompt length
and its batch's wall time; a row reports the metric, those means, the prefill FLOPs (vision tower blocks +
language-model blocks on the prompt, MACs) and latency / throughput.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..adapters.hf_llava import _llava_model
from .base import ArrayDataset, Task, dataloader_factory, fixed_batches
from .engine import EvalModel, PassResult, _sync
from .vqa_data import BENCHMARKS, HFImage, VQAItem, question_prompt, render_prompt
from .vqa_metrics import gqa_accuracy, mme_scores, pope_metrics, scienceqa_accuracy, vqa_accuracy

__all__ = ["VQATask", "load_llava", "build_vqa_task", "score_replies", "PRIMARY", "DEFAULT_MAX_NEW_TOKENS"]

PRIMARY = {"vqav2": "accuracy", "gqa": "accuracy", "vizwiz": "accuracy", "textvqa": "accuracy",
           "scienceqa": "accuracy", "pope": "f1", "mme": "perception"}
DEFAULT_MAX_NEW_TOKENS = 16  # every benchmark asks for a word, a phrase, a letter or yes / no
_COLUMNS = 3  # outputs per question before the generated ids: visual tokens, prompt tokens, batch seconds
_NOT_SUPPORTED = ("pitome eval vqa supports LLaVA-1.5-style models (LlavaForConditionalGeneration: one fixed-size "
                  "image per question, e.g. llava-hf/llava-1.5-7b-hf)")


def load_llava(spec: str, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
               weights: str = "pretrained", seed: int = 0) -> tuple[nn.Module, Any]:
    """(model, processor) from ``hf:<id or folder>``; the architecture is checked before the weights load.

    weights: 'pretrained', or 'random' (built from the config, seeded: smoke tests only; the processor still
    comes from the folder / hub).
    """
    from ..cli.errors import UserError
    from ..loading import check_model_spec

    checked = check_model_spec(spec, weights)
    if checked.source != "hf":
        raise UserError(f"--model {spec!r}: a LLaVA model is 'hf:<id or folder>'; {_NOT_SUPPORTED}")
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(checked.name)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the config of {spec} (a hub id needs a network or a filled cache): "
                        f"{error}") from None
    kind = getattr(config, "model_type", "?")
    if kind != "llava":
        detail = (" (any-resolution tiles with image_sizes are not supported yet)"
                  if kind.startswith(("llava_next", "llava_onevision")) else "")
        raise UserError(f"--model {spec}: model type {kind!r}{detail}; {_NOT_SUPPORTED}")
    if dtype is None:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if weights == "random":
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(dtype)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(checked.name, dtype=dtype)
    model = model.eval().to(device)
    processor = AutoProcessor.from_pretrained(checked.name)
    processor.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    return model, processor


def score_replies(benchmark: str, replies: Sequence[str], items: Sequence[VQAItem]) -> dict[str, float]:
    """The benchmark's metric(s) of the replies to ``items`` (same order)."""
    if benchmark in ("vqav2", "vizwiz", "textvqa"):
        return {"accuracy": vqa_accuracy(replies, [i.answers for i in items])}
    if benchmark == "gqa":
        return {"accuracy": gqa_accuracy(replies, [i.answers[0] for i in items])}
    if benchmark == "scienceqa":
        return scienceqa_accuracy(replies, [i.choices for i in items], [int(i.answers[0]) for i in items])
    if benchmark == "pope":
        out = pope_metrics(replies, [i.answers[0] for i in items])
        groups = sorted({i.group for i in items if i.group})
        for group in groups if len(groups) > 1 else []:
            mine = [k for k, i in enumerate(items) if i.group == group]
            part = pope_metrics([replies[k] for k in mine], [items[k].answers[0] for k in mine])
            out.update({f"{group}_{key}": value for key, value in part.items() if key in ("accuracy", "f1")})
        return out
    if benchmark == "mme":
        return mme_scores(replies, [i.answers[0] for i in items], [i.group for i in items],
                          [i.image_key or i.question_id for i in items])
    raise ValueError(f"benchmark {benchmark!r} is unknown; choose one of {', '.join(BENCHMARKS)}")


def _load_image(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, HFImage):
        image = image.load()
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


class _PromptCounter:
    """Image tokens and real prompt tokens per row of the prompt the language model sees (the prefill call)."""

    def __init__(self, llava: nn.Module) -> None:
        self.image_token = llava.config.image_token_id
        self.visual: Optional[Tensor] = None
        self.prompt: Optional[Tensor] = None
        self.handle = llava.register_forward_pre_hook(self._see, with_kwargs=True)

    def _see(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.visual is None and ids is not None and bool((ids == self.image_token).any()):
            mask = kwargs.get("attention_mask")
            self.visual = (ids == self.image_token).sum(dim=1)
            self.prompt = mask.sum(dim=1) if mask is not None else torch.full_like(self.visual, ids.shape[1])

    def remove(self) -> None:
        self.handle.remove()


class VQATask(Task):
    """One benchmark's questions, answered by greedy generation in fixed batches (dataset order)."""

    def __init__(self, name: str, model: nn.Module, processor: Any, benchmark: str, items: Sequence[VQAItem],
                 batch_size: int = 8, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, template: str = "llava_v1",
                 ocr: bool = False, lm_prop_attn: bool = False, workers: int = 0,
                 info: Optional[dict] = None) -> None:
        if benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark {benchmark!r} is unknown; choose one of {', '.join(BENCHMARKS)}")
        render_prompt(template, "")  # an unknown template fails here, before any batch runs
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.name, self.pass_key, self.primary = name, name, PRIMARY[benchmark]
        self.benchmark, self.items, self.processor = benchmark, list(items), processor
        self.max_new_tokens, self.template, self.ocr = max_new_tokens, template, ocr
        self.lm_prop_attn = lm_prop_attn
        self.batches = fixed_batches(len(self.items), batch_size)
        self._loader = dataloader_factory(ArrayDataset(self.items, list(range(len(self.items)))), self._collate,
                                          workers)
        self._info = dict(info or {})
        self.predictions: dict[str, list[dict]] = {}  # per merge setting: question id + reply, for write_predictions
        self._llava = _llava_model(model)
        self._text_config = model.config.text_config
        from ..flops import encoder_shape

        self.model = EvalModel(target=model, run=self._generate, shape=encoder_shape(self._llava.vision_tower),
                               name=type(model).__name__)

    # -- data -----------------------------------------------------------------------------------------------
    def prompt(self, item: VQAItem) -> str:
        image_token = getattr(self.processor, "image_token", "<image>")
        return render_prompt(self.template, question_prompt(self.benchmark, item, self.ocr), image_token)

    def _collate(self, pairs: list) -> tuple[dict, Tensor]:
        images = [_load_image(item.image) for item, _ in pairs]
        texts = [self.prompt(item) for item, _ in pairs]
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        return dict(inputs), torch.tensor([index for _, index in pairs])

    def loader(self, batches: list[list[int]]) -> Any:
        return self._loader(batches)

    # -- model ----------------------------------------------------------------------------------------------
    def _generate(self, inputs: dict) -> Tensor:
        """Greedy replies; returns (B, 3 + max_new_tokens) float64: visual tokens, prompt tokens, batch seconds, ids."""
        import pitome

        model = self.model.target
        dtype = next(model.parameters()).dtype
        inputs = {k: v.to(dtype) if k == "pixel_values" else v for k, v in inputs.items()}
        pad = self._pad_id()
        counter = _PromptCounter(self._llava)
        context: Any = contextlib.nullcontext()
        if self.lm_prop_attn and pitome.is_patched(model):
            from ..adapters.llava_lm_prop_attn import language_model_prop_attn

            context = language_model_prop_attn(model)
        device = inputs["input_ids"].device
        _sync(device)
        start = time.perf_counter()
        try:
            with context:
                out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=pad)
        finally:
            counter.remove()
        _sync(device)
        seconds = time.perf_counter() - start
        if counter.visual is None:
            raise RuntimeError("the language model saw no image tokens: the processor did not expand the image "
                               "placeholder of the prompt")
        new = out[:, inputs["input_ids"].shape[1]:]
        ids = torch.full((new.shape[0], self.max_new_tokens), pad, dtype=torch.long, device=new.device)
        ids[:, : new.shape[1]] = new
        batch = new.shape[0]
        stats = torch.stack([counter.visual.to(device), counter.prompt.to(device),
                             torch.full((batch,), seconds, dtype=torch.float64, device=device)], dim=1)
        return torch.cat([stats.double(), ids.double()], dim=1)

    def _pad_id(self) -> int:
        tokenizer = self.processor.tokenizer
        for value in (tokenizer.pad_token_id, self._text_config.pad_token_id, tokenizer.eos_token_id):
            if value is not None:
                return int(value)
        return 0

    # -- scoring --------------------------------------------------------------------------------------------
    def replies(self, result: PassResult) -> list[str]:
        """Decoded replies in the order of ``result.labels`` (item indices)."""
        ids = result.outputs[:, _COLUMNS:].long()
        pad = self._pad_id()
        tokenizer = self.processor.tokenizer
        return [tokenizer.decode([t for t in row.tolist() if t != pad], skip_special_tokens=True).strip()
                for row in ids]

    def metrics(self, result: PassResult, reference: Optional[PassResult]) -> dict[str, float]:
        from ..flops import decoder_prefill_macs

        order = [int(i) for i in result.labels]
        replies = self.replies(result)
        self.predictions[result.spec.label] = [{"question_id": self.items[i].question_id, "reply": reply}
                                               for i, reply in zip(order, replies)]
        out = score_replies(self.benchmark, replies, [self.items[i] for i in order])
        visual, prompt, seconds = (result.outputs[:, k].double() for k in range(_COLUMNS))
        generated = int((result.outputs[:, _COLUMNS:].long() != self._pad_id()).sum())
        lengths, counts = torch.unique(prompt.long(), return_counts=True)
        lm_macs = sum(int(c) * decoder_prefill_macs(self._text_config, int(n))
                      for n, c in zip(lengths.tolist(), counts.tolist())) / max(len(prompt), 1)
        out.update({"visual_tokens": float(visual.mean()), "prompt_tokens": float(prompt.mean()),
                    "prefill_gflops": result.gflops + lm_macs / 1e9,
                    "latency_ms": 1000 * statistics.median(seconds.tolist()) if len(seconds) else float("nan"),
                    "new_tokens_per_s": generated / result.seconds if result.seconds > 0 else float("nan")})
        if reference is not None and reference is not result:
            same = [a == b for a, b in zip(replies, self.replies(reference))]
            out["agreement"] = 100.0 * sum(same) / len(same) if same else float("nan")
        return out

    def write_predictions(self, folder: Path) -> list[Path]:
        """One ``predictions-<setting>.jsonl`` per merge setting scored so far (question id, reply)."""
        from ..results import slug

        paths = []
        for label, rows in self.predictions.items():
            path = folder / f"predictions-{slug(label)}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            paths.append(path)
        return paths

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "benchmark": self.benchmark, "items": len(self.items),
                "template": self.template, "max_new_tokens": self.max_new_tokens,
                "lm_prop_attn": self.lm_prop_attn, "example_prompt": self.prompt(self.items[0]), **self._info}


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_vqa_task(options: dict, ctx: Any) -> VQATask:
    """`pitome eval vqa`: the questions are read and checked first, then the model loads."""
    from ..cli.errors import UserError
    from .vqa_data import load_vqa_items

    benchmark = options.get("benchmark")
    if benchmark not in BENCHMARKS:
        raise UserError(f"vqa needs --benchmark, one of {', '.join(BENCHMARKS)} (got {benchmark!r})")
    if not options.get("data"):
        raise UserError("vqa needs --data: the benchmark's annotation file / folder, a .jsonl file or hf:<dataset>")
    if options.get("dtype") and options["dtype"] not in _DTYPES:
        raise UserError(f"--dtype {options['dtype']!r} is unknown; choose one of {', '.join(_DTYPES)}")
    max_new = int(options.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    if max_new < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new}")
    template = options.get("prompt_template") or "llava_v1"
    try:
        render_prompt(template, "")
        items = load_vqa_items(benchmark, options["data"], options.get("images"), options.get("split"),
                               options.get("limit"))
    except ValueError as error:
        raise UserError(str(error)) from None
    weights = options.get("weights") or "pretrained"
    model, processor = load_llava(options["model"], ctx.device, _DTYPES.get(options.get("dtype") or ""), weights,
                                  int(options.get("seed") or 0))
    name = options.get("name") or f"{benchmark}: {options['model']}"
    note = "RANDOM weights (smoke test)" if weights == "random" else "pretrained"
    info = {"model": f"{options['model']} ({note})", "data": options["data"],
            "dtype": str(next(model.parameters()).dtype)}
    return VQATask(name, model, processor, benchmark, items, int(options.get("batch_size") or 8), max_new, template,
                   bool(options.get("ocr")), bool(options.get("lm_prop_attn")), int(options.get("workers") or 0),
                   info)
