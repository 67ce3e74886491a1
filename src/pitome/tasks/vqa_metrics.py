"""The VQA benchmarks' own metrics, written from their published definitions (percentages, 0-100).

- VQAv2 / VizWiz / TextVQA: soft accuracy. Answers are normalised (lowercase; periods removed except in
  decimals; commas between digits removed; the other punctuation the official evaluator handles
  (; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !) becomes a space, apostrophes and colons stay; number words to
  digits ('none' counts as 0); articles dropped; missing contraction apostrophes added), then a prediction
  scores min(#humans who gave it / 3, 1), averaged over the 10 leave-one-annotator-out subsets of 9 humans
  (visualqa.org/evaluation). Both sides are always normalised (LLaVA's pipeline normalises predictions before
  the official evaluator normalises again, so this matches what its published numbers measured).
- GQA: exact match of the lowercased answer without trailing periods.
- ScienceQA: option accuracy; the letter is read from the reply (a bare letter, "B.", "(B)", "The answer is B",
  or the option's text); a reply naming no option counts as wrong.
- POPE: "yes" is the positive class; a reply whose first sentence contains "no" or "not" is "no", otherwise
  "yes" (the POPE paper's rule); accuracy, precision, recall, F1 and the share of "yes" replies.
- MME: a reply is yes / no when it is, or its first four characters contain it ("other" otherwise); per
  subtask, accuracy over questions plus accuracy+ over images (both questions of the image right); the
  perception score sums the 10 perception subtasks (max 2000), cognition the 4 cognition subtasks (max 800).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional, Sequence

__all__ = ["normalize_vqa_answer", "vqa_soft_score", "vqa_accuracy", "gqa_accuracy", "parse_option_letter",
           "scienceqa_accuracy", "parse_yes_no_pope", "pope_metrics", "parse_yes_no_mme", "mme_scores",
           "MME_PERCEPTION", "MME_COGNITION"]

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions written without their apostrophe. Words that are also ordinary words without one ("its", "ill",
# "well", "were", "shell", "hell", "wed", "lets", "id") are left alone.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "hows": "how's", "isnt": "isn't", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "shant": "shan't",
    "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "whats": "what's", "wheres": "where's", "whos": "who's", "whys": "why's",
    "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've", "oclock": "o'clock", "yall": "y'all", "im": "i'm", "ive": "i've",
}
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
# the punctuation the official evaluator replaces (symbols such as % and $ stay part of the answer)
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!]")


def normalize_vqa_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation (see the module docstring for the steps)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _COMMA_IN_NUMBER.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_soft_score(prediction: str, answers: Sequence[str]) -> float:
    """One question's soft accuracy in [0, 1]: min(matches among the other humans / 3, 1), mean over humans."""
    if len(answers) < 2:
        raise ValueError(f"soft accuracy needs several human answers (VQA has 10), got {len(answers)}")
    pred = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(a) for a in answers]
    matches = sum(h == pred for h in humans)
    # leaving out human i removes one match exactly when human i gave the prediction
    return sum(min((matches - (h == pred)) / 3.0, 1.0) for h in humans) / len(humans)


def _mean_percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else float("nan")


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean soft accuracy (%) over questions (VQAv2, VizWiz, TextVQA)."""
    _same_length(predictions, answers)
    return _mean_percent([vqa_soft_score(p, a) for p, a in zip(predictions, answers)])


def _gqa_normalize(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def gqa_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Exact-match accuracy (%) after lowercasing and dropping trailing periods."""
    _same_length(predictions, answers)
    return _mean_percent([float(_gqa_normalize(p) == _gqa_normalize(a)) for p, a in zip(predictions, answers)])


_LETTER_PATTERNS = (
    re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)"),  # "B", "B.", "(B)", "B) text", "B text"
    re.compile(r"answer is:?\s*\(?([A-Z])\)?(?:[.:)\s]|$)", re.IGNORECASE),
)


def parse_option_letter(reply: str, choices: Sequence[str]) -> Optional[int]:
    """Index of the option a reply names (its letter or its exact text), None when it names none."""
    text = reply.strip()
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    for pattern in _LETTER_PATTERNS:
        found = pattern.search(text)
        if found and found.group(1).upper() in letters:
            return letters.index(found.group(1).upper())
    lowered = text.rstrip(".").strip().lower()
    for index, choice in enumerate(choices):
        if lowered == str(choice).strip().lower():
            return index
    return None


def scienceqa_accuracy(predictions: Sequence[str], choices: Sequence[Sequence[str]],
                       answers: Sequence[int]) -> dict[str, float]:
    """{'accuracy': %, 'unparsed': % of replies naming no option (counted wrong)}."""
    _same_length(predictions, answers)
    picked = [parse_option_letter(p, c) for p, c in zip(predictions, choices)]
    return {"accuracy": _mean_percent([float(p == int(a)) for p, a in zip(picked, answers)]),
            "unparsed": _mean_percent([float(p is None) for p in picked])}


def parse_yes_no_pope(reply: str) -> str:
    """POPE's rule: 'no' if the first sentence has the word 'no' or 'not', else 'yes'."""
    first = reply.split(".")[0].replace(",", " ")
    words = {w.lower() for w in first.split()}
    return "no" if words & {"no", "not"} else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = 'yes') and the share of 'yes' replies, in %."""
    _same_length(predictions, labels)
    pred = [parse_yes_no_pope(p) == "yes" for p in predictions]
    gold = [_yes_no_label(label) == "yes" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": _mean_percent([float(p == g) for p, g in zip(pred, gold)]), "precision": 100.0 * precision,
            "recall": 100.0 * recall, "f1": 100.0 * f1, "yes_ratio": _mean_percent([float(p) for p in pred])}


def _yes_no_label(label: str) -> str:
    value = str(label).strip().lower()
    if value not in ("yes", "no"):
        raise ValueError(f"a yes/no benchmark label must be 'yes' or 'no', got {label!r}")
    return value


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "ocr")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no_mme(reply: str) -> str:
    """MME's rule: 'yes' / 'no' when the reply is that word or its first four characters contain it."""
    text = reply.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(predictions: Sequence[str], labels: Sequence[str], subtasks: Sequence[str],
               images: Sequence[str]) -> dict[str, float]:
    """Per-subtask score (accuracy + accuracy+), 'perception' and 'cognition' sums over the subtasks present."""
    _same_length(predictions, labels)
    if not len(subtasks) == len(images) == len(labels):
        raise ValueError(f"{len(labels)} labels, {len(subtasks)} subtasks and {len(images)} image ids")
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for pred, label, task, image in zip(predictions, labels, subtasks, images):
        name = str(task).strip().lower()
        if name not in MME_PERCEPTION and name not in MME_COGNITION:
            raise ValueError(f"unknown MME subtask {task!r}; known: {', '.join(MME_PERCEPTION + MME_COGNITION)}")
        per_image[name][str(image)].append(parse_yes_no_mme(pred) == _yes_no_label(label))
    out: dict[str, float] = {}
    for name, by_image in per_image.items():
        answers = [hit for hits in by_image.values() for hit in hits]
        out[f"mme_{name}"] = _mean_percent([float(h) for h in answers]) + \
            _mean_percent([float(all(hits)) for hits in by_image.values()])
    out["perception"] = sum(out.get(f"mme_{n}", 0.0) for n in MME_PERCEPTION)
    out["cognition"] = sum(out.get(f"mme_{n}", 0.0) for n in MME_COGNITION)
    return out


def _same_length(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
