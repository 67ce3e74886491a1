"""Pictures of what merged: groups of image patches painted in their mean colour and outlined, energy heatmaps,
and merged words in a terminal (ANSI colours) or HTML page.

Why: a source map (``pitome.info(model).source`` with ``trace_source=True``) says which output token holds each
original token; turned into a label per patch it shows at a glance whether merges follow objects (PiToMe's aim)
or cut across them. numpy and Pillow only; matplotlib only for the heatmap colours (lazily).
"""

from __future__ import annotations

import html as html_lib
from typing import Optional, Sequence

import numpy as np

__all__ = ["grid_shape", "patch_labels", "pixel_labels", "paint_groups", "heatmap", "patch_values",
           "compose", "canvas_size", "with_header", "with_colorbar", "text_groups", "ansi_groups", "plain_groups", "html_groups"]

OUTLINE = np.array([20, 20, 20], dtype=np.uint8)
PAD = 6          # pixels between panels
TITLE_H = 18     # height of the column-title strip
LABEL_W = 90     # width of the row-label strip


# --- labels -------------------------------------------------------------------------------------------------

def grid_shape(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of an image of this aspect ratio with ``num_patches`` patches."""
    rows = int(round((num_patches * height / width) ** 0.5))
    if rows < 1 or num_patches % rows:
        raise ValueError(f"{num_patches} patches do not form a grid for a {height}x{width} image")
    return rows, num_patches // rows


def patch_labels(source: Sequence[int], num_protected: int, grid: tuple[int, int]) -> np.ndarray:
    """Group id of every original patch (source map of ONE sample without its protected tokens), as a grid."""
    src = np.asarray(source, dtype=np.int64)[num_protected:]
    if src.size != grid[0] * grid[1]:
        raise ValueError(f"source map has {src.size} patch tokens, the grid {grid} needs {grid[0] * grid[1]}")
    return src.reshape(grid)


def pixel_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-patch upsampling of a (rows, cols, ...) grid to (height, width, ...)."""
    rows, cols = labels.shape[:2]
    ys = np.minimum(np.arange(height) * rows // height, rows - 1)
    xs = np.minimum(np.arange(width) * cols // width, cols - 1)
    return labels[ys][:, xs]


def _boundaries(pix: np.ndarray) -> np.ndarray:
    edge = np.zeros(pix.shape, dtype=bool)
    edge[:, 1:] |= pix[:, 1:] != pix[:, :-1]
    edge[1:, :] |= pix[1:, :] != pix[:-1, :]
    return edge


def paint_groups(image: np.ndarray, labels: np.ndarray, outline: bool = True) -> np.ndarray:
    """Each group painted with the mean colour of its pixels; group borders drawn dark (uint8 (H, W, 3)).

    Dropped tokens (label -1) are painted black.
    """
    h, w = image.shape[:2]
    pix = pixel_labels(labels, h, w)
    flat = pix.reshape(-1)
    ids, inverse = np.unique(flat, return_inverse=True)
    colours = np.zeros((len(ids), 3), dtype=np.float64)
    np.add.at(colours, inverse, image.reshape(-1, 3).astype(np.float64))
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    colours /= counts[:, None]
    colours[ids < 0] = 0.0
    out = np.rint(colours[inverse]).astype(np.uint8).reshape(h, w, 3)
    if outline:
        out[_boundaries(pix)] = OUTLINE
    return out


def patch_values(values: Sequence[float], source: Sequence[int], num_protected: int,
                 grid: tuple[int, int]) -> np.ndarray:
    """Lift per-token values (over the current mergeable tokens) to the original patches through a source map."""
    vals = np.asarray(values, dtype=np.float64)
    labels = patch_labels(source, num_protected, grid) - num_protected
    out = np.full(labels.shape, np.nan)
    ok = labels >= 0
    out[ok] = vals[labels[ok]]
    return out


def heatmap(values: np.ndarray, height: int, width: int, cmap: str = "magma", lo: Optional[float] = None,
            hi: Optional[float] = None) -> np.ndarray:
    """(rows, cols) values -> uint8 (height, width, 3) colour image, scaled to [lo, hi] (default: its own min and
    max; NaN = grey). Give lo / hi to share one colour scale (and one colour bar) between panels."""
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    own_lo, own_hi = (v[finite].min(), v[finite].max()) if finite.any() else (0.0, 1.0)
    lo, hi = own_lo if lo is None else lo, own_hi if hi is None else hi
    scaled = np.clip(np.where(finite, (v - lo) / (hi - lo if hi > lo else 1.0), 0.0), 0.0, 1.0)
    rgb = (colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)
    rgb[~finite] = 128
    return pixel_labels(rgb, height, width)


# --- layout -------------------------------------------------------------------------------------------------

def canvas_size(rows: int, cols: int, panel: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of ``compose``'s output for a rows x cols grid of (h, w) panels."""
    ph, pw = panel
    return TITLE_H + rows * (ph + PAD) + PAD, LABEL_W + cols * (pw + PAD) + PAD


def compose(panels: Sequence[Sequence[Optional[np.ndarray]]], row_labels: Sequence[str],
            col_titles: Sequence[str]) -> np.ndarray:
    """Grid of equally sized uint8 panels (None = blank) on white, with row labels and column titles."""
    from PIL import Image, ImageDraw

    rows, cols = len(panels), max(len(r) for r in panels)
    first = next(p for row in panels for p in row if p is not None)
    ph, pw = first.shape[:2]
    height, width = canvas_size(rows, cols, (ph, pw))
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for i, row in enumerate(panels):
        for j, panel in enumerate(row):
            if panel is None:
                continue
            if panel.shape[:2] != (ph, pw):
                raise ValueError(f"panel ({i}, {j}) is {panel.shape[:2]}, expected {(ph, pw)}")
            top, left = TITLE_H + PAD + i * (ph + PAD), LABEL_W + PAD + j * (pw + PAD)
            canvas[top:top + ph, left:left + pw] = panel[..., :3]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for j, title in enumerate(col_titles):
        draw.text((LABEL_W + PAD + j * (pw + PAD), 3), title, fill=(0, 0, 0))
    for i, label in enumerate(row_labels):
        y = TITLE_H + PAD + i * (ph + PAD) + ph // 2 - 12
        for k, line in enumerate(label.split("\n")):
            draw.text((4, y + 12 * k), line, fill=(0, 0, 0))
    return np.asarray(img)


def _font(size: int) -> object:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        return ImageFont.load_default()


def with_header(image: np.ndarray, lines: Sequence[str], size: int = 13) -> np.ndarray:
    """``image`` below a white strip holding ``lines`` (a title, then a subtitle naming model and weights)."""
    from PIL import Image, ImageDraw

    height = 6 + (size + 5) * len(lines)
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + height), "white")
    canvas.paste(Image.fromarray(image), (0, height))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((4, 4 + (size + 5) * k), line, fill=(0, 0, 0) if k == 0 else (70, 70, 70), font=_font(size))
    return np.asarray(canvas)


def with_colorbar(image: np.ndarray, top: int, height: int, lo: float, hi: float, label: str,
                  cmap: str = "magma", width: int = 16) -> np.ndarray:
    """``image`` with a vertical colour bar on its right, beside rows ``top``..``top + height`` (high at the top),
    its end values, and a label."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    strip = 110
    canvas = Image.new("RGB", (image.shape[1] + strip, image.shape[0]), "white")
    canvas.paste(Image.fromarray(image), (0, 0))
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(width, axis=1)
    bar = (colormaps[cmap](ramp)[..., :3] * 255).round().astype(np.uint8)
    left = image.shape[1] + 6
    canvas.paste(Image.fromarray(bar), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((left, top, left + width - 1, top + height - 1), outline=(0, 0, 0))
    font = _font(11)
    draw.text((left + width + 4, top), f"{hi:.3g}", fill=(0, 0, 0), font=font)
    draw.text((left + width + 4, top + height - 12), f"{lo:.3g}", fill=(0, 0, 0), font=font)
    for k, line in enumerate(label.split("\n")):
        draw.text((left + width + 4, top + height // 2 - 12 + 12 * k), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


# --- text ---------------------------------------------------------------------------------------------------

_ANSI_BG = (41, 42, 43, 44, 45, 46, 101, 102, 103, 104, 105, 106)
_HTML_BG = ("#fbb4ae", "#b3cde3", "#ccebc5", "#decbe4", "#fed9a6", "#ffffcc", "#e5d8bd", "#fddaec",
            "#b3e2cd", "#fdcdac", "#cbd5e8", "#f4cae4")


def text_groups(source: Sequence[int]) -> dict[int, list[int]]:
    """{output slot: [original token positions]} for the slots holding more than one token."""
    groups: dict[int, list[int]] = {}
    for pos, slot in enumerate(source):
        if slot >= 0:
            groups.setdefault(int(slot), []).append(pos)
    return {slot: members for slot, members in groups.items() if len(members) > 1}


def _colour_index(source: Sequence[int]) -> dict[int, int]:
    """Merged group of each token position -> colour number (groups numbered by first appearance)."""
    order: dict[int, int] = {}
    out: dict[int, int] = {}
    for slot, members in sorted(text_groups(source).items(), key=lambda kv: kv[1][0]):
        order[slot] = len(order)
        for pos in members:
            out[pos] = order[slot]
    return out


def _join(token: str, first: bool) -> tuple[str, str]:
    """(separator, text) for a WordPiece / SentencePiece token: '##x' glues to the previous one."""
    if token.startswith("##"):
        return "", token[2:]
    if token.startswith("▁"):
        return ("" if first else " "), token[1:]
    return ("" if first else " "), token


def ansi_groups(tokens: Sequence[str], source: Sequence[int]) -> str:
    """Tokens with merged groups on coloured backgrounds (same colour = same merged token)."""
    colour = _colour_index(source)
    parts = []
    for pos, token in enumerate(tokens):
        sep, text = _join(token, pos == 0)
        if pos in colour:
            text = f"\x1b[30;{_ANSI_BG[colour[pos] % len(_ANSI_BG)]}m{text}\x1b[0m"
        parts.append(sep + text)
    return "".join(parts)


def plain_groups(tokens: Sequence[str], source: Sequence[int]) -> str:
    """Tokens with the number of their merged group in braces (for logs and pipes: no colours)."""
    colour = _colour_index(source)
    parts = []
    for pos, token in enumerate(tokens):
        sep, text = _join(token, pos == 0)
        parts.append(sep + text + (f"{{{colour[pos] + 1}}}" if pos in colour else ""))
    return "".join(parts)


def html_groups(tokens: Sequence[str], source: Sequence[int], title: str = "") -> str:
    """An HTML fragment: merged groups as coloured spans; hovering shows the group's members."""
    colour = _colour_index(source)
    groups = text_groups(source)
    members_of = {pos: members for members in groups.values() for pos in members}
    parts = [f"<h3>{html_lib.escape(title)}</h3><p style='line-height:1.9;font-family:sans-serif'>" if title else
             "<p style='line-height:1.9;font-family:sans-serif'>"]
    for pos, token in enumerate(tokens):
        sep, text = _join(token, pos == 0)
        text = html_lib.escape(text)
        if pos in colour:
            members = " ".join(tokens[m] for m in members_of[pos])
            text = (f"<span style='background:{_HTML_BG[colour[pos] % len(_HTML_BG)]};padding:1px 2px' "
                    f"title='{html_lib.escape(members)}'>{text}</span>")
        parts.append(sep + text)
    parts.append("</p>")
    return "".join(parts)
