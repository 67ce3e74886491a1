"""`pitome calibrate`: validation before loading (one line, exit 2), a JSON that pitome.patch and a MergeSetting
with ``budgets`` apply, unreachable targets as user errors."""

from __future__ import annotations

import json

import pytest
import torch

import pitome
from pitome.cli import main
from pitome.setting import MergeSetting

pytest.importorskip("timm")


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["calibrate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_writes_a_calibration_that_patch_applies(tmp_path, capsys):
    out = tmp_path / "budgets.json"
    code, stdout, _ = _run(capsys, "--model", "tiny-vit", "--weights", "random", "--data", "random", "--items", "8",
                           "--flops-reduction", "0.4", "--max-forwards", "8", "--out", str(out))
    assert code == 0 and "FLOPs removed" in stdout
    saved = json.loads(out.read_text())
    assert saved["format"] == "pitome.calibration/1" and len(saved["ratios"]) == 4
    calibration = pitome.Calibration.load(out)
    assert calibration.target_reduction == pytest.approx(0.4)
    from pitome.loading import load_model

    model = load_model("tiny-vit", weights="random").module
    pitome.patch(model, calibrate=str(out))
    assert list(pitome.settings(model).config.ratio) == list(calibration.ratios)
    setting = MergeSetting.make("pitome", ratio=0.9, budgets=str(out))  # what --budgets gives eval / bench
    assert setting.patch_kwargs()["ratio"] == list(calibration.ratios)
    assert setting.patch_kwargs()["preset"] == "auto"


@pytest.mark.parametrize("args, message", [
    (["--flops-reduction", "0"], "must be in (0, 1)"),
    (["--flops-reduction", "1.2"], "FLOPs reduction"),
    (["--data", "no/such/folder"], "no such file or folder"),
    (["--out", "budgets.txt"], "must name a .json file"),
    (["--out", "no/such/dir/b.json"], "does not exist"),
    (["--preset", "nope"], "unknown preset"),
    (["--model", "timm:"], "model"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    base = {"--model": "tiny-vit", "--data": "random", "--flops-reduction": "0.4", "--out": str(tmp_path / "b.json")}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    flat = [item for pair in base.items() for item in pair] + ["--weights", "random"]
    code, _, err = _run(capsys, *flat)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_unreachable_target_is_a_user_error(tmp_path, capsys):
    code, _, err = _run(capsys, "--model", "tiny-vit", "--weights", "random", "--data", "random", "--items", "4",
                        "--flops-reduction", "0.97", "--out", str(tmp_path / "b.json"))
    assert code == 2 and "reachable range is 0% to" in err
    assert not (tmp_path / "b.json").exists()


def test_text_data_from_a_file(tmp_path):
    from pitome.calibrate_cli import load_inputs

    class Tokenizer:
        def __call__(self, texts, **kwargs):
            ids = torch.zeros(len(texts), 5, dtype=torch.long)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    class Loaded:
        modality, name, tokenizer = "text", "fake", Tokenizer()

    data = tmp_path / "notes.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"note {i}"}) for i in range(5)))
    batch = load_inputs(Loaded(), str(data), items=3, seed=0, text_column="body")
    assert batch["input_ids"].shape == (3, 5)
    with pytest.raises(ValueError, match="no column 'text'"):
        load_inputs(Loaded(), str(data), items=3, seed=0)
