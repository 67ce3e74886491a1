"""docs/extending.md is executed: its ```python blocks run in order as one script (tiny models, no downloads).
Also: a registered adapter is tried before the built-in ones."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import pitome
from pitome.adapters import ADAPTERS, find_adapter, register_adapter
from pitome.adapters.timm_vit import TimmViTAdapter
from pitome.algorithms import ALGORITHMS

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def test_extending_doc_runs():
    pytest.importorskip("timm")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    module = types.ModuleType("extending_doc")  # a real module: dataclasses look their module up
    namespace = module.__dict__
    sys.modules[module.__name__] = module
    adapters_before = list(ADAPTERS)
    try:
        exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)
        assert "neighbour_pairs" in pitome.available_algorithms()
        assert type(find_adapter(namespace["TinyEncoder"]())) is namespace["TinyEncoderAdapter"]
        from pitome.flops import find_blocks

        encoder = namespace["TinyEncoder"]()
        assert find_blocks(encoder) is encoder.layers
    finally:
        ALGORITHMS.pop("neighbour_pairs", None)
        ADAPTERS[:] = adapters_before
        sys.modules.pop(module.__name__, None)


def test_registered_adapters_take_precedence_over_built_ins(make_vit, images):
    calls = []

    class MyTimm(TimmViTAdapter):
        name = "my_timm"

        def patch(self, model, settings):
            calls.append(type(model).__name__)
            super().patch(model, settings)

    before = list(ADAPTERS)
    try:
        assert register_adapter(MyTimm) is MyTimm and ADAPTERS[0] is MyTimm
        model = make_vit()
        assert type(find_adapter(model)) is MyTimm
        pitome.patch(model, ratio=0.8)
        with torch.no_grad():
            model(images(1))
        assert calls == ["VisionTransformer"] and pitome.info(model).tokens_per_layer[-1] < 65
        with pytest.raises(TypeError, match="subclass of pitome.adapters.Adapter"):
            register_adapter(object)  # type: ignore[arg-type]
    finally:
        ADAPTERS[:] = before
