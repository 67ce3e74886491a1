"""VQA benchmark metrics on hand-computed cases (definitions: visualqa.org/evaluation, GQA, ScienceQA, POPE, MME)."""

from __future__ import annotations

import math

import pytest

from pitome.tasks.vqa_metrics import (gqa_accuracy, mme_scores, normalize_vqa_answer, parse_option_letter,
                                      parse_yes_no_mme, parse_yes_no_pope, pope_metrics, scienceqa_accuracy,
                                      vqa_accuracy, vqa_soft_score)


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                       # lowercase, sentence period removed
    ("The dog", "dog"),                    # article
    ("a cat and an owl", "cat and owl"),   # articles inside
    ("Two", "2"),                          # number word
    ("none", "0"),
    ("3.5", "3.5"),                        # decimal point kept
    ("100,978", "100978"),                 # comma between digits removed without a space
    ("red, white", "red white"),           # other commas become a space
    ("black-and-white", "black and white"),
    ("dont", "don't"),                     # missing apostrophe added
    ("isnt it?", "isn't it"),
    ("girl's", "girl's"),                  # apostrophe kept (possessive)
    ("2:50 pm", "2:50 pm"),                # colon kept (time)
    ("  ten\tapples\n", "10 apples"),
    ("its", "its"),                        # an ordinary word, not forced to "it's"
    ("50%", "50%"),                        # symbols outside the evaluator's punctuation set stay
    ("a (big) dog!", "big dog"),
])
def test_vqa_normalisation(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_soft_score_leave_one_out() -> None:
    # 2 of 10 humans said "2": leaving out one of them leaves 1 match (1/3), leaving out any other leaves 2 (2/3):
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    answers = ["2", "two"] + ["3"] * 8
    assert vqa_soft_score("Two.", answers) == pytest.approx(0.6)
    # 3 humans: 3 * min(2/3, 1) + 7 * 1 over 10 = 0.9
    assert vqa_soft_score("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # 4 or more humans: always 1
    assert vqa_soft_score("yes", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    assert vqa_soft_score("maybe", ["yes"] * 10) == 0.0
    # 1 human: 9 subsets see it (1/3 each), the subset without it sees none: 9/30
    assert vqa_soft_score("the blue", ["Blue"] + ["red"] * 9) == pytest.approx(0.3)


def test_vqa_accuracy_is_a_percentage_mean() -> None:
    answers = [["yes"] * 10, ["2", "two"] + ["3"] * 8]
    assert vqa_accuracy(["Yes", "2"], answers) == pytest.approx(100 * (1.0 + 0.6) / 2)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        vqa_accuracy(["a", "b"], [["a"] * 10])
    with pytest.raises(ValueError, match="several human answers"):
        vqa_soft_score("a", ["a"])


def test_gqa_exact_match() -> None:
    assert gqa_accuracy(["Left.", "the table", "no"], ["left", "table", "no"]) == pytest.approx(200 / 3)


@pytest.mark.parametrize("reply, index", [
    ("B", 1), ("B.", 1), ("(C)", 2), ("A) cat", 0), ("The answer is C.", 2), ("dog", 1), ("Dog.", 1),
    ("E", None), ("I think so", None), ("", None),
])
def test_option_letter(reply: str, index: object) -> None:
    assert parse_option_letter(reply, ["cat", "dog", "owl"]) == index


def test_scienceqa_accuracy_counts_unparsed_as_wrong() -> None:
    out = scienceqa_accuracy(["A", "B", "maybe", "C"], [["x", "y"], ["x", "y"], ["x", "y"], ["p", "q", "r"]],
                             [0, 0, 1, 2])
    assert out == {"accuracy": 50.0, "unparsed": 25.0}


def test_pope() -> None:
    assert parse_yes_no_pope("No, there is not.") == "no"
    assert parse_yes_no_pope("Yes. There is no cat elsewhere.") == "yes"  # only the first sentence counts
    assert parse_yes_no_pope("There is not a dog") == "no"
    assert parse_yes_no_pope("Nothing") == "yes"  # whole words only
    preds = ["yes", "yes", "no", "no", "Yes, there is.", "no"]
    gold = ["yes", "no", "yes", "no", "yes", "no"]
    # TP 2 (0, 4), FP 1 (1), FN 1 (2), TN 2 (3, 5)
    out = pope_metrics(preds, gold)
    assert out["accuracy"] == pytest.approx(400 / 6)
    assert out["precision"] == pytest.approx(200 / 3) and out["recall"] == pytest.approx(200 / 3)
    assert out["f1"] == pytest.approx(200 / 3)
    assert out["yes_ratio"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


def test_mme_scores() -> None:
    assert parse_yes_no_mme("Yes") == "yes" and parse_yes_no_mme("No, it is not") == "no"
    assert parse_yes_no_mme("The answer is yes") == "other"
    # existence: image a both right, image b one right -> acc 75, acc+ 50 -> 125
    # count: image c both wrong -> 0; code_reasoning: image d both right -> 200
    preds = ["yes", "no", "yes", "yes", "no", "yes", "Yes", "No"]
    gold = ["yes", "no", "yes", "no", "yes", "no", "yes", "no"]
    tasks = ["existence"] * 4 + ["count"] * 2 + ["code_reasoning"] * 2
    images = ["a", "a", "b", "b", "c", "c", "d", "d"]
    out = mme_scores(preds, gold, tasks, images)
    assert out["mme_existence"] == pytest.approx(125.0)
    assert out["mme_count"] == 0.0
    assert out["perception"] == pytest.approx(125.0) and out["cognition"] == pytest.approx(200.0)
    with pytest.raises(ValueError, match="unknown MME subtask"):
        mme_scores(["yes"], ["yes"], ["colour"], ["a"])
    assert math.isnan(vqa_accuracy([], []))
