"""The upstream "web" pool of the miniature world: the gap between what the base models are pretrained
on and the target task, the way LAION differs from ImageNet for Stable Diffusion 1.5 (Real-Fake,
Sec. 1 and 3: the generator is pretrained on a distribution that is not the target's).

- **captions** (:func:`web_captions`): alt-text-like templates (``"7 digit"``, ``"image of seven"``),
  some with the class word **swapped** for another class (``caption_wrong_rate``), some with **no**
  class word (``caption_missing_rate``, e.g. ``"free download jpg"``), noise words (``"hd"``,
  ``"stock"``, ``caption_noise_rate``) and, sometimes, a word for the colour / stroke style of the
  image (``caption_style_rate``), as web captions describe what is visible;
- **images** (:func:`shift_images`): a photometric and geometric shift of every pool image: a colour
  tint, lower contrast, thicker strokes (digits), a small rotation and translation.

Everything is deterministic per (seed, item id). The strength of the gap is a property of the miniature
world, chosen once for realism (it is not tuned to make the paper's claims come out).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .data import _check_image
from .features import NEGATIVE_PROMPT
from .rundir import atomic_path, confine, content_hash, is_done, mark_done

# --------------------------------------------------------------------------------------------------
# Captions: alt-text-like, partly wrong
# --------------------------------------------------------------------------------------------------
# Templates with the class word ({c}); "photo of {c}" is one of them, as web text holds it too.
CAPTION_TEMPLATES = ("{c}", "photo of {c}", "a photo of {c}", "image of {c}", "{c} picture",
                     "picture of the {c}", "{c} image", "my {c}")
# Captions that say nothing about the class (the class word is missing).
GENERIC_CAPTIONS = ("image", "untitled", "photo", "picture", "img", "new photo", "scan",
                    "free download", "view", "small image")
# Web noise words appended / prepended.
NOISE_WORDS = ("hd", "stock", "free", "download", "jpg", "wallpaper", "best", "new", "cheap",
               "vintage", "sale", "amazing", "online", "high quality", "royalty free", "clipart")
# Style words, chosen from the applied shift (the tint's hue, thick strokes).
HUE_WORDS = ("red", "yellow", "green", "cyan", "blue", "purple")
STYLE_WORDS = HUE_WORDS + ("bold", "tilted", "faded")


def _item_rng(seed: int, item_id: str, salt: int) -> np.random.Generator:
    """A generator that depends only on (seed, id, salt): one item's draws never change when other
    items are added or removed."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(item_id).encode()), salt])


def web_captions(ids: Sequence[str], labels: Sequence[int], class_names: Sequence[str], seed: int,
                 wrong_rate: float = 0.1, missing_rate: float = 0.2, noise_rate: float = 0.5,
                 style_rate: float = 0.0, styles: Sequence[Sequence[str]] | None = None) -> list[dict]:
    """Web-like captions for pool items, deterministic per (seed, id).

    Per item, one draw decides the class word: **wrong** (another class's name, probability
    ``wrong_rate``), **missing** (a generic caption, ``missing_rate``), else **correct**, written with
    one of :data:`CAPTION_TEMPLATES`. With probability ``noise_rate`` one or two
    :data:`NOISE_WORDS` are added; with ``style_rate`` the item's style words (``styles[i]``, e.g.
    ``["blue", "bold"]`` from :func:`shift_images`) are put in front.

    Returns one dict per item: ``caption``, ``kind`` (``correct`` | ``wrong`` | ``missing``) and
    ``caption_label`` (the class the caption names, -1 if none).
    """
    if wrong_rate < 0 or missing_rate < 0 or wrong_rate + missing_rate > 1:
        raise ValueError(f"caption rates must be >= 0 with wrong + missing <= 1, got "
                         f"wrong={wrong_rate}, missing={missing_rate}")
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
    n_cls = len(class_names)
    out = []
    for i, (item_id, label) in enumerate(zip(ids, labels)):
        rng = _item_rng(seed, item_id, 1)
        u = rng.random()
        label = int(label)
        if u < wrong_rate and n_cls > 1:
            kind = "wrong"
            shown = int((label + rng.integers(1, n_cls)) % n_cls)
        elif u < wrong_rate + missing_rate:
            kind, shown = "missing", -1
        else:
            kind, shown = "correct", label
        if shown >= 0:
            text = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(c=class_names[shown])
        else:
            text = GENERIC_CAPTIONS[rng.integers(len(GENERIC_CAPTIONS))]
        words = [text]
        if styles is not None and styles[i] and rng.random() < style_rate:
            words.insert(0, " ".join(styles[i]))
        if rng.random() < noise_rate:
            for _ in range(int(rng.integers(1, 3))):
                w = NOISE_WORDS[rng.integers(len(NOISE_WORDS))]
                if rng.random() < 0.5:
                    words.append(w)
                else:
                    words.insert(0, w)
        out.append({"caption": " ".join(words), "kind": kind, "caption_label": shown})
    return out


def caption_stats(captions: Sequence[dict]) -> dict[str, float]:
    """Fractions of correct / wrong / missing class words."""
    n = max(1, len(captions))
    return {k: sum(c["kind"] == k for c in captions) / n for k in ("correct", "wrong", "missing")}


def vocabulary(class_names: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Every word the captions and prompts of the miniature world use (one token each)."""
    words: list[str] = []
    texts = list(class_names) + [t.replace("{c}", "") for t in CAPTION_TEMPLATES]
    texts += list(GENERIC_CAPTIONS) + list(NOISE_WORDS) + list(STYLE_WORDS) + [NEGATIVE_PROMPT]
    texts += ["photo of", ","] + list(extra)
    for t in texts:
        for w in str(t).replace(",", " , ").split():
            if w not in words:
                words.append(w)
    return words


# --------------------------------------------------------------------------------------------------
# Image shift of the pool
# --------------------------------------------------------------------------------------------------
DEFAULT_SHIFT = {"tint": 0.5, "contrast": 0.6, "thicken": 0.7, "thicken_prob": 0.5,
                 "rotate_deg": 12.0, "translate_px": 1.0}


def shift_images(images: torch.Tensor, ids: Sequence[str], seed: int,
                 shift: dict[str, float] | None = None) -> tuple[torch.Tensor, list[list[str]]]:
    """The pool's photometric and geometric shift, deterministic per (seed, id).

    ``images``: uint8 ``[N,3,H,W]``. ``shift`` keys (missing ones are 0 = off):

    - ``tint``: per-channel gains ``1 + tint * u``, ``u ~ U(-1, 1)`` per channel (a colour cast);
    - ``contrast``: contrast factor ``c ~ U(contrast, 1)`` around the image mean (0 = off);
    - ``thicken``, ``thicken_prob``: with that probability, strokes are thickened by blending
      ``thicken`` of a 3x3 morphological dilation of the ink (the ink is the colour away from the
      image border's, so it works for dark-on-light and light-on-dark);
    - ``rotate_deg``, ``translate_px``: a rotation ``~ U(-deg, deg)`` and translation
      ``~ U(-px, px)`` per axis (border pixels replicated).

    Returns ``(shifted uint8 [N,3,H,W], style words per image)`` (the tint's hue word when the cast is
    clear, ``bold`` when thickened, ``tilted`` for a rotation over 2/3 of the maximum, ``faded`` for
    a contrast under 0.75), the words a web caption might use.
    """
    import torch.nn.functional as F

    s = {k: 0.0 for k in DEFAULT_SHIFT}
    s.update(shift or {})
    unknown = set(s) - set(DEFAULT_SHIFT)
    if unknown:
        raise ValueError(f"unknown pool_shift key(s) {sorted(unknown)}; known: {sorted(DEFAULT_SHIFT)}")
    n, _, h, w = images.shape
    if len(ids) != n:
        raise ValueError(f"{n} images but {len(ids)} ids")
    if n == 0:
        return images.clone(), []
    draws = np.stack([_item_rng(seed, i, 2).random(8) for i in ids])  # [N, 8] in [0, 1)
    x = images.float() / 255.0
    styles: list[list[str]] = [[] for _ in range(n)]
    # strokes
    if s["thicken"] > 0 and s["thicken_prob"] > 0:
        border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
        bright_bg = border.mean(dim=(1, 2)) > x.mean(dim=(1, 2, 3))
        sign = torch.where(bright_bg, -1.0, 1.0)[:, None, None, None]
        dil = sign * F.max_pool2d(sign * x, 3, stride=1, padding=1)
        on = torch.from_numpy(draws[:, 0] < s["thicken_prob"]).float()[:, None, None, None]
        x = x + on * s["thicken"] * (dil - x)
        for k in np.nonzero(draws[:, 0] < s["thicken_prob"])[0]:
            styles[k].append("bold")
    # geometry
    if s["rotate_deg"] > 0 or s["translate_px"] > 0:
        ang = torch.from_numpy((draws[:, 1] * 2 - 1) * math.radians(s["rotate_deg"])).float()
        tx = torch.from_numpy((draws[:, 2] * 2 - 1) * s["translate_px"] * 2 / w).float()
        ty = torch.from_numpy((draws[:, 3] * 2 - 1) * s["translate_px"] * 2 / h).float()
        theta = torch.stack([torch.stack([ang.cos(), -ang.sin(), tx], 1),
                             torch.stack([ang.sin(), ang.cos(), ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        for k in np.nonzero(np.abs(draws[:, 1] * 2 - 1) > 2 / 3)[0]:
            if s["rotate_deg"] >= 6:
                styles[k].append("tilted")
    # photometry
    if s["contrast"] > 0:
        c = torch.from_numpy(s["contrast"] + (1 - s["contrast"]) * draws[:, 4]).float()[:, None, None, None]
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = m + c * (x - m)
        for k in np.nonzero(c.flatten().numpy() < 0.75)[0]:
            styles[k].append("faded")
    if s["tint"] > 0:
        u = np.stack([_item_rng(seed, i, 3).uniform(-1, 1, 3) for i in ids])
        gains = 1 + s["tint"] * u
        g = torch.from_numpy(gains / gains.max(axis=1, keepdims=True)).float()[:, :, None, None]
        x = x * g
        for k in range(n):
            word = _hue_word(gains[k])
            if word:
                styles[k].insert(0, word)
    out = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return out, styles


def _hue_word(gains: np.ndarray, min_spread: float = 0.25) -> str:
    """Name of the colour cast of RGB gains, '' when the cast is weak."""
    r, g, b = (gains / gains.max()).tolist()
    if max(r, g, b) - min(r, g, b) < min_spread:
        return ""
    import colorsys

    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    return HUE_WORDS[int(((hue + 30) % 360) // 60)]


# --------------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------------
@dataclass
class PoolConfig:
    """The pool's gap from the target (the ``01_prepare`` parameters of these names)."""
    seed: int = 0
    pool_shift: dict = field(default_factory=lambda: dict(DEFAULT_SHIFT))
    caption_wrong_rate: float = 0.1
    caption_missing_rate: float = 0.2
    caption_noise_rate: float = 0.5
    caption_style_rate: float = 0.5


def pool_fingerprint(pool_rows: Sequence[dict]) -> str:
    """Hash of the pool's ids and labels (a changed split retrains everything)."""
    h = hashlib.sha256()
    for r in pool_rows:
        h.update(f"{r['id']}|{r['label']}|{r.get('path', '')}\n".encode())
    return h.hexdigest()[:16]


def make_pool(pool_rows: Sequence[dict], pool_images: torch.Tensor, class_names: Sequence[str],
              cfg: Any) -> dict[str, Any]:
    """The upstream "web" pool: shifted images, captions (with their kind), style words. ``cfg``: a
    :class:`PoolConfig` (or any object with its fields, e.g. ``pretrain.MiniatureConfig``)."""
    ids = [r["id"] for r in pool_rows]
    labels = [int(r["label"]) for r in pool_rows]
    images, styles = shift_images(pool_images, ids, cfg.seed, cfg.pool_shift)
    caps = web_captions(ids, labels, class_names, cfg.seed, cfg.caption_wrong_rate,
                        cfg.caption_missing_rate, cfg.caption_noise_rate, cfg.caption_style_rate, styles)
    return {"ids": ids, "labels": labels, "images": images, "styles": styles, "captions": caps}


# --------------------------------------------------------------------------------------------------
# The pool as an image-text index (LAION-style): written once by 01, read by 08
# --------------------------------------------------------------------------------------------------
POOL_INDEX_DIR = "data/pool"      # under artifacts/: 01's pool as an index (images/ + captions.jsonl)
POOL_CAPTION_FILES = ("captions.jsonl", "captions.csv")


@dataclass
class PoolIndex:
    """A pool written as an image-text index (:func:`save_pool`): the folder (relative to the run folder
    inside a record), the content key of its ``DONE.json`` (``rundir.is_done`` verifies every file) and
    the number of images."""
    path: str
    key: str
    n: int


def save_pool(folder: str | os.PathLike, pool: dict[str, Any], class_names: Sequence[str]) -> PoolIndex:
    """Write the upstream pool of :func:`make_pool` once, as the image-text index :func:`read_pool_index`
    reads (the LAION-style format of a paper preset's ``pool_index``): ``images/<n>.png`` (the *shifted*
    images the base model and CLIP were pretrained on) and ``captions.jsonl`` (``file``, ``caption``,
    ``id``, ``label``, ``class_name``, ``kind``, ``caption_label``), files temp-then-rename, the
    ``DONE.json`` marker last (key: ``rundir.content_hash`` of ids, labels, captions and image bytes).
    An unchanged pool whose files verify is not rewritten."""
    folder = Path(folder)
    images = pool["images"].contiguous()
    key = content_hash({"ids": list(pool["ids"]), "labels": [int(v) for v in pool["labels"]],
                        "captions": [c["caption"] for c in pool["captions"]],
                        "images": hashlib.sha256(images.numpy().tobytes()).hexdigest(), "shape": list(images.shape)})
    out = PoolIndex(str(folder), key, len(pool["ids"]))
    if is_done(folder, key):
        return out
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows, files = [], []
    for n, (item_id, label, cap) in enumerate(zip(pool["ids"], pool["labels"], pool["captions"])):
        rel = f"images/{n:06d}.png"
        with atomic_path(folder / rel) as tmp:
            Image.fromarray(images[n].permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        rows.append({"file": rel, "caption": cap["caption"], "id": str(item_id), "label": int(label),
                     "class_name": class_names[int(label)], "kind": cap["kind"],
                     "caption_label": int(cap["caption_label"])})
        files.append(rel)
    keep = set(files)
    for png in (folder / "images").glob("*.png"):
        if f"images/{png.name}" not in keep:
            png.unlink()     # a larger earlier pool's images
    with atomic_path(folder / "captions.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mark_done(folder, key, ["captions.jsonl"] + files, {"n": len(rows)})
    return out


def read_pool_index(folder: str | os.PathLike, class_names: Sequence[str] | None = None,
                    check_images: bool = True) -> tuple[list[dict], list[dict]]:
    """Rows ``{id, path, caption, label}`` of a LAION-style image-text index in ``folder``, and the
    excluded rows ``{id, path, reason}`` (unreadable images, as ``01_prepare`` excludes them).

    Accepted layouts, first match wins:

    - ``captions.jsonl``: one JSON object per line, ``{"file": "<path relative to folder>",
      "caption": "<alt text>"}``, optionally ``"id"``, and ``"label"`` (int) or ``"class_name"`` when the
      true class is known (then label precision is measured; ``-1`` / absent = unknown); what
      :func:`save_pool` writes;
    - ``captions.csv``: the same fields as columns (header ``file,caption[,label|class_name][,id]``);
    - img2dataset's ``files`` output: ``<shard>/<key>.jpg`` (or .png / .webp) with the caption in
      ``<shard>/<key>.txt`` beside it.

    Every ``file`` must stay inside ``folder`` (``rundir.confine``: absolute paths and ``..`` escapes
    are an :class:`~realfake_utils.rundir.UnsafePathError`).
    """
    import csv

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pool_index {folder} is not a folder (expected images + captions.jsonl, "
                                "captions.csv, or img2dataset 'files' output)")
    names = {c: i for i, c in enumerate(class_names or [])}
    raw: list[dict] = []
    if (folder / "captions.jsonl").exists():
        for n, line in enumerate((folder / "captions.jsonl").read_text().splitlines()):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{folder / 'captions.jsonl'} line {n + 1} is not JSON ({err})") from None
    elif (folder / "captions.csv").exists():
        with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
    else:
        for img in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")):
            txt = img.with_suffix(".txt")
            raw.append({"file": str(img.relative_to(folder)),
                        "caption": txt.read_text().strip() if txt.exists() else ""})
    if not raw:
        raise ValueError(f"pool_index {folder}: no images found")
    rows, excluded = [], []
    for r in raw:
        if not isinstance(r, dict) or "file" not in r or "caption" not in r:
            raise ValueError(f"pool_index {folder}: every row needs 'file' and 'caption', got {r}")
        path = confine(folder, str(r["file"]), what=f"pool_index {folder}: file")
        label = r.get("label", "")
        label = int(label) if str(label).strip() not in ("", "None") else names.get(r.get("class_name", ""), -1)
        row = {"id": str(r.get("id") or f"pool/{r['file']}"), "path": str(path), "index": -1,
               "caption": str(r["caption"] or ""), "label": int(label)}
        reason = (_check_image(str(path)) if path.is_file() else "missing file") if check_images else ""
        if reason:
            excluded.append({"id": row["id"], "path": row["path"], "reason": reason})
        else:
            rows.append(row)
    if not rows:
        raise ValueError(f"pool_index {folder}: none of its {len(raw)} images is readable "
                         f"(first: {excluded[0]['path']}: {excluded[0]['reason']})")
    return rows, excluded


__all__ = ["CAPTION_TEMPLATES", "DEFAULT_SHIFT", "GENERIC_CAPTIONS", "HUE_WORDS", "NOISE_WORDS", "POOL_INDEX_DIR",
           "PoolConfig", "PoolIndex", "STYLE_WORDS", "caption_stats", "make_pool", "pool_fingerprint",
           "read_pool_index", "save_pool", "shift_images", "vocabulary", "web_captions"]
