"""Retrieval baseline of Geng et al. (2024), "The Unmet Promise of Synthetic Training Images".

Instead of generating training images with a model pretrained on an upstream pool (LAION-2B for Stable
Diffusion; the miniature pool of ``01_prepare`` here), retrieve real images of the target classes from that
same pool and adapt the same pretrained CLIP with either (``clip_adapt``), at equal numbers of images.

Retrieval (their Sec. 3.2): (a) ``caption``: substring match of the class name in the captions;
(b) semantic k-NN of class-name x CLIP-template text embeddings over the pool's ``knn_image`` (image
embeddings) and ``knn_caption`` (caption text embeddings) indices; the legacy strategies of the
from-scratch comparison are ``clip_i2i`` (class-mean image feature) and ``clip_t2i`` (one text query).
Then de-duplication (:func:`deduplicate`), the CLIP-score filter (:func:`clip_score_filter`: their score
0.2 or a per-class percentile) and test near-duplicate removal with the copy descriptor of ``07_sscd``
(:func:`dedup_against_test`; their ISC descriptor at 0.604). The data-size sweep (:func:`sweep_points`,
:func:`run_sweep`) adapts CLIP on nested fractions of the retrieved maximum and on synthetic sets of the
same sizes and beyond (their Fig. 2 grey regions); :class:`RetrievalRecord` holds it, :func:`claim` judges
"retrieved real data match or beat synthetic data at every size" through ``realfake_utils.stats``.

08's stages are one call each: :func:`load_task` (01's record: splits, CLIP, the pool index 01 wrote,
read by :func:`load_pool`, never rebuilt), :func:`build_index`, :func:`find_test_copies` (07's record),
:func:`retrieve_all`, :func:`sweep_sources` + :func:`run_sweep`, :meth:`RetrievalRecord.build`,
:func:`scratch_comparison`; figures :func:`plot_sweep` (their Fig. 2) and :func:`plot_examples` (Fig. 3).

The older comparison (a from-scratch classifier on retrieved vs synthetic sets at one size) remains as a
second, labelled table (:func:`write_image_set`, :func:`summarise_runs`).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import classify, clip_adapt, data, sscd, stats
from . import synthesize as syn
from .pool import PoolIndex, read_pool_index, web_captions
from .prepare import PrepareRecord
from .records import Record, run_root
from .rundir import atomic_path, confine, is_done, write_json

GENG_STRATEGIES = ("caption", "knn_image", "knn_caption")   # Geng et al. Sec. 3.2
STRATEGIES = GENG_STRATEGIES + ("clip_i2i", "clip_t2i")      # + the from-scratch table's legacy k-NN


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


def template_scores(item_feats: torch.Tensor, template_feats: torch.Tensor) -> torch.Tensor:
    """[C, N]: per class the best cosine over its templates between the C x T text embeddings
    ``template_feats`` [C, T, D] (class name x CLIP template) and N index embeddings [N, D]."""
    C, T, D = template_feats.shape
    s = cosine_scores(item_feats, template_feats.reshape(C * T, D)).reshape(C, T, -1)
    return s.max(dim=1).values


def retrieve(strategy: str, budget: Sequence[int], *, captions: Sequence[str] | None = None,
             class_names: Sequence[str] | None = None, pool_feats: torch.Tensor | None = None,
             class_mean_feats: torch.Tensor | None = None, text_feats: torch.Tensor | None = None,
             caption_feats: torch.Tensor | None = None, template_feats: torch.Tensor | None = None,
             exclude: torch.Tensor | None = None, seed: int = 0) -> list[list[int]]:
    """Pool indices per class for one strategy (see module docstring), best first, at most ``budget[c]``
    each (a budget of the pool size = everything the strategy yields). ``knn_image`` / ``knn_caption``
    rank the image / caption embeddings by :func:`template_scores` with ``template_feats`` [C, T, D]."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown retrieval strategy '{strategy}'; choose one of {STRATEGIES}")
    C = len(budget)
    if strategy == "caption":
        if captions is None or class_names is None:
            raise ValueError("caption retrieval needs the pool captions and the class names")
        allowed = caption_match(captions, class_names)
        scores = torch.zeros(allowed.shape)  # no ranking signal: seeded random order among matches
    elif strategy in ("knn_image", "knn_caption"):
        index = pool_feats if strategy == "knn_image" else caption_feats
        if index is None or template_feats is None:
            raise ValueError(f"{strategy} needs the {'image' if strategy == 'knn_image' else 'caption'} "
                             "embeddings of the pool and the class-name x template text embeddings")
        scores = template_scores(index, template_feats)
        allowed = torch.ones(scores.shape, dtype=torch.bool)
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


def deduplicate(picks: list[list[int]], feats: torch.Tensor, threshold: float = 0.98) -> list[list[int]]:
    """Drop every retrieved image whose cosine to an image kept before it (any class, rank order, round
    robin over classes) exceeds ``threshold``: the retrieved set holds no (near-)duplicate pair."""
    f = F.normalize(feats.float(), dim=-1)
    kept: list[list[int]] = [[] for _ in picks]
    bank = torch.empty(sum(map(len, picks)), f.shape[-1])
    n = 0
    for r in range(max((len(p) for p in picks), default=0)):
        for c, p in enumerate(picks):
            if r < len(p):
                v = f[p[r]]
                if n and float((bank[:n] @ v).max()) > threshold:
                    continue
                kept[c].append(p[r])
                bank[n] = v
                n += 1
    return kept


def clip_score_filter(picks: list[list[int]], image_feats: torch.Tensor, class_text_feats: torch.Tensor,
                      threshold: float | None = None, percentile: float | None = None) -> list[list[int]]:
    """Geng et al.'s CLIP-score filter: keep a retrieved image of class c when the cosine of its image
    embedding with class c's text embedding is at least ``threshold`` (their ViT-B/16 value 0.2), or,
    with ``percentile`` p, when it is not among the lowest p % of class c's retrieved images. Order kept."""
    if threshold is None and percentile is None:
        return [list(p) for p in picks]
    sims = cosine_scores(image_feats, class_text_feats)  # [C, N]
    out = []
    for c, p in enumerate(picks):
        if not p:
            out.append([])
            continue
        s = sims[c, torch.tensor(p)]
        cut = float(threshold) if threshold is not None else float(np.percentile(s.numpy(), percentile))
        out.append([i for i, v in zip(p, s.tolist()) if v >= cut])
    return out


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
# Budget, text queries
# --------------------------------------------------------------------------------------------------
def budget_from_set(rows: Sequence[dict], num_classes: int) -> list[int]:
    """Images per class of an image set's manifest rows (``label`` field): the retrieval budget."""
    counts = [0] * num_classes
    for r in rows:
        counts[int(r["label"])] += 1
    return counts


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
    """The two papers' claims on the from-scratch table. ``lines`` maps ``real`` / ``synthetic`` /
    ``retrieved-<s>`` to :func:`summarise_runs` entries (``mean``, ``per_seed`` top-1 %). Real-Fake:
    synthetic-only comes close to real (gap ``real - synthetic``); Geng et al.: the best retrieval
    strategy against synthetic at equal size, by ``stats.compare`` (paired when the seeds agree) and
    ``stats.verdict`` (the same computation as REPORT.md)."""
    out: dict = {}
    if "real" in lines and "synthetic" in lines:
        out["realfake_gap_real_minus_synthetic"] = lines["real"]["mean"] - lines["synthetic"]["mean"]
    retr = {k: v for k, v in lines.items() if k.startswith("retrieved-")}
    if retr and "synthetic" in lines:
        best = max(retr, key=lambda k: retr[k]["mean"])
        a, b = lines["synthetic"]["per_seed"], retr[best]["per_seed"]
        cmp = stats.compare([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], paired_seeds=sorted(a) == sorted(b))
        out.update({"best_retrieval": best, "geng_margin_retrieved_minus_synthetic": cmp.diff,
                    "comparison": cmp.as_dict(), "verdict": stats.verdict(cmp, "greater"),
                    "every_strategy_beats_synthetic": all(v["mean"] > lines["synthetic"]["mean"]
                                                          for v in retr.values())})
    return out


def summarise_runs(records: Sequence[dict], synthetic_label: str, recipe: str = "") -> dict[str, dict]:
    """Classifier runs grouped as ``real`` / ``synthetic`` / ``retrieved-<strategy>``: label, n_train,
    ``stats.seed_stats`` of top-1 in % over seeds (mean, std, 95 % interval), per-seed values, and
    whether every run used ``recipe`` (read from the run's ``config.json``). The input of :func:`claims`."""
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
        est = stats.seed_stats([100 * r["top1"] for r in rs])
        label = {"real": "real (full train split)", "synthetic": synthetic_label}.get(g) \
            or strategy_label(g[len("retrieved-"):])
        out[g] = {"label": label, "n_train": rs[0]["n_train"], "mean": est.mean, "std": est.std,
                  "lo": est.lo, "hi": est.hi, "per_seed": {int(r["seed"]): 100 * r["top1"] for r in rs},
                  "same_recipe": all(map(same_recipe, rs))}
    return out


# --------------------------------------------------------------------------------------------------
# Geng et al.'s experiment: the pool, test de-duplication, the data-size sweep of CLIP adaptation
# --------------------------------------------------------------------------------------------------


@dataclass
class Pool:
    """The generator's upstream data: images (uint8 ``[N,3,H,W]``), captions, true labels (-1 unknown)."""

    ids: list[str]
    images: torch.Tensor
    captions: list[str]
    labels: list[int]
    source: dict[str, Any]
    excluded: list[dict] = field(default_factory=list)


@dataclass
class Task:
    """What 08 works on, read from 01's record and files (:func:`load_task`): the target task's class
    names, its train and test splits (uint8 images, labels), the upstream pool, the pretrained CLIP and
    the base model (paths or ids)."""

    class_names: list[str]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    pool: Pool
    clip_path: str
    base_model: str

    def summary(self) -> str:
        p = self.pool
        return (f"{len(self.class_names)} classes; train {len(self.train[1])}, test {len(self.test[1])}; pool "
                f"{len(p.ids)} (from {p.source['kind']}: {p.source['path']}; {len(p.excluded)} unreadable excluded); "
                f"CLIP {self.clip_path}")


@dataclass
class Index:
    """The retrieval indices and queries of Geng et al. Sec. 3.2 (:func:`build_index`): the pretrained CLIP
    ``model``; its zero-shot ``head`` [C, D] (per class the templates' normalised mean, also the text side
    of the CLIP-score filter); the pool's L2-normalised ``image`` embeddings [N, D]; its ``caption`` text
    embeddings [N, D]; the class-name x template text embeddings ``templates`` [C, T, D] (the k-NN queries)."""

    model: Any
    head: torch.Tensor
    image: torch.Tensor
    caption: torch.Tensor
    templates: torch.Tensor

    def summary(self) -> str:
        return (f"image index {tuple(self.image.shape)}, caption index {tuple(self.caption.shape)}, "
                f"queries {tuple(self.templates.shape)}, zero-shot head {tuple(self.head.shape)}")


def _run_path(root: Path, stored: str) -> str:
    """A record's model path: relative to the run folder when it lies inside it, else an id / path as given."""
    p = root / stored
    return str(p) if p.exists() else stored


def load_task(run: Any, image_size: int, clip_model: str = "", pool_index: str = "") -> Task:
    """The target task and the generator's upstream data as ``01_prepare`` recorded them
    (``prepare.PrepareRecord``): class names, train / test splits of the manifest, the CLIP (``clip_model``
    if set, else 01's) and the pool (:func:`load_pool`: ``pool_index`` if set, else the index 01 wrote)."""
    root = run_root(run)
    rec = PrepareRecord.load(root)
    ddir = root / "artifacts" / "data"
    train_x, train_y, _ = data.load_split(ddir, "train", image_size)
    test_x, test_y, _ = data.load_split(ddir, "test", image_size)
    pool = load_pool(root, rec.class_names, image_size, pool_index, rec.pool_index)
    return Task(list(rec.class_names), (train_x, train_y), (test_x, test_y), pool,
                clip_model or _run_path(root, rec.clip_model), _run_path(root, rec.base_model))


def build_index(task: Task, templates: Sequence[str]) -> Index:
    """Load the pretrained CLIP and embed the pool's images and captions, every class name in every
    template, and the zero-shot head (``clip_adapt.zero_shot_head``)."""
    model, tokenizer = clip_adapt.load_clip(task.clip_path)
    return Index(model, clip_adapt.zero_shot_head(model, tokenizer, task.class_names, templates),
                 clip_adapt.encode_images(model, task.pool.images),
                 clip_adapt.encode_texts(model, tokenizer, task.pool.captions),
                 template_text_features(model, tokenizer, task.class_names, templates))


def load_pool(root: str | Path, class_names: Sequence[str], image_size: int, pool_index: str = "",
              prepared: Optional[PoolIndex] = None) -> Pool:
    """The pool 08 retrieves from, read, never rebuilt: the folder ``pool_index`` (a LAION-style index,
    ``pool.read_pool_index``) when given, else the index ``01_prepare`` wrote (``prepared``, its record's
    ``pool_index``: the shifted images and web captions its base model and CLIP were pretrained on),
    verified by its ``DONE.json`` marker. Unreadable images are excluded and listed."""
    root = Path(root)
    if pool_index:
        folder, source = Path(pool_index), {"kind": "pool_index", "path": str(pool_index)}
    elif prepared is None:
        raise ValueError("01_prepare wrote no upstream pool (a real base_model was pretrained elsewhere): set "
                         "08's pool_index to a LAION-style folder of images + captions.jsonl")
    else:
        folder = confine(root, prepared.path, what="01_prepare's pool_index")
        if not is_done(folder, prepared.key):
            raise RuntimeError(f"{folder}: 01_prepare's pool index is incomplete or changed since 01 wrote it: "
                               "rerun 01_prepare")
        source = {"kind": "01_prepare", "path": prepared.path, "key": prepared.key}
    rows, excluded = read_pool_index(folder, class_names)
    return Pool([r["id"] for r in rows], data.load_images(rows, image_size), [r["caption"] for r in rows],
                [r["label"] for r in rows], source, excluded)


def template_text_features(model, tokenizer, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, T, D] text embeddings of every class name in every template (the k-NN queries)."""
    prompts = [t.format(c) for c in class_names for t in templates]
    return clip_adapt.encode_texts(model, tokenizer, prompts).reshape(len(class_names), len(templates), -1)


def dedup_against_test(descriptor, pool_images: torch.Tensor, test_images: torch.Tensor, threshold: float,
                       size: int, mode: str = "square", device: str = "cpu", n_planted: int = 20
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Pool images that are copies of a target **test** image under the copy descriptor of 07 (cosine of
    descriptors above ``threshold``; Geng et al.: their ISC descriptor at 0.604), so nothing retrieved is
    a test image. Also measured: SSCD-style near copies (exact, crop, jitter, JPEG) of ``n_planted``
    test images must be flagged (``planted_caught``). Returns (mask [N_pool], info)."""
    def embed(x: torch.Tensor) -> torch.Tensor:
        return sscd.compute_descriptors(descriptor, x, size=size, mode=mode, device=device)

    test_desc = embed(test_images)
    mask = duplicate_mask(embed(pool_images), test_desc, threshold)
    n = min(n_planted, len(test_images))
    near = [img for i in range(n) for img in sscd.near_copies(test_images[i]).values()]
    caught = duplicate_mask(embed(torch.stack(near)), test_desc, threshold) if near else torch.zeros(0, dtype=torch.bool)
    return mask, {"threshold": float(threshold), "pool_flagged": int(mask.sum()), "n_pool": int(len(mask)),
                  "planted_caught": int(caught.sum()), "planted": len(near),
                  "planted_recall": float(caught.float().mean()) if len(near) else float("nan")}


def find_test_copies(run: Any, task: Task, dedup_threshold: float = 0.0, device: str = "cpu", n_planted: int = 20
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`dedup_against_test` of the pool against the test split with ``07_sscd``'s descriptor and,
    unless ``dedup_threshold`` > 0, its calibrated threshold (both from its ``SSCDRecord``: 08 trains
    nothing of 07's). The info's ``threshold_from`` names where the threshold came from."""
    rec = sscd.SSCDRecord.load(run_root(run))
    descriptor = sscd.load_descriptor(rec.descriptor_file(run), rec.descriptor_sha256)
    threshold = dedup_threshold or rec.calibration.threshold
    mask, info = dedup_against_test(descriptor, task.pool.images, task.test[0], threshold, rec.size, rec.preprocess,
                                    device, n_planted)
    return mask, {**info, "threshold_from": "dedup_threshold" if dedup_threshold else "07_sscd calibrated"}


def dedup_summary(info: dict[str, Any]) -> str:
    """One line: the threshold, where it came from, pool images flagged, planted near copies caught."""
    return (f"threshold {info['threshold']:.3f} ({info['threshold_from']}): {info['pool_flagged']} of {info['n_pool']} "
            f"pool images flagged; planted near copies caught {info['planted_caught']}/{info['planted']}")


def proportional_subset(per_class: Sequence[Sequence[int]], total: int, seed: int) -> list[list[int]]:
    """``total`` items drawn per class in proportion to what each class holds (largest remainder),
    uniformly at random within a class (seeded): a sweep point of ``total`` images."""
    avail = np.array([len(p) for p in per_class], dtype=float)
    if total > avail.sum():
        raise ValueError(f"a subset of {total} from {int(avail.sum())} items")
    quota = np.floor(avail / max(avail.sum(), 1) * total).astype(int)
    rest = avail / max(avail.sum(), 1) * total - quota
    for c in np.argsort(-rest, kind="stable")[: total - int(quota.sum())]:
        quota[c] += 1
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(list(p), size=int(q), replace=False).tolist()) if q else []
            for p, q in zip(per_class, quota)]


def sweep_points(retrieved_max: int, fractions: Sequence[float], synthetic_multipliers: Sequence[float]
                 ) -> dict[str, list[int]]:
    """Sizes of the sweep: ``fractions`` of the retrieved maximum for both sources, and the
    ``synthetic_multipliers`` (> 1) of it for synthetic data only (their Fig. 2 grey regions)."""
    base = sorted({max(1, int(round(f * retrieved_max))) for f in fractions if 0 < f <= 1})
    beyond = sorted({int(round(m * retrieved_max)) for m in synthetic_multipliers if m > 1})
    return {"retrieved": base, "synthetic": base + [b for b in beyond if b not in base]}


@dataclass
class AdaptSource:
    """Images one sweep line adapts on: per-class index lists into ``images`` and a content fingerprint."""

    name: str
    label: str
    images: torch.Tensor
    per_class: list[list[int]]
    fingerprint: str


@dataclass
class SweepPoint:
    source: str
    size: int
    seed: int
    zero_shot: float
    linear_probe: float


def run_sweep(out_root: str | Path, model, head: torch.Tensor, sources: Sequence[AdaptSource],
              sizes: dict[str, Sequence[int]], seeds: Sequence[int], probe_train: tuple, test: tuple,
              config, log=print, device: str = "cpu") -> list[SweepPoint]:
    """Adapt CLIP (``clip_adapt.adapt_unit``, each model a finished unit under
    ``out_root/<source>__n<size>__s<seed>``, reused on resume) for every source, size and seed."""
    points = []
    for src in sources:
        for size in sizes.get(src.name, []):
            for seed in seeds:
                pick = proportional_subset(src.per_class, size, seed)
                idx = [i for p in pick for i in p]
                labels = [c for c, p in enumerate(pick) for _ in p]
                m = clip_adapt.adapt_unit(Path(out_root) / f"{src.name}__n{size}__s{seed}", model, head,
                                          src.images[idx], labels, probe_train, test, config, seed,
                                          {"source": src.fingerprint, "picks": pick}, device)
                points.append(SweepPoint(src.name, int(size), int(seed), float(m["zero_shot"]),
                                         float(m["linear_probe"])))
            done = [p for p in points if p.source == src.name and p.size == size]
            if log and done:
                log(f"{src.name:>10} n={size:>5}: ZS {np.mean([p.zero_shot for p in done]):5.1f}  "
                    f"LP {np.mean([p.linear_probe for p in done]):5.1f}  ({len(done)} seeds)")
    return points


@dataclass
class StrategyStats:
    n_images: int
    per_class: list[int]
    label_precision: Optional[float]
    test_duplicates_removed: int
    removed_by_dedup: int
    removed_by_clip_score: int


@dataclass
class RetrievalRecord(Record):
    """Results of ``08_retrieval_baseline`` (Geng et al.'s Fig. 2 in miniature, and the from-scratch table)."""

    STEP: ClassVar[str] = "08_retrieval_baseline"
    strategies: dict[str, StrategyStats]
    sweep_strategy: str
    retrieved_max: int
    sizes: dict[str, list[int]]
    seeds: list[int]
    off_the_shelf: dict[str, float]
    sweep: list[SweepPoint]
    source_labels: dict[str, str]
    synthetic_sets: dict[str, str]
    dedup: dict[str, Any]
    pool: dict[str, Any]
    adapt_config: dict[str, Any]
    templates: list[str]
    scratch_table: list[dict[str, Any]] = field(default_factory=list)
    scratch_label: str = ("second table: from-scratch classifier (04's recipe) on retrieved vs synthetic "
                          "images at one size (the kit's earlier comparison, not Geng et al.'s protocol)")
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, task: Task, strategies: dict[str, StrategyStats], sweep_strategy: str,
              sizes: dict[str, list[int]], seeds: Sequence[int], off_the_shelf: dict[str, float],
              sweep: list[SweepPoint], sources: Sequence[AdaptSource], dedup: dict[str, Any], config: Any,
              templates: Sequence[str]) -> "RetrievalRecord":
        """The record of one sweep: the retrieved maximum is the ``sweep_strategy``'s yield; the pool's
        provenance (:attr:`Pool.source`), size and excluded count; each source's label and fingerprint."""
        return cls(strategies=strategies, sweep_strategy=sweep_strategy,
                   retrieved_max=strategies[sweep_strategy].n_images, sizes=sizes, seeds=list(seeds),
                   off_the_shelf=off_the_shelf, sweep=sweep, source_labels={s.name: s.label for s in sources},
                   synthetic_sets={s.name: s.fingerprint for s in sources}, dedup=dedup,
                   pool={"n": len(task.pool.ids), **task.pool.source, "excluded": len(task.pool.excluded)},
                   adapt_config=config.to_dict(), templates=list(templates))


METRICS = ("zero_shot", "linear_probe")


def per_seed(record: RetrievalRecord, source: str, size: int, metric: str) -> dict[int, float]:
    return {p.seed: getattr(p, metric) for p in record.sweep if p.source == source and p.size == size}


def claim(record: RetrievalRecord, synthetic: str = "synthetic", retrieved: str = "retrieved") -> dict[str, Any]:
    """Claim 6 (Geng et al.): "synthetic data is matched or beaten by retrieved real data at every size".

    Per size both sources share, for zero-shot and linear-probe top-1: ``stats.compare`` of retrieved
    minus synthetic (paired when both ran the same seeds) and ``stats.verdict(..., "greater")`` (holds:
    retrieved better; contradicted: synthetic better; inconclusive: no resolvable difference, which the
    claim allows). Across sizes: a paired test of the per-size means. Beyond the retrieved maximum:
    synthetic at each larger size against retrieved at the maximum. Overall: ``contradicted`` if
    synthetic is significantly better anywhere, ``holds`` if the across-size test favours retrieved in
    a metric and nothing contradicts it, else ``inconclusive``."""
    sizes = sorted(set(record.sizes.get(synthetic, [])) & set(record.sizes.get(retrieved, [])))
    out: dict[str, Any] = {"per_size": [], "across_sizes": {}, "beyond_max": [], "verdict": "inconclusive"}
    contradicted, holds = False, False
    for metric in METRICS:
        means_a, means_b = [], []
        for n in sizes:
            a, b = per_seed(record, synthetic, n, metric), per_seed(record, retrieved, n, metric)
            if not a or not b:
                continue
            same = sorted(a) == sorted(b)
            cmp = stats.compare([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], paired_seeds=same)
            v = stats.verdict(cmp, "greater")
            contradicted |= v == "contradicted"
            out["per_size"].append({"metric": metric, "size": n, "synthetic": stats.seed_stats(list(a.values())).as_dict(),
                                    "retrieved": stats.seed_stats(list(b.values())).as_dict(),
                                    "comparison": cmp.as_dict(), "verdict": v})
            means_a.append(float(np.mean(list(a.values()))))
            means_b.append(float(np.mean(list(b.values()))))
        if len(means_a) >= 2:
            cmp = stats.paired(means_a, means_b)
            v = stats.verdict(cmp, "greater")
            contradicted |= v == "contradicted"
            holds |= v == "holds"
            out["across_sizes"][metric] = {"comparison": cmp.as_dict(), "verdict": v, "sizes": sizes}
        top = max(sizes) if sizes else None
        b = per_seed(record, retrieved, top, metric) if top else {}
        for n in sorted(n for n in record.sizes.get(synthetic, []) if top and n > top):
            a = per_seed(record, synthetic, n, metric)
            if a and b:
                cmp = stats.compare([a[s] for s in sorted(a)], [b[s] for s in sorted(b)],
                                    paired_seeds=sorted(a) == sorted(b))
                v = stats.verdict(cmp, "greater")
                contradicted |= v == "contradicted"
                out["beyond_max"].append({"metric": metric, "synthetic_size": n, "retrieved_size": top,
                                          "comparison": cmp.as_dict(), "verdict": v})
    out["verdict"] = "contradicted" if contradicted else "holds" if holds else "inconclusive"
    return out


def claim_lines(c: dict[str, Any]) -> list[str]:
    """One line per comparison of :func:`claim` (the notebook's summary and REPORT.md's details)."""
    lines = []
    for r in c["per_size"]:
        cm = r["comparison"]
        lines.append(f"{r['metric']:<12} n={r['size']:>5}: retrieved {r['retrieved']['mean']:5.1f} vs synthetic "
                     f"{r['synthetic']['mean']:5.1f}: diff {cm['diff']:+.1f} [{cm['lo']:+.1f}, {cm['hi']:+.1f}] -> {r['verdict']}")
    for m, r in c["across_sizes"].items():
        cm = r["comparison"]
        lines.append(f"{m:<12} across sizes: diff {cm['diff']:+.1f} [{cm['lo']:+.1f}, {cm['hi']:+.1f}] -> {r['verdict']}")
    for r in c["beyond_max"]:
        cm = r["comparison"]
        lines.append(f"{r['metric']:<12} synthetic n={r['synthetic_size']} vs retrieved n={r['retrieved_size']}: "
                     f"diff {cm['diff']:+.1f} [{cm['lo']:+.1f}, {cm['hi']:+.1f}] -> {r['verdict']}")
    lines.append(f"overall: {c['verdict']}")
    return lines


# --------------------------------------------------------------------------------------------------
# Figures of Geng et al. (reused by 09)
# --------------------------------------------------------------------------------------------------
SOURCE_STYLE = {"retrieved": ("C0", "o"), "synthetic": ("C1", "^"), "realfake": ("C2", "s")}


def plot_sweep(record: RetrievalRecord):
    """Their Fig. 2 analog: ZS and LP top-1 vs number of adaptation images, mean +- 1 std over seeds per
    source, the off-the-shelf CLIP dashed, the region beyond the retrieved maximum grey."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, title in zip(axes, METRICS, ("zero-shot (ZS)", "linear probe (LP)")):
        for src in dict.fromkeys(p.source for p in record.sweep):
            ns = sorted({p.size for p in record.sweep if p.source == src})
            vals = [list(per_seed(record, src, n, metric).values()) for n in ns]
            m = np.array([np.mean(v) for v in vals])
            sd = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals])
            color, marker = SOURCE_STYLE.get(src, ("C3", "d"))
            ax.errorbar(ns, m, yerr=sd, color=color, marker=marker, capsize=3, lw=1.2,
                        label=record.source_labels.get(src, src))
        ax.axhline(record.off_the_shelf[metric], color="purple", ls="--", lw=1, label="off-the-shelf CLIP")
        ax.set_xscale("log")
        sizes = sorted({p.size for p in record.sweep})
        if record.retrieved_max and sizes and sizes[-1] > record.retrieved_max:
            ax.axvspan(record.retrieved_max, sizes[-1] * 1.1, color="0.9", zorder=0)
        ax.set_xticks(sizes, [str(n) for n in sizes], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("adaptation images")
        ax.set_ylabel("top-1 on the target test split (%)")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Geng et al. Fig. 2 in miniature: retrieved real vs synthetic images\n(mean +- 1 std over "
                 f"{len(record.seeds)} seeds; grey: beyond the retrieved maximum)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


def plot_examples(target_x: torch.Tensor, target_y: torch.Tensor, sources: Sequence[AdaptSource],
                  class_names: Sequence[str], per_class: int = 4, size: float = 0.7):
    """Their Fig. 3 analog: per class (rows) one target train image (ground truth), then ``per_class``
    images of each source (``retrieved``, ``synthetic``, ...), the first of each class."""
    import textwrap

    import matplotlib.pyplot as plt

    C, S = len(class_names), len(sources)
    ncol = 1 + S * (per_class + 1)
    fig, axes = plt.subplots(C, ncol, figsize=(size * ncol, size * C + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for c in range(C):
        tgt = target_x[torch.as_tensor(target_y) == c][:1]
        blocks = [(0, tgt)] + [(2 + j * (per_class + 1), src.images[src.per_class[c][:per_class]])
                               for j, src in enumerate(sources) if c < len(src.per_class)]
        for start, imgs in blocks:
            for j, img in enumerate(imgs):
                axes[c, start + j].imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[c, 0].text(-0.1, 0.5, str(class_names[c]), ha="right", va="center", fontsize=7,
                        transform=axes[c, 0].transAxes)
    axes[0, 0].set_title("target", fontsize=7)
    titles = [textwrap.fill(src.label, max(12, 10 * per_class)) for src in sources]
    for j, title in enumerate(titles):
        axes[0, 2 + j * (per_class + 1)].set_title(title, fontsize=6, loc="left")
    head = 0.15 * max(t.count("\n") + 1 for t in titles) if titles else 0.15
    fig.subplots_adjust(left=0.1, right=0.99, top=1 - (head + 0.1) / (size * C + 0.5), bottom=0.02, wspace=0.05,
                        hspace=0.05)
    return fig


# --------------------------------------------------------------------------------------------------
# The synthetic side: the vanilla base model, txt2img, pool-style caption prompts (Geng et al.'s setting)
# --------------------------------------------------------------------------------------------------
def pool_style_captions(rows: Sequence[dict], class_names: Sequence[str], seed: int,
                        noise_rate: float = 0.5) -> dict[str, str]:
    """id -> a web-style caption naming the row's own class (the pool's caption templates and noise
    words, ``pool.web_captions`` with no wrong / missing class word): the prompts of the base model,
    as Geng et al. prompt SD with LAION-style captions of the class."""
    caps = web_captions([f"geng/{r['id']}" for r in rows], [int(r["label"]) for r in rows], class_names,
                        seed, wrong_rate=0.0, missing_rate=0.0, noise_rate=noise_rate, style_rate=0.0)
    return {str(r["id"]): c["caption"] for r, c in zip(rows, caps)}


def synthesize_base_t2i(set_dir: str | Path, base_model: str | Path, manifest: str | Path,
                        class_names: Sequence[str], total_needed: int, seed: int = 0,
                        num_inference_steps: int = 30, guidance_scale: float = 2.0, image_size: int = 16,
                        batch_size: int = 64, device: str = "auto") -> tuple[Path, list[list[int]]]:
    """Generate (resumably, through ``synthesize.synthesize``) at least ``total_needed`` images with the
    vanilla base model (row ``base-novg-t2i``: no LoRA, no guidance token, txt2img, CFG
    ``guidance_scale`` 2.0 as Geng et al.): ``k = ceil(total_needed / n_train)`` rounds over the train
    split (per class as in the split), prompts ``photo of <class>, <pool-style caption>``, into
    ``<set_dir>/k<k>`` (a larger k later reuses the smaller set's images, as 03's sets do).
    Returns the set folder and per-class index lists into ``synthesize.synthetic_rows(folder)``."""
    train = data.read_manifest(manifest, "train")
    k = max(1, math.ceil(total_needed / max(len(train), 1)))
    set_dir = Path(set_dir) / f"k{k}"
    cap_path = set_dir.parent / "pool_style_captions.json"
    set_dir.mkdir(parents=True, exist_ok=True)
    if not cap_path.exists():
        write_json(cap_path, pool_style_captions(train, class_names, seed))
    st = syn.row_settings("base-novg-t2i", str(base_model), num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, image_size=image_size, seed=seed, use_captions=True)
    syn.synthesize(set_dir, st, k, source_manifest=manifest, captions=cap_path, batch_size=batch_size,
                   device=device, progress=False)
    rows = syn.synthetic_rows(set_dir)
    return set_dir, [[i for i, r in enumerate(rows) if r["label"] == c] for c in range(len(class_names))]


# --------------------------------------------------------------------------------------------------
# Composition: one call per stage of 08
# --------------------------------------------------------------------------------------------------
def fingerprint(images: torch.Tensor) -> str:
    """Content hash of an image tensor (the cache key of what an adapted model was trained on)."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]


def retrieve_all(task: Task, index: Index, strategies: Sequence[str], *, exclude: torch.Tensor,
                 knn_per_class: int = 0, dedup_within: float = 0.98, clip_score_threshold: float = 0.0,
                 clip_score_percentile: float = 0.0, seed: int = 0
                 ) -> tuple[dict[str, list[list[int]]], dict[str, StrategyStats]]:
    """Every strategy's retrieved set from ``task.pool``, as far as the pool yields (caption: every match;
    k-NN: the ``knn_per_class`` nearest per class, 0 = the caption strategy's mean matches per class),
    test duplicates (``exclude``) removed, then :func:`deduplicate` at ``dedup_within`` (CLIP image
    cosine) and :func:`clip_score_filter` against the zero-shot head (``clip_score_threshold`` > 0, else
    ``clip_score_percentile`` > 0, else none). Returns picks and :class:`StrategyStats` per strategy."""
    pool, C, N = task.pool, len(task.class_names), len(task.pool.ids)
    kw = dict(captions=pool.captions, class_names=task.class_names, pool_feats=index.image,
              caption_feats=index.caption, template_feats=index.templates, seed=seed)
    if not knn_per_class:
        n_cap = sum(map(len, retrieve("caption", [N] * C, exclude=exclude, **kw)))
        knn_per_class = max(1, round(n_cap / C))
    known = any(v >= 0 for v in pool.labels)
    picks, out = {}, {}
    for st in strategies:
        budget = [N] * C if st == "caption" else [knn_per_class] * C
        raw = retrieve(st, budget, **kw)
        no_dup = retrieve(st, budget, exclude=exclude, **kw)
        dd = deduplicate(no_dup, index.image, dedup_within) if dedup_within < 1 else no_dup
        p = clip_score_filter(dd, index.image, index.head,
                              clip_score_threshold if clip_score_threshold > 0 else None,
                              clip_score_percentile if clip_score_threshold <= 0 and clip_score_percentile > 0 else None)
        picks[st] = p
        out[st] = StrategyStats(sum(map(len, p)), [len(x) for x in p],
                                label_precision(p, pool.labels) if known else None,
                                int(sum(bool(exclude[i]) for idx in raw for i in idx)),
                                sum(map(len, no_dup)) - sum(map(len, dd)), sum(map(len, dd)) - sum(map(len, p)))
    return picks, out


def strategy_lines(strategies: dict[str, StrategyStats]) -> list[str]:
    """One line per strategy: images, label precision (known labels only), what each filter removed."""
    out = []
    for st, v in strategies.items():
        prec = "n/a" if v.label_precision is None else f"{v.label_precision:.3f}"
        out.append(f"{strategy_label(st):<28} {v.n_images:>5} images, label precision {prec}; removed: "
                   f"{v.test_duplicates_removed} test duplicates, {v.removed_by_dedup} duplicates, "
                   f"{v.removed_by_clip_score} by CLIP score")
    return out


def synthetic_source(run: Any, table2_row: str, image_size: int, name: str, label: str, max_k: int = 0
                     ) -> Optional[AdaptSource]:
    """An :class:`AdaptSource` pooling every complete set of 03's record (``SynthesisRecord``) that
    realises ``table2_row`` (all synthesis seeds; k up to ``max_k``, 0 = any), or None when 03 made none."""
    root = run_root(run)
    rec = syn.SynthesisRecord.load_or_none(root)
    if rec is None:
        return None
    dirs = [root / s.path for s in rec.sets if s.complete and s.table2_row == table2_row and (not max_k or s.k <= max_k)]
    rows = [r for d in dirs for r in syn.synthetic_rows(d)]
    if not rows:
        return None
    images = data.load_images(rows, image_size)
    C = max(int(r["label"]) for r in rows) + 1
    per_class = [[i for i, r in enumerate(rows) if int(r["label"]) == c] for c in range(C)]
    return AdaptSource(name, label, images, per_class, fingerprint(images))


def generated_source(set_dir: str | Path, base_model: str | Path, manifest: str | Path,
                     class_names: Sequence[str], total: int, image_size: int, seed: int = 0,
                     num_inference_steps: int = 30, device: str = "auto") -> AdaptSource:
    """:func:`synthesize_base_t2i` as an :class:`AdaptSource` named ``synthetic``."""
    folder, per_class = synthesize_base_t2i(set_dir, base_model, manifest, class_names, total, seed,
                                            num_inference_steps, image_size=image_size, device=device)
    images = data.load_images(syn.synthetic_rows(folder), image_size)
    return AdaptSource("synthetic", "synthetic: base model txt2img, pool-style prompts (generated here)", images,
                       per_class, fingerprint(images))


def scratch_comparison(run: Any, task: Task, picks: dict[str, list[list[int]]], strategies: Sequence[str],
                       seeds: Sequence[int], classifier_dir: str = "classifiers", device: str = "auto"
                       ) -> tuple[list[dict], dict]:
    """The second table: 04's from-scratch classifier (the recipe of 04's ``ClassifierRecord``) on the
    full real train split, on 03's default set at k = 1 (:func:`default_set_dir`) and on each retrieved
    set (written under ``artifacts/retrieved/<strategy>/``), same seeds; 04's finished runs are reused.
    Returns the table rows (:func:`summarise_runs` entries with ``group``) and :func:`claims`."""
    root = run_root(run)
    art = root / "artifacts"
    recipe = classify.ClassifierRecord.load(root).recipe
    synthetic_dir = default_set_dir(root)
    manifest = art / "data" / "manifest.csv"
    specs = [classify.RunSpec("real", [classify.Source("real", str(manifest))], seed=s, table="08") for s in seeds]
    if synthetic_dir is not None:
        specs += [classify.RunSpec(synthetic_dir.parent.name, [classify.Source("synthetic", str(synthetic_dir), k=1,
                                                                                name=synthetic_dir.parent.name)],
                                   seed=s, k=1, table="08") for s in seeds]
    for st in strategies:
        if sum(map(len, picks[st])):
            d = write_image_set(art / "retrieved" / st, task.pool.images, picks[st], task.class_names, task.pool.ids,
                                tag=f"retrieval:{st}", prompts=task.pool.captions)
            specs += [classify.RunSpec(f"retrieved-{st}", [classify.Source("retrieved", str(d), name=st)], seed=s,
                                       table="08") for s in seeds]
    records = classify.run_experiments(specs, manifest, art / classifier_dir, recipe, device=device, verbose=False)
    lines = summarise_runs(records, f"synthetic {synthetic_dir.parent.name}/k1" if synthetic_dir else "synthetic",
                           recipe)
    table = [{"group": g, **{k: v for k, v in ln.items() if k != "per_seed"},
              "per_seed": {str(s): v for s, v in ln["per_seed"].items()}} for g, ln in lines.items()]
    return table, claims(lines)


def scratch_lines(table: Sequence[dict], scratch_claims: dict) -> list[str]:
    """The second table as text (label, training images, mean and std of top-1 over seeds) and the
    verdict of :func:`claims` (``stats.compare`` / ``stats.verdict``)."""
    out = [f"{r['label']:<34} n={r['n_train']:>5}  top-1 {r['mean']:5.1f} (std {r['std']:.1f})" for r in table]
    return out + [f"best retrieval vs synthetic: {scratch_claims.get('verdict', 'n/a')}"]


def default_set_dir(run: Any) -> Optional[Path]:
    """03's full-method set at k = 1 and its first synthesis seed (``SynthesisRecord``), or None."""
    root = run_root(run)
    rec = syn.SynthesisRecord.load_or_none(root)
    if rec is None:
        return None
    sets = sorted((s for s in rec.sets if s.complete and s.table2_row == rec.default_row and s.k == 1),
                  key=lambda s: s.synthesis_seed)
    return root / sets[0].path if sets else None


def sweep_sources(run: Any, task: Task, picks: list[list[int]], strategy: str, sizes: dict[str, list[int]],
                  generate: bool = False, synthesis_steps: int = 30, seed: int = 0, device: str = "auto"
                  ) -> tuple[list[AdaptSource], dict[str, list[int]]]:
    """The lines of the sweep: ``retrieved`` (``picks`` of ``strategy`` from ``task.pool``), ``synthetic``
    (03's ``base-novg-t2i`` sets; generated here from 01's base model with :func:`generated_source` when
    ``generate`` or when 03 made none) and ``realfake`` (03's full-method sets at k = 1, when present);
    each line's sizes capped by the images it has (``realfake`` takes the shared sizes)."""
    root = run_root(run)
    art = root / "artifacts"
    image_size = int(task.train[0].shape[-1])
    sources = [AdaptSource("retrieved", f"retrieved real ({strategy_label(strategy)})", task.pool.images, picks,
                           fingerprint(task.pool.images))]
    syn_src = None if generate else synthetic_source(root, "base-novg-t2i", image_size, "synthetic",
                                                     "synthetic: base model txt2img (03's base-novg-t2i)")
    if syn_src is None:
        syn_src = generated_source(art / "retrieved" / "synthetic-base-t2i", task.base_model,
                                   art / "data" / "manifest.csv", task.class_names, max(sizes["synthetic"]), image_size,
                                   seed, synthesis_steps, device)
    full = synthetic_source(root, "lora-dm-vg-lp", image_size, "realfake", "Real-Fake full method (lora-dm-vg-lp, k=1)", 1)
    sources += [s for s in (syn_src, full) if s is not None]
    avail = {s.name: sum(map(len, s.per_class)) for s in sources}
    return sources, {s.name: [n for n in sizes.get(s.name, sizes["retrieved"]) if n <= avail[s.name]] for s in sources}
