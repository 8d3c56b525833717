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
# # 07 SSCD copy retrieval: do synthetic images copy the real training images? (Sec. 4.5, Fig. 4)
#
# For every synthetic image, the most similar real training images under **SSCD** (Pizzi et al. 2022,
# a self-supervised copy-detection descriptor): cosine similarity of L2-normalised descriptors, top-5
# matches per synthetic image. The paper (Fig. 4) shows the synthetic images with the highest similarity
# next to their real matches and concludes that its synthetic data do not reproduce training images.
#
# **Calibration.** SSCD's copy threshold 0.75 gives about 90 % precision on DISC2021 (Pizzi et al.). A
# threshold only means something for the descriptor it was set on, so it is set here the same way:
# near copies (centre crop, colour jitter, JPEG at quality 50) of real training images are planted among
# held-out real images (the test split: not copies), and the threshold is the lowest one whose detections
# reach `target_precision` (a detection of a planted copy counts when its top-1 match is its own source).
# The **copy rate** of each synthetic set is its share of images above that threshold. Also reported:
# shares above 0.5 (Somepalli et al.'s replication threshold) and 0.75, raw and after SSCD's background
# score normalisation (SSCD Eq. 8, "1.00[0,2]", background = the test split).
#
# **The descriptor.** With `sscd_model` set to a downloaded `sscd_disc_mixup.torchscript.pt` (or
# `sscd_disc_large`), it is loaded with `torch.jit.load` only after its SHA-256 matches `sscd_sha256`
# (TorchScript runs code). In miniature (`sscd_model = ""`) a small CNN is trained here self-supervised as
# SSCD is (InfoNCE on two augmentations), on the real images of the run (pool + train), exported with
# `torch.jit.script` (byte-identical across identical runs) and loaded back through the same checked loader.

# %% tags=["parameters"]
preset = "digits"
run_dir = ""
seed = 0
device = "auto"
torch_threads = 1            # CPU threads; 1 is fastest for the small descriptor CNN on a shared CPU (0: min(cores, 2))
image_size = 16
sscd_model = ""              # "": the miniature descriptor trained here; else a TorchScript file (sscd_disc_mixup.torchscript.pt)
sscd_sha256 = ""             # required with sscd_model: the file's SHA-256 (checked before loading)
sscd_preprocess = "square"   # "short_side" (SSCD default, size 288) | "square" (SSCD's 320x320 alternative)
sscd_size = 16               # 288 for the real SSCD models
descriptor_steps = 300       # miniature descriptor training (self-supervised)
descriptor_dim = 64
descriptor_width = 16
descriptor_batch_size = 128
synthetic_sets = []          # set ids of 03's record ("lora-dm-vg-lp/k1"); []: every complete set
max_synthetic = 0            # per set, 0: all images
top_k = 5
target_precision = 0.9       # calibration: SSCD's 0.75 is about 90 % precision on DISC2021
calibration_sources = 50     # real images whose near copies (crop, jitter, JPEG) are planted
score_norm_beta = 1.0        # SSCD background normalisation (0 turns it off)
fake_if_missing = True       # no synthetic set yet: use perturbed real images as a stand-in (clearly marked)

# %%
import torch

import realfake_utils as rf
from realfake_utils import sscd

run = rf.setup(globals(), "07_sscd")
torch.set_num_threads(torch_threads or min(torch.get_num_threads(), 2))
data_dir = run.artifacts / "data"
# read batch by batch (sscd.LazyImages): a paper preset's splits and sets do not fit in memory at once
real = sscd.split_images(data_dir, ["pool", "train"], image_size)
background = sscd.split_images(data_dir, "test", image_size)
print(f"reference: {len(real)} real training images (pool + train); background / non-copies: "
      f"{len(background)} held-out test images; descriptor input {sscd_preprocess} {sscd_size}")

# %% [markdown]
# ## The descriptor
# Loaded from `sscd_model` after the SHA-256 check, or (miniature) trained here, cached in
# `artifacts/sscd/` and loaded through the same checked loader.

# %%
if sscd_model:
    descriptor_path, expected_sha = sscd_model, sscd_sha256
else:
    descriptor_path, expected_sha = sscd.train_miniature_descriptor(
        real.all(), run.artifacts / "sscd" / "miniature_descriptor.pt", size=sscd_size, dim=descriptor_dim,
        width=descriptor_width, steps=descriptor_steps, batch_size=descriptor_batch_size, seed=seed,
        device=device, log_every=max(descriptor_steps // 4, 1))
model = sscd.load_descriptor(descriptor_path, expected_sha, device=device)
print(f"descriptor {descriptor_path}\n  sha256 {expected_sha} (checked)")
embed = lambda images: sscd.compute_descriptors(model, images, size=sscd_size, mode=sscd_preprocess,  # noqa: E731
                                                device=device)
d_real, d_background = embed(real), embed(background)

# %% [markdown]
# ## Calibration on planted copies
# Near copies of `calibration_sources` real training images among the held-out test images (non-copies);
# the threshold where detections reach `target_precision`.

# %%
cal, planted = sscd.calibrate(embed, real, d_real, d_background, n_sources=calibration_sources, seed=seed,
                              target_precision=target_precision, device=device)
bg_top1 = planted["noncopy_top1"]
print(f"calibrated threshold {cal.threshold:.3f}: precision {cal.precision:.3f}, recall {cal.recall:.3f} "
      f"({cal.n_copies} planted copies, {cal.n_noncopies} non-copies; recall by kind "
      f"{ {k: round(v, 2) for k, v in cal.recall_by_kind.items()} })")
print("top-1 is the source:", {k: round(v, 2) for k, v in planted["top1_is_source"].items()},
      f"| non-copies: top-1 median {bg_top1.median():.3f}")

# %%
# NBVAL_CHECK_OUTPUT
assert planted["top1_is_source"]["exact"] == 1.0 and planted["exact_top1_min"] > 0.999
assert not cal.achieved or cal.precision >= target_precision
print(f"exact copies retrieved with similarity 1.0; calibrated precision >= {target_precision} where reached: True")

# %% [markdown]
# ## The synthetic sets
# Every complete set of `03_synthesize`'s record (or those in `synthetic_sets`).

# %%
sets, main_set = sscd.synthetic_sets(run, image_size, max_synthetic, synthetic_sets)
stand_in = not sets
if stand_in:
    if not fake_if_missing:
        raise FileNotFoundError(f"no synthetic set in this run: run 03_synthesize first (realfake run --preset {preset} --only 03)")
    print("NOTE: no synthetic set: using a STAND-IN set of perturbed real training images (crop / jitter / JPEG) "
          "so the pipeline runs; its numbers say nothing about the paper's synthetic data")
    sets = {"STAND-IN perturbed real": sscd.stand_in_set(real, 200, seed)}
main_set = main_set or max(sets, key=lambda n: len(sets[n]))
d_sets = {n: embed(imgs) for n, imgs in sets.items()}   # each set through the descriptor once
retrieved = {n: sscd.topk_similar(d, d_real, k=top_k, device=device) for n, d in d_sets.items()}
normed = {n: sscd.background_normalize(retrieved[n][0], d, d_background, beta=score_norm_beta,
                                       device=device)[:, 0] if score_norm_beta else None for n, d in d_sets.items()}
results_sets = {n: sscd.set_copies(retrieved[n][0][:, 0], cal, normed[n]) for n in sets}
for n, r in results_sets.items():
    print(f"{n}: {r.n} images, copy rate {100 * r.copy_rate:.1f}% at {cal.threshold:.3f}; top-1 median "
          f"{r.raw['median_top1']:.3f}, > 0.5: {100 * r.raw['share_above_0.5']:.1f}%, > 0.75: {100 * r.raw['share_above_0.75']:.1f}%")

# %%
hist = {f"{n} (raw)": retrieved[n][0][:, 0] for n in sets}
hist["held-out real images (not copies)"] = bg_top1
fig = sscd.plot_similarity_histogram(hist, thresholds=(cal.threshold, sscd.COPY_THRESHOLD))
run.save_figure(fig, "07_sscd_top1_histogram")

# %% [markdown]
# ## Fig. 4 analog
# The three synthetic images of the full method's set (03's `default_row`) most similar to a real
# training image, each with its three best real matches. The paper finds such pairs semantically similar
# but not copies.

# %%
sims, idx = retrieved[main_set]
fig = sscd.plot_top_matches(sets[main_set], real, sims, idx, n=3, k=3)
fig.suptitle(f"{main_set}: top-3 synthetic images by SSCD similarity", fontsize=8, y=1.02)
run.save_figure(fig, "07_sscd_top_matches")

# %%
record = sscd.SSCDRecord(
    descriptor=sscd.SSCDRecord.rel(run, descriptor_path), descriptor_sha256=expected_sha,
    miniature_descriptor=not sscd_model, preprocess=sscd_preprocess, size=sscd_size, n_reference=len(real),
    n_background=len(background), top_k=top_k, calibration=cal, planted_top1_recall=planted["top1_is_source"],
    heldout_real_top1_median=float(bg_top1.median()), sets=results_sets, stand_in_synthetic=stand_in,
    score_norm={"beta": score_norm_beta, "neighbours": [0, 2]})
record.save(run)
print(f"07_sscd: threshold {cal.threshold:.3f} (precision {cal.precision:.2f}), {len(results_sets)} set(s)")
