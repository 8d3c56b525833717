"""Small generic figures: image grids (real vs synthetic, per class), used by several notebooks."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _to_hwc(img) -> np.ndarray:
    """uint8 HxWx3 from a CHW / HWC tensor or array, a float image in [0, 1], or a PIL image."""
    if hasattr(img, "mode") and hasattr(img, "size") and not hasattr(img, "shape"):  # PIL
        return np.asarray(img.convert("RGB"))
    if hasattr(img, "detach"):
        img = img.detach().cpu().numpy()
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    elif a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    elif a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] in (1, 3) and a.shape[0] != a.shape[-1]:
        a = np.transpose(a, (1, 2, 0))
    elif a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] == 3:
        a = np.transpose(a, (1, 2, 0))  # ambiguous 3x3: CHW, as tensors are
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.max(initial=0) <= 1.0 + 1e-6:
            a = a * 255.0
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return a


def _finish(fig, suptitle: str | None) -> None:
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
        top = 1 - 0.35 / fig.get_figheight()
        fig.tight_layout(pad=0.2, rect=(0, 0, 1, top))
    else:
        fig.tight_layout(pad=0.2)


def _as_list(images) -> list:
    if hasattr(images, "shape") and len(images.shape) == 4:
        return [images[i] for i in range(images.shape[0])]
    return list(images)


def image_grid(images, nrow: int = 8, titles: Sequence[str] | None = None, size: float = 1.0,
               suptitle: str | None = None):
    """A matplotlib ``Figure`` with the images in rows of ``nrow``.

    ``images``: uint8 ``[N,3,H,W]`` (or float in [0, 1]), a list of such images, HWC arrays or PIL
    images. ``titles``: one short title per image (e.g. class names). ``size``: inches per image.
    """
    import matplotlib.pyplot as plt

    imgs = [_to_hwc(im) for im in _as_list(images)]
    n = max(len(imgs), 1)
    ncol = max(1, min(int(nrow), n))
    nrows = math.ceil(n / ncol)
    row_h = size + (0.22 if titles is not None else 0.0)  # room for a title above each image
    fig, axes = plt.subplots(nrows, ncol, figsize=(size * ncol, row_h * nrows + (0.3 if suptitle else 0)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(imgs):
            ax.imshow(imgs[k], interpolation="nearest")
            if titles is not None and k < len(titles):
                ax.set_title(str(titles[k]), fontsize=7)
    _finish(fig, suptitle)
    return fig


def per_class_grid(images, labels, class_names: Sequence[str], per_class: int = 8, size: float = 1.0,
                   suptitle: str | None = None):
    """One row per class: the first ``per_class`` images of that class, the class name on the left.

    Classes with fewer images leave blanks; a class with none shows an empty row.
    """
    import matplotlib.pyplot as plt

    imgs = _as_list(images)
    labels = [int(x) for x in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    if len(labels) != len(imgs):
        raise ValueError(f"{len(imgs)} images but {len(labels)} labels")
    rows = [[i for i, y in enumerate(labels) if y == c][:per_class] for c in range(len(class_names))]
    nrows, ncol = max(1, len(class_names)), max(1, int(per_class))
    height = size * nrows + (0.3 if suptitle else 0)
    fig, axes = plt.subplots(nrows, ncol, figsize=(size * ncol + 1.2, height), squeeze=False)
    for c in range(nrows):
        for j in range(ncol):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(rows) and j < len(rows[c]):
                ax.imshow(_to_hwc(imgs[rows[c][j]]), interpolation="nearest")
        if c < len(class_names):
            axes[c, 0].set_ylabel(str(class_names[c]), rotation=0, ha="right", va="center", fontsize=7)
    _finish(fig, suptitle)
    return fig


__all__ = ["image_grid", "per_class_grid"]
