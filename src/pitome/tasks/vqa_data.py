"""VQA benchmark data: each benchmark's released annotation format (or a ``datasets`` dataset) -> ``VQAItem``s,
and the question prompts LLaVA-1.5's evaluation uses.

Formats read (``--data``; images under ``--images``, default: next to the annotation file):
- vqav2:     a folder holding the official ``*questions*.json`` and ``*annotations*.json`` (COCO images named
             ``COCO_<data_subtype>_<image_id:012d>.jpg``).
- gqa:       the official questions JSON (``{question_id: {imageId, question, answer, ...}}``), images ``<imageId>.jpg``.
- vizwiz:    the official JSON list (``[{image, question, answers: [{answer, ...}] x10, ...}]``).
- textvqa:   the official JSON (``{"data": [{question_id, question, image_id, answers, ...}]}``), images ``<image_id>.jpg``.
- scienceqa: ``problems.json`` (``{pid: {question, choices, answer, hint, image, split}}``); only questions with an
             image in ``--split`` (default test) are kept (ScienceQA-IMG); images ``<split>/<pid>/<image>``.
- pope:      the POPE JSON-lines files (``{question_id, image, text, label}``), one file or a folder of them; the
             file name's random / popular / adversarial is the category.
- mme:       the MME release folder: one folder per subtask with image + ``.txt`` pairs, or ``images/`` and
             ``questions_answers_YN/``; each text line is ``question<TAB>Yes|No``.
- any:       a ``.jsonl`` file with one question per line (keys as in ``record_to_item``), or ``hf:<dataset>[:config]``
             with the same column names (the lmms-lab datasets use them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .hf_data import import_datasets

__all__ = ["BENCHMARKS", "VQAItem", "HFImage", "load_vqa_items", "record_to_item", "question_prompt", "TEMPLATES",
           "render_prompt"]

BENCHMARKS = ("vqav2", "gqa", "vizwiz", "textvqa", "scienceqa", "pope", "mme")

SHORT_ANSWER = "Answer the question using a single word or phrase."
_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
_LETTER = "Answer with the option's letter from the given choices directly."

# How a question is wrapped for the language model ({prompt} = the question prompt, <image> = the image).
TEMPLATES = {
    # LLaVA-1.5's conversation format ("vicuna_v1"), the one its evaluation scripts use
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions. USER: <image>\n{prompt} ASSISTANT:",
    # the Hugging Face llava-1.5 processors' chat template (no system line)
    "llava_hf": "USER: <image>\n{prompt} ASSISTANT:",
    "plain": "<image>\n{prompt}",
}


@dataclass
class VQAItem:
    """One question. ``answers``: the human answers (VQA: 10), or the one gold answer (GQA, POPE/MME yes/no,
    ScienceQA: the option index as text). ``group``: POPE category or MME subtask; ``image_key``: MME image."""

    question_id: str
    image: Any  # a path, or an image object from a datasets dataset
    question: str
    answers: list[str]
    choices: list[str] = field(default_factory=list)
    hint: str = ""
    group: str = ""
    image_key: str = ""
    ocr_tokens: list[str] = field(default_factory=list)


def question_prompt(benchmark: str, item: VQAItem, ocr: bool = False) -> str:
    """The text after the image in LLaVA-1.5's evaluation of each benchmark."""
    if benchmark == "scienceqa":
        context = f"Context: {item.hint}\n" if item.hint.strip() else ""
        options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(item.choices))
        return f"{context}{item.question}\n{options}\n{_LETTER}"
    question = item.question.strip()
    if benchmark == "textvqa" and ocr and item.ocr_tokens:
        question += "\nReference OCR token: " + ", ".join(item.ocr_tokens)
    if benchmark == "vizwiz":
        return f"{question}\n{_UNANSWERABLE}\n{SHORT_ANSWER}"
    return f"{question}\n{SHORT_ANSWER}"


def render_prompt(template: str, prompt: str, image_token: str = "<image>") -> str:
    if template not in TEMPLATES:
        raise ValueError(f"prompt template {template!r} is unknown; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[template].replace("<image>", image_token).replace("{prompt}", prompt)


# --- records (hf: datasets and our JSON lines) ---------------------------------------------------------------

def _answer_texts(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [str(value)]
    return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in value]


def record_to_item(benchmark: str, record: dict, index: int, source: str, images: Optional[Path] = None) -> VQAItem:
    """One question from a dict with keys question (or text), image (path relative to ``images`` or an image
    object), answers (list of str / {answer: ...}) or answer (or label), optional question_id, choices, hint,
    category, image_key (MME: the image both questions are about), ocr_tokens."""
    where = f"{source}, record {index}"
    question = record.get("question", record.get("text"))
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: no question (a 'question' or 'text' field)")
    answers = _answer_texts(record.get("answers", record.get("answer", record.get("label"))))
    if not answers:
        raise ValueError(f"{where}: no answer ('answers', 'answer' or 'label')")
    image = record.get("image")
    if image is None:
        raise ValueError(f"{where}: no 'image'")
    if isinstance(image, str):
        image = _image_path(images, image, where)
    choices = [str(c) for c in (record.get("choices") or [])]
    if benchmark == "scienceqa":
        if not choices or not str(answers[0]).lstrip("-").isdigit() or not 0 <= int(answers[0]) < len(choices):
            raise ValueError(f"{where}: ScienceQA needs 'choices' and 'answer' = the index of the right choice")
    qid = str(record.get("question_id", record.get("id", index)))
    group = str(record.get("category", "") or "")
    key = str(record.get("image_key", "") or (qid.rsplit("/", 1)[-1] if benchmark == "mme" else ""))
    return VQAItem(qid, image, question, answers, choices, str(record.get("hint") or ""), group,
                   key if benchmark == "mme" else "", [str(t) for t in (record.get("ocr_tokens") or [])])


def _image_path(root: Optional[Path], name: str, where: str) -> Path:
    path = Path(name) if root is None or Path(name).is_absolute() else root / name
    if not path.is_file():
        raise ValueError(f"{where}: image {str(path)!r} does not exist (set --images to the image folder)")
    return path


# --- official formats ----------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from None


def _read_jsonl(path: Path) -> list[dict]:
    from .base import iter_json_lines  # (torch-free import of this module: the CLI reads BENCHMARKS for --help)

    return [record for _, record in iter_json_lines(path)]


def _one(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise ValueError(f"{folder}: expected one {what} file ({pattern}), found {[p.name for p in found] or 'none'}")
    return found[0]


def _vqav2(data: Path, images: Path) -> list[dict]:
    if not data.is_dir():
        raise ValueError(f"{data}: VQAv2 --data is the folder holding the official *questions*.json and "
                         f"*annotations*.json (or a .jsonl file)")
    questions = _read_json(_one(data, "*questions*.json", "questions"))
    annotations = _read_json(_one(data, "*annotations*.json", "annotations"))
    subtype = questions.get("data_subtype", "val2014")
    answers = {a["question_id"]: a["answers"] for a in annotations["annotations"]}
    records = []
    for q in questions["questions"]:
        if q["question_id"] not in answers:
            raise ValueError(f"{data}: question {q['question_id']} has no annotation")
        records.append({"question_id": q["question_id"], "question": q["question"],
                        "image": f"COCO_{subtype}_{int(q['image_id']):012d}.jpg",
                        "answers": answers[q["question_id"]]})
    return records


def _gqa(data: Path, images: Path) -> list[dict]:
    questions = _read_json(data)
    if not isinstance(questions, dict):
        raise ValueError(f"{data}: GQA questions are a mapping of question id to {{imageId, question, answer}}")
    return [{"question_id": qid, "question": q["question"], "answer": q["answer"], "image": f"{q['imageId']}.jpg"}
            for qid, q in questions.items()]


def _vizwiz(data: Path, images: Path) -> list[dict]:
    records = _read_json(data)
    if not isinstance(records, list):
        raise ValueError(f"{data}: VizWiz annotations are a list of {{image, question, answers}}")
    return [{"question_id": r["image"], "question": r["question"], "answers": r["answers"], "image": r["image"]}
            for r in records]


def _textvqa(data: Path, images: Path) -> list[dict]:
    content = _read_json(data)
    if not isinstance(content, dict) or "data" not in content:
        raise ValueError(f"{data}: TextVQA annotations are {{'data': [{{question_id, question, image_id, answers}}]}}")
    return [{"question_id": r["question_id"], "question": r["question"], "answers": r["answers"],
             "image": f"{r['image_id']}.jpg", "ocr_tokens": r.get("ocr_tokens", [])} for r in content["data"]]


def _scienceqa(data: Path, images: Path, split: str) -> list[dict]:
    problems = _read_json(data)
    if not isinstance(problems, dict):
        raise ValueError(f"{data}: ScienceQA problems.json is a mapping of problem id to problems")
    splits = sorted({p.get("split") for p in problems.values()})
    if split not in splits:
        raise ValueError(f"{data}: no problems in split {split!r}; splits: {splits}")
    return [{"question_id": pid, "question": p["question"], "choices": p["choices"], "answer": p["answer"],
             "hint": p.get("hint", ""), "image": f"{split}/{pid}/{p['image']}"}
            for pid, p in problems.items() if p.get("split") == split and p.get("image")]


def _pope(data: Path, images: Path) -> list[dict]:
    files = sorted(data.glob("*.json*")) if data.is_dir() else [data]
    if not files:
        raise ValueError(f"{data}: no POPE .json / .jsonl files")
    records = []
    for file in files:
        category = next((c for c in ("adversarial", "popular", "random") if c in file.name), file.stem)
        for r in _read_jsonl(file):
            records.append({**r, "category": r.get("category", category),
                            "question_id": f"{category}/{r.get('question_id', len(records))}"})
    return records


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _mme(data: Path, images: Path) -> list[dict]:
    if not data.is_dir():
        raise ValueError(f"{data}: MME --data is the release folder with one folder per subtask (or a .jsonl file)")
    from .vqa_metrics import MME_COGNITION, MME_PERCEPTION

    known = {n.lower(): n for n in MME_PERCEPTION + MME_COGNITION}
    records = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        if folder.name.lower() not in known:
            continue
        texts = folder / "questions_answers_YN"
        pictures = folder / "images"
        text_dir, image_dir = (texts, pictures) if texts.is_dir() else (folder, folder)
        for text in sorted(text_dir.glob("*.txt")):
            image = next((image_dir / (text.stem + s) for s in _IMAGE_SUFFIXES if (image_dir / (text.stem + s)).is_file()),
                         None)
            if image is None:
                raise ValueError(f"{text}: no image {text.stem}{{.jpg,.png}} in {image_dir}")
            for number, line in enumerate(text.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                question, sep, answer = line.rpartition("\t")
                if not sep:
                    raise ValueError(f"{text}, line {number}: expected 'question<TAB>Yes|No'")
                records.append({"question_id": f"{folder.name}/{text.stem}/{number}", "question": question,
                                "answer": answer.strip(), "category": folder.name.lower(),
                                "image_key": f"{folder.name}/{text.stem}", "image": str(image)})
    if not records:
        raise ValueError(f"{data}: no MME subtask folders ({', '.join(known.values())}) with question files")
    return records


_READERS = {"vqav2": _vqav2, "gqa": _gqa, "vizwiz": _vizwiz, "textvqa": _textvqa, "pope": _pope, "mme": _mme}


def load_vqa_items(benchmark: str, data: str, images: Optional[str] = None, split: Optional[str] = None,
                   limit: Optional[int] = None) -> list[VQAItem]:
    """The benchmark's questions from ``data`` (see the module docstring), checked before any model loads."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"--benchmark {benchmark!r} is unknown; choose one of {', '.join(BENCHMARKS)}")
    if data.startswith("hf:"):
        records = _hf_records(data, split or ("test" if benchmark in ("scienceqa", "pope", "mme") else "validation"),
                              limit)
        root = Path(images) if images else None
    else:
        path = Path(data)
        if not path.exists():
            raise ValueError(f"--data {data}: no such file or folder")
        root = Path(images) if images else (path if path.is_dir() else path.parent)
        if images and not root.is_dir():
            raise ValueError(f"--images {images}: no such folder")
        if path.suffix.lower() == ".jsonl" and benchmark != "pope":
            records = _read_jsonl(path)
        elif benchmark == "scienceqa":
            records = _scienceqa(path, root, split or "test")
        else:
            records = _READERS[benchmark](path, root)
        records = records[:limit] if limit else records
    items = [record_to_item(benchmark, r, i, data, root) for i, r in enumerate(records)]
    if not items:
        raise ValueError(f"--data {data}: no {benchmark} questions")
    return items


class HFImage:
    """An image of a ``datasets`` dataset, decoded only when a batch needs it (a split can hold 100k images)."""

    def __init__(self, dataset: Any, index: int, column: str = "image") -> None:
        self.dataset, self.index, self.column = dataset, index, column

    def load(self) -> Any:
        return self.dataset[self.index][self.column]


def _hf_records(data: str, split: str, limit: Optional[int]) -> list[dict]:
    """Rows of ``hf:<name>[:<config>]`` without decoding images (their column becomes ``HFImage`` references)."""
    datasets = import_datasets()
    name, _, config = data[3:].partition(":")
    dataset = datasets.load_dataset(name, config or None, split=split)
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    column = "image" if "image" in dataset.column_names else None
    rows = dataset.remove_columns([column]) if column else dataset
    return [{**row, **({"image": HFImage(dataset, i, column)} if column else {})} for i, row in enumerate(rows)]
