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
#     display_name: realfake-kit (.venv)
#     language: python
#     name: realfake-kit
# ---

# %% [markdown]
# # 01 Prepare: the miniature world, captions and CLIP features (Sec. 3.1-3.2, Sec. 4.1)
#
# **What the paper starts from.** Stable Diffusion 1.5 and CLIP ViT-L/14 were pretrained on LAION: web
# images with alt-text captions whose distribution differs from the target task. Real-Fake (Yuan et al.,
# ICLR 2024) fine-tunes SD with LoRA on the target training set to close that gap (Sec. 3), conditioning
# on the prompt `photo of [classname], [caption]` (BLIP-2 captions for ImageNet, none for the fine-grained
# and EuroSAT sets, Sec. 4.1) and on a visual guidance token, a CLIP image embedding in place of the last
# text token (Sec. 3.2). The paper reports that vanilla SD's synthetic data lies off the real data in CLIP
# space (Fig. 1, left) and that fine-tuning closes much of the accuracy gap (Table 2).
#
# **This step, in miniature** (digits and eurosat-mini presets; with `base_model` set to a real model such
# as `runwayml/stable-diffusion-v1-5` the pretraining is skipped and CLIP comes from `clip_model`):
#
# 1. `data.prepare_data` splits the data set into an **upstream pool** and the **target task** (train /
#    test), disjoint and stratified.
# 2. The pool is given a gap from the target the way web data has one (`realfake_utils.miniature`):
#    - *captions* like alt-text: templates such as `image of seven` or `7 picture`, with the class word
#      **swapped** for another class (`caption_wrong_rate`), **missing** (`caption_missing_rate`, e.g.
#      `free download jpg`), web noise words (`caption_noise_rate`: `hd`, `stock`, `wallpaper` ...), and
#      sometimes words for what is visible (`caption_style_rate`: the colour cast, `bold`, `tilted`);
#    - *images* shifted photometrically and geometrically (`pool_shift`): a random colour tint, lower
#      contrast, thicker strokes (digits), a small rotation and translation.
# 3. Pretrained from scratch on the pool, in the real formats, each cached by a hash of its parameters
#    (a rerun skips it, a changed parameter retrains it): a miniature **CLIP** (`CLIPModel`, ViT + text
#    tower, contrastive on pool image / caption pairs; its projection size equals its text width, as
#    ViT-L/14's 768 equals SD 1.5's), a tiny **AutoencoderKL**, and a **UNet2DConditionModel** conditioned
#    on the frozen CLIP text tower's hidden states with 10% prompt dropout (classifier-free guidance),
#    saved as a `StableDiffusionPipeline` folder: `artifacts/miniature/base`.
# 4. Target-task captions (a pluggable captioner), prompts, CLIP image features of train and test
#    (cached, resumable) and the per-class mean features used by the visual guidance token.
#
# Shown and measured: the gap (pool vs target images and captions, MMD² in CLIP space), the base model's
# samples per class, their MMD² to the target train set and a linear-probe check that they show the right
# class. The synthetic-only accuracy of the vanilla base model (Table 2's first row) comes with
# `03_synthesize` and `04_train_classifier`.

# %% tags=["parameters"]
preset = "digits"
run_dir = ""
seed = 0
device = "auto"
torch_threads = 0           # 0: min(cores, 4); 1 is fastest on a CPU shared with other jobs
dataset = "digits"          # digits | eurosat | imagefolder
data_root = ""              # folder of the data set (not needed for digits)
class_map = ""              # optional folder name -> class name map (imagefolder)
test_root = ""              # optional separate test tree (e.g. ImageNet val/ in class folders): the test split
image_size = 16
split_fractions = {"pool": 0.5, "train": 0.3, "test": 0.2}
base_model = ""             # "": pretrain the miniature base model here; else an id / path (skips it)
clip_model = ""             # "": the miniature CLIP; else an id / path (e.g. openai/clip-vit-large-patch14)
captioner = "none"          # none | blip2 (ImageNet presets)
captioner_model = ""        # e.g. Salesforce/blip2-opt-2.7b
# the pool's gap from the target
pool_shift = {"tint": 0.5, "contrast": 0.6, "thicken": 0.7, "thicken_prob": 0.5, "rotate_deg": 12.0, "translate_px": 1.0}
caption_wrong_rate = 0.1
caption_missing_rate = 0.2
caption_noise_rate = 0.5
caption_style_rate = 0.5
# miniature pretraining (sizes and steps)
model_max_length = 16
clip_width = 64
clip_layers = 2
clip_patch = 4
clip_steps = 300
clip_batch = 256
clip_lr = 0.001
vae_channels = [32, 64]
vae_steps = 300
vae_batch = 32
vae_lr = 0.001
unet_channels = [32, 64]
unet_steps = 1200
unet_batch = 64
unet_lr = 0.002
prompt_dropout = 0.1
# evaluation of the base model
base_samples_per_class = 20   # 0: skip (e.g. SD 1.5 on CPU)
sample_steps = 20
guidance_scale = 2.0
probe_check = "pixels"         # pixels (luminance probe: digits) | clip (probe on CLIP features: colour matters)
min_base_accuracy = 0.6       # that probe must find the prompted class in the base samples at least this often
feature_batch_size = 64

# %%
import textwrap
import time

import numpy as np
import torch

import realfake_utils as rf
from realfake_utils import data, features, models, plots
from realfake_utils import miniature as mini

run = rf.setup(globals(), "01_prepare")
torch.set_num_threads(torch_threads or min(torch.get_num_threads(), 4))
t_start = time.time()
art = run.artifacts
miniature = not base_model
if not miniature and not clip_model:
    raise ValueError("base_model is set to a real model: set clip_model too (the CLIP whose image embedding "
                     "size equals the base model's text width, e.g. openai/clip-vit-large-patch14 for SD 1.5)")
manifest = data.prepare_data(dataset, data_root, art / "data", split_fractions, seed, class_map,
                             test_root=test_root)
rows = data.read_manifest(manifest)
class_names = data.class_names(rows)
split = {s: [r for r in rows if r["split"] == s] for s in data.SPLITS}
if miniature:  # small: every split in memory as uint8 tensors
    images = {s: data.load_images(split[s], image_size) for s in data.SPLITS if split[s]}
else:         # a real data set: read lazily (PIL images) by the captioner and the CLIP feature extractor
    images = {s: data.ImageDataset(split[s], image_size) for s in ("train", "test") if split[s]}
labels = {s: torch.tensor([r["label"] for r in split[s]]) for s in images}

# %%
# NBVAL_CHECK_OUTPUT
ids = {s: {r["id"] for r in split[s]} for s in data.SPLITS}
disjoint = not (ids["pool"] & ids["train"] or ids["pool"] & ids["test"] or ids["train"] & ids["test"])
assert disjoint and split["train"] and split["test"]
assert not miniature or split["pool"], "the miniature world needs an upstream pool: split_fractions['pool'] > 0"
print(f"{len(class_names)} classes; pool / train / test disjoint: {disjoint}")

# %% [markdown]
# ## The gap: upstream pool vs target task
#
# The pool's images are shifted and its captions are web-like (deterministic per image id and seed). Top:
# pool images as the miniature pretraining sees them, with their captions; bottom: target train images.

# %%
cfg = mini.MiniatureConfig(
    image_size=image_size, seed=seed, pool_shift=dict(pool_shift), caption_wrong_rate=caption_wrong_rate,
    caption_missing_rate=caption_missing_rate, caption_noise_rate=caption_noise_rate,
    caption_style_rate=caption_style_rate, model_max_length=model_max_length, clip_width=clip_width,
    clip_layers=clip_layers, clip_patch=clip_patch, clip_steps=clip_steps, clip_batch=clip_batch, clip_lr=clip_lr,
    vae_channels=list(vae_channels), vae_steps=vae_steps, vae_batch=vae_batch, vae_lr=vae_lr,
    unet_channels=list(unet_channels), unet_steps=unet_steps, unet_batch=unet_batch, unet_lr=unet_lr,
    prompt_dropout=prompt_dropout)
gap = {}
if miniature:
    pool = mini.make_pool(split["pool"], images["pool"], class_names, cfg)
    gap["caption_kinds"] = mini.caption_stats(pool["captions"])
    show = [int(np.flatnonzero(np.asarray(pool["labels"]) == c)[0]) for c in range(len(class_names))][:10]
    fig = plots.image_grid(pool["images"][show], nrow=len(show),
                           titles=[textwrap.fill(pool["captions"][i]["caption"], 16) for i in show],
                           size=1.1, suptitle="upstream pool (shifted images, web captions)")
    run.save_figure(fig, "01_pool_images")
    tshow = [int(np.flatnonzero(labels["train"].numpy() == c)[0]) for c in range(len(class_names))][:10]
    fig = plots.image_grid(images["train"][tshow], nrow=len(tshow), titles=[textwrap.fill(class_names[c], 14) for c in range(len(tshow))],
                           size=1.1, suptitle="target task (train)")
    run.save_figure(fig, "01_target_images")
    print("caption kinds in the pool:", {k: round(v, 3) for k, v in gap["caption_kinds"].items()})
    for i in range(0, len(pool["ids"]), max(1, len(pool["ids"]) // 8))[:8]:
        c = pool["captions"][i]
        print(f"  {class_names[pool['labels'][i]]:>12} -> {c['caption']!r} ({c['kind']})")
else:
    print(f"base_model = {base_model}: no miniature pool (the base model was pretrained elsewhere)")

# %% [markdown]
# ## Pretraining the miniature CLIP and base model on the pool
#
# Each part is reused when its parameters (and the pool) are unchanged; training checkpoints under
# `artifacts/miniature/.work/` let a killed run resume.

# %%
pre = None
if miniature:
    pre = mini.build_miniature(art, split["pool"], images["pool"], class_names, cfg)
    print({k: f"{'trained' if pre['built'][k] else 'cached'} in {pre['seconds'][k]:.0f}s" for k in pre["built"]})
    if pre["losses"]:
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(pre["losses"]), figsize=(3.2 * len(pre["losses"]), 2.4), squeeze=False)
        for ax, (name, ls) in zip(axes[0], pre["losses"].items()):
            k = max(1, len(ls) // 30)
            ax.plot(np.convolve(ls, np.ones(k) / k, mode="valid"))
            ax.set_title(f"{name} loss", fontsize=9)
            ax.set_xlabel("step")
        fig.tight_layout()
        run.save_figure(fig, "01_pretraining_losses")
base_path = base_model or str(art / "miniature" / "base")
clip_path = clip_model or str(art / "miniature" / "clip")

# %% [markdown]
# ## Target captions, prompts and CLIP image features
#
# Captions of the target train images come from the captioner (`none` for digits and EuroSAT, as in the
# paper; BLIP-2 for ImageNet presets) into `artifacts/captions.json`; prompts follow the paper's template.
# CLIP image embeddings of train and test are extracted once into
# `artifacts/features/clip_image.safetensors` (the cache `02_finetune` and `03_synthesize` read), with the
# per-class means of the train features in `artifacts/features/class_means.safetensors`.

# %%
cap = features.make_captioner(captioner, captioner_model, device=device)
captions = features.caption_images(cap, images["train"], [r["id"] for r in split["train"]], art / "captions.json",
                                   progress=False)
prompts = [features.build_prompt(r["class_name"], captions[r["id"]]) for r in split["train"]]
print("example prompts:", sorted(set(prompts))[:3])

clip_key = mini.artifact_hash(clip_path) if not clip_model else clip_model
if mini.reset_stale_features(art / "features", clip_key):
    print("CLIP changed: old feature caches removed")
vision, processor = models.load_clip_vision(clip_path, device=device)
feat_path = art / "features" / "clip_image.safetensors"
feats = {}
for s in [s for s in ("train", "test") if s in images]:
    feats[s] = features.extract_clip_features((vision, processor), images[s], [r["id"] for r in split[s]], feat_path,
                                              batch_size=feature_batch_size, device=device, progress=False).float()
class_means = features.class_mean_features(feats["train"], labels["train"], len(class_names))
features.save_feature_cache(art / "features" / "class_means.safetensors", class_names, class_means,
                            {"model": clip_path, "kind": "class_mean", "split": "train"})
print("CLIP features:", {s: tuple(f.shape) for s, f in feats.items()}, "class means:", tuple(class_means.shape))

# %%
# NBVAL_CHECK_OUTPUT
dim = vision.config.projection_dim
if miniature:
    from transformers import CLIPTextConfig
    text_width = CLIPTextConfig.from_pretrained(base_path, subfolder="text_encoder").hidden_size
    models.check_guidance_compat(dim, text_width)
    print(f"CLIP projection_dim == base text width: {dim == text_width}")
assert feats["train"].shape == (len(split["train"]), dim) and torch.isfinite(feats["train"]).all()
print(f"features: one per train and test image: {all(feats[s].shape[0] == len(split[s]) for s in feats)}")

# %% [markdown]
# ## How far the pool is from the target, in CLIP space
#
# MMD² (Gaussian kernel, median bandwidth, unbiased) between CLIP image embeddings. `train vs test`
# (two samples of the target) is the noise level; `pool vs train` is the upstream / target gap the
# fine-tuning has to close.

# %%
from realfake_utils import losses

mmd = {"train_vs_test": float(losses.mmd2(feats["train"], feats["test"]))} if "test" in feats else {}
if miniature:
    pool_feats = mini.clip_image_embeds(vision, pool["images"])
    mmd["pool_vs_train"] = float(losses.mmd2(pool_feats, feats["train"]))
    unshifted = mini.clip_image_embeds(vision, images["pool"])
    mmd["pool_unshifted_vs_train"] = float(losses.mmd2(unshifted, feats["train"]))
print({k: round(v, 4) for k, v in mmd.items()})

# %% [markdown]
# ## The base model's samples
#
# `photo of [classname]` at guidance 2.0 through the stock `StableDiffusionPipeline` (loaded with
# `models.load_pipeline`, UniPC). Measured: MMD² to the target train set in CLIP space (compare with
# `pool_vs_train` above: the base model reproduces the pool, not the target), and a linear probe
# (logistic regression on real target-train pixels, luminance standardised per image so that it judges
# the class, not the colour) applied to the samples: the fraction showing the prompted class. The raw-pixel
# probe, which also sees the colour and contrast gap, and a probe on the CLIP features (for EuroSAT, whose
# classes are largely colours and textures, `probe_check = "clip"`) are given for comparison; each is
# also applied to the real test set (its ceiling) and to the shifted pool.

# %%
base_eval = {}
if base_samples_per_class > 0:
    pipe = models.load_pipeline(base_path, kind="txt2img", device=device)
    t0 = time.time()
    samples, sample_labels = mini.sample_base(pipe, class_names, base_samples_per_class, guidance_scale,
                                              sample_steps, seed)
    base_eval["sample_seconds"] = round(time.time() - t0, 1)
    fig = plots.per_class_grid(samples, sample_labels, class_names, per_class=min(10, base_samples_per_class),
                               suptitle=f"base model, 'photo of [class]', guidance {guidance_scale}")
    run.save_figure(fig, "01_base_samples")
    sample_feats = mini.clip_image_embeds(vision, samples)
    base_eval["mmd2_base_vs_train"] = float(losses.mmd2(sample_feats, feats["train"]))
    if miniature:  # linear probes on real target-train pixels
        evalsets = {"test": (images["test"], labels["test"]), "base": (samples, sample_labels),
                    "pool": (pool["images"], torch.tensor(pool["labels"]))}
        base_eval["probe_style_normalised"] = mini.probe_accuracy(images["train"], labels["train"], evalsets, True, seed)
        base_eval["probe_raw_pixels"] = mini.probe_accuracy(images["train"], labels["train"], evalsets, False, seed)
        base_eval["probe_clip"] = mini.feature_probe_accuracy(
            feats["train"], labels["train"], {"test": (feats["test"], labels["test"]), "base": (sample_feats, sample_labels),
                                              "pool": (pool_feats, torch.tensor(pool["labels"]))}, seed)
    print({k: v for k, v in base_eval.items()})

# %%
# NBVAL_CHECK_OUTPUT
if "probe_style_normalised" in base_eval:
    acc = base_eval["probe_style_normalised" if probe_check == "pixels" else "probe_clip"]["base"]
    assert acc >= min_base_accuracy, f"base samples show the prompted class only {acc:.2f} of the time ({probe_check} probe)"
    print(f"base samples show the prompted class ({probe_check} probe >= {min_base_accuracy}): {acc >= min_base_accuracy}")
    if miniature:
        print(f"base samples lie off the target (MMD2 base-train > train-test): "
              f"{base_eval['mmd2_base_vs_train'] > mmd['train_vs_test']}")

# %%
results = {
    "dataset": dataset, "image_size": image_size, "num_classes": len(class_names), "class_names": class_names,
    "counts": {s: len(split[s]) for s in data.SPLITS}, "captioner": captioner,
    "base_model": base_path, "clip_model": clip_path, "clip_projection_dim": int(dim),
    "mmd2_clip": mmd, "caption_kinds": gap.get("caption_kinds"), "pool_shift": dict(pool_shift) if miniature else None,
    "base_eval": base_eval, "seconds_total": round(time.time() - t_start, 1), "torch_threads": torch.get_num_threads(),
}
if pre is not None:
    results["pretraining"] = {"built": pre["built"], "seconds": {k: round(v, 1) for k, v in pre["seconds"].items()},
                              "hashes": pre["hashes"],
                              "final_loss": {k: float(np.mean(v[-20:])) for k, v in pre["losses"].items()}}
run.save_results(results)
print(f"01_prepare done in {results['seconds_total']:.0f}s")
