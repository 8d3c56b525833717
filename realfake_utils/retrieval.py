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

import hashlib
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
    """Share of retrieved images whose true pool label is the class they were retrieved for (images with
    an unknown label, ``-1``, are left out)."""
    hits = sum(int(true_labels[i] == c) for c, idx in enumerate(picks) for i in idx)
    total = sum(int(true_labels[i]) >= 0 for idx in picks for i in idx)
    return hits / total if total else float("nan")


def _safe_name(name: str) -> str:
    """A file-system-safe folder / file name (as the synthetic sets' class folders)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip(".") or "x"


def write_image_set(out_dir: str | Path, images: torch.Tensor, picks: list[list[int]],
                    class_names: Sequence[str], source_ids: Sequence[str], tag: str,
                    prompts: Sequence[str] | None = None) -> Path:
    """Write the retrieved images as ``<class>/<source>.png`` + ``manifest.jsonl`` (synthetic-set format).

    ``images`` is the uint8 [N, 3, H, W] pool; files are written temp-then-rename, the manifest last,
    so a killed run never leaves a manifest that names missing files. ``prompts`` (optional, one per
    pool image) go into the manifest's ``prompt`` field (the pool caption, for inspection). PNGs of an
    earlier run that the new manifest does not name are removed, so the folder is exactly the set.
    """
    out_dir = Path(out_dir)
    rows = []
    for label, idx in enumerate(picks):
        folder = out_dir / _safe_name(class_names[label])
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            rel = f"{folder.name}/{_safe_name(source_ids[i])}.png"
            if not (out_dir / rel).exists():
                with atomic_path(out_dir / rel) as tmp:
                    Image.fromarray(images[i].permute(1, 2, 0).numpy().astype(np.uint8)).save(tmp, format="PNG")
            rows.append({"file": rel, "label": label, "class_name": class_names[label],
                         "source_id": str(source_ids[i]), "round": 0, "seed": 0,
                         "prompt": str(prompts[i]) if prompts is not None else "",
                         "lora": "", "settings_hash": tag})
    with atomic_path(out_dir / "manifest.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keep = {r["file"] for r in rows}
    for png in out_dir.glob("*/*.png"):
        if f"{png.parent.name}/{png.name}" not in keep:
            png.unlink()
    return out_dir


def set_hash(set_dir: str | Path) -> str:
    """Short SHA-256 of a set's ``manifest.jsonl`` (which files, which labels): a classifier trained on
    an earlier version of the set is stale when this changes."""
    return hashlib.sha256((Path(set_dir) / "manifest.jsonl").read_bytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Budget, pool, text queries
# --------------------------------------------------------------------------------------------------
def budget_from_set(rows: Sequence[dict], num_classes: int) -> list[int]:
    """Images per class of an image set's manifest rows (``label`` field): the retrieval budget."""
    counts = [0] * num_classes
    for r in rows:
        counts[int(r["label"])] += 1
    return counts


POOL_CAPTION_FILES = ("captions.jsonl", "captions.csv")


def read_pool_index(folder: str | Path, class_names: Sequence[str] | None = None) -> list[dict]:
    """Rows ``{id, path, caption, label}`` of a LAION-style image-text index in ``folder``.

    Accepted layouts, first match wins:

    - ``captions.jsonl``: one JSON object per line, ``{"file": "<path relative to folder>",
      "caption": "<alt text>"}``, optionally ``"id"``, and ``"label"`` (int) or ``"class_name"`` when the
      true class is known (then label precision is measured; ``-1`` / absent = unknown);
    - ``captions.csv``: the same fields as columns (header ``file,caption[,label|class_name][,id]``);
    - img2dataset's ``files`` output: ``<shard>/<key>.jpg`` (or .png / .webp) with the caption in
      ``<shard>/<key>.txt`` beside it.
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
                raw.append(json.loads(line))
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
    rows = []
    for r in raw:
        if "file" not in r or "caption" not in r:
            raise ValueError(f"pool_index {folder}: every row needs 'file' and 'caption', got {r}")
        label = r.get("label", "")
        label = int(label) if str(label).strip() not in ("", "None") else names.get(r.get("class_name", ""), -1)
        rows.append({"id": str(r.get("id") or f"pool/{r['file']}"), "path": str(folder / r["file"]),
                     "index": -1, "caption": str(r["caption"] or ""), "label": int(label)})
    return rows


def miniature_pool_config(clip_dir: str | Path, fallback: dict | None = None) -> dict:
    """The pool settings (``image_size``, ``seed``, ``pool_shift``, ``caption_*`` rates) the miniature CLIP
    was trained with, read from its key file ``<clip_dir>.params.json`` (written by
    ``miniature.cached_artifact``), else ``fallback`` (e.g. 01_prepare's resolved parameters)."""
    key = Path(str(clip_dir).rstrip("/") + ".params.json")
    keys = ("caption_wrong_rate", "caption_missing_rate", "caption_noise_rate", "caption_style_rate")
    if key.exists():
        p = json.loads(key.read_text())["params"]
        out = {"image_size": int(p["image_size"]), "seed": int(p["seed"]), "pool_shift": dict(p["shift"]),
               "pool_fingerprint": p.get("pool"), "source": str(key)}
        out.update({k: float(p[k]) for k in keys})
        return out
    if fallback is None:
        raise FileNotFoundError(f"{key} does not exist and no fallback configuration was given")
    out = {"image_size": int(fallback["image_size"]), "seed": int(fallback["seed"]),
           "pool_shift": dict(fallback["pool_shift"]), "pool_fingerprint": None, "source": "01_prepare parameters"}
    out.update({k: float(fallback[k]) for k in keys})
    return out


@torch.no_grad()
def clip_text_features(clip_model: str | Path, prompts: Sequence[str], device: str = "cpu") -> torch.Tensor:
    """CLIP text embeddings ``[B, D]`` (``text_embeds`` of ``CLIPTextModelWithProjection``, i.e.
    ``CLIPModel.get_text_features``; not normalised) of ``prompts``, loaded from a CLIPModel folder or id
    (the miniature CLIP or e.g. ``openai/clip-vit-large-patch14``), tokenized padded to the model length
    as in the miniature CLIP's training."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # loading the text tower from a CLIPModel lists the unused vision weights
    try:
        tok = CLIPTokenizer.from_pretrained(str(clip_model))
        model = CLIPTextModelWithProjection.from_pretrained(str(clip_model)).eval().to(device)
    finally:
        hf_logging.set_verbosity(verbosity)
    enc = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")
    out = model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device))
    return out.text_embeds.float().cpu()


def strategy_label(strategy: str) -> str:
    return {"caption": "caption match", "clip_i2i": "CLIP k-NN image-to-image",
            "clip_t2i": "CLIP k-NN text-to-image"}.get(strategy, strategy)


def plot_retrieved(images: torch.Tensor, picks_by_strategy: dict[str, list[list[int]]],
                   class_names: Sequence[str], true_labels: Sequence[int] | None = None,
                   per_class: int = 6, size: float = 0.7):
    """One row per class, one block of ``per_class`` columns per strategy: the first retrieved pool
    images (best first). With ``true_labels``, an image whose true label is not the class it was
    retrieved for gets a red frame."""
    import matplotlib.pyplot as plt

    strategies = list(picks_by_strategy)
    C, S = len(class_names), len(strategies)
    ncol = S * per_class + (S - 1)
    fig, axes = plt.subplots(C, ncol, figsize=(size * ncol + 1.0, size * C + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_visible(False)
    for s, name in enumerate(strategies):
        for c in range(C):
            for j, i in enumerate(picks_by_strategy[name][c][:per_class]):
                ax = axes[c, s * (per_class + 1) + j]
                ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
                if true_labels is not None and int(true_labels[i]) >= 0 and int(true_labels[i]) != c:
                    for sp in ax.spines.values():
                        sp.set_visible(True)
                        sp.set_color("red")
                        sp.set_linewidth(2)
        axes[0, s * (per_class + 1)].set_title(strategy_label(name), fontsize=8, loc="left")
    for c in range(C):
        axes[c, 0].set_ylabel(str(class_names[c]), rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("retrieved pool images per class, best first (red frame: true label differs)", fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.99, top=0.9, bottom=0.02, wspace=0.08, hspace=0.08)
    return fig


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------
def stale_runs(out_root: str | Path, specs: Sequence, recipe: dict) -> list[Path]:
    """Classifier run folders of ``specs`` made from another version of their set (``extra['set_hash']``
    differs from the one in the run's ``config.json``) or with another recipe: to be retrained."""
    out = []
    for spec in specs:
        cfg = Path(out_root) / spec.name / "config.json"
        if not cfg.exists():
            continue
        c = json.loads(cfg.read_text())
        if (c.get("info", {}).get("set_hash") != spec.extra.get("set_hash")
                or json.loads(json.dumps(c.get("recipe"))) != json.loads(json.dumps(recipe))):
            out.append(cfg.parent)
    return out


def claims(lines: dict[str, dict]) -> dict:
    """The two papers' claims on one run. ``lines`` maps ``real`` / ``synthetic`` / ``retrieved-<s>`` to
    ``{"mean", "std"}`` (top-1 %). Real-Fake: synthetic-only accuracy comes close to real data (gap
    ``real - synthetic``); Geng et al.: retrieved real images beat synthetic ones at equal size (best
    strategy's margin over synthetic, and whether it exceeds one pooled standard deviation)."""
    out: dict = {}
    if "real" in lines and "synthetic" in lines:
        out["realfake_gap_real_minus_synthetic"] = lines["real"]["mean"] - lines["synthetic"]["mean"]
    retr = {k: v for k, v in lines.items() if k.startswith("retrieved-")}
    if retr and "synthetic" in lines:
        best = max(retr, key=lambda k: retr[k]["mean"])
        margin = retr[best]["mean"] - lines["synthetic"]["mean"]
        spread = float(np.sqrt((retr[best]["std"] ** 2 + lines["synthetic"]["std"] ** 2) / 2))
        out.update({"best_retrieval": best, "geng_margin_retrieved_minus_synthetic": margin,
                    "pooled_std": spread, "retrieval_beats_synthetic": bool(margin > 0),
                    "retrieval_beats_synthetic_beyond_std": bool(margin > spread),
                    "every_strategy_beats_synthetic": all(v["mean"] > lines["synthetic"]["mean"]
                                                          for v in retr.values())})
    return out


def summarise_runs(records: Sequence[dict], synthetic_label: str, recipe: str = "") -> dict[str, dict]:
    """Classifier runs grouped as ``real`` / ``synthetic`` / ``retrieved-<strategy>``: label, n_train,
    mean and std (ddof 1) of top-1 in % over seeds, per-seed values, and whether every run used
    ``recipe`` (read from the run's ``config.json``). The input of :func:`claims`."""
    def group_of(r: dict) -> str:
        if r["row"] == "real" or r["row"].startswith("retrieved-"):
            return r["row"]
        return "synthetic"

    def same_recipe(r: dict) -> bool:
        cfg = Path(r["path"]) / "config.json"
        return cfg.exists() and json.loads(cfg.read_text())["recipe"] == recipe

    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(group_of(r), []).append(r)
    out = {}
    for g, rs in groups.items():
        acc = np.array([100 * r["top1"] for r in rs])
        label = {"real": "real (full train split)", "synthetic": synthetic_label}.get(g) \
            or strategy_label(g[len("retrieved-"):])
        out[g] = {"label": label, "n_train": rs[0]["n_train"], "mean": float(acc.mean()),
                  "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                  "per_seed": {int(r["seed"]): 100 * r["top1"] for r in rs},
                  "same_recipe": all(map(same_recipe, rs))}
    return out
