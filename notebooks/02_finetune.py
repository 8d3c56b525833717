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
# - **loss** `L_simple` (optionally Min-SNR-gamma weighted) **+ L_DM** (Eq. 7 / 21), in the paper's form
#   `gamma * ||mean_i(eps_i - eps_hat_i)||^2` or the official code's (`weight * MSE` of the Min-SNR-weighted
#   batch sums); both are trained by default;
# - **visual guidance token** (Sec. 3.2): each training sample's CLIP image embedding replaces the last
#   token of the text encoder's hidden states (the class-mean embedding at generation).
#
# Every Table 2 switch is a parameter (`finetune`, `dm_loss` + `dm_loss_form`, `visual_guidance`); the
# switches name the **main** variant, `variants` lists further LoRA variants to train (names such as
# `lora-nodm-novg`, `lora-dm-vg`, `lora-dmofficial-vg`, see `finetune.variant_name`), so every row of
# Table 2 has its weights. Training runs through accelerate (mixed precision, gradient accumulation,
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
image_size = 16
base_model = ""            # empty: artifacts/miniature/base of this run folder, built by 01_prepare
clip_model = ""            # empty: artifacts/miniature/clip of this run folder
# Table 2 switches of the main variant (its samples are shown as "after fine-tuning")
finetune = True
dm_loss = True
dm_loss_form = "paper"     # "paper" | "official"
visual_guidance = True
# further LoRA variants to train (finetune.variant_name); 03_synthesize samples the Table 2 rows from them
variants = ["lora-nodm-novg", "lora-dm-novg", "lora-dm-vg", "lora-dmofficial-vg"]
lora_rank = 8
lora_alpha = 8.0
learning_rate = 1e-3
lr_warmup_steps = 0
max_train_steps = 300
num_train_epochs = 0       # > 0 replaces max_train_steps by epochs over the train split (paper 300, official 100)
train_batch_size = 32
gradient_accumulation_steps = 1
snr_gamma = 5.0            # Min-SNR-gamma weights for L_simple and the DM loss, 0 turns them off
dm_loss_weight = -1.0      # < 0: the form's published weight (paper 0.05, official 0.003)
random_flip = False        # digits are not mirror-symmetric
mixed_precision = "no"     # "no" | "fp16" | "bf16"
checkpoint_every = 100
checkpoints_total_limit = 2
num_processes = 0          # GPUs to train on, 0 means all visible, notebook_launcher when more than one
n_per_class = 20           # generated samples per class for the grids and the MMD
sample_steps = 20
guidance_scale = 2.0
lora_scale = 1.0           # LoRA scale for the "after" samples (03_synthesize uses 0.5, the official value)
use_negative_prompt = False  # the official negative prompt (SD 1.5 presets); the miniature knows "" only
grid_per_class = 8
expect_gap_reduction = True  # assert that fine-tuning lowers the MMD of the main variant

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import realfake_utils as rf
from realfake_utils import data, features, losses, models, plots
from realfake_utils import finetune as ft

run = rf.setup(globals(), "02_finetune")
for lib in ("diffusers", "transformers"):  # quiet loading bars and the "no text-encoder LoRA keys" note
    __import__(lib).utils.logging.set_verbosity_error()
    __import__(lib).utils.logging.disable_progress_bar()
torch.set_num_threads(torch_threads or min(torch.get_num_threads(), 4))
art = run.artifacts
rows_all = data.read_manifest(art / "data" / "manifest.csv")  # a clear error if 01_prepare has not run
class_names = data.class_names(rows_all)
base = base_model or str(art / "miniature" / "base")
clip = clip_model or str(art / "miniature" / "clip")
if base_model == "" and not Path(base).exists():
    raise FileNotFoundError(f"no miniature base model at {base}: run 01_prepare first, or set base_model")
# the training set: target train images, prompts "photo of <class>[, caption]", CLIP image embeddings
# (the feature cache artifacts/features/clip_image.safetensors shared with 01_prepare / 03_synthesize)
train_set_path = ft.build_train_set(run.root, image_size, clip_model=clip, device=device)
ts = ft.load_train_set(train_set_path)
print(f"{len(ts)} train images, {len(class_names)} classes, embeddings {tuple(ts.image_embeds.shape)}; base {base}")

# %% [markdown]
# Fine-tuning: the main variant (from the switches) and the listed `variants`. A finished variant with the
# same configuration is reused; an interrupted one resumes from its latest checkpoint.

# %%
if num_train_epochs > 0:  # steps = epochs x optimizer steps per epoch over the target train split
    steps_per_epoch = -(-len(ft.load_train_set(train_set_path)) // (train_batch_size * gradient_accumulation_steps))
    max_train_steps = num_train_epochs * steps_per_epoch
    print(f"{num_train_epochs} epochs x {steps_per_epoch} steps = {max_train_steps} steps per variant")
main_variant = ft.variant_name(finetune, dm_loss, visual_guidance, dm_loss_form)
to_train = list(dict.fromkeys(([main_variant] if finetune else []) + list(variants)))
common = dict(base_model=base, lora_rank=lora_rank, lora_alpha=lora_alpha, learning_rate=learning_rate,
              lr_warmup_steps=lr_warmup_steps, max_train_steps=max_train_steps,
              train_batch_size=train_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
              snr_gamma=snr_gamma, dm_loss_weight=dm_loss_weight, random_flip=random_flip,
              mixed_precision=mixed_precision, seed=seed, device=device, checkpoint_every=checkpoint_every,
              checkpoints_total_limit=checkpoints_total_limit)
summaries = {}
for name in to_train:
    sw = ft.parse_variant(name)
    if not sw["finetune"]:
        continue  # base-* rows use no LoRA
    cfg = ft.FinetuneConfig(output_dir=str(art / "lora" / name), dm_loss=sw["dm_loss"],
                            dm_loss_form=sw["dm_loss_form"], visual_guidance=sw["visual_guidance"], **common)
    summaries[name] = ft.launch_training(cfg, train_set_path, num_processes or None)
    s = summaries[name]
    how = "reused" if s.get("reused") else f"{s['steps_this_session']} steps in {s['seconds_this_session']:.0f}s"
    print(f"{name}: {how}, final loss {s['final_loss']:.4f}")

# %%
# NBVAL_CHECK_OUTPUT
for name in summaries:
    hist = ft.read_history(art / "lora" / name)
    assert [h["step"] for h in hist] == list(range(max_train_steps)), name
    assert (art / "lora" / name / ft.LORA_WEIGHT_NAME).exists()
    assert all(h["l_dm"] == 0 for h in hist) == (not ft.parse_variant(name)["dm_loss"])
    print(f"{name}: {len(hist)} steps logged once each, LoRA weights written")


# %% [markdown]
# Loss curves (moving average over 10% of the steps): `L_simple` and the DM term as added to the loss.

# %%
def smooth(v, frac=0.1):
    k = max(1, int(len(v) * frac))
    c = torch.tensor(v, dtype=torch.float64).cumsum(0)
    return ((c[k - 1:] - torch.cat([torch.zeros(1, dtype=torch.float64), c[:-k]])) / k).tolist()


fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for name in summaries:
    hist = ft.read_history(art / "lora" / name)
    for ax, key in zip(axes, ("l_simple", "l_dm")):
        y = smooth([h[key] for h in hist])
        ax.plot(range(len(hist) - len(y), len(hist)), y, label=name)
axes[0].set_title("L_simple (Min-SNR weighted)" if snr_gamma > 0 else "L_simple")
axes[1].set_title("L_DM (weighted, as added to the loss)")
axes[1].set_yscale("symlog", linthresh=1e-4)
for ax in axes:
    ax.set_xlabel("optimizer step")
axes[0].legend(fontsize=7)
run.save_figure(fig, "02_loss_curves")

# %% [markdown]
# Samples per class before (base model) and after fine-tuning, with the same seeds. With visual
# guidance the class-mean CLIP embedding of the train images replaces the last prompt token. Each set's
# CLIP features are compared with the target train set's by MMD² (Gaussian kernel, bandwidth from the
# median heuristic on the real train features, fixed for all sets); the MMD² between the real train and
# test features is the noise floor.

# %%
import tempfile

from realfake_utils.features import class_mean_features

pipe = models.load_pipeline(base, device=device, scheduler=None)
class_means = class_mean_features(ts.image_embeds, ts.labels, len(class_names))
neg = features.NEGATIVE_PROMPT if use_negative_prompt else ""
test_rows = [r for r in rows_all if r["split"] == "test"]
test_feats = features.extract_clip_features(clip, data.load_images(test_rows, image_size), [r["id"] for r in test_rows],
                                            art / "features" / "clip_image.safetensors", device=device,
                                            progress=False).float()
real = ts.image_embeds.float()
bandwidth = losses.median_bandwidth(real)


def generate(vg, lora=None):
    if lora:
        pipe.load_lora_weights(str(art / "lora" / lora), adapter_name="ft")
        pipe.set_adapters(["ft"], adapter_weights=[lora_scale])
    try:
        imgs, labels = ft.sample_per_class(pipe, class_names, n_per_class, class_means if vg else None,
                                           num_inference_steps=sample_steps, guidance_scale=guidance_scale,
                                           seed=seed, negative_prompt=neg)
    finally:
        if lora:
            pipe.unload_lora_weights()
    return imgs, labels


def clip_feats(imgs):
    with tempfile.TemporaryDirectory() as d:
        return features.extract_clip_features(clip, imgs, [str(i) for i in range(len(imgs))],
                                              Path(d) / "f.safetensors", device=device, progress=False).float()


t0 = time.time()
samples, mmd = {}, {"real test (noise floor)": float(losses.mmd2(real, test_feats, bandwidth=bandwidth))}
for vg in sorted({ft.parse_variant(n)["visual_guidance"] for n in to_train} | {visual_guidance}):
    name = ft.variant_name(False, False, vg)
    samples[name] = generate(vg)
for name in summaries:
    samples[name] = generate(ft.parse_variant(name)["visual_guidance"], lora=name)
for name, (imgs, _) in samples.items():
    mmd[name] = float(losses.mmd2(real, clip_feats(imgs), bandwidth=bandwidth))
print(f"{sum(len(v[0]) for v in samples.values())} samples in {time.time() - t0:.0f}s")
for k, v in mmd.items():
    print(f"MMD2(real train, {k}) = {v:.4f}")

# %%
before_name = ft.variant_name(False, False, visual_guidance)
after_name = main_variant if finetune else before_name
for title, key in (("before fine-tuning", before_name), ("after fine-tuning", after_name)):
    imgs, labels = samples[key]
    fig = plots.per_class_grid(imgs, labels.tolist(), class_names, per_class=grid_per_class,
                               suptitle=f"{title}: {key}")
    run.save_figure(fig, f"02_samples_{key}")
real_pick = torch.cat([ts.images[ts.labels == c][:grid_per_class] for c in range(len(class_names))])
real_lab = torch.cat([ts.labels[ts.labels == c][:grid_per_class] for c in range(len(class_names))])
fig = plots.per_class_grid(real_pick, real_lab.tolist(), class_names, per_class=grid_per_class,
                           suptitle="target train images")
run.save_figure(fig, "02_target_train")

fig, ax = plt.subplots(figsize=(6, 0.4 * len(mmd) + 1))
ax.barh(list(mmd), list(mmd.values()), color=["tab:gray"] + ["tab:orange" if k.startswith("base") else "tab:green"
                                                             for k in list(mmd)[1:]])
ax.set_xlabel("MMD$^2$ to the target train set (CLIP space)")
run.save_figure(fig, "02_mmd_before_after")

# %%
print(f"MMD2 to the target train set: before {mmd[before_name]:.4f} ({before_name}), "
      f"after {mmd[after_name]:.4f} ({after_name}), real test {mmd['real test (noise floor)']:.4f}")

# %%
# NBVAL_CHECK_OUTPUT
before, after = mmd[before_name], mmd[after_name]
if expect_gap_reduction and finetune:
    assert after < before, f"fine-tuning did not lower the MMD2 to the target: {before:.4f} -> {after:.4f}"
print(f"{before_name} -> {after_name}: MMD2 check {'on' if expect_gap_reduction and finetune else 'off'}")

# %%
run.save_results({
    "main_variant": after_name,
    "variants": {k: {key: s.get(key) for key in ("steps", "final_loss", "steps_per_s", "samples_per_s",
                                                 "seconds_this_session", "reused", "config_hash",
                                                 "trainable_params", "device", "mixed_precision")}
                 for k, s in summaries.items()},
    "loss_curves": {k: {"l_simple": [h["l_simple"] for h in ft.read_history(art / "lora" / k)],
                        "l_dm": [h["l_dm"] for h in ft.read_history(art / "lora" / k)]} for k in summaries},
    "mmd2_to_real_train": mmd,
    "mmd_bandwidth": bandwidth,
    "mmd2_before": mmd[before_name],
    "mmd2_after": mmd[after_name],
    "settings": {**{k: v for k, v in common.items() if k != "base_model"}, "base_model": base,
                 "n_per_class": n_per_class, "sample_steps": sample_steps, "guidance_scale": guidance_scale,
                 "lora_scale": lora_scale},
})
