"""One plotting style for every verb: a distinct colour *and* marker per algorithm (the same in every figure),
the unmerged model as a black star, legends outside the axes, titles that wrap instead of clipping, and a
subtitle naming model, weights (random flagged), device and batch.

matplotlib is optional: ``pyplot()`` raises ``UserError`` with the install command when it is missing.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .cli.errors import UserError

__all__ = ["style", "pyplot", "subtitle", "titled", "legend_outside", "save", "metric_label", "UNMERGED"]

UNMERGED = "unmerged"
# Okabe-Ito and Tol's bright/muted palettes: distinguishable in colour-blind vision; markers differ as well,
# so two lines never share both.
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#56B4E9", "#CC79A7", "#E69F00", "#882255", "#999933", "#AA4499",
            "#661100", "#6699CC", "#332288", "#888888", "#44AA99")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "H", "d", "8")  # no "*": that is the unmerged model
# fixed slots so an algorithm looks the same in every figure, whichever others are plotted with it
_ORDER = ("pitome", "tome", "auto", "pitome_text", "pitome_bsm", "tofu", "dct", "diffrate", "mctf", "crossget",
          "kth", "evit", "random")

METRIC_LABELS = {
    "top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)", "accuracy": "accuracy (%)",
    "probe_acc": "linear-probe accuracy (%)", "knn_acc": "k-NN accuracy (%)", "rsum": "recall sum (R@1+5+10, both ways)",
    "t2i_r1": "text→image R@1 (%)", "i2t_r1": "image→text R@1 (%)", "agreement": "agreement with unmerged (%)",
    "fidelity": "fidelity (cosine to unmerged, 1 = same)", "gflops": "GFLOPs per item (multiply-accumulates)",
    "items_per_s": "throughput (items / s)", "flops_kept": "FLOPs kept (fraction of unmerged)",
}


def style(name: str) -> dict[str, Any]:
    """matplotlib keyword arguments (color, marker, markersize, linestyle) for an algorithm name."""
    if name == UNMERGED:
        return {"color": "black", "marker": "*", "markersize": 14, "linestyle": "none", "zorder": 5}
    if name in _ORDER:
        slot = _ORDER.index(name)
    else:  # a new algorithm: a stable slot after the known ones
        slot = len(_ORDER) + sum(map(ord, name)) % (len(_COLOURS) - len(_ORDER) + len(_MARKERS))
    return {"color": _COLOURS[slot % len(_COLOURS)], "marker": _MARKERS[slot % len(_MARKERS)], "markersize": 6,
            "linestyle": "--" if name == "auto" else "-", "linewidth": 1.4}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install -e '.[plot]' (or pass --no-plot)") from None
    return plt


def subtitle(model: str, weights_note: str, random: bool, device: str = "", batch: Optional[int] = None,
             extra: str = "") -> str:
    """'DINOv2-S/14, pretrained (...), cpu, batch 32' with random weights shouted."""
    parts = [model, ("RANDOM WEIGHTS (not a real model's accuracy)" if random else weights_note)]
    parts += [p for p in (device, f"batch {batch}" if batch else "", extra) if p]
    return ", ".join(parts)


def titled(fig: Any, title: str, sub: str = "", width: int = 90) -> None:
    """A wrapped title and a smaller subtitle above all panels."""
    text = "\n".join(textwrap.wrap(title, width))
    if sub:
        text += "\n" + "\n".join(textwrap.wrap(sub, int(width * 1.25)))
    fig.suptitle(text, fontsize=10, x=0.01, horizontalalignment="left")


def legend_outside(fig: Any, axes: Sequence[Any]) -> None:
    """One legend for all panels, right of the axes (never over a data point)."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def save(fig: Any, path: Union[str, Path], dpi: int = 130) -> Path:
    """PNG with everything inside the image (legend outside the axes included)."""
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
