"""Step 01's results record and compositions: the miniature world's build summary and its checks.

``01_prepare`` ends with ``PrepareRecord(...).save(run)`` (``results/01_prepare.json``); consumers call
``PrepareRecord.load(run)``. On a resume, reused parts keep their summary (steps, final loss, seconds),
rebuilt from each part's own ``training_log.json`` / ``DONE.json`` (``pretrain.build_part``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .pretrain import MiniatureConfig, PartSummary, train_oracle
from .probe import probe_accuracy, sample_prompts, synthetic_only_check
from .records import Record
from .rundir import read_json, write_json

@dataclass
class OracleCheck:
    """The capacity check: the base architecture trained on the target train split itself (the
    oracle), sampled at 1x (as many images per class as the train split, ``photo of [classname]``,
    txt2img), a classifier of the kit's recipe trained on those samples only vs on the real train
    images, both tested on the real test split (top-1 %). Goal: ``gap`` <= 3 points."""
    steps: int
    n_samples: int
    real_top1: float
    synthetic_top1: float
    gap: float
    probe: float                 # the sample probe: real-trained classifier labels the samples correctly
    sample_steps: int
    guidance_scale: float
    recipe: str
    max_gap: float = 3.0
    within_goal: bool = False

@dataclass
class PrepareRecord(Record):
    """What ``01_prepare`` made: the splits, the miniature world's parts and its checks."""
    STEP = "01_prepare"
    dataset: str
    image_size: int
    class_names: list[str]
    counts: dict[str, int]                      # images per split (pool / train / test)
    excluded: int                               # unreadable images left out
    excluded_list: str                          # their list, relative to the run folder
    base_model: str                             # relative to the run folder (miniature) or an id / path
    clip_model: str
    clip_projection_dim: int
    captioner: str
    parts: dict[str, PartSummary] = field(default_factory=dict)   # clip / vae / base / oracle
    oracle: Optional[OracleCheck] = None
    mmd2_clip: dict[str, float] = field(default_factory=dict)
    base_eval: dict[str, Any] = field(default_factory=dict)
    caption_kinds: Optional[dict[str, float]] = None
    pool_shift: Optional[dict[str, float]] = None
    torch_threads: int = 1
    seconds_total: float = 0.0

    @classmethod
    def build(cls, run: Any, parts: dict[str, PartSummary], **fields: Any) -> "PrepareRecord":
        """The record with part paths stored relative to the run folder."""
        rel = {k: PartSummary(**{**vars(p), "path": cls.rel(run, p.path)}) for k, p in parts.items()}
        for key in ("base_model", "clip_model", "excluded_list"):
            if key in fields:
                fields[key] = cls.rel(run, fields[key])
        return cls(parts=rel, **fields)

@dataclass
class Splits:
    """The data of step 01: manifest rows per split, images (uint8 tensors for the miniature world, lazy
    PIL datasets for a real data set), labels, class names and the excluded images."""
    rows: list[dict]
    class_names: list[str]
    split: dict[str, list[dict]]
    images: dict[str, Any]
    labels: dict[str, torch.Tensor]
    excluded: int
    excluded_list: Path


def check_models(base_model: str, clip_model: str) -> bool:
    """True for the miniature world (``base_model`` empty: pretrain it here). A real base model needs
    its CLIP too (the one whose image embedding size equals the base model's text width)."""
    if base_model and not clip_model:
        raise ValueError("base_model is set to a real model: set clip_model too (the CLIP whose image embedding "
                         "size equals the base model's text width, e.g. openai/clip-vit-large-patch14 for SD 1.5)")
    return not base_model


def load_splits(dataset: str, data_root: str, data_dir: str | os.PathLike, split_fractions: dict[str, float],
                seed: int, class_map: str, test_root: str, image_size: int, miniature: bool) -> Splits:
    """``data.prepare_data`` (pool / train / test, disjoint and stratified) and the images: every split in
    memory for the miniature world; train and test read lazily for a real data set. Checks that the
    splits are disjoint and that train, test (and, for the miniature world, the pool) are not empty."""
    from . import data

    manifest = data.prepare_data(dataset, data_root, data_dir, split_fractions, seed, class_map,
                                 test_root=test_root)
    rows = data.read_manifest(manifest)
    split = {s: [r for r in rows if r["split"] == s] for s in data.SPLITS}
    ids = {s: {r["id"] for r in split[s]} for s in data.SPLITS}
    if ids["pool"] & ids["train"] or ids["pool"] & ids["test"] or ids["train"] & ids["test"]:
        raise RuntimeError(f"{manifest}: the pool / train / test splits overlap; rerun with a fresh run folder")
    for s in ("train", "test") + (("pool",) if miniature else ()):
        if not split[s]:
            raise ValueError(f"the {s} split is empty: raise split_fractions['{s}'] (the miniature world needs "
                             "an upstream pool, a train and a test split)")
    if miniature:
        images = {s: data.load_images(split[s], image_size) for s in data.SPLITS if split[s]}
    else:
        images = {s: data.ImageDataset(split[s], image_size) for s in ("train", "test") if split[s]}
    labels = {s: torch.tensor([r["label"] for r in split[s]]) for s in images}
    n_excluded, excluded_list = excluded_count(Path(data_dir))
    return Splits(rows, data.class_names(rows), split, images, labels, n_excluded, excluded_list)


def pool_figures(pool: dict[str, Any], train_images: torch.Tensor, train_labels: torch.Tensor,
                 class_names: Sequence[str]):
    """One pool image per class with its web caption, and one target train image per class."""
    import textwrap

    import numpy as np

    from .plots import image_grid

    n = min(10, len(class_names))
    show = [int(np.flatnonzero(np.asarray(pool["labels"]) == c)[0]) for c in range(n)]
    fig_pool = image_grid(pool["images"][show], nrow=n, titles=[textwrap.fill(pool["captions"][i]["caption"], 16)
                                                                 for i in show],
                          size=1.1, suptitle="upstream pool (shifted images, web captions)")
    tshow = [int(np.flatnonzero(train_labels.numpy() == c)[0]) for c in range(n)]
    fig_target = image_grid(train_images[tshow], nrow=n, titles=[textwrap.fill(class_names[c], 14) for c in range(n)],
                            size=1.1, suptitle="target task (train)")
    return fig_pool, fig_target


def caption_examples(pool: dict[str, Any], class_names: Sequence[str], n: int = 8) -> list[str]:
    """``n`` pool captions spread over the pool, one line each: class -> caption (kind)."""
    step = max(1, len(pool["ids"]) // n)
    return [f"{class_names[pool['labels'][i]]:>12} -> {pool['captions'][i]['caption']!r} "
            f"({pool['captions'][i]['kind']})" for i in range(0, len(pool["ids"]), step)[:n]]


def clip_features(clip_path: str, clip_key: str, splits: Splits, features_dir: str | os.PathLike,
                  batch_size: int = 64, device: str = "auto") -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """CLIP image embeddings of train and test into ``features/clip_image.safetensors`` (cached; removed
    first when the CLIP changed, see :func:`reset_stale_features`) and the per-class means of the train
    features into ``features/class_means.safetensors`` (the visual guidance token's, Sec. 3.2).
    Returns ``(vision model, {split: features}, class means)``."""
    from .features import class_mean_features, extract_clip_features, save_feature_cache
    from .models import load_clip_vision

    fdir = Path(features_dir)
    if reset_stale_features(fdir, clip_key):
        print("CLIP changed: old feature caches removed")
    vision, processor = load_clip_vision(clip_path, device=device)
    feats = {}
    for s in [s for s in ("train", "test") if s in splits.images]:
        feats[s] = extract_clip_features((vision, processor), splits.images[s], [r["id"] for r in splits.split[s]],
                                         fdir / "clip_image.safetensors", batch_size=batch_size, device=device,
                                         progress=False).float()
    means = class_mean_features(feats["train"], splits.labels["train"], len(splits.class_names))
    save_feature_cache(fdir / "class_means.safetensors", splits.class_names, means,
                       {"model": clip_path, "kind": "class_mean", "split": "train"})
    return vision, feats, means


def evaluate_base(pipe, vision, splits: Splits, feats: dict[str, torch.Tensor], pool: dict[str, Any] | None,
                  n_per_class: int, guidance_scale: float, sample_steps: int, seed: int = 0):
    """The base model's class-prompted samples (``probe.sample_prompts``), their MMD² to the target train
    set beside the real noise floor (``probe.mmd_report``) and, with the miniature ``pool``, the sample
    probes (luminance-normalised pixels, raw pixels, CLIP features) on the real test set (the ceiling),
    the samples and the shifted pool. Returns ``(base_eval, samples, sample labels)``."""
    from .pretrain import clip_image_embeds
    from .probe import feature_probe_accuracy, mmd_report

    t0 = time.time()
    x, y = sample_prompts(pipe, splits.class_names, n_per_class, guidance_scale, sample_steps, seed)
    out: dict[str, Any] = {"sample_seconds": round(time.time() - t0, 1)}
    fx = clip_image_embeds(vision, x)
    out["mmd2"] = mmd_report(fx, feats["train"], feats["test"])
    if pool is not None:
        im, lab = splits.images, splits.labels
        pool_y = torch.tensor(pool["labels"])
        sets = {"test": (im["test"], lab["test"]), "base": (x, y), "pool": (pool["images"], pool_y)}
        out["probe_style_normalised"] = probe_accuracy(im["train"], lab["train"], sets, True, seed)
        out["probe_raw_pixels"] = probe_accuracy(im["train"], lab["train"], sets, False, seed)
        out["probe_clip"] = feature_probe_accuracy(
            feats["train"], lab["train"], {"test": (feats["test"], lab["test"]), "base": (fx, y),
                                           "pool": (clip_image_embeds(vision, pool["images"]), pool_y)}, seed)
    return out, x, y


def pool_mmd(vision, feats: dict[str, torch.Tensor], pool: dict[str, Any] | None,
             unshifted_pool: torch.Tensor | None) -> dict[str, float]:
    """MMD² in CLIP space: train vs test (the noise floor), shifted pool vs train (the gap fine-tuning must
    close) and the unshifted pool vs train."""
    from .pretrain import clip_image_embeds
    from .probe import mmd2

    out = {"train_vs_test": mmd2(feats["train"], feats["test"])} if "test" in feats else {}
    if pool is not None:
        out["pool_vs_train"] = mmd2(clip_image_embeds(vision, pool["images"]), feats["train"])
        out["pool_unshifted_vs_train"] = mmd2(clip_image_embeds(vision, unshifted_pool), feats["train"])
    return out


def excluded_count(data_dir: str | os.PathLike) -> tuple[int, Path]:
    """Number of excluded (unreadable) images and the path of their list (``data/excluded.csv``)."""
    path = Path(data_dir) / "excluded.csv"
    if not path.exists():
        return 0, path
    import csv

    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f)), path

def oracle_check(art_dir: str | os.PathLike, class_names: Sequence[str], train: tuple, test: tuple,
                 train_rows: Sequence[dict], prompts: Sequence[str], cfg: MiniatureConfig,
                 sample_steps: int = 20, guidance_scale: float = 2.0, recipe: str = "miniature",
                 device: str = "auto", log=print) -> tuple[OracleCheck, PartSummary, torch.Tensor, torch.Tensor]:
    """Train (or reuse) the capacity oracle (``pretrain.train_oracle``), sample it at 1x and compare
    synthetic-only with real top-1 (``probe.synthetic_only_check``). ``train`` / ``test``:
    ``(uint8 images, labels)``. Returns ``(check, oracle part, samples, sample labels)``."""
    from .models import load_pipeline

    art = Path(art_dir)
    part = train_oracle(art, train_rows, train[0], prompts, cfg, log=log)
    pipe = load_pipeline(part.path, kind="txt2img", device=device)
    counts = [int((train[1] == c).sum()) for c in range(len(class_names))]
    x, y = sample_prompts(pipe, class_names, counts, guidance_scale, sample_steps, cfg.seed + 1)
    acc = synthetic_only_check(art / "miniature" / ".oracle_check" / part.params_hash, train, (x, y), test,
                               len(class_names), recipe, image_size=cfg.image_size, seed=cfg.seed, device=device)
    probe = probe_accuracy(train[0], train[1], {"oracle": (x, y)}, seed=cfg.seed)["oracle"]
    check = OracleCheck(steps=cfg.oracle_steps, n_samples=len(y), real_top1=acc["real"],
                        synthetic_top1=acc["synthetic"], gap=acc["gap"], probe=probe, sample_steps=sample_steps,
                        guidance_scale=guidance_scale, recipe=recipe)
    check.within_goal = check.gap <= check.max_gap
    return check, part, x, y

def reset_stale_features(features_dir: str | os.PathLike, clip_key: str) -> bool:
    """Feature caches are tied to the CLIP that made them: when ``clip_key`` (the CLIP part's content
    hash, or the id of ``clip_model``) differs from the one recorded in ``features/clip_key.json``, every
    ``*.safetensors`` there is removed. Returns True if something was removed."""
    d = Path(features_dir)
    d.mkdir(parents=True, exist_ok=True)
    rec = d / "clip_key.json"
    old = read_json(rec).get("clip") if rec.exists() else None
    removed = False
    if old != clip_key:
        for f in d.glob("*.safetensors"):
            f.unlink()
            removed = True
        write_json(rec, {"clip": clip_key})
    return removed

__all__ = ["OracleCheck", "PrepareRecord", "Splits", "caption_examples", "check_models", "clip_features", "evaluate_base",
           "excluded_count", "load_splits", "oracle_check", "pool_figures", "pool_mmd", "reset_stale_features"]
