"""`pitome eval vqa`: benchmark readers and prompts, language-model FLOPs, proportional attention in the language
model, and a tiny random-weight LLaVA answering synthetic questions in every benchmark's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pitome  # noqa: E402
from pitome.tasks.vqa_data import BENCHMARKS, load_vqa_items, question_prompt, render_prompt  # noqa: E402

from vqa_fixtures import build_tiny_llava, write_benchmark, write_jsonl  # noqa: E402

_IMAGES = {"gqa": "images", "textvqa": "train_images", "pope": "val2014"}


def _images(benchmark: str, root: Path) -> str | None:
    return str(root / _IMAGES[benchmark]) if benchmark in _IMAGES else None


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


# --- data ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_released_format_is_read(name: str, tmp_path: Path) -> None:
    data = write_benchmark(name, tmp_path, count=4)
    items = load_vqa_items(name, str(data), _images(name, tmp_path))
    expected = {"pope": 8, "mme": 12}.get(name, 4)
    assert len(items) == expected
    assert all(Path(item.image).is_file() for item in items)
    first = items[0]
    if name in ("vqav2", "vizwiz", "textvqa"):
        assert len(first.answers) == 10
    if name == "vqav2":
        assert first.question == "what color is w0?" and first.answers.count("w0") == 6
        assert Path(first.image).name == "COCO_val2014_000000000001.jpg"
    if name == "scienceqa":  # ScienceQA-IMG: the text-only problem and the train problem are left out
        assert [i.question_id for i in items] == ["0", "1", "2", "3"]
        assert items[1].choices == ["w1", "w2", "w3"] and items[1].answers == ["1"] and items[1].hint == "w9 w8"
    if name == "pope":
        assert {i.group for i in items} == {"random", "adversarial"} and items[0].answers in (["yes"], ["no"])
    if name == "mme":
        assert {i.group for i in items} == {"existence", "artwork", "code_reasoning"}
        pairs = [i for i in items if i.image_key == items[0].image_key]
        assert [p.answers[0] for p in pairs] == ["Yes", "No"]


def test_generic_jsonl_and_limit(tmp_path: Path) -> None:
    items = load_vqa_items("gqa", str(write_jsonl(tmp_path, count=3)), limit=2)
    assert [i.question for i in items] == ["w0 w2?", "w1 w2?"] and items[0].answers == ["w2"]


def test_bad_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--benchmark 'okvqa' is unknown"):
        load_vqa_items("okvqa", str(tmp_path))
    with pytest.raises(ValueError, match="no such file"):
        load_vqa_items("gqa", str(tmp_path / "missing.json"))
    data = write_benchmark("gqa", tmp_path / "g", count=2)
    with pytest.raises(ValueError, match=r"image .*n0\.jpg.* does not exist"):
        load_vqa_items("gqa", str(data))  # images live in images/, not next to the file
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "image": "x.png"}\n')
    with pytest.raises(ValueError, match="record 0: no answer"):
        load_vqa_items("gqa", str(bad))
    sqa = write_benchmark("scienceqa", tmp_path / "s", count=2)
    with pytest.raises(ValueError, match="no problems in split 'val'"):
        load_vqa_items("scienceqa", str(sqa), split="val")


def test_prompts_follow_llava_15() -> None:
    from pitome.tasks.vqa_data import VQAItem

    item = VQAItem("1", "x.jpg", "What is it?", ["cat"] * 10, ocr_tokens=["STOP", "ahead"])
    short = "What is it?\nAnswer the question using a single word or phrase."
    assert question_prompt("vqav2", item) == short == question_prompt("gqa", item) == question_prompt("pope", item)
    assert question_prompt("vizwiz", item) == ("What is it?\nWhen the provided information is insufficient, respond "
                                               "with 'Unanswerable'.\nAnswer the question using a single word or "
                                               "phrase.")
    assert question_prompt("textvqa", item, ocr=True).startswith("What is it?\nReference OCR token: STOP, ahead\n")
    sqa = VQAItem("2", "x.jpg", "Which is a mammal?", ["1"], choices=["trout", "whale"], hint="Look at the animals.")
    assert question_prompt("scienceqa", sqa) == ("Context: Look at the animals.\nWhich is a mammal?\nA. trout\n"
                                                 "B. whale\nAnswer with the option's letter from the given choices "
                                                 "directly.")
    assert render_prompt("llava_hf", "Q") == "USER: <image>\nQ ASSISTANT:"
    assert render_prompt("llava_v1", "Q").endswith("questions. USER: <image>\nQ ASSISTANT:")
    with pytest.raises(ValueError, match="prompt template 'chatml' is unknown"):
        render_prompt("chatml", "Q")


# --- FLOPs ---------------------------------------------------------------------------------------------------

def test_decoder_prefill_macs_match_the_flop_counter() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from pitome.flops import decoder_prefill_macs

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=50)
    model = transformers.LlamaModel(config).eval()
    model.set_attn_implementation("eager")  # matmuls the counter sees (QK^T and AV over all pairs)
    ids = torch.randint(0, 50, (1, 37))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    assert decoder_prefill_macs(config, 37) == counter.get_total_flops() // 2


# --- language-model proportional attention (ours) -------------------------------------------------------------

def _tiny(tiny_llava: Path, impl: str = "sdpa") -> torch.nn.Module:
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    model.set_attn_implementation(impl)
    return model


def _ids(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 60] + [127] * 64 + [61, 62]] * rows)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_language_model_prop_attn(tiny_llava: Path, impl: str) -> None:
    from pitome.adapters.llava_lm_prop_attn import language_model_prop_attn

    model = _tiny(tiny_llava, impl)
    ids, mask = _ids(2)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    generate = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, do_sample=False,
                    output_scores=True, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="needs a patched LLaVA"), language_model_prop_attn(model):
        pass
    with torch.no_grad():
        pitome.patch(model, ratio=1.0)
        plain = model.generate(**generate)
        with language_model_prop_attn(model):  # nothing merged: every size is 1, the bias is 0
            same = model.generate(**generate)
        assert torch.equal(plain.sequences, same.sequences)
        assert torch.allclose(plain.scores[0], same.scores[0], atol=1e-5)

        pitome.patch(model, ratio=0.7)
        plain = model.generate(**generate)
        masks: list[torch.Tensor] = []
        with language_model_prop_attn(model):
            first = model.model.language_model.layers[0].self_attn
            hook = first.register_forward_pre_hook(lambda m, a, k: masks.append(k["attention_mask"]), with_kwargs=True)
            biased = model.generate(**generate)
            hook.remove()
    visual = pitome.adapters.hf_llava.image_token_count(model)
    prompt = ids.shape[1] - 64 + visual
    assert [tuple(m.shape) for m in masks] == [(2, 1, prompt, prompt)] + [(2, 1, 1, prompt + k) for k in (1, 2)]
    last_row = masks[0][:, 0, -1].float()  # the last prompt token's view of every key
    image_keys = last_row[:, 2: 2 + visual]
    assert torch.allclose(image_keys.exp().sum(dim=1), torch.full((2,), 64.0))  # sizes cover the 64 patches
    assert (image_keys > 0).any() and (last_row[:, :2] == 0).all() and (last_row[:, 2 + visual:] == 0).all()
    assert torch.isneginf(masks[0][0, 0, 0, 1]) or masks[0][0, 0, 0, 1] < -1e30  # still causal
    assert not torch.allclose(plain.scores[0], biased.scores[0])


# --- the task, end to end -------------------------------------------------------------------------------------

def _task(tiny_llava: Path, benchmark: str, root: Path, batch_size: int, **kwargs: object):
    from pitome.tasks.vqa import VQATask, load_llava

    model, processor = load_llava(f"hf:{tiny_llava}")
    data = write_benchmark(benchmark, root, count=4)
    items = load_vqa_items(benchmark, str(data), _images(benchmark, root))
    return VQATask(f"tiny {benchmark}", model, processor, benchmark, items, batch_size=batch_size,
                   max_new_tokens=3, **kwargs)


@pytest.mark.parametrize("lm_prop_attn", [False, True])
def test_batched_answers_equal_one_question_at_a_time(tiny_llava: Path, tmp_path: Path, lm_prop_attn: bool) -> None:
    from pitome.tasks.engine import MergeSpec, run_pass

    # ScienceQA prompts differ in length (2 or 3 options, a hint or not): the batch is left-padded
    batched = _task(tiny_llava, "scienceqa", tmp_path, batch_size=4, lm_prop_attn=lm_prop_attn)
    single = _task(tiny_llava, "scienceqa", tmp_path, batch_size=1, lm_prop_attn=lm_prop_attn)
    spec = MergeSpec.make("pitome", ratio=0.7)
    one = run_pass(batched.model, batched.loader, batched.batches, spec)
    many = run_pass(single.model, single.loader, single.batches, spec)
    assert batched.replies(one) == single.replies(many)
    assert torch.equal(one.outputs[:, :2], many.outputs[:, :2])  # visual and prompt tokens per question
    metrics = batched.metrics(one, None)
    with pitome.patched(batched.model.target, "pitome", ratio=0.7):
        assert metrics["visual_tokens"] == pitome.adapters.hf_llava.image_token_count(batched.model.target) < 64
    assert set(metrics) >= {"accuracy", "unparsed", "prefill_gflops", "latency_ms", "new_tokens_per_s"}


def _run_cli(args: list[str]) -> int:
    from pitome.cli import main

    return main(args)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_eval_vqa_cli_every_benchmark(name: str, tiny_llava: Path, tmp_path: Path) -> None:
    data = write_benchmark(name, tmp_path / "data", count=4)
    out = tmp_path / "out"
    args = ["eval", "vqa", "--model", f"hf:{tiny_llava}", "--benchmark", name, "--data", str(data),
            "--algorithms", "pitome", "--ratios", "0.7", "--batch-size", "3", "--max-new-tokens", "3",
            "--no-progress", "--out", str(out)]
    if name in _IMAGES:
        args += ["--images", _images(name, tmp_path / "data")]
    if name == "gqa":
        args += ["--lm-prop-attn"]
    assert _run_cli(args) == 0
    rows = json.loads(next(out.glob("*/results.json")).read_text())["rows"]
    assert [r["algorithm"] for r in rows] == ["unmerged", "pitome"]
    primary = {"pope": "f1", "mme": "perception"}.get(name, "accuracy")
    assert all(isinstance(r[primary], float) for r in rows)
    assert rows[0]["visual_tokens"] == 64 > rows[1]["visual_tokens"]
    assert rows[0]["prefill_gflops"] > rows[1]["prefill_gflops"] > 0
    replies = [json.loads(line) for line in next(out.glob("*/predictions-unmerged.jsonl")).read_text().splitlines()]
    assert len(replies) == rows[0]["items"] and all(set(r) == {"question_id", "reply"} for r in replies)


def test_cli_errors_are_one_line_before_any_model_loads(tiny_llava: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    data = write_benchmark("gqa", tmp_path, count=2)
    base = ["eval", "vqa", "--model", f"hf:{tiny_llava}", "--no-progress", "--out", str(tmp_path / "out")]
    images = ["--images", str(tmp_path / "images")]
    assert _run_cli(base + ["--benchmark", "okvqa", "--data", str(data)] + images) == 2
    assert _run_cli(base + ["--benchmark", "gqa", "--data", str(data)]) == 2  # images are in images/
    assert _run_cli(base + ["--benchmark", "gqa", "--data", str(data), "--prompt-template", "chatml"] + images) == 2
    assert _run_cli(["eval", "vqa", "--model", f"hf:{tmp_path / 'no-model'}", "--benchmark", "gqa", "--data",
                     str(data), "--no-progress", "--out", str(tmp_path / "out")] + images) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and "okvqa" in errors[0] and "n0.jpg" in errors[1] and "chatml" in errors[2]
    assert "no-model" in errors[3]
    assert not list((tmp_path / "out").glob("*/rows.jsonl"))  # nothing ran


def test_llava_next_is_refused_with_what_is_supported(tmp_path: Path) -> None:
    from pitome.tasks.vqa import load_llava

    transformers.LlavaNextConfig().save_pretrained(tmp_path)  # a config is enough: refused before weights load
    with pytest.raises(ValueError, match=r"'llava_next'.*any-resolution.*LlavaForConditionalGeneration"):
        load_llava(f"hf:{tmp_path}")


def _replies_in(folders: tuple) -> list:
    """Each process: the tiny LLaVA on the synthetic POPE files, unmerged and PiToMe; the gathered rows."""
    from pitome.tasks.distributed import init_from_env
    from pitome.tasks.sweep import build_specs, run_sweep
    from pitome.tasks.vqa import VQATask, load_llava

    model_folder, data_folder = folders
    torch.set_num_threads(1)
    ctx = init_from_env("cpu")
    model, processor = load_llava(f"hf:{model_folder}")
    items = load_vqa_items("pope", str(Path(data_folder)), str(Path(data_folder) / "val2014"))
    task = VQATask("tiny pope", model, processor, "pope", items, batch_size=3, max_new_tokens=2)
    rows = run_sweep([task], build_specs(["pitome"], [0.7]), ctx)
    ctx.close()
    return [{k: r[k] for k in ("algorithm", "f1", "accuracy", "yes_ratio", "visual_tokens", "gflops", "items")}
            for r in rows]


@pytest.mark.slow
def test_two_processes_match_one(tiny_llava: Path, tmp_path: Path) -> None:
    from pitome.tasks.distributed import spawn_local

    data = write_benchmark("pope", tmp_path, count=4)
    threads = torch.get_num_threads()
    try:
        single = _replies_in((str(tiny_llava), str(data)))
    finally:
        torch.set_num_threads(threads)
    double = spawn_local(_replies_in, 2, (str(tiny_llava), str(data)))
    assert double[0] == double[1] == single


def test_llava_configs_load_and_carry_the_papers_numbers() -> None:
    import argparse

    import yaml

    from pitome.tasks.cli import resolve_options

    folder = Path(__file__).resolve().parent.parent / "configs"
    table3 = {"vqav2", "gqa", "vizwiz", "scienceqa", "textvqa", "mme"}
    seen = set()
    for path in sorted(folder.glob("llava15_*.yaml")):
        options = resolve_options(argparse.Namespace(config=path))  # validated like the command line
        size = path.stem.split("_")[1]
        assert options["task"] == "vqa" and list(options["ratios"]) == [0.9 if size == "7b" else 0.925]
        raw = yaml.safe_load(path.read_text())
        if options["benchmark"] in table3 and not path.stem.endswith("walltime"):
            assert "Table 3" in raw["paper"] and set(raw["paper_results"]) >= {"unmerged", "pitome", "tome"}
        seen.add(path.stem)
    assert {f"llava15_{s}_{b}" for s in ("7b", "13b") for b in table3 | {"pope", "walltime"}} == seen
