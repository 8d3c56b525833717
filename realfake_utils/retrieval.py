"""Retrieval baseline of Geng et al. (2024), "The Unmet Promise of Synthetic Training Images".

Instead of generating training images with a model pretrained on an upstream pool (LAION for Stable
Diffusion; the miniature pool here), retrieve real images of the target classes from that same pool:

(a) caption substring match of the class name (their "string matching" baseline);
(b) CLIP k-NN: image-to-image against the class-mean image feature of the target train set, and
    text-to-image against the text feature of ``a photo of a [classname]``.

Retrieved images are de-duplicated against the target *test* split with the SSCD descriptor (so the
baseline never trains on test images), and the budget per class equals the synthetic set's size.
The result is written as an image set in the synthetic-set format (ImageFolder + manifest.jsonl), so
the classifier trains on it with the same recipe and seeds.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .rundir import atomic_path

STRATEGIES = ("caption", "clip_i2i", "clip_t2i")


def text_query(class_name: str) -> str:
    """The text-to-image query of Geng et al.: ``a photo of a [classname]``."""
    return f"a photo of a {class_name}"


def caption_match(captions: Sequence[str], class_names: Sequence[str]) -> torch.Tensor:
    """[C, N] boolean: caption n mentions class c as a whole word (case-insensitive).

    Substring matching is the cheapest retrieval; its label noise (a caption naming the wrong class
    or several classes) is part of what the baseline measures.
    """
    patterns = [re.compile(rf"(?<![a-z]){re.escape(c.lower())}(?![a-z])") for c in class_names]
    return torch.tensor([[bool(p.search(cap.lower())) for cap in captions] for p in patterns],
                        dtype=torch.bool).reshape(len(class_names), len(captions))


def cosine_scores(pool_feats: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """[C, N] cosine similarity between C query features and N pool features."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(pool_feats.float(), dim=-1).T


def duplicate_mask(pool_desc: torch.Tensor, test_desc: torch.Tensor, threshold: float,
                   chunk: int = 4096) -> torch.Tensor:
    """[N] True where a pool image is a (near) duplicate of some test image.

    Descriptors are SSCD-style (L2-normalised); a cosine above ``threshold`` counts as a copy
    (0.5: Somepalli et al.'s replication threshold; SSCD's copy threshold is 0.75).
    """
    test = F.normalize(test_desc.float(), dim=-1)
    out = []
    for start in range(0, len(pool_desc), chunk):
        block = F.normalize(pool_desc[start:start + chunk].float(), dim=-1)
        out.append((block @ test.T).max(dim=1).values > threshold)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def select_per_class(scores: torch.Tensor, budget: Sequence[int], allowed: torch.Tensor | None = None,
                     seed: int = 0) -> list[list[int]]:
    """Pick up to ``budget[c]`` pool indices per class, best score first, each index at most once.

    ``scores`` [C, N] (higher is better; ties broken by a seeded random order); ``allowed`` [C, N]
    masks candidates (e.g. caption matches, not-a-test-duplicate). An image wanted by several classes
    goes to the class that scores it highest, as a k-NN labeller would do.
    """
    C, N = scores.shape
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.rand(C, N, generator=gen) * 1e-6
    s = scores.float() + jitter
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    owner = s.argmax(dim=0)  # each image to its best class
    picks: list[list[int]] = []
    for c in range(C):
        mine = s[c].clone()
        mine[owner != c] = float("-inf")
        order = torch.argsort(mine, descending=True)
        valid = order[torch.isfinite(mine[order])]
        picks.append(valid[: int(budget[c])].tolist())
    return picks


def retrieve(strategy: str, budget: Sequence[int], *, captions: Sequence[str] | None = None,
             class_names: Sequence[str] | None = None, pool_feats: torch.Tensor | None = None,
             class_mean_feats: torch.Tensor | None = None, text_feats: torch.Tensor | None = None,
             exclude: torch.Tensor | None = None, seed: int = 0) -> list[list[int]]:
    """Pool indices per class for one strategy (see module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown retrieval strategy '{strategy}'; choose one of {STRATEGIES}")
    C = len(budget)
    if strategy == "caption":
        if captions is None or class_names is None:
            raise ValueError("caption retrieval needs the pool captions and the class names")
        allowed = caption_match(captions, class_names)
        scores = torch.zeros(allowed.shape)  # no ranking signal: seeded random order among matches
    else:
        queries = class_mean_feats if strategy == "clip_i2i" else text_feats
        if pool_feats is None or queries is None:
            raise ValueError(f"{strategy} needs pool image features and "
                             f"{'class-mean image' if strategy == 'clip_i2i' else 'text'} features")
        scores = cosine_scores(pool_feats, queries)
        allowed = torch.ones(scores.shape, dtype=torch.bool)
    if exclude is not None:
        allowed = allowed & ~exclude.reshape(1, -1)
    if scores.shape[0] != C:
        raise ValueError(f"{C} budgets but {scores.shape[0]} classes")
    return select_per_class(scores, budget, allowed, seed)


def label_precision(picks: list[list[int]], true_labels: Sequence[int]) -> float:
    """Share of retrieved images whose true pool label is the class they were retrieved for."""
    hits = sum(int(true_labels[i] == c) for c, idx in enumerate(picks) for i in idx)
    total = sum(len(idx) for idx in picks)
    return hits / total if total else float("nan")


def write_image_set(out_dir: str | Path, images: torch.Tensor, picks: list[list[int]],
                    class_names: Sequence[str], source_ids: Sequence[str], tag: str) -> Path:
    """Write the retrieved images as ``<class>/<source>.png`` + ``manifest.jsonl`` (synthetic-set format).

    ``images`` is the uint8 [N, 3, H, W] pool; files are written temp-then-rename, the manifest last,
    so a killed run never leaves a manifest that names missing files.
    """
    out_dir = Path(out_dir)
    rows = []
    for label, idx in enumerate(picks):
        folder = out_dir / class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            rel = f"{class_names[label]}/{source_ids[i]}.png"
            if not (out_dir / rel).exists():
                with atomic_path(out_dir / rel) as tmp:
                    Image.fromarray(images[i].permute(1, 2, 0).numpy().astype(np.uint8)).save(tmp, format="PNG")
            rows.append({"file": rel, "label": label, "class_name": class_names[label],
                         "source_id": str(source_ids[i]), "round": 0, "seed": 0, "prompt": "",
                         "lora": "", "settings_hash": tag})
    with atomic_path(out_dir / "manifest.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir
