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

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from . import data
from .classify import (_k_axis, accuracy_metrics, evaluate, load_classifier, load_size, predict_logits,
                       real_dataset, train_classifier)
from .classify import TensorImages
from .plots import image_grid
from .records import Record
from .stats import seed_stats

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


class SplitImages(torch.utils.data.Dataset):
    """A split of the run's own manifest (the clean test split) as (PIL, label), decoded one image at a
    time (``classify.real_dataset``), scored with the recipe's eval transform like an OOD folder."""

    allowed = None      # all classes: no logit restriction

    def __init__(self, manifest: str | os.PathLike, split: str = "test", image_size: int | None = None):
        self.dataset = real_dataset(manifest, split, image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


def evaluate_folder(model, dataset: OODFolder | SplitImages, recipe: dict[str, Any], num_classes: int,
                    device: str = "cpu", restrict: bool = True) -> dict[str, Any]:
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


def train_filter_models(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                        recipe: dict[str, Any], out_dir: str | os.PathLike, n_models: int = 2,
                        seed: int = 0, device: str = "auto") -> list:
    """The ``hard`` set's filter models: ``n_models`` classifiers of the evaluated family trained on the
    real train split with their own seeds (10_000 + seed + i), cached (resumable) under ``out_dir``."""
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
                      restrict: bool = True, device: str | None = None,
                      unrestricted_too: bool = False) -> dict[str, dict[str, float]]:
    """top-1 / top-5 of ``model`` on each variant (and on the clean test set if given). With
    ``unrestricted_too``, a class-subset set is also scored with the arg-max over all classes
    (``"<set> (all classes)"``) from the same logits (one forward pass per set)."""
    sets = dict(variants)
    if clean is not None:
        sets = {"clean": {"images": clean[0], "labels": clean[1], "allowed": None}, **sets}
    out, free = {}, {}
    for name, v in sets.items():
        logits = predict_logits(model, v["images"], device=device)
        allowed = v.get("allowed") if restrict else None
        m = accuracy_metrics(logits, v["labels"], num_classes, allowed)
        out[name] = {"top1": m["top1"], "top5": m["top5"], "n": m["n_test"],
                     "restricted": allowed is not None}
        if unrestricted_too and allowed is not None:
            m = accuracy_metrics(logits, v["labels"], num_classes, None)
            free[f"{name} (all classes)"] = {"top1": m["top1"], "top5": m["top5"], "n": m["n_test"],
                                             "restricted": False}
    return out | free


# --------------------------------------------------------------------------------------------- tables
def label_wnids(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The model's class folders (ImageNet wnids for the ImageNet presets), from manifest ids
    ``<folder>/<file>``, in label order."""
    folders: dict[int, str] = {}
    for r in rows:
        folders.setdefault(int(r["label"]), str(r["id"]).split("/")[0])
    return [folders[i] for i in range(len(folders))]


# --------------------------------------------------------------------------------------------- the step
@dataclass
class OODResult:
    """top-1 / top-5 (fractions) of one 04 classifier on one OOD set. ``source``: what it trained on,
    as 04's record names it (``real``, a set name such as ``lora-dm-vg-lp``, ``real+<set>``)."""

    classifier: str          # 04's run folder, relative to the run folder
    source: str
    k: int
    synthesis_seed: Optional[int]   # None: real only
    classifier_seed: int
    ood_set: str             # v2-like | sketch | rendition | hard | clean | imagenet-* | "<set> (all classes)"
    top1: float
    top5: float
    n: int
    restricted: bool


@dataclass
class OODLine:
    """One Table 4 cell: ``metric`` (%) of the classifiers of (source, k) on ``ood_set``, mean and
    t 95 % interval over seeds (classifier seeds x synthesis seeds) from ``stats.seed_stats``."""

    source: str
    k: int
    ood_set: str
    metric: str
    n: int
    mean: float
    std: float
    lo: float
    hi: float

    def fmt(self) -> str:
        half = (self.hi - self.lo) / 2
        return f"{self.mean:5.1f} +-{half:4.1f}" if self.n > 1 and math.isfinite(half) else f"{self.mean:5.1f} (n=1)"


@dataclass
class OODRecord(Record):
    """Results of 05 (Table 4, Apx. G.3): every classifier of 04 on every OOD set, and the summary."""

    STEP: ClassVar[str] = "05_ood_eval"

    sets: dict[str, str]               # OOD set name -> what it is
    results: list[OODResult]
    summary_top1: list[OODLine]
    summary_top5: list[OODLine]
    default_set: str = ""              # 03's default set (the full method): the OOD-vs-k curve
    hard_fraction: float = 0.0
    hard_filter: str = ""
    hard_filter_models: int = 0

    def line(self, source: str, k: int, ood_set: str, metric: str = "top1") -> OODLine | None:
        lines = self.summary_top1 if metric == "top1" else self.summary_top5
        return next((ln for ln in lines if (ln.source, ln.k, ln.ood_set) == (source, k, ood_set)), None)

    @property
    def ood_sets(self) -> list[str]:
        """The OOD sets proper (not the clean test split, not the unrestricted comparisons)."""
        return [s for s in dict.fromkeys(r.ood_set for r in self.results)
                if s != "clean" and not s.endswith("(all classes)")]


def build_ood_sets(run: Any, image_size: int, recipe: dict[str, Any], *, miniature_variants: bool = True,
                   hard_fraction: float = 0.1, hard_filter: str = "cnn", hard_filter_models: int = 2,
                   roots: dict[str, str] | None = None, seed: int = 0, device: str = "auto"
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, OODFolder], tuple | None]:
    """The OOD sets of a run: (miniature variants {name: {images, labels, allowed, description}},
    ImageNet-style folders {name: OODFolder} for every non-empty root of ``roots`` (``imagenet-v2``,
    ``imagenet-sketch``, ``imagenet-r``, ``imagenet-a``), the clean test split (images, labels), or None
    with the miniature variants, else None). Without miniature variants (the paper presets) the clean test
    split is the folder ``"clean"`` (:class:`SplitImages`, decoded one image at a time: an ImageNet-size
    split never sits in memory), so every classifier is scored on it even with no OOD folder (imagenette:
    Table 4 is an ImageNet-1K experiment). The hard set's filter CNNs train with ``recipe`` (04's) on the
    real train split."""
    data_dir = (Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.root)) / "artifacts" / "data"
    rows_all = data.read_manifest(data_dir / "manifest.csv")
    num_classes = len(data.class_names(rows_all))
    variants, clean, folders = {}, None, {}
    if miniature_variants:
        test_x, test_y, _ = data.load_split(data_dir, "test", image_size)
        train_x, train_y, _ = data.load_split(data_dir, "train", image_size)
        filters = None
        if hard_filter == "cnn":
            filters = train_filter_models(train_x, train_y, num_classes, recipe, data_dir.parent / "ood",
                                          hard_filter_models, seed=seed, device=device)
        variants = build_miniature_variants(test_x, test_y, train_x, train_y, num_classes, seed=seed,
                                            hard_fraction=hard_fraction, filter_models=filters)
        clean = (test_x, test_y)
    elif any(r["split"] == "test" for r in rows_all):
        size = load_size(recipe) if recipe.get("num_workers", 0) == 0 else None   # as 04 decodes its test split
        folders["clean"] = SplitImages(data_dir / "manifest.csv", "test", size)
    kinds = {"imagenet-v2": "v2", "imagenet-sketch": "sketch", "imagenet-r": "r", "imagenet-a": "a"}
    folders |= {name: OODFolder(root, kinds[name], model_wnids=label_wnids(rows_all))
                for name, root in (roots or {}).items() if root}
    return variants, folders, clean


def describe_sets(variants: dict[str, dict[str, Any]], folders: dict[str, OODFolder]) -> str:
    """One line per OOD set: size, class restriction, what it stands for."""
    lines = [f"{name:<10} {len(v['labels']):>5} images, "
             f"{'restricted to ' + str(len(v['allowed'])) + ' classes' if v['allowed'] else 'all classes'}: "
             f"{v['description']}" for name, v in variants.items()]
    lines += [f"{name:<10} {len(ds):>5} images, "
              f"{'restricted to ' + str(len(ds.allowed)) + ' classes' if ds.allowed else 'all classes'}"
              + (": the clean test split" if isinstance(ds, SplitImages) else "")
              for name, ds in folders.items()]
    if not variants and not any(isinstance(ds, OODFolder) for ds in folders.values()):
        lines += ["no OOD set (miniature_variants off, no imagenet_*_root given): every classifier is scored on "
                 "the clean test split only. Table 4 is an ImageNet-1K experiment: the imagenet1k preset sets "
                 "the four roots (imagenet_v2_root, imagenet_sketch_root, imagenet_r_root, imagenet_a_root)"]
    return "\n".join(lines)


def evaluate_classifiers(run: Any, runs: Sequence[Any], variants: dict[str, dict[str, Any]],
                         folders: dict[str, OODFolder], num_classes: int, clean: tuple | None = None,
                         device: str = "cpu") -> list[OODResult]:
    """Every classifier of 04's record (``runs``: its run entries, each with ``path``, ``source``, ``k``,
    ``synthesis_seed``, ``classifier_seed``) on the clean test split and every OOD set; sets covering a
    class subset are also scored with the unrestricted arg-max (``"<set> (all classes)"``), as the
    official Real-Fake evaluation does."""
    root = Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.root)
    out: list[OODResult] = []
    for r in runs:
        path = Path(r.path) if Path(r.path).is_absolute() else root / r.path
        model = load_classifier(path, device=device)
        sets = evaluate_variants(model, variants, num_classes, clean=clean, device=device,
                                 unrestricted_too=True) if variants or clean is not None else {}
        for name, ds in folders.items():
            sets[name] = evaluate_folder(model, ds, model.recipe, num_classes, device=device)
            if ds.allowed is not None:
                sets[f"{name} (all classes)"] = evaluate_folder(model, ds, model.recipe, num_classes,
                                                                device=device, restrict=False)
        for name, m in sets.items():
            out.append(OODResult(classifier=str(r.path), source=r.source, k=int(r.k),
                                 synthesis_seed=None if r.synthesis_seed is None else int(r.synthesis_seed), classifier_seed=int(r.classifier_seed),
                                 ood_set=name, top1=float(m["top1"]), top5=float(m["top5"]), n=int(m["n"]),
                                 restricted=bool(m["restricted"])))
    return out


def summarise(results: Sequence[OODResult], metric: str = "top1") -> list[OODLine]:
    """One :class:`OODLine` per (source, k, OOD set): ``metric`` in %, statistics over seeds from
    ``stats.seed_stats`` (the kit's one place for them)."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        groups.setdefault((r.source, r.k, r.ood_set), []).append(100 * getattr(r, metric))
    lines = []
    for (source, k, name), vals in groups.items():
        e = seed_stats(vals)
        lines.append(OODLine(source, k, name, metric, e.n, e.mean, e.std, e.lo, e.hi))
    return lines


def build_record(results: Sequence[OODResult], variants: dict[str, dict[str, Any]],
                 folders: dict[str, OODFolder], default_set: str = "", **settings: Any) -> OODRecord:
    """The step's :class:`OODRecord` (``settings``: hard_fraction, hard_filter, hard_filter_models)."""
    sets = {name: v["description"] for name, v in variants.items()}
    sets |= {name: f"ImageNet-style folder ({len(ds)} images)" for name, ds in folders.items()
             if isinstance(ds, OODFolder)}
    return OODRecord(sets=sets, results=list(results), summary_top1=summarise(results, "top1"),
                     summary_top5=summarise(results, "top5"), default_set=default_set, **settings)


def format_ood_table(lines: Sequence[OODLine], sets: Sequence[str]) -> str:
    """Table 4 layout: one line per (source, k), one column per OOD set (mean +- 95 % half-width, %)."""
    by = {(ln.source, ln.k, ln.ood_set): ln for ln in lines}
    keys = list(dict.fromkeys((ln.source, ln.k) for ln in lines))
    metric = lines[0].metric.replace("top", "top-") if lines else ""
    out = [f"{metric} % (mean +- 95% interval half-width over seeds)",
           f"{'classifier':<28} {'k':>2} " + " ".join(f"{s:>14}" for s in sets)]
    for source, k in keys:
        cells = [by[(source, k, s)].fmt() if (source, k, s) in by else "-" for s in sets]
        out.append(f"{source:<28} {k:>2} " + " ".join(f"{c:>14}" for c in cells))
    return "\n".join(out)


def restriction_gaps(record: OODRecord) -> dict[str, float]:
    """Mean top-1 gain (points) of restricting the arg-max to the covered classes, per class-subset set."""
    by = {(r.classifier, r.ood_set): r.top1 for r in record.results}
    out = {}
    for r_set in dict.fromkeys(r.ood_set for r in record.results if r.restricted):
        gaps = [100 * (v - by[(c, f"{r_set} (all classes)")]) for (c, s), v in by.items()
                if s == r_set and (c, f"{r_set} (all classes)") in by]
        if gaps:
            out[r_set] = float(np.mean(gaps))
    return out


def plot_ood_vs_k(record: OODRecord, synthetic_source: str = "", real_source: str = "real",
                  metric: str = "top1"):
    """OOD accuracy against k for the synthetic-only classifiers of ``synthetic_source`` (default: the
    record's default set), with 95 % intervals, and each set's real-only level as a dashed line."""
    import matplotlib.pyplot as plt

    src = synthetic_source or record.default_set
    lines = record.summary_top1 if metric == "top1" else record.summary_top5
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, s in enumerate(record.ood_sets):
        pts = sorted((ln.k, ln.mean, ln.lo, ln.hi) for ln in lines if ln.source == src and ln.ood_set == s)
        if pts:
            k, m, lo, hi = map(np.asarray, zip(*pts))
            err = np.nan_to_num(np.stack([m - lo, hi - m]), posinf=0.0, neginf=0.0)
            ax.errorbar(k, m, yerr=err, marker="o", capsize=3, color=f"C{i}", label=s)
        real = [ln for ln in lines if ln.source == real_source and ln.ood_set == s]
        if real:
            ax.axhline(real[0].mean, color=f"C{i}", ls="--", lw=1)
    _k_axis(ax, sorted({ln.k for ln in lines if ln.source == src}))
    ax.set_xlabel("k (synthetic images per real training image)")
    ax.set_ylabel(f"{metric.replace('top', 'top-')} (%)")
    ax.set_title(f"OOD accuracy vs k ({src}; dashed: real only)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def variants_figure(clean: tuple, variants: dict[str, dict[str, Any]], per_row: int = 8):
    """Rows: clean test images, then each miniature OOD variant (a spread across classes)."""
    spread = lambda t: t[torch.linspace(0, len(t) - 1, min(per_row, len(t))).long()]  # noqa: E731
    show = torch.cat([spread(clean[0])] + [spread(v["images"]) for v in variants.values()])
    return image_grid(show, nrow=per_row, suptitle="rows: clean test, " + ", ".join(variants))
