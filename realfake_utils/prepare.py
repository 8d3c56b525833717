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

from . import data
from .features import (build_prompt, caption_images, class_mean_features, extract_clip_features, make_captioner,
                       save_feature_cache)
from .models import load_clip_vision, load_pipeline
from .plots import image_grid, per_class_grid
from .pool import POOL_INDEX_DIR, PoolIndex, caption_stats, make_pool, save_pool
from .pretrain import MiniatureConfig, PartSummary, build_miniature, clip_image_embeds, part_hash, train_oracle
from .classify import synthetic_only_check
from .probe import feature_probe_accuracy, mmd2, mmd_report, probe_accuracy, sample_prompts
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
    pool_index: Optional[PoolIndex] = None      # the upstream pool as an image-text index (pool.save_pool)
    torch_threads: int = 1
    seconds_total: float = 0.0

    @classmethod
    def build(cls, run: Any, parts: dict[str, PartSummary], **fields: Any) -> "PrepareRecord":
        """The record with part paths stored relative to the run folder."""
        rel = {k: PartSummary(**{**vars(p), "path": cls.rel(run, p.path)}) for k, p in parts.items()}
        for key in ("base_model", "clip_model", "excluded_list"):
            if key in fields:
                fields[key] = cls.rel(run, fields[key])
        if fields.get("pool_index") is not None:
            idx = fields["pool_index"]
            fields["pool_index"] = PoolIndex(cls.rel(run, idx.path), idx.key, idx.n)
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


def pool_figures(pool: dict[str, Any] | None, splits: Splits) -> dict[str, Any]:
    """``01_pool_images``: one pool image per class with its web caption; ``01_target_images``: one target
    train image per class (none without a miniature pool)."""
    import textwrap

    import numpy as np

    if pool is None:
        return {}
    class_names, n = splits.class_names, min(10, len(splits.class_names))
    show = [int(np.flatnonzero(np.asarray(pool["labels"]) == c)[0]) for c in range(n)]
    fig_pool = image_grid(pool["images"][show], nrow=n, titles=[textwrap.fill(pool["captions"][i]["caption"], 16)
                                                                 for i in show],
                          size=1.1, suptitle="upstream pool (shifted images, web captions)")
    tshow = [int(np.flatnonzero(splits.labels["train"].numpy() == c)[0]) for c in range(n)]
    fig_target = image_grid(splits.images["train"][tshow], nrow=n,
                            titles=[textwrap.fill(class_names[c], 14) for c in range(n)],
                            size=1.1, suptitle="target task (train)")
    return {"01_pool_images": fig_pool, "01_target_images": fig_target}


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
                 device: str = "auto", log=print, max_gap: float = 3.0
                 ) -> tuple[OracleCheck, PartSummary, torch.Tensor, torch.Tensor]:
    """Train (or reuse) the capacity oracle (``pretrain.train_oracle``), sample it at 1x and compare
    synthetic-only with real top-1 (``classify.synthetic_only_check``). ``train`` / ``test``:
    ``(uint8 images, labels)``. Returns ``(check, oracle part, samples, sample labels)``."""
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
                        guidance_scale=guidance_scale, recipe=recipe, max_gap=float(max_gap))
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


# --------------------------------------------------------------------------------------------------
# 01's stages, one call each: the notebook is parameters -> these calls -> figures -> checks
# --------------------------------------------------------------------------------------------------
def upstream_pool(splits: Splits, cfg: MiniatureConfig, art_dir: str | os.PathLike | None = None
                  ) -> dict[str, Any]:
    """The miniature world's upstream pool (``pool.make_pool``: the ``pool`` split's images shifted,
    with web-like captions), the stand-in for LAION that the base model and CLIP are pretrained on. With
    ``art_dir``, also written once as an image-text index under ``artifacts/data/pool/``
    (``pool.save_pool``: what 08 retrieves from, never rebuilding it); its ``pool.PoolIndex`` is
    ``pool["index"]`` (the record's ``pool_index``, see :func:`record_fields`)."""
    pool = make_pool(splits.split["pool"], splits.images["pool"], splits.class_names, cfg)
    if art_dir is not None:
        pool["index"] = save_pool(Path(art_dir) / POOL_INDEX_DIR, pool, splits.class_names)
    return pool


def pool_lines(pool: dict[str, Any] | None, class_names: Sequence[str], base_model: str = "") -> list[str]:
    """The pool's caption kinds (``pool.caption_stats``) and :func:`caption_examples`, one line each."""
    if pool is None:
        return [f"base_model = {base_model}: no miniature pool (the base model was pretrained elsewhere)"]
    kinds = {k: round(v, 3) for k, v in caption_stats(pool["captions"]).items()}
    return [f"caption kinds in the pool: {kinds}"] + caption_examples(pool, class_names)


def pretrain_miniature(art_dir: str | os.PathLike, splits: Splits, cfg: MiniatureConfig) -> dict[str, PartSummary]:
    """``pretrain.build_miniature`` on the pool split: the miniature CLIP, VAE and base model, each reused
    when its parameters and the pool are unchanged. Returns the parts' summaries by name."""
    return build_miniature(art_dir, splits.split["pool"], splits.images["pool"], splits.class_names, cfg)["parts"]


def parts_line(parts: dict[str, PartSummary]) -> str:
    """One line: per part, trained or cached, its steps, final loss and seconds."""
    if not parts:
        return "no miniature parts (base_model and clip_model are given)"
    return str({k: f"{'trained' if p.built else 'cached'}: {p.steps} steps, loss {p.final_loss:.4f}, {p.seconds:.0f}s"
                for k, p in parts.items()})


def model_paths(art_dir: str | os.PathLike, base_model: str, clip_model: str) -> tuple[str, str]:
    """``(base model, CLIP)`` of the later steps: ``base_model`` / ``clip_model`` when given (an id or a
    path), else the miniature world's ``artifacts/miniature/base`` and ``artifacts/miniature/clip``."""
    art = Path(art_dir)
    return base_model or str(art / "miniature" / "base"), clip_model or str(art / "miniature" / "clip")


@dataclass
class TargetFeatures:
    """The target train set's conditioning (Sec. 3.2, Sec. 4.1): captions by id, the prompts
    ``photo of [classname], [caption]``, the CLIP vision model, its image features per split and the
    per-class means of the train features (the visual guidance token's)."""
    captions: dict[str, str]
    prompts: list[str]
    vision: Any
    feats: dict[str, torch.Tensor]
    class_means: torch.Tensor

    @property
    def dim(self) -> int:
        """The CLIP image embedding size (``projection_dim``: the guidance token's width, Sec. 3.2)."""
        return int(self.vision.config.projection_dim)

    def lines(self) -> list[str]:
        shapes = {s: tuple(f.shape) for s, f in self.feats.items()}
        return [f"example prompts: {sorted(set(self.prompts))[:3]}",
                f"CLIP features: {shapes} class means: {tuple(self.class_means.shape)}"]


def target_features(art_dir: str | os.PathLike, splits: Splits, clip_path: str, clip_model: str = "",
                    captioner: str = "none", captioner_model: str = "", batch_size: int = 64,
                    device: str = "auto") -> TargetFeatures:
    """Captions of the target train images (``features.make_captioner``, cached in ``captions.json``;
    ``none`` for the fine-grained sets and EuroSAT as in the paper, BLIP-2 for ImageNet, Sec. 4.1), their
    prompts (``features.build_prompt``) and :func:`clip_features` (the cache is keyed by the miniature
    CLIP's content hash, or by the ``clip_model`` id)."""
    art = Path(art_dir)
    cap = make_captioner(captioner, captioner_model, device=device)
    captions = caption_images(cap, splits.images["train"], [r["id"] for r in splits.split["train"]],
                              art / "captions.json", progress=False)
    prompts = [build_prompt(r["class_name"], captions[r["id"]]) for r in splits.split["train"]]
    clip_key = clip_model or part_hash(clip_path)
    vision, feats, means = clip_features(clip_path, clip_key, splits, art / "features", batch_size, device)
    return TargetFeatures(captions, prompts, vision, feats, means)


def capacity_oracle(art_dir: str | os.PathLike, splits: Splits, target: TargetFeatures, cfg: MiniatureConfig,
                    sample_steps: int = 20, guidance_scale: float = 2.0, device: str = "auto",
                    max_gap: float = 3.0):
    """:func:`oracle_check` on the target's train and test splits (trained on ``target.prompts``) and the
    figure of its samples (``plots.per_class_grid``). Returns ``(check, oracle part, figure)``."""
    im, lab = splits.images, splits.labels
    check, part, x, y = oracle_check(art_dir, splits.class_names, (im["train"], lab["train"]),
                                     (im["test"], lab["test"]), splits.split["train"], target.prompts, cfg,
                                     sample_steps, guidance_scale, device=device, max_gap=max_gap)
    fig = per_class_grid(x, y, splits.class_names, per_class=8, suptitle="capacity oracle (trained on the target)")
    return check, part, fig


def oracle_line(check: OracleCheck) -> str:
    """One line: the oracle's real and synthetic-only top-1 (%), their gap and the sample probe."""
    return (f"oracle: real {check.real_top1:.1f} %, synthetic only {check.synthetic_top1:.1f} % "
            f"(gap {check.gap:.1f}), sample probe {check.probe:.3f}")


def sample_base(base_path: str, target: TargetFeatures, splits: Splits, pool: dict[str, Any] | None,
                n_per_class: int, guidance_scale: float, sample_steps: int, seed: int = 0, device: str = "auto"):
    """The base model (``models.load_pipeline``, txt2img) through :func:`evaluate_base`, and the figure
    of its samples per class. Returns ``(base_eval, figure)``; ``({}, None)`` when ``n_per_class`` is 0."""
    if n_per_class <= 0:
        return {}, None
    pipe = load_pipeline(base_path, kind="txt2img", device=device)
    out, x, y = evaluate_base(pipe, target.vision, splits, target.feats, pool, n_per_class, guidance_scale,
                              sample_steps, seed)
    fig = per_class_grid(x, y, splits.class_names, per_class=min(10, n_per_class),
                         suptitle=f"base model, 'photo of [class]', guidance {guidance_scale}")
    return out, fig


def record_fields(splits: Splits, pool: dict[str, Any] | None, t_start: float) -> dict[str, Any]:
    """The :class:`PrepareRecord` fields that come from the splits, the pool and the run: class names,
    images per split, the excluded images (count and list), the pool's caption kinds
    (``pool.caption_stats``) and index (:func:`upstream_pool`), torch's thread count and the seconds since
    ``t_start`` (``time.time()``)."""
    return {"class_names": list(splits.class_names), "counts": {s: len(v) for s, v in splits.split.items()},
            "excluded": splits.excluded, "excluded_list": str(splits.excluded_list),
            "caption_kinds": caption_stats(pool["captions"]) if pool is not None else None,
            "pool_index": pool.get("index") if pool is not None else None,
            "torch_threads": torch.get_num_threads(), "seconds_total": round(time.time() - t_start, 1)}


__all__ = ["OracleCheck", "PrepareRecord", "Splits", "TargetFeatures", "capacity_oracle", "caption_examples",
           "check_models", "clip_features", "evaluate_base", "excluded_count", "load_splits", "model_paths",
           "oracle_check", "oracle_line", "parts_line", "pool_figures", "pool_lines", "pool_mmd",
           "pretrain_miniature", "record_fields", "reset_stale_features", "sample_base", "target_features",
           "upstream_pool"]
