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
# # 02 Fine-tune: LoRA with the distribution-matching loss and the visual guidance token (Sec. 3.1-3.2, Eq. 7 / 21, Table 2)
#
# The base model was pretrained on an upstream distribution that differs from the target task (LAION for
# Stable Diffusion 1.5; the shifted, loosely captioned pool for the miniature base model built by
# `01_prepare`). Real-Fake closes that gap by fine-tuning the base model on the target **train** split:
#
# - **LoRA** (peft) on the UNet attention projections `to_q, to_k, to_v, to_out.0`, rank / alpha from the
#   parameters, saved as `artifacts/lora/<variant>/pytorch_lora_weights.safetensors`, which stock
#   `pipe.load_lora_weights(dir)` loads (03_synthesize does);
# - **loss** `L_simple` (Min-SNR-gamma weighted, Table 7) **+ L_DM** (Eq. 7 / 21), in the paper's form
#   `gamma * ||mean_i(eps_i - eps_hat_i)||^2` (no per-sample weights inside the mean) or the official
#   code's (`weight * MSE` of the Min-SNR-weighted batch sums), chosen by `dm_loss_form`;
# - **visual guidance token** (Sec. 3.2): the class-mean CLIP image embedding *concatenated* with the
#   text embeddings (`guidance_token_position = "append"`, `[B, 77, D] -> [B, 78, D]`, the paper's text),
#   or, as the official code does, each sample's own embedding overwriting the last token
#   (`"replace_last"`, `guidance_feature_train = "sample"`).
#
# Every Table 2 switch is a parameter (`finetune`, `dm_loss` + `dm_loss_form`, `visual_guidance`); the
# switches name the **main** variant, `variants` lists the LoRA variants the nine Table 2 rows need
# (`lora-nodm-novg`, `lora-nodm-vg`, `lora-dm-novg`, `lora-dm-vg`; `dm_loss_form = "official"` trains
# `lora-dmofficial-*` instead). The batch is the paper's global batch (`global_batch_size`, Table 7's
# 8x8 = 64), split over processes and gradient accumulation; `num_train_epochs` counts passes over the
# data whatever the number of processes. Training runs through accelerate (mixed precision,
# checkpoints every `checkpoint_every` steps, resumed after a kill; several GPUs through
# `notebook_launcher`, or from the shell `accelerate launch -m realfake_utils.finetune --run-dir ...`).
#
# Shown: loss curves (`L_simple`, `L_DM`), samples per class before and after fine-tuning, and the MMD² in
# CLIP-feature space between generated samples and the target train set before vs after (the gap shown by
# `01_prepare`, and how fine-tuning changes it). For comparison, the paper (Table 2, ImageNette,
# ResNet-50 trained on synthetic data only) reports that fine-tuning, the DM loss and the guidance token
# each add accuracy over vanilla SD, and Fig. 1 shows the fine-tuned model's CLIP features covering the
# real ones. The digits default uses a miniature model trained here, so only the direction of the numbers
# is meaningful.

# %% tags=["parameters"]
preset = "digits"
run_dir = ""
seed = 0
device = "auto"
torch_threads = 0          # 0: min(cores, 4); 1 is fastest on a CPU shared with other jobs
image_size = 16            # train images and before/after samples (height and width)
base_model = ""            # empty: artifacts/miniature/base of this run folder, built by 01_prepare
clip_model = ""            # empty: artifacts/miniature/clip of this run folder
# Table 2 switches of the main variant (its samples are shown as "after fine-tuning")
finetune = True
dm_loss = True
dm_loss_form = "paper"     # the form the DM variants train with: "paper" (Eq. 21) | "official" (-> lora-dmofficial-*)
visual_guidance = True
guidance_token_position = "append"      # "append" (Sec. 3.2: concatenated) | "replace_last" (official code)
guidance_feature_train = "class_mean"   # "class_mean" (Sec. 3.2) | "sample" (official: each image's own feature)
# the LoRA variants the nine Table 2 rows need (03 reads which exist from this step's record)
variants = ["lora-nodm-novg", "lora-nodm-vg", "lora-dm-novg", "lora-dm-vg"]
lora_rank = 8
lora_alpha = 8.0
learning_rate = 3e-3       # digits: measured in 01's world (probe 0.78 -> 0.86 at 300 steps, 0.865 at 450; 1e-3: 0.835 at 300)
lr_warmup_steps = 0
max_train_steps = 450
num_train_epochs = 0       # > 0: passes over the train split instead of max_train_steps (Table 7: 300)
global_batch_size = 32     # the global batch (Table 7: 8x8, 64); per device: global / (processes x accumulation)
gradient_accumulation_steps = 1
snr_gamma = 5.0            # Min-SNR-gamma weights on L_simple (Table 7: 0.75), 0 turns them off
dm_loss_weight = -1.0      # < 0: the form's published weight (paper gamma 0.05, official 0.003)
random_flip = False        # digits are not mirror-symmetric
mixed_precision = "no"     # "no" | "fp16" | "bf16"
checkpoint_every = 100
checkpoints_total_limit = 2
num_processes = 0          # GPUs to train on, 0 means all visible, notebook_launcher when more than one
n_per_class = 20           # generated samples per class for the grids and the MMD (0: none)
sample_steps = 20
guidance_scale = 2.0
lora_scale = 1.0           # LoRA scale for the "after" samples (03_synthesize uses 0.5, the official value)
use_negative_prompt = False  # a negative prompt for the samples (SD 1.5 presets); the miniature knows "" only
negative_prompt = "distorted, unrealistic, blurry, out of frame, cropped, deformed"   # official generate.py (paper presets: Apx. E)
grid_per_class = 8
expect_gap_reduction = True  # assert that fine-tuning lowers the MMD of the main variant

# %%
import torch

import realfake_utils as rf
from realfake_utils import models, plots
from realfake_utils import finetune as ft

run = rf.setup(globals(), "02_finetune")
for lib in ("diffusers", "transformers"):  # quiet loading bars and the "no text-encoder LoRA keys" note
    __import__(lib).utils.logging.set_verbosity_error()
    __import__(lib).utils.logging.disable_progress_bar()
torch.set_num_threads(torch_threads or min(torch.get_num_threads(), 4))
base = base_model or str(run.artifacts / "miniature" / "base")
clip = clip_model or str(run.artifacts / "miniature" / "clip")
sizes = models.check_guidance_compatible(clip, base)   # CLIP projection == text width == cross-attention
cfg = ft.FinetuneConfig.from_params(globals(), base_model=base)
main_variant = ft.variant_name(finetune, dm_loss, visual_guidance, dm_loss_form)
print(f"base {base}; guidance token {guidance_token_position} ({guidance_feature_train}), sizes {sizes}")
print(f"global batch {global_batch_size} = per device {cfg.per_device_batch_size(max(1, num_processes))} x "
      f"{max(1, num_processes)} processes x {gradient_accumulation_steps} accumulation")

# %% [markdown]
# Fine-tuning, every variant in one call (`finetune.train_variants`): the target train split with its
# CLIP embeddings, each LoRA variant (reused when finished with the same content key, resumed from its
# latest checkpoint when interrupted), then samples of the base model and of each variant with the same
# seeds, and the MMD² of their CLIP features to the target train set. The record
# (`results/02_finetune.json`) holds the resolved configuration for 03 and 06.

# %%
record = ft.train_variants(run, cfg, variants, clip_model=clip, image_size=image_size,
                           sampling=ft.SampleSettings.from_params(globals()),
                           num_processes=num_processes or None, main_variant=main_variant if finetune else "")

# %%
# NBVAL_CHECK_OUTPUT
for name, v in record.variants.items():
    hist = record.history(run, name)
    assert [h["step"] for h in hist] == list(range(v.steps)), name
    assert v.samples_seen == v.steps * global_batch_size == hist[-1]["samples_seen"], name
    assert all(h["l_dm"] == 0 for h in hist) == (not ft.parse_variant(name)["dm_loss"]), name
    print(f"{name}: {len(hist)} steps logged once each, {v.samples_seen} samples seen, LoRA weights written")

# %% [markdown]
# Loss curves (moving average over 10% of the steps): `L_simple` and the DM term as added to the loss.

# %%
run.save_figure(ft.plot_loss_curves(run, record), "02_loss_curves")

# %% [markdown]
# Samples per class before (base model) and after fine-tuning, with the same seeds, at `image_size`.
# With visual guidance the class-mean CLIP embedding of the train images is the guidance token. Each
# set's CLIP features are compared with the target train set's by MMD² (Gaussian kernel, bandwidth from
# the median heuristic on the real train features, fixed for all sets); the MMD² between the real train
# and test features is the noise floor.

# %%
before_name = ft.variant_name(False, False, visual_guidance)
after_name = main_variant if finetune else before_name
if n_per_class > 0:
    class_names = ft.load_train_set(run.artifacts / "lora" / ft.TRAIN_SET_NAME).class_names
    for title, key in (("before fine-tuning", before_name), ("after fine-tuning", after_name)):
        imgs, labels = record.load_samples(run, key)
        fig = plots.per_class_grid(imgs, labels.tolist(), class_names, per_class=grid_per_class,
                                   suptitle=f"{title}: {key}")
        run.save_figure(fig, f"02_samples_{key}")
    mmd = ft.mmd_table(record)
    run.save_figure(ft.plot_mmd(mmd), "02_mmd_before_after")
    for k, v in mmd.items():
        print(f"MMD2(real train, {k}) = {v:.4f}")

# %%
# NBVAL_CHECK_OUTPUT
checked = expect_gap_reduction and finetune and n_per_class > 0
if checked:
    v = record.variants[after_name]
    assert v.mmd2_after < v.mmd2_before, f"fine-tuning did not lower the MMD2: {v.mmd2_before:.4f} -> {v.mmd2_after:.4f}"
print(f"{before_name} -> {after_name}: MMD2 check {'on' if checked else 'off'}; record {record.path(run).name}")
