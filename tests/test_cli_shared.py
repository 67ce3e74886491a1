"""The shared command-line layer: model specs, shared flags, merge settings, results folders, the entry point."""

from __future__ import annotations

import json
import os
import pytest

from pitome.cli import main
from pitome.cli.errors import UserError, did_you_mean
from pitome.cli.flags import (Parser, add_merge_flags, add_model_flags, add_output_flags, add_runtime_flags,
                              merge_choices)
from pitome.loading import check_model_spec, load_model, parse_model_spec
from pitome.results import ResultsFolder
from pitome.setting import MergeSetting

def _parser() -> Parser:
    parser = Parser(prog="test")
    add_model_flags(parser)
    add_merge_flags(parser)
    add_runtime_flags(parser)
    add_output_flags(parser)
    return parser


# --- model specs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, source, name, tag", [
    ("timm:vit_tiny_patch16_224", "timm", "vit_tiny_patch16_224", None),
    ("hf:google/vit-base-patch16-224", "hf", "google/vit-base-patch16-224", None),
    ("openclip:ViT-B-16/laion2b_s34b_b88k", "openclip", "ViT-B-16", "laion2b_s34b_b88k"),
    ("openclip:ViT-B-16", "openclip", "ViT-B-16", None),
    ("dinov2-s", "builtin", "dinov2-s", None), ("minilm", "builtin", "minilm", None),
    ("tiny-vit", "builtin", "tiny-vit", None), ("deit_small_patch16_224", "bare", "deit_small_patch16_224", None),
])
def test_spec_grammar(text, source, name, tag):
    spec = parse_model_spec(text)
    assert (spec.source, spec.name, spec.tag) == (source, name, tag)


@pytest.mark.parametrize("text, message", [
    ("", "non-empty"), ("tim:deit_tiny_patch16_224", "did you mean 'timm'"), ("timm:", "names no model"),
])
def test_spec_syntax_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_model_spec(text)


def test_bare_name_is_tried_as_timm_then_hf(tmp_path):
    pytest.importorskip("timm")
    assert check_model_spec("deit_tiny_patch16_224").source == "timm"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert check_model_spec(str(folder)).source == "hf"
    with pytest.raises(UserError, match="did you mean 'deit_tiny_patch16_224'"):
        check_model_spec("deit_tiny_patch16_22")
    with pytest.raises(UserError, match="unknown timm model"):
        check_model_spec("timm:does_not_exist")
    with pytest.raises(UserError, match="no config.json"):
        check_model_spec(f"hf:{tmp_path}")


def test_tiny_models_load_and_say_their_weights_are_random():
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    vit = load_model("tiny-vit", weights="pretrained", model_kwargs={"depth": 2})
    assert vit.random and "RANDOM" in vit.describe() and vit.modality == "image"
    assert vit.forward(vit.random_inputs(2)).shape == (2, 10)
    bert = load_model("tiny-bert", head="classifier")
    assert bert.random and bert.modality == "text"
    assert bert.forward(bert.random_inputs(2, seq_len=16)).logits.shape[0] == 2
    with pytest.raises(UserError, match="does not accept"):
        load_model("tiny-vit", model_kwargs={"no_such_argument": 1})
    with pytest.raises(UserError, match="image size"):
        load_model("tiny-vit", image_size=5)


def test_timm_random_weights_are_labelled():
    pytest.importorskip("timm")
    model = load_model("timm:vit_tiny_patch16_224", weights="random", model_kwargs={"depth": 1}, image_size=32)
    assert model.weights_note.startswith("random init") and model.image_size == (32, 32)


# --- flags ------------------------------------------------------------------------------------------------

def test_parser_errors_are_user_errors():
    with pytest.raises(UserError, match="keep-ratio"):
        _parser().parse_args(["--ratios", "2"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        _parser().parse_args(["--option", "margin"])
    with pytest.raises(UserError, match="unknown device"):
        _parser().parse_args(["--device", "gpu"])
    with pytest.raises(UserError, match="did you mean 'timm'"):
        _parser().parse_args(["--model", "tim:x"])


def test_merge_choices_validate_names_and_options():
    args = _parser().parse_args(["--algorithms", "pitome,tome", "kth", "--ratios", "0.9", "0.8",
                                 "--option", "margin=0.8", "--option", "prop_attn=false"])
    choices = merge_choices(args)
    assert choices.algorithms == ["pitome", "tome", "kth"] and choices.ratios == [0.9, 0.8]
    assert choices.options_for("pitome") == {"margin": 0.8, "prop_attn": False}
    assert choices.options_for("tome") == {"prop_attn": False}
    settings = choices.settings()
    assert settings[0] == MergeSetting() and len(settings) == 1 + 3 * 2
    with pytest.raises(UserError, match="did you mean 'pitome'"):
        merge_choices(_parser().parse_args(["--algorithms", "pitme"]))
    with pytest.raises(UserError, match="preset"):
        merge_choices(_parser().parse_args(["--preset", "deitt"]))
    with pytest.raises(UserError, match="not accepted"):
        merge_choices(_parser().parse_args(["--algorithms", "tome", "--option", "margin=0.8"]))
    with pytest.raises(UserError, match="pitome"):
        merge_choices(_parser().parse_args(["--algorithms", "pitome", "--option", "margin=abc"]))


def test_default_budget_and_auto():
    choices = merge_choices(_parser().parse_args(["--algorithms", "auto", "tome", "--r", "4"]))
    assert choices.ratios == [] and choices.rs == [4]
    auto = choices.settings(unmerged=False)[0]
    assert auto.display == "auto" and auto.preset == "auto" and auto.patch_kwargs() == {"preset": "auto", "r": 4}
    assert merge_choices(_parser().parse_args([]), text=True).algorithms == ["pitome_text", "tome"]


# --- merge settings ---------------------------------------------------------------------------------------

def test_setting_labels_and_json_round_trip():
    setting = MergeSetting.make("tome", r=8, equal_flops_to=MergeSetting.make("tome", ratio=0.9), prop_attn=False)
    assert setting.label == "tome r=8 (FLOPs of ratio 0.9) prop_attn=false"
    assert setting.match_ratio == 0.9 and not setting.solved
    assert MergeSetting.from_dict(json.loads(json.dumps(setting.to_dict()))) == setting
    solved = MergeSetting.make("pitome", flops_reduction=0.3, layers=[0, 1])
    assert solved.budget == "-30% FLOPs" and solved.solved
    with pytest.raises(ValueError, match="solved per model"):
        solved.patch_kwargs()
    assert solved.with_budget(ratio=0.85).patch_kwargs() == {"algorithm": "pitome", "ratio": 0.85, "layers": [0, 1]}
    assert MergeSetting().label == "unmerged" and not MergeSetting().merges
    assert hash(setting) == hash(MergeSetting.from_dict(setting.to_dict()))


def test_setting_patches_a_model(make_vit, images):
    import pitome

    model = make_vit(depth=2)
    with MergeSetting.make("pitome", ratio=0.8).applied(model):
        model(images())
        assert pitome.info(model).tokens_per_layer[-1] < 65
    assert not pitome.is_patched(model)


# --- results folders --------------------------------------------------------------------------------------

def test_results_folder_streams_rows(tmp_path):
    folder = ResultsFolder.create(tmp_path / "out", "eval offline", stamp="20260101-000000")
    assert folder.path.name == "20260101-000000-eval-offline" and folder.path.is_dir()
    again = ResultsFolder.create(tmp_path / "out", "eval offline", stamp="20260101-000000")
    assert again.path.name.endswith("-2")
    folder.append({"algorithm": "pitome", "accuracy": 0.5, "tokens": [3, 2]})
    folder.append({"algorithm": "tome", "accuracy": float("nan"), "fidelity": 0.9})
    assert ResultsFolder.read_rows(folder.path)[1] == {"algorithm": "tome", "accuracy": None, "fidelity": 0.9}
    lines = (folder.path / "rows.csv").read_text().splitlines()
    assert lines[0] == "algorithm,accuracy,tokens,fidelity" and lines[1] == 'pitome,0.5,"[3, 2]",'
    with (folder.path / "rows.jsonl").open("a") as handle:
        handle.write('{"torn')  # a kill mid-write
    assert len(ResultsFolder.read_rows(folder.path)) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_is_a_user_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            ResultsFolder.check_parent(locked / "sub")
        with pytest.raises(UserError, match="cannot create"):
            ResultsFolder.create(locked, "x")
    finally:
        locked.chmod(0o700)


def test_out_that_is_a_file_is_a_user_error(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(UserError, match="is a file"):
        ResultsFolder.check_parent(file / "sub")


# --- entry point ------------------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("pitome 0.")


def test_unknown_verb_is_one_line(capsys):
    assert main(["benhc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice" in err
