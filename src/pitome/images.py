"""Images for the picture verbs: bundled samples (scikit-image / scikit-learn, no download) or files, and the
centre crop a model sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cli.errors import UserError, did_you_mean

__all__ = ["SAMPLE_IMAGES", "sample_image", "check_image_names", "square_crop"]

_SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "horse", "camera")
_SKLEARN = ("china", "flower")
SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "horse", "china", "flower")


def check_image_names(names: list[str]) -> None:
    """Each name is a bundled sample or an existing file (checked before any model loads)."""
    for name in names:
        if name not in _SKIMAGE + _SKLEARN and not Path(name).is_file():
            raise UserError(f"image {name!r} is neither a file nor a bundled sample"
                            f"{did_you_mean(name, SAMPLE_IMAGES)}; samples: {', '.join(SAMPLE_IMAGES)}")


def sample_image(name: str) -> np.ndarray:
    """A bundled sample or an image file, as uint8 (H, W, 3)."""
    check_image_names([name])
    if name in _SKIMAGE:
        import skimage.data

        img = np.asarray(getattr(skimage.data, name)())
    elif name in _SKLEARN:
        from sklearn.datasets import load_sample_image

        img = np.asarray(load_sample_image(f"{name}.jpg"))
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(name) as opened:
                img = np.asarray(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"cannot read {name} as an image ({exc})") from None
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def square_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop resized to ``size`` x ``size`` (uint8 RGB); what the model sees, before normalising."""
    from PIL import Image

    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(img[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.BICUBIC))
