"""A tiny random-weight LLaVA saved as a Hugging Face folder (model + processor with a word-level tokenizer) and
synthetic annotation files in every benchmark's released format; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE_ID = 127
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)] + [
    "yes", "no", "is", "there", "a", "in", "the", "image", "what", "color", "A", "B", "C", "answer", "question",
    "using", "single", "word", "or", "phrase", "USER", "ASSISTANT", "Context", "Unanswerable"]
WORDS = WORDS + [f"x{i}" for i in range(IMAGE_ID - len(WORDS))] + ["<image>"]


def build_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """Save a tiny LLaVA (CLIP tower 32 px / patch 4 = 64 patches + class, 2-layer Llama) with its processor."""
    import torch
    import transformers as t
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert len(WORDS) == IMAGE_ID + 1
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = t.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>", unk_token="<unk>",
                                     extra_special_tokens={"image_token": "<image>"})
    images = t.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = t.LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=4,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 image_token="<image>")
    vision = t.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                image_size=32, patch_size=4)
    text = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=IMAGE_ID + 1, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    config = t.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, vision_feature_layer=-2,
                           vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = t.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _image(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 255, (40 + seed % 7, 36 + seed % 5, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def _ten(first: str, second: str = "w7") -> list[str]:
    return [first] * 6 + [second] * 4


def write_benchmark(benchmark: str, root: Path, count: int = 5) -> Path:
    """Synthetic files in the benchmark's released format under ``root``; returns what ``--data`` takes."""
    root.mkdir(parents=True, exist_ok=True)
    if benchmark == "vqav2":
        for i in range(count):
            _image(root / f"COCO_val2014_{i + 1:012d}.jpg", i)
        _write(root / "v2_OpenEnded_mscoco_val2014_questions.json",
               {"data_subtype": "val2014", "questions": [{"image_id": i + 1, "question": f"what color is w{i}?",
                                                          "question_id": 10 * i} for i in range(count)]})
        _write(root / "v2_mscoco_val2014_annotations.json",
               {"annotations": [{"question_id": 10 * i, "multiple_choice_answer": f"w{i}",
                                 "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(_ten(f"w{i}"))]}
                                for i in range(count)]})
        return root
    if benchmark == "gqa":
        for i in range(count):
            _image(root / "images" / f"n{i}.jpg", i)
        return _write(root / "testdev_balanced_questions.json",
                      {f"2{i}": {"imageId": f"n{i}", "question": f"what is in the image w{i}?", "answer": f"w{i}"}
                       for i in range(count)})
    if benchmark == "vizwiz":
        for i in range(count):
            _image(root / f"VizWiz_val_{i:08d}.jpg", i)
        return _write(root / "val.json", [{"image": f"VizWiz_val_{i:08d}.jpg", "question": f"what is this w{i}?",
                                           "answers": [{"answer": a, "answer_confidence": "yes"}
                                                       for a in _ten("unanswerable", f"w{i}")],
                                           "answerable": 0} for i in range(count)])
    if benchmark == "textvqa":
        for i in range(count):
            _image(root / "train_images" / f"t{i}.jpg", i)
        return _write(root / "TextVQA_0.5.1_val.json",
                      {"data": [{"question_id": i, "question": f"what word is there w{i}?", "image_id": f"t{i}",
                                 "answers": _ten(f"w{i}"), "ocr_tokens": [f"w{i}", "w3"]} for i in range(count)]})
    if benchmark == "scienceqa":
        problems = {}
        for i in range(count + 1):
            image = None if i == count else "image.png"  # a text-only problem: not in ScienceQA-IMG
            if image:
                _image(root / "test" / str(i) / image, i)
            problems[str(i)] = {"question": f"what is w{i}?", "choices": ["w1", "w2", "w3"][: 2 + i % 2],
                                "answer": i % 2, "hint": "w9 w8" if i % 2 else "", "image": image, "split": "test"}
        problems["99"] = {**problems["0"], "split": "train"}
        return _write(root / "problems.json", problems)
    if benchmark == "pope":
        for i in range(count):
            _image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
        for category in ("random", "adversarial"):
            lines = [json.dumps({"question_id": i, "image": f"COCO_val2014_{i:012d}.jpg",
                                 "text": f"Is there a w{i} in the image?", "label": "yes" if i % 2 else "no"})
                     for i in range(count)]
            (root / f"coco_pope_{category}.json").write_text("\n".join(lines) + "\n")
        return root
    if benchmark == "mme":
        for n, task in enumerate(("existence", "artwork", "code_reasoning")):
            for i in range(max(count // 2, 1)):
                nested = task == "artwork"  # artwork-style subtasks keep images/ and questions_answers_YN/
                image = root / task / ("images" if nested else "") / f"{i:04d}.jpg"
                text = root / task / ("questions_answers_YN" if nested else "") / f"{i:04d}.txt"
                _image(image, 10 * n + i)
                text.parent.mkdir(parents=True, exist_ok=True)
                text.write_text(f"Is there a w{i} in the image? Please answer yes or no.\tYes\n"
                                f"Is there a w{i + 1} in the image? Please answer yes or no.\tNo\n")
        return root
    raise ValueError(benchmark)


def write_jsonl(root: Path, count: int = 3) -> Path:
    """Our generic one-question-per-line format (here with GQA-style single answers)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        _image(root / f"img{i}.png", i)
        lines.append(json.dumps({"question_id": i, "image": f"img{i}.png", "question": f"w{i} w2?", "answer": "w2"}))
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "questions.jsonl"
