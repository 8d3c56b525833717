"""Out-of-distribution evaluation (the paper's Table 4, Apx. G.3).

Paper presets: ImageNet-v2, ImageNet-Sketch, ImageNet-R and ImageNet-A folders (paths from parameters).
ImageNet-R and ImageNet-A cover 200 of the 1000 classes, so the logits are restricted to those 200
classes before the arg-max (the official Real-Fake evaluation takes the arg-max over all 1000, which
counts a prediction of a class absent from the set as an error; the datasets' own evaluation code,
hendrycks/imagenet-r and hendrycks/natural-adv-examples, restricts). The 200-class lists are data in
``realfake_utils/resources/imagenet_{r,a}_wnids.txt``.

Miniature presets: four OOD variants built from the held-out real test images, one documented
transformation standing for each set (see :data:`MINIATURE_VARIANTS`):

* ``v2-like``   - a re-sampled test set: every test image re-drawn through a small random affine
  (rotation +-10 deg, translation +-1/16, scale 0.9-1.1) and a different resampling filter, standing
  for ImageNet-v2's "same collection process, new sample";
* ``sketch``    - an edge rendering (grey-scale, PIL FIND_EDGES, contrast-stretched: outline strokes
  without texture or fill), standing for ImageNet-Sketch;
* ``rendition`` - a cartoon-like rendition (colours posterised to 2 bits, edges over-enhanced),
  restricted to a class subset (every other class, as ImageNet-R's 200 of 1000), standing for
  ImageNet-R;
* ``hard``      - the hardest test images for filter models independent of the evaluated ones: like
  ImageNet-A (test images that ResNet-50s trained on ImageNet get wrong), small CNNs of the same family
  trained here on the real train split with their own seeds (``filter="cnn"``; ``"pixels"``: logistic
  regression + k-NN on raw pixels, no training), keeping the images with the lowest mean probability of
  the true class (all classes: with the class restriction on top, a 10-class miniature hard set
  becomes easy again).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from .classify import accuracy_metrics, predict_logits

DATA_DIR = Path(__file__).resolve().parent / "resources"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")
MINIATURE_VARIANTS = {
    "v2-like": "ImageNet-v2: test images re-drawn (random affine +-10 deg / +-1/16 shift / 0.9-1.1 scale, "
               "nearest-neighbour resampling)",
    "sketch": "ImageNet-Sketch: grey-scale edge rendering (FIND_EDGES outline strokes, contrast-stretched)",
    "rendition": "ImageNet-R: cartoon-like rendition (posterised to 2 bits, edges over-enhanced), class "
                 "subset (every other class), logits restricted",
    "hard": "ImageNet-A: hardest test images for independently trained filter models (all classes)",
}


# --------------------------------------------------------------------------------------------- class lists
def read_wnids(name: str) -> list[str]:
    """``imagenet`` (1000, index order), ``imagenet_r`` or ``imagenet_a`` (200 each)."""
    path = DATA_DIR / f"{name}_wnids.txt"
    if not path.exists():
        raise FileNotFoundError(f"no class list {path}")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def subset_indices(subset_wnids: Sequence[str], model_wnids: Sequence[str]) -> list[int]:
    """Indices in the model's class space of the wnids of a subset (those the model knows)."""
    pos = {w: i for i, w in enumerate(model_wnids)}
    return [pos[w] for w in subset_wnids if w in pos]


def restrict_logits(logits: torch.Tensor, allowed: Sequence[int]) -> torch.Tensor:
    """Logits with every class outside ``allowed`` set to -inf (arg-max then lands inside)."""
    out = torch.full_like(logits, float("-inf"))
    idx = torch.as_tensor(list(allowed), dtype=torch.long)
    out[:, idx] = logits[:, idx]
    return out


def restricted_predict(logits: torch.Tensor, allowed: Sequence[int] | None) -> torch.Tensor:
    """Arg-max over ``allowed`` classes only, as indices in the full class space."""
    if allowed is None:
        return logits.argmax(1)
    idx = torch.as_tensor(list(allowed), dtype=torch.long)
    return idx[logits[:, idx].argmax(1)]


# --------------------------------------------------------------------------------------------- ImageNet folders
class OODFolder(torch.utils.data.Dataset):
    """An ImageNet-style OOD folder as (PIL, label in the model's class space).

    ``kind``: ``v2`` (class folders named 0..999, ImageNet-1K indices), ``sketch`` / ``r`` / ``a``
    (wnid folders). Folders of classes the model does not know are skipped; :attr:`allowed` is the
    model's class indices present in the set (the restriction for R and A, ``None`` otherwise).
    """

    def __init__(self, root: str | os.PathLike, kind: str, model_wnids: Sequence[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"OOD folder {root} does not exist")
        imagenet = read_wnids("imagenet")
        model_wnids = list(model_wnids or imagenet)
        pos = {w: i for i, w in enumerate(model_wnids)}
        self.samples: list[tuple[str, int]] = []
        present = set()
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            wnid = imagenet[int(d.name)] if kind == "v2" else d.name
            if wnid not in pos:
                continue
            present.add(pos[wnid])
            for f in sorted(d.rglob("*")):
                if f.suffix in IMAGE_EXTS:
                    self.samples.append((str(f), pos[wnid]))
        if not self.samples:
            raise ValueError(f"{root}: no images of the model's classes")
        self.kind = kind
        listed = {"r": "imagenet_r", "a": "imagenet_a"}.get(kind)
        self.allowed = (subset_indices(read_wnids(listed), model_wnids) if listed else None)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as im:
            return im.convert("RGB"), label


def evaluate_folder(model, dataset: OODFolder, recipe: dict[str, Any], num_classes: int,
                    device: str = "cpu", restrict: bool = True) -> dict[str, Any]:
    from .classify import evaluate

    allowed = dataset.allowed if restrict else None
    m = evaluate(model, dataset, num_classes, recipe, device=device, allowed=allowed)
    return {"top1": m["top1"], "top5": m["top5"], "n": m["n_test"], "restricted": allowed is not None}


# --------------------------------------------------------------------------------------------- miniature variants
def _to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def resample_variant(images: torch.Tensor, seed: int) -> torch.Tensor:
    """v2-like: each image re-drawn through a small random affine with nearest resampling."""
    import torchvision.transforms.v2.functional as F

    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        h = img.shape[-1]
        angle = float(rng.uniform(-10, 10))
        shift = [int(round(v)) for v in rng.uniform(-h / 16, h / 16, size=2)]
        scale = float(rng.uniform(0.9, 1.1))
        out.append(F.affine(img, angle=angle, translate=shift, scale=scale, shear=[0.0, 0.0],
                            interpolation=F.InterpolationMode.NEAREST))
    return torch.stack(out)


def sketch_variant(images: torch.Tensor) -> torch.Tensor:
    """Edge rendering: grey-scale, FIND_EDGES, contrast-stretched, back to 3 channels."""
    out = []
    for img in images:
        g = _to_pil(img).convert("L")
        out.append(_to_tensor(ImageOps.autocontrast(g.filter(ImageFilter.FIND_EDGES)).convert("RGB")))
    return torch.stack(out)


def rendition_variant(images: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Cartoon-like rendition: colours posterised to ``bits`` per channel, edges over-enhanced."""
    return torch.stack([_to_tensor(ImageOps.posterize(_to_pil(im), bits).filter(ImageFilter.EDGE_ENHANCE_MORE))
                        for im in images])


def class_subset(num_classes: int) -> list[int]:
    """Every other class (0, 2, 4, ...): the miniature stand-in for the 200-of-1000 subsets."""
    return list(range(0, num_classes, 2))


def hard_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                seed: int = 0) -> np.ndarray:
    """Mean probability of the true class under models independent of the evaluated classifiers
    (logistic regression and 15-NN on raw pixels, fitted on the real train split). Lower = harder."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    xtr = train_x.reshape(len(train_x), -1).float().numpy() / 255.0
    xte = test_x.reshape(len(test_x), -1).float().numpy() / 255.0
    ytr, yte = train_y.numpy(), test_y.numpy()
    probs = []
    for clf in (LogisticRegression(max_iter=300, C=0.5, random_state=seed),
                KNeighborsClassifier(n_neighbors=min(15, len(xtr)))):
        clf.fit(xtr, ytr)
        p = clf.predict_proba(xte)
        col = {c: j for j, c in enumerate(clf.classes_)}
        probs.append(np.array([p[i, col[y]] if y in col else 0.0 for i, y in enumerate(yte)]))
    return np.mean(probs, axis=0)


class TensorImages(torch.utils.data.Dataset):
    """uint8 [N,3,H,W] images and labels as a (PIL, label) dataset (for ``train_classifier``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return _to_pil(self.images[i]), int(self.labels[i])


def train_filter_models(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                        recipe: dict[str, Any], out_dir: str | os.PathLike, n_models: int = 2,
                        seed: int = 0, device: str = "auto") -> list:
    """The ``hard`` set's filter models: ``n_models`` classifiers of the evaluated family trained on the
    real train split with their own seeds (10_000 + seed + i), cached (resumable) under ``out_dir``."""
    from .classify import load_classifier, train_classifier

    ds = TensorImages(train_x, train_y)
    models = []
    for i in range(n_models):
        d = Path(out_dir) / f"filter_s{10_000 + seed + i}"
        train_classifier(d, ds, None, num_classes, recipe, seed=10_000 + seed + i, device=device,
                         info={"row": "ood-filter", "k": 0})
        models.append(load_classifier(d))
    return models


def model_true_prob(models: Sequence, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Mean softmax probability of the true class under ``models``."""
    probs = [predict_logits(m, images).softmax(1)[torch.arange(len(labels)), labels].numpy() for m in models]
    return np.mean(probs, axis=0)


def build_miniature_variants(test_x: torch.Tensor, test_y: torch.Tensor, train_x: torch.Tensor,
                             train_y: torch.Tensor, num_classes: int, seed: int = 0,
                             hard_fraction: float = 0.3, filter_models: Sequence | None = None
                             ) -> dict[str, dict[str, Any]]:
    """The four miniature OOD sets: {name: {images uint8, labels, allowed (class subset or None),
    description}} built from the held-out real test images. ``filter_models``: classifiers that choose
    the hard subset (see :func:`train_filter_models`); ``None`` uses pixel models (:func:`hard_scores`)."""
    subset = class_subset(num_classes)
    in_subset = torch.isin(test_y, torch.tensor(subset))
    out = {
        "v2-like": {"images": resample_variant(test_x, seed), "labels": test_y.clone(), "allowed": None},
        "sketch": {"images": sketch_variant(test_x), "labels": test_y.clone(), "allowed": None},
        "rendition": {"images": rendition_variant(test_x[in_subset]), "labels": test_y[in_subset],
                      "allowed": subset},
    }
    sx, sy = test_x, test_y
    if filter_models:
        scores, how = model_true_prob(filter_models, sx, sy), f"{len(filter_models)} filter CNN(s)"
    else:
        scores, how = hard_scores(train_x, train_y, sx, sy, seed), "pixel models (logistic regression + k-NN)"
    n_hard = max(1, int(round(hard_fraction * len(sy))))
    order = np.argsort(scores, kind="stable")[:n_hard]
    idx = torch.as_tensor(np.sort(order), dtype=torch.long)
    out["hard"] = {"images": sx[idx], "labels": sy[idx], "allowed": None,
                   "filter_true_prob": float(scores[order].mean())}
    for name, v in out.items():
        v["description"] = MINIATURE_VARIANTS[name]
    out["hard"]["description"] += f" (filter: {how}, hardest {hard_fraction:.0%})"
    return out


def evaluate_variants(model, variants: dict[str, dict[str, Any]], num_classes: int,
                      clean: tuple[torch.Tensor, torch.Tensor] | None = None,
                      restrict: bool = True, device: str | None = None) -> dict[str, dict[str, float]]:
    """top-1 / top-5 of ``model`` on each variant (and on the clean test set if given)."""
    sets = dict(variants)
    if clean is not None:
        sets = {"clean": {"images": clean[0], "labels": clean[1], "allowed": None}, **sets}
    out = {}
    for name, v in sets.items():
        logits = predict_logits(model, v["images"], device=device)
        allowed = v.get("allowed") if restrict else None
        m = accuracy_metrics(logits, v["labels"], num_classes, allowed)
        out[name] = {"top1": m["top1"], "top5": m["top5"], "n": m["n_test"],
                     "restricted": allowed is not None}
    return out


# --------------------------------------------------------------------------------------------- tables
def label_wnids(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The model's class folders (ImageNet wnids for the ImageNet presets), from manifest ids
    ``<folder>/<file>``, in label order."""
    folders: dict[int, str] = {}
    for r in rows:
        folders.setdefault(int(r["label"]), str(r["id"]).split("/")[0])
    return [folders[i] for i in range(len(folders))]


def summarise_ood(results: Sequence[dict[str, Any]], metric: str = "top1") -> list[dict[str, Any]]:
    """Results ({row, k, seed, sets: {name: {top1, top5}}}) -> one line per (row, k): mean and std over
    seeds of ``metric`` for every OOD set (in %)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["row"], r["k"]), []).append(r)
    out = []
    for (row, k), rs in groups.items():
        line: dict[str, Any] = {"row": row, "k": k, "n": len(rs)}
        for name in rs[0]["sets"]:
            vals = np.array([100 * x["sets"][name][metric] for x in rs])
            line[name] = float(vals.mean())
            line[name + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out.append(line)
    return out


def format_ood_table(lines: Sequence[dict[str, Any]], sets: Sequence[str], metric: str = "top-1") -> str:
    head = f"{'classifier':<28} {'k':>2} " + " ".join(f"{s:>15}" for s in sets)
    out = [f"{metric} % (mean +- std over seeds)", head]
    for ln in lines:
        out.append(f"{ln['row']:<28} {ln['k']:>2} " +
                   " ".join(f"{ln[s]:>8.1f} +-{ln[s + '_std']:>4.1f}" for s in sets))
    return "\n".join(out)


def plot_ood_vs_k(lines: Sequence[dict[str, Any]], synthetic_row: str, real_row: str, sets: Sequence[str]):
    """OOD accuracy against k for the synthetic-only classifiers of ``synthetic_row``, with each set's
    real-only level as a dashed line of the same colour."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    real = next((ln for ln in lines if ln["row"] == real_row), None)
    for i, s in enumerate(sets):
        pts = sorted((ln["k"], ln[s], ln[s + "_std"]) for ln in lines if ln["row"] == synthetic_row)
        color = f"C{i}"
        if pts:
            k, m, sd = map(np.asarray, zip(*pts))
            ax.errorbar(k, m, yerr=sd, marker="o", capsize=3, color=color, label=s)
        if real is not None:
            ax.axhline(real[s], color=color, ls="--", lw=1)
    from .classify import _k_axis

    _k_axis(ax, sorted({ln["k"] for ln in lines if ln["row"] == synthetic_row}))
    ax.set_xlabel("k (synthetic images per real training image)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"OOD accuracy vs k ({synthetic_row}; dashed: real only)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
