"""Real data: loaders, deterministic stratified splits, the manifest, and image loading.

Three sources, one manifest format (``artifacts/data/manifest.csv``):

- ``digits``: scikit-learn's ``load_digits`` (1,797 images, 8x8, 17 grey levels 0..16), shipped with
  scikit-learn, so the kit runs with no download. Class names are words (``"seven"``) so a prompt reads
  ``photo of seven``. Images are upsampled bilinearly to ``image_size`` (see :func:`digits_array`).
- ``eurosat``: the ``torchvision.datasets.EuroSAT`` layout ``<root>/2750/<Class>/<Class>_<n>.jpg``
  (``root`` may also be the ``2750`` folder itself, or torchvision's root holding ``eurosat/2750``).
  Prompt names are the ones CoOp and later CLIP work use (``AnnualCrop`` -> ``Annual Crop Land``).
- ``imagefolder``: any ImageNet-style tree ``<root>/<class folder>/**/<image>`` (classes are the sorted
  folder names, as in ``torchvision.datasets.ImageFolder``), with an optional map from folder name
  (e.g. a WordNet id) to a readable name, as a JSON dict or ``wnid name`` text lines.

Manifest columns: ``id, path, index, label, class_name, split`` (``split`` in pool / train / test;
``path`` is absolute, ``""`` for digits; ``index`` is the row in ``load_digits`` for digits, else the
position in the sorted file list). Images that cannot be read are left out and listed in
``excluded.csv`` (path, reason).
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from torch.utils.data import Dataset

from .params import REPO_ROOT
from .rundir import atomic_path, confine, read_json, write_json

DATASETS = ("digits", "eurosat", "imagefolder")
SPLITS = ("pool", "train", "test")
MANIFEST_FIELDS = ("id", "path", "index", "label", "class_name", "split")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Readable EuroSAT names for prompts, as used by CoOp / CLIP work on EuroSAT ("photo of Sea or Lake").
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


class DataError(ValueError):
    """A data problem (missing root, no class folders, empty class, bad split fractions)."""


# --------------------------------------------------------------------------------------------------
# Images


def resize_center_crop(img, size: int):
    """Resize so the shorter side is ``size`` (keeping the aspect ratio), then crop the centre square.

    Returns an RGB ``PIL.Image`` of ``size x size``; never squashes a non-square image.
    """
    from PIL import Image

    img = _to_rgb(img)
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def _to_rgb(img):
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        from PIL import Image

        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def open_image(path: str | os.PathLike, size: int | None = None):
    """Open an image file as RGB, fully decoded; with ``size``, resized and centre-cropped.

    For JPEGs, ``draft`` lets the decoder skip resolution it does not need (a large speed-up on
    ImageNet-size files; the result is still at least ``size`` on its shorter side before the resize).
    """
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        if size is not None and img.format == "JPEG":
            w, h = img.size
            s = min(w, h)
            if s > 2 * size:
                img.draft("RGB", (max(size, w * size // s), max(size, h * size // s)))
        img.load()  # pixels in memory (first frame); the file closes with the block
    img = _to_rgb(img)
    return resize_center_crop(img, size) if size is not None else img


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits_array(indices: Sequence[int] | None = None, image_size: int = 8):
    """Digits as a uint8 tensor ``[N,3,S,S]`` (grey levels 0..16 -> 0..255, grey replicated to RGB).

    Upsampling is bilinear (``align_corners=False``, i.e. PIL-like): at 16x16 and 32x32 it gives the
    smooth pen strokes of a small photo of a handwritten digit, which suits a VAE / diffusion model and
    CLIP, whereas nearest keeps 8x8 blocks whose sharp block edges dominate the image content.
    """
    import torch
    import torch.nn.functional as F

    images, _ = _digits_raw()
    if indices is not None:
        images = images[np.asarray(list(indices), dtype=np.int64)]
    x = torch.from_numpy(images).unsqueeze(1) * (255.0 / 16.0)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def _load_file_images(paths: Sequence[str], image_size: int, workers: int):
    arr = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)

    def one(i: int) -> None:
        arr[i] = np.asarray(open_image(paths[i], image_size))

    if workers > 1 and len(paths) > 64:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(len(paths)), chunksize=64))
    else:
        for i in range(len(paths)):
            one(i)
    return arr


def load_images(rows: Sequence[dict], image_size: int, cache: str | os.PathLike | None = None,
                workers: int = 2):
    """Images of manifest rows as a uint8 tensor ``[N,3,H,W]`` in the order of ``rows``.

    Files are resized keeping the aspect ratio and centre-cropped (:func:`resize_center_crop`); rows
    without a path are digits, upsampled bilinearly (:func:`digits_array`); both may be mixed (real
    digits with synthetic PNGs). With ``cache`` (a ``.safetensors`` path), the tensor is stored
    there with a key of the ids, paths and size and reused on the next
    call when they match (a file edited in place under the same path is not noticed: delete the cache).
    """
    import torch

    t0 = time.perf_counter()
    rows = list(rows)
    key = _cache_key(rows, image_size)
    if cache is not None and Path(cache).exists():
        from safetensors.torch import load_file
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key:
            return load_file(str(cache))["images"]
    if not rows:
        out = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
    else:
        is_file = [bool(r.get("path")) for r in rows]
        files = [i for i, f in enumerate(is_file) if f]
        digits = [i for i, f in enumerate(is_file) if not f]
        out = torch.empty((len(rows), 3, image_size, image_size), dtype=torch.uint8)
        if digits:  # rows without a path are digits (index = row of load_digits)
            out[digits] = digits_array([int(rows[i]["index"]) for i in digits], image_size)
        if files:
            arr = _load_file_images([rows[i]["path"] for i in files], image_size, workers)
            out[files] = torch.from_numpy(arr).permute(0, 3, 1, 2)
            if len(files) >= 1000:
                print(f"loaded {len(rows)} images at {image_size}x{image_size} in "
                      f"{time.perf_counter() - t0:.1f} s")
    if cache is not None:
        from safetensors.torch import save_file

        with atomic_path(cache) as tmp:
            save_file({"images": out}, str(tmp), metadata={"key": key})
    return out


def _cache_key(rows: Sequence[dict], image_size: int) -> str:
    import hashlib

    h = hashlib.sha1(f"{image_size}|".encode())
    for r in rows:
        h.update(f"{r['id']}|{r.get('path', '')}|{r.get('index', '')}\n".encode())
    return h.hexdigest()


class ImageDataset(Dataset):
    """A torch ``Dataset`` of ``(PIL.Image RGB image_size x image_size, label)`` for manifest rows.

    ``transform`` (e.g. torchvision transforms) is applied to the PIL image. Digits come from the same
    bilinear upsampling as :func:`load_images`; files from :func:`open_image`. ``image_size=0`` (or
    None) gives files at their own resolution (for a ``RandomResizedCrop`` on the full image) and
    digits at 8x8.
    """

    def __init__(self, rows: Sequence[dict], image_size: int | None, transform=None):
        self.rows = list(rows)
        self.image_size = int(image_size or 0)
        self.transform = transform
        self.labels = [int(r["label"]) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image

        row = self.rows[i]
        if row.get("path"):
            img = open_image(row["path"], self.image_size or None)
        else:
            img = Image.fromarray(digits_array([int(row["index"])], self.image_size or 8)[0]
                                  .permute(1, 2, 0).numpy())
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[i]


# --------------------------------------------------------------------------------------------------
# Scanning sources


def _split_camel(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)


def readable_name(folder: str) -> str:
    """A prompt-friendly class name from a folder name: ``001.Black_footed_Albatross`` ->
    ``Black footed Albatross``, ``great_white_shark`` -> ``great white shark``."""
    name = re.sub(r"^\d+[._-]", "", folder)
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip() or folder


def read_class_map(path: str | os.PathLike) -> dict[str, str]:
    """Folder name (e.g. WordNet id) -> readable name.

    Accepts a JSON dict ``{"n01440764": "tench"}``, the torchvision/Keras ``imagenet_class_index.json``
    form ``{"0": ["n01440764", "tench"]}``, or text lines ``n01440764 tench, Tinca tinca`` (the name is
    the rest of the line up to the first comma, which is the common name used for prompts).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"class map {path} does not exist; give the path of a JSON dict or of "
                        "'wnid name' text lines, or class_map='' to use folder names")
    text = path.read_text(encoding="utf-8")
    out: dict[str, str] = {}
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise DataError(f"class map {path}: expected a JSON object")
        for key, value in raw.items():
            if isinstance(value, (list, tuple)) and len(value) == 2:
                out[str(value[0])] = str(value[1]).replace("_", " ")
            else:
                out[str(key)] = str(value)
        return out
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise DataError(f"class map {path} line {n}: expected 'wnid name', got {line!r}")
        out[parts[0]] = parts[1].split(",")[0].strip()
    return out


def resolve_path(path: str | os.PathLike) -> Path:
    """An absolute path for a user-given data path. A relative path is taken from the repository root
    (presets say ``../shared/data/eurosat-rgb-mini``; notebooks run with ``notebooks/`` as working
    folder), else from the working folder if it exists only there."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if not (REPO_ROOT / p).exists() and p.resolve().exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def _missing_root(root: Path, dataset: str) -> DataError:
    hint = {
        "eurosat": "point data_root at the folder holding 2750/ (e.g. -p data_root=../shared/data/"
                   "eurosat-rgb-mini, or set REALFAKE_DATA)",
        "imagefolder": "point data_root at a folder with one sub-folder per class "
                       "(-p data_root=/path/to/train, or set REALFAKE_DATA)",
    }.get(dataset, "")
    return DataError(f"data root {root} does not exist ({dataset}); {hint}")


def _eurosat_root(root: Path) -> Path:
    if not root.exists():
        raise _missing_root(root, "eurosat")
    for cand in (root / "2750", root / "eurosat" / "2750", root):
        if cand.is_dir() and any(p.is_dir() for p in cand.iterdir()):
            return cand
    raise DataError(f"{root} has no EuroSAT class folders: expected {root}/2750/<Class>/<Class>_<n>.jpg "
                    "(the torchvision.datasets.EuroSAT layout); point data_root at the folder "
                    "holding 2750/")


def _scan_tree(root: Path, dataset: str, names: dict[str, str]) -> tuple[list[dict], list[dict], list[str]]:
    """Class folders of ``root`` -> candidate rows (unchecked), excluded rows, folder names."""
    if not root.exists():
        raise _missing_root(root, dataset)
    if not root.is_dir():
        raise DataError(f"data root {root} is a file, not a folder of class folders")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"data root {root} has no class folders: expected {root}/<class>/<image files> "
                        "(one sub-folder per class); point data_root at that folder")
    if set(folders) <= {"train", "val", "valid", "validation", "test"}:
        raise DataError(f"data root {root} holds split folders {folders}, not class folders; point "
                        f"data_root at {root / ('train' if 'train' in folders else folders[0])} "
                        "(and test_root at the validation folder, if any)")
    rows, excluded = [], []
    for label, folder in enumerate(folders):
        files = []
        for dirpath, dirnames, filenames in os.walk(root / folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
        name = names.get(folder) or (readable_name(folder) if dataset == "imagefolder"
                                     else _split_camel(folder))
        for f in files:
            rel = f.relative_to(root).as_posix()
            if f.suffix.lower() not in IMG_EXTENSIONS:
                excluded.append({"path": str(f), "reason": f"not an image file (extension "
                                 f"'{f.suffix or '(none)'}')", "class_name": name})
                continue
            rows.append({"id": rel, "path": str(f), "index": 0, "label": label, "class_name": name})
    return rows, excluded, folders


def _check_image(path: str) -> str:
    """'' if the image decodes, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (64, 64))  # decode the whole stream cheaply
            img.load()
            if img.size[0] < 1 or img.size[1] < 1:
                return "empty image"
    except Exception as err:  # noqa: BLE001 - any decoder error excludes the file
        return f"{type(err).__name__}: {err}".strip()
    return ""


def scan(dataset: str, data_root: str | os.PathLike = "", class_map: str | os.PathLike = "",
         check_images: bool = True, workers: int = 2) -> tuple[list[dict], list[dict], list[str]]:
    """All usable items of a source (no split yet): rows, excluded rows (path, reason), class names.

    Rows carry ``id, path, index, label, class_name``. Raises :class:`DataError` for a missing root, a
    root without class folders, or a class left with no readable image.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    if dataset == "digits":
        _, target = _digits_raw()
        rows = [{"id": f"digits_{i:04d}", "path": "", "index": i, "label": int(t),
                 "class_name": DIGIT_NAMES[int(t)]} for i, t in enumerate(target)]
        return rows, [], list(DIGIT_NAMES)
    if not str(data_root):
        raise DataError(f"dataset '{dataset}' needs data_root (-p data_root=/path, or REALFAKE_DATA)")
    root, names = _resolve_tree(dataset, data_root, class_map)
    rows, excluded, folders, class_list = _scan_checked(root, dataset, names, check_images, workers)
    for i, row in enumerate(rows):
        row["index"] = i
    return rows, excluded, class_list


def _resolve_tree(dataset: str, data_root, class_map) -> tuple[Path, dict[str, str]]:
    root = resolve_path(data_root)
    if class_map:
        class_map = resolve_path(class_map)
    if dataset == "eurosat":
        names = dict(EUROSAT_NAMES)
        if class_map:
            names.update(read_class_map(class_map))
        return _eurosat_root(root), names
    return root, (read_class_map(class_map) if class_map else {})


def _scan_checked(root: Path, dataset: str, names: dict[str, str], check_images: bool, workers: int):
    rows, excluded, folders = _scan_tree(root, dataset, names)
    if check_images and rows:
        paths = [r["path"] for r in rows]
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                reasons = list(pool.map(_check_image, paths, chunksize=64))
        else:
            reasons = [_check_image(p) for p in paths]
        kept = []
        for row, reason in zip(rows, reasons):
            if reason:
                excluded.append({"path": row["path"], "reason": reason, "class_name": row["class_name"]})
            else:
                kept.append(row)
        rows = kept
    class_list = []
    by_label = {r["label"]: r["class_name"] for r in rows}
    for label, folder in enumerate(folders):
        if label not in by_label:
            n_bad = sum(1 for e in excluded if Path(e["path"]).relative_to(root).parts[0] == folder)
            raise DataError(
                f"class folder {root / folder} has no readable images ({n_bad} file(s) excluded); "
                "add images to it or remove the folder")
        class_list.append(by_label[label])
    return rows, excluded, folders, class_list


def scan_test_root(dataset: str, test_root: str | os.PathLike, train_folders: Sequence[str],
                   class_map: str | os.PathLike = "", check_images: bool = True,
                   workers: int = 2) -> tuple[list[dict], list[dict]]:
    """A separate test tree (e.g. ImageNet ``val/`` in class folders): rows labelled by the folder
    names of the training tree, ids prefixed ``test/``. Every test folder must be a training class;
    a training class may be absent from the test tree."""
    root, names = _resolve_tree(dataset, test_root, class_map)
    rows, excluded, folders, _ = _scan_checked(root, dataset, names, check_images, workers)
    label_of = {f: i for i, f in enumerate(train_folders)}
    unknown = [f for f in folders if f not in label_of]
    if unknown:
        raise DataError(f"test_root {root} has class folders that data_root lacks: {unknown[:5]}"
                        f"{' ...' if len(unknown) > 5 else ''}; both trees need the same folder names")
    for i, row in enumerate(rows):
        row["label"] = label_of[folders[row["label"]]]
        row["id"] = "test/" + row["id"]
        row["index"] = i
    return rows, excluded


# --------------------------------------------------------------------------------------------------
# Splits and manifest


def _split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    total = sum(fractions.values())
    target = min(n, int(round(total * n + 1e-9)))
    raw = {s: fractions[s] * n for s in SPLITS}
    counts = {s: int(np.floor(raw[s] + 1e-9)) for s in SPLITS}
    order = sorted(SPLITS, key=lambda s: (-(raw[s] - counts[s]), SPLITS.index(s)))
    i = 0
    while sum(counts.values()) < target and i < 10 * len(SPLITS):
        s = order[i % len(SPLITS)]
        if fractions[s] > 0:
            counts[s] += 1
        i += 1
    # every split with a positive fraction gets at least one image when the class is big enough
    for s in SPLITS:
        if fractions[s] > 0 and counts[s] == 0:
            donor = max(SPLITS, key=lambda t: counts[t])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[s] += 1
    return counts


def check_fractions(split_fractions: dict[str, float]) -> dict[str, float]:
    """Validate ``{"pool": .., "train": .., "test": ..}``: known keys, each in [0, 1], sum <= 1.

    Missing splits are 0. A sum below 1 uses that share of each class (the rest is left out).
    """
    unknown = set(split_fractions) - set(SPLITS)
    if unknown:
        raise DataError(f"split_fractions: unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    out = {s: float(split_fractions.get(s, 0.0)) for s in SPLITS}
    if any(v < 0 or v > 1 for v in out.values()):
        raise DataError(f"split_fractions must each be in [0, 1], got {out}")
    if sum(out.values()) > 1 + 1e-6:
        raise DataError(f"split_fractions sum to {sum(out.values()):.4f} > 1: {out}")
    if sum(out.values()) <= 0:
        raise DataError(f"split_fractions are all 0: {out}")
    return out


def split_rows(rows: Sequence[dict], split_fractions: dict[str, float], seed: int) -> list[dict]:
    """Deterministic stratified split: per class, rows sorted by id, shuffled with a generator seeded
    by ``(seed, label)``, then cut into pool / train / test by the fractions (largest remainder).

    Returns new rows with ``split`` set, ordered by split, then label, then id. Rows not assigned (when
    the fractions sum to less than 1) are dropped.
    """
    fr = check_fractions(split_fractions)
    by_class: dict[int, list[dict]] = {}
    for r in rows:
        by_class.setdefault(int(r["label"]), []).append(r)
    out = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda r: r["id"])
        perm = np.random.default_rng([int(seed), label]).permutation(len(items))
        counts = _split_counts(len(items), fr)
        start = 0
        for s in SPLITS:
            for j in perm[start:start + counts[s]]:
                out.append({**items[j], "split": s})
            start += counts[s]
    order = {s: i for i, s in enumerate(SPLITS)}
    out.sort(key=lambda r: (order[r["split"]], int(r["label"]), r["id"]))
    return out


def _write_csv(path: str | os.PathLike, rows: Iterable[dict], fields: Sequence[str]) -> Path:
    """Write CSV atomically; an identical existing file is left untouched (its mtime too, so
    downstream caches keyed on the manifest's mtime stay valid when 01_prepare reruns)."""
    import io

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    text = buf.getvalue()
    path = Path(path)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return path
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_manifest(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write manifest rows as CSV (atomically; unchanged content keeps the existing file)."""
    return _write_csv(path, rows, MANIFEST_FIELDS)


def read_manifest(path: str | os.PathLike, split: str | Sequence[str] | None = None) -> list[dict]:
    """Rows of a manifest: ``{id, path, index:int, label:int, class_name, split}``.

    ``path`` may be the CSV or the folder holding ``manifest.csv``; ``split`` keeps only those splits.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebook 01_prepare first "
                                "(realfake run --preset <preset> --only 01)")
    keep = None if split is None else ({split} if isinstance(split, str) else set(split))
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if keep is not None and r["split"] not in keep:
                continue
            rows.append({"id": r["id"], "path": r["path"], "index": int(r["index"]),
                         "label": int(r["label"]), "class_name": r["class_name"], "split": r["split"]})
    return rows


def class_names(rows: Sequence[dict]) -> list[str]:
    """Class names indexed by label (``class_{i}`` for a label absent from ``rows``)."""
    by_label = {int(r["label"]): r["class_name"] for r in rows}
    n = max(by_label) + 1 if by_label else 0
    return [by_label.get(i, f"class_{i}") for i in range(n)]


def count_table(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    """``{class_name: {split: count}}`` plus a ``"total"`` row, in label order."""
    names = class_names(rows)
    table = {n: {s: 0 for s in SPLITS} for n in names}
    total = {s: 0 for s in SPLITS}
    for r in rows:
        table[names[int(r["label"])]][r["split"]] += 1
        total[r["split"]] += 1
    table["total"] = total
    return table


def format_counts(rows: Sequence[dict]) -> str:
    table = count_table(rows)
    width = max(len(k) for k in table)
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS)]
    for name, c in table.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c[s]:>6}" for s in SPLITS))
    return "\n".join(lines)


def prepare_data(dataset: str, data_root: str | os.PathLike, out_dir: str | os.PathLike,
                 split_fractions: dict[str, float], seed: int, class_map: str | os.PathLike = "",
                 check_images: bool = True, test_root: str | os.PathLike = "") -> Path:
    """Scan a source, split it, and write ``out_dir/manifest.csv``, ``out_dir/excluded.csv`` and
    ``out_dir/info.json`` (dataset, root, fractions, seed, class names, counts). ``out_dir`` is
    normally ``run.artifacts / "data"``. Prints the counts per class and split. Returns the manifest
    path.

    ``test_root`` (optional): a separate tree with the same class folders (e.g. ImageNet ``val/``
    sorted into class folders) whose images all form the ``test`` split, as in the paper's evaluation;
    the fractions then split ``data_root`` into pool / train only (``test`` must be 0).
    """
    t0 = time.perf_counter()
    fr = check_fractions(split_fractions)
    if test_root and fr["test"] > 0:
        raise DataError(f"test_root is set, so the test split is all of {test_root}; set the test "
                        f"fraction to 0 (got split_fractions {fr})")
    if test_root and dataset == "digits":
        raise DataError("test_root applies to eurosat / imagefolder, not digits")
    all_rows, excluded, names = scan(dataset, data_root, class_map, check_images=check_images)
    rows = split_rows(all_rows, fr, seed)
    if test_root:
        folders = {int(r["label"]): r["id"].split("/")[0] for r in all_rows}
        test_rows, test_excluded = scan_test_root(
            dataset, test_root, [folders[i] for i in range(len(folders))], class_map, check_images)
        offset = len(all_rows)  # test indices follow the training tree's, so indices stay unique
        rows += [{**r, "index": offset + r["index"], "class_name": names[r["label"]], "split": "test"}
                 for r in sorted(test_rows, key=lambda r: (r["label"], r["id"]))]
        excluded += test_excluded
    out_dir = Path(out_dir)
    manifest = write_manifest(rows, out_dir / "manifest.csv")
    _write_csv(out_dir / "excluded.csv", excluded, ("path", "reason", "class_name"))
    counts = count_table(rows)
    info = {
        "dataset": dataset, "data_root": str(resolve_path(data_root)) if str(data_root) else "",
        "test_root": str(resolve_path(test_root)) if test_root else "",
        "class_map": str(resolve_path(class_map)) if class_map else "", "split_fractions": fr,
        "seed": int(seed), "class_names": names, "num_classes": len(names), "counts": counts,
        "num_rows": len(rows), "num_excluded": len(excluded)}
    if not (out_dir / "info.json").exists() or read_info(out_dir) != json.loads(json.dumps(info)):
        write_json(out_dir / "info.json", info)
    print(f"{dataset}: {len(rows)} images in {len(names)} classes, {len(excluded)} excluded")
    print(format_counts(rows))
    print(f"manifest: {manifest} ({time.perf_counter() - t0:.1f} s)")
    if excluded:
        print(f"excluded ({len(excluded)}), listed in {out_dir / 'excluded.csv'}:", file=sys.stderr)
        for e in excluded[:10]:
            print(f"  {e['path']}: {e['reason']}", file=sys.stderr)
        if len(excluded) > 10:
            print(f"  ... and {len(excluded) - 10} more", file=sys.stderr)
    return manifest


# --------------------------------------------------------------------------------------------------
# Image sets (synthetic sets of 03, retrieved sets of 08): one reader / writer
# --------------------------------------------------------------------------------------------------
IMAGE_SET_MANIFEST = "manifest.jsonl"


def write_image_set(set_dir: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write ``set_dir/manifest.jsonl`` atomically: one JSON object per image, each with at least
    ``file`` (relative to ``set_dir``), ``label`` and ``class_name``. A ``path`` key is never stored
    (it is derived on reading), so a set folder can be moved or shared."""
    set_dir = Path(set_dir)
    text = "".join(json.dumps({k: v for k, v in r.items() if k != "path"}, sort_keys=True) + "\n"
                   for r in rows)
    with atomic_path(set_dir / IMAGE_SET_MANIFEST) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return set_dir / IMAGE_SET_MANIFEST


def read_image_set(set_dir: str | os.PathLike, missing_ok: bool = False) -> list[dict]:
    """Rows of ``set_dir/manifest.jsonl`` with ``path`` = ``set_dir / file``, confined to ``set_dir``
    (:func:`rundir.confine`: an absolute path or a ``..`` escape is an error naming the entry).
    ``missing_ok`` gives ``[]`` for a set whose manifest is not written yet."""
    set_dir = Path(set_dir)
    manifest = set_dir / IMAGE_SET_MANIFEST
    if not manifest.exists():
        if missing_ok:
            return []
        raise FileNotFoundError(f"{manifest} does not exist (an image set is a folder with "
                                f"{IMAGE_SET_MANIFEST}; synthetic sets are written by 03_synthesize)")
    rows = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{manifest} line {n} is not JSON ({err}); rewrite the set's manifest "
                            "(python -m realfake_utils.synthesize --set-dir ... --merge-only)") from None
        if "file" not in row or "label" not in row:
            raise DataError(f"{manifest} line {n} lacks 'file' or 'label'")
        row["path"] = str(confine(set_dir, row["file"], what=f"{manifest} line {n}: file"))
        rows.append(row)
    return rows


def image_set_rows(set_dir: str | os.PathLike, split: str = "train") -> list[dict]:
    """An image set's rows in the data manifest's format (``id, path, index, label, class_name,
    split``), for :class:`ImageDataset` / :func:`load_images`; ids are ``<set folder>/<file>``."""
    set_dir = Path(set_dir)
    tag = f"{set_dir.parent.name}/{set_dir.name}"
    return [{"id": f"{tag}/{r['file']}", "path": r["path"], "index": -1, "label": int(r["label"]),
             "class_name": r.get("class_name", ""), "split": split} for r in read_image_set(set_dir)]


def read_excluded(out_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``excluded.csv`` (path, reason, class_name)."""
    path = Path(out_dir)
    if path.is_dir():
        path = path / "excluded.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_split(data_dir: str | os.PathLike, split: str | Sequence[str], image_size: int,
               cache: bool = True):
    """``(images uint8 [N,3,S,S], labels int64 [N], rows)`` of one split (or several) of the manifest
    in ``data_dir``; with ``cache``, the images are kept in ``data_dir/cache/`` (safetensors) and
    reused while the manifest rows and size are unchanged."""
    import torch

    rows = read_manifest(data_dir, split=split)
    tag = split if isinstance(split, str) else "+".join(split)
    path = Path(data_dir)
    path = path if path.is_dir() else path.parent
    cache_path = path / "cache" / f"{tag}_{image_size}.safetensors" if cache else None
    images = load_images(rows, image_size, cache=cache_path)
    return images, torch.tensor([r["label"] for r in rows], dtype=torch.int64), rows


def read_info(out_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(out_dir) / "info.json")


__all__ = [
    "DATASETS", "DIGIT_NAMES", "EUROSAT_NAMES", "SPLITS", "DataError", "ImageDataset", "class_names",
    "count_table", "digits_array", "image_set_rows", "load_images", "load_split", "open_image", "prepare_data",
    "read_class_map", "read_excluded", "read_image_set", "read_info", "read_manifest", "readable_name", "resize_center_crop",
    "resolve_path", "scan", "scan_test_root", "split_rows", "write_image_set", "write_manifest",
]
