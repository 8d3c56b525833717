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
# # 03 Synthesize: the nine Table 2 rows at 1x, and the full method scaled (Sec. 3.2-3.3, 4.1, 4.3; Tables 1-3, Fig. 1-2)
#
# **Protocol** (Sec. 4.1, Apx. E): a set at scale *k* holds exactly *k* synthetic images per real **train**
# image, per class as in the split: k = 1 is the train split's size (digits: 539). With the latent prior each
# real train image is the img2img source of its own copies (round *r < k*, seed from SHA-256 of
# (synthesis seed, image id, round)). Sampling is the official code's (Table 6): UniPC, guidance scale 2.0,
# LoRA scale 0.5, prompt `photo of [classname], [caption]` with the negative prompt, img2img strength 0.75, and
#
# - **latent prior** (Sec. 3.3): img2img from the real image; `-t2i` rows sample from noise;
# - **visual guidance** (Sec. 3.2): the class-mean CLIP image feature as one more prompt token, entering as
#   02 trained it (`append` = the paper's concatenation, `replace_last` = the official code), read from 02's record;
# - **fine-tuning** with or without the **DM loss**: the LoRA variants 02 trained (their DM form too: 03 has no
#   `dm_loss_form`; `lora-dmofficial-...` sets when 02 used the official form).
#
# `rows` are the nine rows of **Table 2** in the paper's order (ImageNette: 79.8, 80.8, 82.3, 81.2, 82.9, 88.0,
# 89.5, 88.9, 90.5; the full method `lora-dm-vg-lp` is 10.7 points above the vanilla base model), each made
# with every seed of `synthesis_seeds` so a component effect has an interval over synthesis *and* classifier
# seeds. `default_row` is also made at every `k` of `scale_k` (Table 3 / Fig. 2: 1, 2, 5, 10 in the paper).
# Each finished set carries a completion marker (`DONE.json`, every file's SHA-256); 04 reads the sets from
# this step's record (`results/03_synthesize.json`, `synthesize.SynthesisRecord`). Large runs: shard a set with
# `python -m realfake_utils.synthesize --set-dir ... --num-shards N --shard-index i` (or `accelerate launch`).
#
# Figures: real vs synthetic per class; the CLIP-feature PCA of real, vanilla-base and fine-tuned synthetic data
# (the paper's Fig. 1, left); MMD² of each set to the real train set in CLIP space.

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
rows = ["base-novg-t2i", "lora-nodm-novg-t2i", "lora-nodm-vg-t2i", "lora-dm-novg-t2i", "lora-dm-vg-t2i",
        "base-novg-lp", "lora-nodm-vg-lp", "lora-dm-novg-lp", "lora-dm-vg-lp"]   # Table 2, rows 1-9
default_row = "lora-dm-vg-lp"      # Tables 1 / 3 / 4 "OURS": all three components
scale_k = [1, 2, 5]                # Table 3 / Fig. 2 (paper presets: 1, 2, 5, 10)
synthesis_seeds = [0, 1]           # every row at 1x with each of them; larger k with the first
lora_scale = 0.5                   # official shell_generate.sh --cross_attention_scale
num_inference_steps = 10           # CPU SHORTCUT: Table 6 samples 30 UniPC steps; the miniature takes 10
guidance_scale = 2.0               # Table 6
latent_prior_strength = 0.75       # Table 6 Img_strength
guidance_feature = "class_mean"    # class_mean (Sec. 3.2) | source (the official code)
negative_guidance_token = False
negative_prompt = "distorted, unrealistic, blurry, out of frame, cropped, deformed"   # official generate.py; paper presets: Apx. E's
batch_size = 256                   # a throughput setting (the official 24 on a GPU)
grid_per_class = 6

# %%
import torch

import realfake_utils as rf
from realfake_utils import synthesize as syn

run = rf.setup(globals(), "03_synthesize")
if torch_threads:
    torch.set_num_threads(torch_threads)
cfg = syn.SynthesisConfig.from_params(globals())
print(f"{len(cfg.jobs())} sets planned: {len(rows)} rows x seeds {synthesis_seeds} at k=1, {default_row} at k={scale_k}")

# %% [markdown]
# Synthesis: every set, resumable (finished images are skipped; a set at k = 5 reuses the same seed's k = 1 and
# k = 2 images, which are the same items with the same seeds). A row whose LoRA variant 02 did not train is
# listed as SKIPPED with the parameter that makes it.

# %%
record = syn.synthesize_rows(run, cfg)
print(f"{record.images_generated} images generated at {record.images_per_s} img/s "
      f"({record.settings['seconds']} s in all)")

# %%
# NBVAL_CHECK_OUTPUT
for s in record.sets:
    assert s.complete and s.size == s.k * s.n_real_train, s   # 1x = the train split's size, exactly
    print(f"{s.id}: {s.size} images = {s.k} x {s.n_real_train} real train images, complete")
default = record.default()
assert default.size == record.n_real_train
print(f"default set {default.id}: {default.size} images (the real train split: {record.n_real_train})")

# %% [markdown]
# Real vs synthetic, per class (the default set, k = 1): each row a class, the first images real, the rest synthetic.

# %%
run.save_figure(syn.figure_real_vs_synthetic(run, default, grid_per_class), "03_real_vs_synthetic")

# %% [markdown]
# CLIP-feature PCA of real, vanilla-base synthetic and fine-tuned synthetic data (Fig. 1, left), and MMD²
# (Gaussian kernel, bandwidth from the median heuristic on the real features, fixed for all sets) of every set
# to the real train set.

# %%
run.save_figure(syn.figure_clip_pca(run, record, clip_model, device), "03_clip_pca")
run.save_figure(syn.figure_mmd(record), "03_mmd")
for key, v in record.mmd2_to_real_train.items():
    print(f"MMD2(real train, {key}) = {v:.4f}")

# %%
record.save(run)
