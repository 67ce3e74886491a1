"""ONNX export of a patched model: the merge (similarities, energy, sort, scatter) is part of the graph, so the
exported model merges each input as the eager one does; checked with onnxruntime on inputs not seen at export."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pitome

pytestmark = pytest.mark.slow  # compile / export / real assets / processes: minutes

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path))
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("algorithm, budget", [("pitome", dict(ratio=0.8)), ("tome", dict(r=6))])
def test_dynamo_export_with_dynamic_batch_matches_eager(make_vit, images, tmp_path, algorithm, budget):
    model = pitome.patch(make_vit(), algorithm=algorithm, **budget)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (images(2),), path, dynamo=True,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    for batch, seed in ((1, 5), (3, 6)):
        x = images(batch, seed=seed)
        with torch.no_grad():
            expected = model(x)
        assert pitome.info(model).tokens_per_layer[-1] < 65
        np.testing.assert_allclose(_run(path, x), expected.numpy(), atol=1e-5, rtol=1e-5)


def test_torchscript_export_matches_eager(make_vit, images, tmp_path):
    model = pitome.patch(make_vit(), ratio=0.8)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (images(2),), path, dynamo=False, opset_version=18)
    x = images(2, seed=7)
    with torch.no_grad():
        expected = model(x)
    np.testing.assert_allclose(_run(path, x), expected.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_hugging_face_vision_towers_export(tmp_path, family):
    """transformers builds an explicit all-attend mask while exporting; after a merge the size bias replaces it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8)
    if family == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**common)).eval()
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common)).eval()
    pitome.patch(model, ratio=0.8)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), path, dynamo=True, input_names=["pixel_values"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(pixel_values=x).pooler_output
    assert pitome.info(model).tokens_per_layer[-1] < 17
    session = ort.InferenceSession(str(path))
    outputs = session.run(None, {"pixel_values": x.numpy()})
    pooled = [o for o in outputs if o.shape == tuple(expected.shape)]
    assert pooled and min(np.abs(o - expected.numpy()).max() for o in pooled) < 1e-5
    with torch.no_grad(), pytest.raises(ValueError, match="attention_mask"):  # a caller's own mask still errors
        model(pixel_values=x, attention_mask=torch.ones(2, 1, 17, 17, dtype=torch.bool))


def test_text_encoder_without_padding_mask_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100)
    model = pitome.patch(transformers.BertModel(config).eval(), preset="bert", ratio=0.8)
    path = tmp_path / "bert.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randint(1, 100, (2, 20)),), path, dynamo=True, input_names=["input_ids"])
    ids = torch.randint(1, 100, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    assert expected.shape[1] < 20
    session = ort.InferenceSession(str(path))
    np.testing.assert_allclose(session.run(None, {"input_ids": ids.numpy()})[0], expected.numpy(), atol=1e-5, rtol=1e-5)
