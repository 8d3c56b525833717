# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: realfake-kit
#     language: python
#     name: realfake-kit
# ---

# %% [markdown]
# # 08 Retrieval baseline: retrieved real images vs synthetic images at equal size (Geng et al. 2024)
#
# **The question.** Real-Fake (Yuan et al., ICLR 2024) trains classifiers on images *generated* by a model
# pretrained on an upstream pool (Stable Diffusion on LAION) and reports that, after distribution matching,
# synthetic-only training comes close to training on the real target data (Table 1, Table 2). Geng et al.
# (2024, "The Unmet Promise of Synthetic Training Images: Using Retrieved Real Images Performs Better")
# ask what the generator adds over its own training data: instead of generating, **retrieve** real images
# of the target classes from the generator's upstream pool (LAION-2B for SD) and train on those, at the same
# number of images. They report that retrieved real images match or beat synthetic ones on every benchmark
# they tried (e.g. ImageNet, fine-grained sets, and FGVC-Aircraft), so the synthetic images' gain comes
# mostly from the pool the generator was trained on.
#
# **This step** retrieves, from the same upstream pool the miniature base model and CLIP were pretrained
# on (`01_prepare`: the shifted pool images with their web captions; for real runs a LAION-style index
# given by `pool_index`), per class:
#
# - (a) **caption match**: pool images whose caption contains the class name as a word (Geng et al.'s
#   string matching; the pool's wrong and missing captions make this label-noisy);
# - (b) **CLIP k-NN**, *image-to-image*: the pool images nearest (cosine) to the class-mean CLIP image
#   feature of the target train set; *text-to-image*: nearest to the CLIP text feature of
#   `a photo of a [classname]` (the CLIP text tower of the same model);
#
# an image wanted by several classes goes to the one that scores it highest; pool images that are SSCD
# near-duplicates of a **test** image are removed first (so the baseline never trains on test images);
# the **budget** per class is the synthetic set's size (the default set of `03_synthesize` at `k=1`).
# Each retrieved set is written under `artifacts/retrieved/<strategy>/` in the synthetic-set format and
# the classifier is trained on it with the same recipe and seeds as `04_train_classifier`; the synthetic
# set and real data runs of `04` are reused when present (trained here otherwise). Reported: label
# precision of each strategy (the pool's true labels are known in miniature), test duplicates removed,
# top-1 mean and std over seeds, and the two papers' claims side by side, whichever way they come out.

# %% tags=["parameters"]
preset = "digits"
run_dir = ""
seed = 0
device = "auto"
image_size = 16
clip_model = ""            # "": the miniature CLIP of this run (artifacts/miniature/clip); else an id / path
pool_index = ""            # "": the miniature pool of 01_prepare; else a folder: images + captions.jsonl (see README)
strategies = ["caption", "clip_i2i", "clip_t2i"]
text_template = "a photo of a {}"
synthetic_set = ""         # "": the default set of 03_synthesize (results/03_synthesize.json), e.g. "lora-dm-vg-lp/k1"
# SSCD de-duplication against the test split (same names as 07_sscd, so a preset's `shared:` sets both)
sscd_model = ""            # "": 07_sscd's miniature descriptor (artifacts/sscd/), trained here as 07 does if missing
sscd_sha256 = ""           # required with sscd_model: the file's SHA-256 (checked before loading)
sscd_preprocess = "square" # with sscd_model: "short_side" (SSCD default, size 288) | "square"; else 07's
sscd_size = 16             # with sscd_model: 288 for the real SSCD models; else 07's
dedup_threshold = 0.9      # SSCD cosine above which a pool image is a copy of a test image (real SSCD: 0.5)
min_near_copy_recall = 0.9 # check: planted near copies of test images caught at least this often
max_pool_flagged = 0.5     # check: at most this share of the pool flagged as test duplicates
# classifier: the recipe of 04_train_classifier (read from its runs, else from its parameters), these seeds
seeds = [0, 1, 2]
torch_threads = 1          # 1 is fastest on a CPU shared with other jobs; 0: min(cores, 4)
classifier_dir = "classifiers"   # under artifacts/, shared with 04_train_classifier
grid_per_class = 6
feature_batch_size = 64

# %%
import time
from pathlib import Path

import numpy as np
import torch

import realfake_utils as rf
from realfake_utils import classify, data, features, retrieval, sscd
from realfake_utils import miniature as mini
from realfake_utils import synthesize as syn
from realfake_utils.rundir import read_json, write_json

run = rf.setup(globals(), "08_retrieval_baseline")
torch.set_num_threads(torch_threads or min(torch.get_num_threads(), 4))
t_start = time.time()
art = run.artifacts
manifest = art / "data" / "manifest.csv"
rows = data.read_manifest(manifest)  # a clear error if 01_prepare has not run
class_names = data.class_names(rows)
C = len(class_names)
split = {s: [r for r in rows if r["split"] == s] for s in data.SPLITS}
clip_path = clip_model or str(art / "miniature" / "clip")
if not (Path(clip_path).exists() or (not clip_path.startswith(("/", ".")) and clip_path.count("/") == 1)):
    raise FileNotFoundError(f"no CLIP model at {clip_path}: run 01_prepare first or set clip_model")
train_images = data.load_images(split["train"], image_size)
test_images = data.load_images(split["test"], image_size)
train_labels = torch.tensor([r["label"] for r in split["train"]])
print(f"{C} classes; train {len(split['train'])}, test {len(split['test'])}; CLIP {clip_path}")

# %% [markdown]
# ## The upstream pool
#
# In miniature, the pool is recomputed deterministically from the manifest's `pool` split with the settings
# the miniature CLIP was trained with (read from its key file `artifacts/miniature/clip.params.json`;
# `01_prepare` does not save the shifted images or captions): the same shifted images and web captions the
# base model and CLIP saw. With `pool_index`, the images and captions come from that folder instead.

# %%
if pool_index:
    pool_rows = retrieval.read_pool_index(pool_index, class_names)
    pool_ids = [r["id"] for r in pool_rows]
    pool_images = data.load_images(pool_rows, image_size)
    pool_captions = [r["caption"] for r in pool_rows]
    pool_labels = [r["label"] for r in pool_rows]      # -1: unknown
    pool_source = {"kind": "index", "path": str(pool_index)}
else:
    if not split["pool"]:
        raise ValueError("this run has no miniature pool (split_fractions['pool'] = 0 or a real base model): "
                         "set pool_index to a folder of images + captions.jsonl")
    try:
        cfg01 = rf.params.resolve(run.preset, notebooks=["01_prepare"])["01_prepare"]
    except Exception:
        cfg01 = None
    pc = retrieval.miniature_pool_config(clip_path, cfg01)
    cfg = mini.MiniatureConfig(image_size=pc["image_size"], seed=pc["seed"], pool_shift=pc["pool_shift"],
                               caption_wrong_rate=pc["caption_wrong_rate"],
                               caption_missing_rate=pc["caption_missing_rate"],
                               caption_noise_rate=pc["caption_noise_rate"],
                               caption_style_rate=pc["caption_style_rate"])
    if pc["pool_fingerprint"] and pc["pool_fingerprint"] != mini.pool_fingerprint(split["pool"]):
        raise ValueError(f"the miniature CLIP was trained on another pool than this manifest's: rerun 01_prepare")
    pool = mini.make_pool(split["pool"], data.load_images(split["pool"], pc["image_size"]), class_names, cfg)
    pool_ids, pool_images, pool_labels = pool["ids"], pool["images"], pool["labels"]
    pool_captions = [c["caption"] for c in pool["captions"]]
    pool_source = {"kind": "miniature", "config_from": pc["source"],
                   "caption_kinds": mini.caption_stats(pool["captions"])}
    if pool_images.shape[-1] != image_size:
        pool_images = torch.nn.functional.interpolate(pool_images.float(), size=(image_size, image_size),
                                                      mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
labels_known = any(l >= 0 for l in pool_labels)
print(f"pool: {len(pool_ids)} images ({pool_source['kind']}); true labels known: {labels_known}")
for i in range(0, len(pool_ids), max(1, len(pool_ids) // 5))[:5]:
    print(f"  {pool_ids[i]}: {pool_captions[i]!r}" + (f" (true: {class_names[pool_labels[i]]})" if pool_labels[i] >= 0 else ""))

# %% [markdown]
# ## Budget: the synthetic set's size per class

# %%
set_rel = synthetic_set
if not set_rel and run.result_path("03_synthesize").exists():
    set_rel = run.load_results("03_synthesize").get("default_set", "")
syn_dir = art / "synthetic" / set_rel if set_rel else None
if syn_dir is not None and syn.read_synthetic_manifest(syn_dir):
    syn_rows = syn.read_synthetic_manifest(syn_dir)
    budget = retrieval.budget_from_set(syn_rows, C)
    budget_source = f"synthetic set {set_rel}"
else:
    syn_dir = None
    budget = retrieval.budget_from_set(split["train"], C)
    budget_source = "train split (no synthetic set found" + (f" at {set_rel})" if set_rel else ")")
    print(f"NOTE: {budget_source}: the budget falls back to the real train split's size per class")
print(f"budget from the {budget_source}: {sum(budget)} images, per class {budget}")

# %% [markdown]
# ## CLIP features: pool images, target class means, text queries
#
# Image embeddings of the pool (cached in `artifacts/features/pool_clip_image.safetensors`) and of the target
# train set (the `01_prepare` cache), the per-class means (the image-to-image queries), and the text
# embeddings of `a photo of a [classname]` from the text tower of the same CLIP (`CLIPTextModelWithProjection`).

# %%
pool_feats = features.extract_clip_features(clip_path, pool_images, pool_ids, art / "features" / "pool_clip_image.safetensors",
                                            batch_size=feature_batch_size, device=device, progress=False).float()
train_feats = features.extract_clip_features(clip_path, train_images, [r["id"] for r in split["train"]],
                                             art / "features" / "clip_image.safetensors",
                                             batch_size=feature_batch_size, device=device, progress=False).float()
class_means = features.class_mean_features(train_feats, train_labels, C)
queries = [text_template.format(c) for c in class_names]
text_feats = retrieval.clip_text_features(clip_path, queries)
print("pool", tuple(pool_feats.shape), "class means", tuple(class_means.shape), "text", tuple(text_feats.shape),
      "e.g.", repr(queries[0]))

# %% [markdown]
# ## De-duplication against the test split (SSCD)
#
# SSCD descriptors (Pizzi et al. 2022) of every pool image and every test image; a pool image whose cosine
# similarity to some test image exceeds `dedup_threshold` is never retrieved. The miniature descriptor is the
# one `07_sscd` trains (its file under `artifacts/sscd/`, loaded after a SHA-256 check), trained here the
# same way if it is missing. The miniature descriptor (16 px digits) scores unrelated digits of the same shape
# up to about 0.9 (the real SSCD's copy / replication thresholds are 0.75 / 0.5), so the digits default is
# `dedup_threshold = 0.9`; the checks: SSCD-style near copies of test images (exact, crop, colour jitter,
# JPEG) planted as queries must be caught, and most of the pool must be kept. Measured too: false alarms
# on the target train split (distinct images, so every flag there is a false alarm), and test images passed
# through the pool's own shift (tint, contrast, strokes, rotation: a harder leak than a copy detector is
# built for).

# %%
if sscd_model:
    desc_path, desc_sha, desc_source = Path(sscd_model), sscd_sha256, "sscd_model"
else:  # 07_sscd's miniature descriptor, with 07's preprocessing; trained here exactly as 07 does if missing
    p07 = rf.params.resolve(run.preset, notebooks=["07_sscd"])["07_sscd"]
    sscd_size, sscd_preprocess = p07["sscd_size"], p07["sscd_preprocess"]
    desc_path = art / "sscd" / "miniature_descriptor.pt"
    if desc_path.exists() and desc_path.with_suffix(".json").exists():
        desc_sha, desc_source = sscd.recorded_sha256(desc_path), "07_sscd"
    else:  # same parameters and images as 07: 07 reuses this file (its cache key matches)
        ref_images, _, _ = data.load_split(art / "data", ["pool", "train"], p07["image_size"])
        desc_path, desc_sha = sscd.train_miniature_descriptor(
            ref_images, desc_path, size=p07["sscd_size"], dim=p07["descriptor_dim"], width=p07["descriptor_width"],
            steps=p07["descriptor_steps"], batch_size=p07["descriptor_batch_size"], seed=p07["seed"],
            device=device, log_every=0)
        desc_source = "trained here with 07_sscd's parameters"
descriptor = sscd.load_descriptor(desc_path, desc_sha)
pool_desc = sscd.compute_descriptors(descriptor, pool_images, size=sscd_size, mode=sscd_preprocess, device=device)
test_desc = sscd.compute_descriptors(descriptor, test_images, size=sscd_size, mode=sscd_preprocess, device=device)
is_dup = retrieval.duplicate_mask(pool_desc, test_desc, dedup_threshold)
top1_pool_test = sscd.topk_similar(pool_desc, test_desc, 1)[0][:, 0]
# false positives: target train images are distinct from the test images, so any flagged one is a false alarm
train_flagged = retrieval.duplicate_mask(sscd.compute_descriptors(descriptor, train_images, size=sscd_size,
                                                                  mode=sscd_preprocess, device=device),
                                         test_desc, dedup_threshold)
# planted copies of test images: SSCD's near copies (exact, crop, colour jitter, JPEG), and, harder, test images
# passed through the miniature pool's shift (tint, contrast, strokes, rotation)
n_leak = min(20, len(split["test"]))
near = [img for i in range(n_leak) for img in sscd.near_copies(test_images[i]).values()]
near_desc = sscd.compute_descriptors(descriptor, torch.stack(near), size=sscd_size, mode=sscd_preprocess, device=device)
near_caught = retrieval.duplicate_mask(near_desc, test_desc, dedup_threshold)
shift_caught = None
if not pool_index:
    leaked, _ = mini.shift_images(test_images[:n_leak], [f"leak/{r['id']}" for r in split["test"][:n_leak]], seed,
                                  pc["pool_shift"])
    shift_caught = retrieval.duplicate_mask(
        sscd.compute_descriptors(descriptor, leaked, size=sscd_size, mode=sscd_preprocess, device=device),
        test_desc, dedup_threshold)
print(f"descriptor: {desc_path.name} ({desc_source}), threshold {dedup_threshold}")
print(f"pool images flagged as test duplicates: {int(is_dup.sum())} of {len(is_dup)} (pool->test top-1 similarity "
      f"median {top1_pool_test.median():.2f}, max {top1_pool_test.max():.2f}); false alarms on the train split: "
      f"{int(train_flagged.sum())}/{len(train_flagged)}")
print(f"planted near copies caught: {int(near_caught.sum())}/{len(near)}"
      + ("" if shift_caught is None else f"; test images with the pool's shift caught: {int(shift_caught.sum())}/{n_leak}"))

# %%
# NBVAL_CHECK_OUTPUT
assert near_caught.float().mean() >= min_near_copy_recall, f"only {int(near_caught.sum())}/{len(near)} planted near copies caught"
assert is_dup.float().mean() <= max_pool_flagged, (f"{int(is_dup.sum())} of {len(is_dup)} pool images flagged as test "
                                                   "duplicates: dedup_threshold is too low for this descriptor")
print(f"planted near copies of test images caught >= {min_near_copy_recall}: True; "
      f"pool flagged <= {max_pool_flagged}: True")

# %% [markdown]
# ## Retrieval
#
# Each strategy fills each class up to the budget (fewer if the pool has fewer candidates, e.g. caption
# matches), best score first (caption match: seeded random order among matches), each pool image at most
# once. Label precision: the share of retrieved images whose true pool label is the class they were
# retrieved for.

# %%
kw = dict(captions=pool_captions, class_names=class_names, pool_feats=pool_feats, class_mean_feats=class_means,
          text_feats=text_feats, seed=seed)
picks, stats, set_dirs = {}, {}, {}
for strategy in strategies:
    p = retrieval.retrieve(strategy, budget, exclude=is_dup, **kw)
    p_nodedup = retrieval.retrieve(strategy, budget, **kw)
    picks[strategy] = p
    dups_removed = int(sum(bool(is_dup[i]) for idx in p_nodedup for i in idx))
    out = retrieval.write_image_set(art / "retrieved" / strategy, pool_images, p, class_names, pool_ids,
                                    tag=f"retrieval:{strategy}", prompts=pool_captions)
    set_dirs[strategy] = out
    prec = retrieval.label_precision(p, pool_labels) if labels_known else None
    per_class_prec = [retrieval.label_precision([idx if c == k else [] for k, idx in enumerate(p)], pool_labels)
                      if labels_known and p[c] else None for c in range(C)]
    stats[strategy] = {"n_images": sum(map(len, p)), "per_class": [len(x) for x in p], "label_precision": prec,
                       "label_precision_per_class": per_class_prec, "test_duplicates_removed": dups_removed,
                       "dir": str(out.relative_to(run.root)), "set_hash": retrieval.set_hash(out)}
    print(f"{retrieval.strategy_label(strategy):<26} {stats[strategy]['n_images']:>5} images "
          f"(budget {sum(budget)}), label precision "
          f"{'n/a' if prec is None else f'{prec:.3f}'}, test duplicates removed {dups_removed}")

# %%
# NBVAL_CHECK_OUTPUT
for strategy in strategies:
    p = picks[strategy]
    flat = [i for idx in p for i in idx]
    assert len(flat) == len(set(flat)), "a pool image was retrieved twice"
    assert all(len(p[c]) <= budget[c] for c in range(C)) and not any(is_dup[i] for i in flat)
    assert len(syn.read_synthetic_manifest(set_dirs[strategy])) == len(flat)
    print(f"{strategy}: within budget, no test duplicate, no image twice, set written: True")

# %%
fig = retrieval.plot_retrieved(pool_images, picks, class_names, pool_labels if labels_known else None,
                               per_class=grid_per_class)
run.save_figure(fig, "08_retrieved_examples")

# %% [markdown]
# ## Classifiers: retrieved vs synthetic vs real
#
# Same recipe and seeds as `04_train_classifier`: when `04`'s runs exist in `artifacts/classifiers/` their
# recipe is used here and their finished runs (real data, the synthetic set) are read back, not retrained.
# Every run is resumable (a finished run is skipped); a retrieved-set run made from an older version of its
# set is retrained.

# %%
clf_root = art / classifier_dir
ref_cfg = sorted(clf_root.glob("real__k0__s*/config.json"))
if ref_cfg:
    recipe_d = read_json(ref_cfg[0])["recipe"]
    recipe_source = f"04_train_classifier's run {ref_cfg[0].parent.name}"
else:
    p04 = rf.params.resolve(run.preset, notebooks=["04_train_classifier"])["04_train_classifier"]
    recipe_d = classify.load_recipe(p04["recipe"], image_size=image_size, **p04["recipe_overrides"])
    recipe_source = f"04_train_classifier's parameters (recipe '{p04['recipe']}', overrides {p04['recipe_overrides']})"
print(f"recipe from {recipe_source}: {recipe_d['model']}, {recipe_d['epochs']} epochs, seeds {list(seeds)}")

specs = [classify.RunSpec("real", [classify.Source("real", str(manifest))], seed=s, k=0, table="08")
         for s in seeds]
syn_name, syn_k = (set_rel.split("/")[0], int(set_rel.split("/k")[-1])) if syn_dir is not None else ("", 0)
if syn_dir is not None:
    specs += [classify.RunSpec(syn_name, [classify.Source("synthetic", str(syn_dir), k=syn_k, name=syn_name)],
                               seed=s, k=syn_k, table="08") for s in seeds]
retr_specs = [classify.RunSpec(f"retrieved-{st}", [classify.Source("retrieved", str(set_dirs[st]), name=st)], seed=s,
                               k=0, table="08", extra={"set_hash": stats[st]["set_hash"], "strategy": st})
              for st in strategies for s in seeds if stats[st]["n_images"] > 0]
for st in strategies:
    if stats[st]["n_images"] == 0:
        print(f"NOTE: {st} retrieved no image: no classifier for it")
import shutil
for stale in retrieval.stale_runs(clf_root, retr_specs, recipe_d):
    print(f"retraining {stale.name}: its retrieved set or recipe changed")
    shutil.rmtree(stale)
t0 = time.time()
records = classify.run_experiments(specs + retr_specs, manifest, clf_root, recipe_d, device=device)
train_seconds = time.time() - t0

# %%
lines = retrieval.summarise_runs(records, f"synthetic {set_rel}", recipe_d)
order = ["real", "synthetic"] + [f"retrieved-{s}" for s in strategies]
order = [g for g in order if g in lines]
print(f"{'training data':<30} {'n_train':>7} {'label prec.':>11} {'top-1 % mean':>12} {'+-std':>6}  per seed")
for g in order:
    ln = lines[g]
    st = stats.get(g[len("retrieved-"):], {}) if g.startswith("retrieved-") else {}
    prec = st.get("label_precision")
    print(f"{ln['label']:<30} {ln['n_train']:>7} {('-' if prec is None else f'{prec:.3f}'):>11} {ln['mean']:>12.2f} "
          f"{ln['std']:>6.2f}  {[round(v, 1) for v in ln['per_seed'].values()]}")
claims = retrieval.claims(lines)
if "realfake_gap_real_minus_synthetic" in claims:
    print(f"Real-Fake (synthetic close to real): real - synthetic = {claims['realfake_gap_real_minus_synthetic']:+.2f} points")
if "best_retrieval" in claims:
    print(f"Geng et al. (retrieved beats synthetic at equal size): best retrieval {claims['best_retrieval']} "
          f"{claims['geng_margin_retrieved_minus_synthetic']:+.2f} points vs synthetic "
          f"(pooled std {claims['pooled_std']:.2f}): {'holds' if claims['retrieval_beats_synthetic'] else 'does not hold'} here")

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(1.3 * len(order) + 2.5, 3.8))
colors = {"real": "C1", "synthetic": "C0"}
for i, g in enumerate(order):
    ln = lines[g]
    ax.bar(i, ln["mean"], yerr=ln["std"], capsize=4, alpha=0.8, color=colors.get(g, "C2"))
    ax.scatter([i] * len(ln["per_seed"]), list(ln["per_seed"].values()), color="k", s=10, zorder=3)
    ax.text(i, 1, f"n={ln['n_train']}", ha="center", va="bottom", fontsize=7, color="w")
ax.set_xticks(range(len(order)), [lines[g]["label"] for g in order], rotation=20, ha="right", fontsize=8)
ax.set_ylabel("top-1 on the real test split (%)")
ax.set_ylim(0, 100)
ax.set_title("Real-Fake: synthetic close to real?  Geng et al.: retrieved > synthetic at equal size?\n"
             f"(mean +- std over {len(seeds)} seeds, dots: seeds)", fontsize=9)
fig.tight_layout()
run.save_figure(fig, "08_retrieval_vs_synthetic")

# %%
# NBVAL_CHECK_OUTPUT
assert all(len(lines[g]["per_seed"]) == len(seeds) for g in order) and "real" in lines
assert all(0 <= lines[g]["mean"] <= 100 for g in order)
print(f"rows with one run per seed: {order}")

# %%
run.save_results({
    "pool": {"n": len(pool_ids), **pool_source, "labels_known": labels_known},
    "budget": {"source": budget_source, "synthetic_set": set_rel if syn_dir is not None else None,
               "per_class": budget, "total": sum(budget)},
    "dedup": {"descriptor": str(desc_path), "descriptor_source": desc_source, "threshold": dedup_threshold,
              "pool_flagged": int(is_dup.sum()), "train_false_alarms": int(train_flagged.sum()),
              "planted_near_copies_caught": int(near_caught.sum()), "planted_near_copies": len(near),
              "shifted_test_images_caught": None if shift_caught is None else int(shift_caught.sum()),
              "shifted_test_images": n_leak, "pool_test_top1_median": float(top1_pool_test.median())},
    "text_template": text_template,
    "strategies": {st: {**stats[st], "accuracy": lines.get(f"retrieved-{st}")} for st in strategies},
    "synthetic": lines.get("synthetic"), "real": lines.get("real"),
    "claims": claims, "recipe_source": recipe_source, "recipe": recipe_d["name"], "seeds": list(seeds),
    "train_seconds": round(train_seconds, 1), "seconds_total": round(time.time() - t_start, 1),
})
print(f"08_retrieval_baseline done in {time.time() - t_start:.0f}s")
