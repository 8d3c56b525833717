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
# # 03 Synthesize: latent-prior img2img with LoRA and guidance tokens (Sec. 3.2-3.3, Tables 2-3, Fig. 1-2)
#
# Generates the synthetic training sets. For every real **train** image and every round `r < k` (scale
# multiplier *k*, Table 3 / Fig. 2: 1, 2, 5, 10) one image is sampled with the official code's settings:
# UniPC, 30 steps, guidance scale 2.0, LoRA scale 0.5, prompt `photo of [classname], [caption]` with the
# negative prompt, and
#
# - **latent prior** (Sec. 3.3): img2img from that real image (resized keeping its aspect ratio, centre
#   cropped) at strength 0.75; txt2img when the switch is off;
# - **visual guidance** (Sec. 3.2): the class-mean CLIP image feature written into the last token of the
#   prompt embedding (`guidance_feature = "source"` uses the source image's own feature, as the official
#   code does); the negative prompt embedding gets no token unless `negative_guidance_token`;
# - **fine-tuning** with or without the **DM loss**: the LoRA variant trained by `02_finetune`.
#
# Every switch of Table 2 is a key of the rows in `ablation_rows`; `default_row` is the full method and is
# synthesised for every `k` in `scale_k`. Each image's seed derives from (source image id, round), so a
# resumed or re-sharded run writes the same images; the sets land in
# `artifacts/synthetic/<variant>/k<k>/` (ImageFolder + `manifest.jsonl`). Large runs: prepare a set here
# and run shards with `python -m realfake_utils.synthesize --set-dir ... --num-shards N --shard-index i`.
#
# Figures: real vs synthetic per class; the CLIP-feature PCA of real, vanilla-base synthetic and
# fine-tuned synthetic data (the paper's Fig. 1, left); MMD² of each set to the real train set in CLIP
# space. For comparison the paper (Table 2, ImageNette, ResNet-50 trained on synthetic data only) goes from
# vanilla SD to the full method with each switch adding accuracy; Fig. 1 shows the fine-tuned synthetic
# features covering the real ones where vanilla SD's do not. The digits default uses a miniature model, so
# only the direction of these numbers is meaningful.

# %% tags=["parameters"]
preset = "digits"
run_dir = ""
seed = 0
device = "auto"
torch_threads = 0          # 0: torch default
image_size = 16
base_model = ""            # empty: artifacts/miniature/base of this run folder
clip_model = ""            # empty: artifacts/miniature/clip of this run folder
dtype = "auto"             # auto: float16 on CUDA, float32 elsewhere
lora_scale = 0.5
num_inference_steps = 30
guidance_scale = 2.0
latent_prior_strength = 0.75
guidance_feature = "class_mean"   # class_mean | source (the official code)
negative_guidance_token = False
dm_loss_form = "paper"            # DM-loss LoRA variant to sample from: paper | official
default_row = {"finetune": True, "dm_loss": True, "visual_guidance": True, "latent_prior": True}
scale_k = [1, 2]
ablation_rows = [
    {"finetune": False, "dm_loss": False, "visual_guidance": False, "latent_prior": False},
    {"finetune": True, "dm_loss": False, "visual_guidance": False, "latent_prior": False},
    {"finetune": True, "dm_loss": True, "visual_guidance": False, "latent_prior": False},
    {"finetune": True, "dm_loss": True, "visual_guidance": True, "latent_prior": False},
    {"finetune": True, "dm_loss": True, "visual_guidance": True, "latent_prior": True},
]
ablation_k = 1
source_per_class = 20      # real train images per class used as sources; 0: all of them
batch_size = 64
grid_per_class = 6

# %%
import json
import time
from pathlib import Path

import torch

import realfake_utils as rf
from realfake_utils import data, features, losses, models, plots
from realfake_utils import synthesize as syn

run = rf.setup(globals(), "03_synthesize")
if torch_threads:
    torch.set_num_threads(torch_threads)
art = run.artifacts
manifest = art / "data" / "manifest.csv"
rows_all = data.read_manifest(manifest)  # a clear error if 01_prepare has not run
class_names = data.class_names(rows_all)
train_rows = [r for r in rows_all if r["split"] == "train"]
base = base_model or str(art / "miniature" / "base")
clip = clip_model or str(art / "miniature" / "clip")
for what, path, param in (("base model", base, "base_model"), ("CLIP model", clip, "clip_model")):
    if not (Path(path).exists() or (path and not path.startswith(("/", ".")) and path.count("/") == 1)):
        raise FileNotFoundError(f"no {what} at {path}: run 02_finetune first (it builds the miniature "
                                f"models of this run folder) or set the parameter {param}")
dev = models.resolve_device(device)
dt = dtype if dtype != "auto" else ("float16" if dev.type == "cuda" else "float32")
print(f"{len(train_rows)} train images, {len(class_names)} classes; base model {base}; device {dev} ({dt})")

# %% [markdown]
# Guidance features: the CLIP image embeddings of the train images (the cache `artifacts/features/clip_image.safetensors` shared with `02_finetune`), and their class means.

# %%
feat_path = art / "features" / "clip_image.safetensors"
train_images = data.load_images(train_rows, image_size)
train_ids = [r["id"] for r in train_rows]
train_feats = features.extract_clip_features(clip, train_images, train_ids, feat_path, device=device,
                                             progress=False).float()
train_labels = torch.tensor([r["label"] for r in train_rows])
class_means = features.class_mean_features(train_feats, train_labels, len(class_names))
print("CLIP features", tuple(train_feats.shape), "class means", tuple(class_means.shape))

# %% [markdown]
# Synthesis: the default row for every `k` in `scale_k`, then every Table 2 row at `ablation_k`. A row whose LoRA variant has not been trained is skipped with a message (sets already on disk are resumed, finished images skipped).

# %%
common = dict(lora_scale=lora_scale, strength=latent_prior_strength, guidance_feature=guidance_feature,
              negative_guidance_token=negative_guidance_token, num_inference_steps=num_inference_steps,
              guidance_scale=guidance_scale, image_size=image_size, seed=seed, dtype=dt)
jobs = [(dict(default_row), k) for k in scale_k] + [(dict(r), ablation_k) for r in ablation_rows]
seen, sets, skipped = set(), [], []
t_all = time.time()
for row, k in jobs:
    name = syn.set_name(row, dm_loss_form)
    if (name, k) in seen:
        continue
    seen.add((name, k))
    st = syn.row_settings(row, base, art / "lora", dm_loss_form, **common)
    if st.lora_dir and not syn.lora_file(st.lora_dir).exists():
        msg = (f"SKIPPED {name}/k{k}: LoRA variant '{st.lora_name}' was not trained "
               f"({syn.lora_file(st.lora_dir)} missing). Add '{st.lora_name}' to the 02_finetune parameter "
               f"variants and rerun 02_finetune.")
        print(msg)
        skipped.append({"set": f"{name}/k{k}", "row": row, "k": k, "reason": msg})
        continue
    gid = train_ids if guidance_feature == "source" else None
    gfeat = train_feats if guidance_feature == "source" else class_means
    set_dir = art / "synthetic" / name / f"k{k}"
    res = syn.synthesize(set_dir, st, k, source_manifest=manifest, guidance_features=gfeat, guidance_ids=gid,
                         captions=art / "captions.json" if (art / "captions.json").exists() else "",
                         batch_size=batch_size, per_class=source_per_class, device=device)
    res.update(name=name, row=row, dir=str(set_dir.relative_to(run.root)))
    sets.append(res)
    print(f"{name}/k{k}: {res['finished']}/{res['planned']} images, {res['generated']} generated, "
          f"{res['linked']} reused from a sibling k, {res['images_per_s']:.1f} img/s")
print(f"synthesis done in {time.time() - t_all:.0f}s")

# %%
# NBVAL_CHECK_OUTPUT
for s in sets:
    rows = syn.read_synthetic_manifest(run.root / s["dir"])
    assert s["complete"] and len(rows) == s["planned"], s
    assert len({r["file"] for r in rows}) == len(rows)
    print(f"{s['name']}/k{s['k']}: {len(rows)} images, complete")
default_name = syn.set_name(default_row, dm_loss_form)
assert any(s["name"] == default_name for s in sets), f"the default set {default_name} was not made"


# %% [markdown]
# Real vs synthetic, per class (default set, smallest k): each row a class, the first images real, the rest synthetic.

# %%
def set_of(name, k=None):
    cand = [s for s in sets if s["name"] == name and (k is None or s["k"] == k)]
    return min(cand, key=lambda s: s["k"]) if cand else None


default = set_of(default_name)
syn_rows = syn.synthetic_rows(run.root / default["dir"])
real_pick, syn_pick = [], []
for c in range(len(class_names)):
    real_pick += [r for r in train_rows if r["label"] == c][:grid_per_class]
    syn_pick += [r for r in syn_rows if r["label"] == c][:grid_per_class]
imgs = torch.cat([data.load_images(real_pick, image_size), data.load_images(syn_pick, image_size)])
labels = [r["label"] for r in real_pick + syn_pick]
order = sorted(range(len(labels)), key=lambda i: (labels[i], i))  # per class: real first, then synthetic
fig = plots.per_class_grid(imgs[order], [labels[i] for i in order], class_names, per_class=2 * grid_per_class,
                           suptitle=f"real (left {grid_per_class}) vs synthetic {default_name} (right)")
run.save_figure(fig, "03_real_vs_synthetic")


# %% [markdown]
# CLIP-feature PCA of real, vanilla-base synthetic and fine-tuned synthetic data (Fig. 1, left), and MMD² (Gaussian kernel, bandwidth from the median heuristic on the real features, fixed for all sets) of every set to the real train set.

# %%
def set_features(s):
    d = run.root / s["dir"]
    srows = syn.synthetic_rows(d)
    return features.extract_clip_features(clip, data.load_images(srows, image_size), [r["id"] for r in srows],
                                          d / "clip_features.safetensors", device=device, progress=False).float()


bandwidth = losses.median_bandwidth(train_feats)
mmd = {}
feats_by_set = {}
for s in sets:
    f = set_features(s)
    feats_by_set[(s["name"], s["k"])] = f
    mmd[f"{s['name']}/k{s['k']}"] = float(losses.mmd2(train_feats, f, bandwidth=bandwidth))
for key, v in mmd.items():
    print(f"MMD2(real train, {key}) = {v:.4f}")

import matplotlib.pyplot as plt
from sklearn.decomposition import PCA

vanilla = set_of(syn.set_name(ablation_rows[0], dm_loss_form)) if ablation_rows else None
groups = [("real train", train_feats)]
if vanilla is not None and not vanilla["row"]["finetune"]:
    groups.append((f"vanilla base ({vanilla['name']})", feats_by_set[(vanilla["name"], vanilla["k"])]))
groups.append((f"fine-tuned ({default_name})", feats_by_set[(default["name"], default["k"])]))
pca = PCA(n_components=2, random_state=0).fit(train_feats.numpy())
fig, ax = plt.subplots(figsize=(5, 4.5))
for (label, f), color in zip(groups, ["tab:blue", "tab:orange", "tab:green"]):
    z = pca.transform(f.numpy())
    ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.5, color=color, label=label)
ax.set_xlabel("PC 1 (real CLIP features)"); ax.set_ylabel("PC 2"); ax.legend(fontsize=8)
ax.set_title("CLIP image features (Fig. 1, left)")
run.save_figure(fig, "03_clip_pca")

fig, ax = plt.subplots(figsize=(6, 0.4 * len(mmd) + 1))
ax.barh(list(mmd), list(mmd.values()), color="tab:green")
ax.set_xlabel("MMD$^2$ to the real train set (CLIP space)")
run.save_figure(fig, "03_mmd")

# %%
gen = [s for s in sets if s["generated"]]
run.save_results({
    "default_set": f"{default_name}/k{min(scale_k)}",
    "sets": [{key: s[key] for key in ("name", "k", "dir", "row", "settings_hash", "planned", "finished",
                                      "generated", "linked", "seconds", "images_per_s")} for s in sets],
    "skipped": skipped,
    "mmd2_to_real_train": mmd,
    "mmd_bandwidth": bandwidth,
    "images_generated": sum(s["generated"] for s in sets),
    "images_per_s": (sum(s["generated"] for s in gen) / max(sum(s["seconds"] for s in gen), 1e-9)) if gen else 0.0,
    "settings": {**common, "guidance_feature": guidance_feature, "source_per_class": source_per_class,
                 "batch_size": batch_size, "base_model": base},
})
