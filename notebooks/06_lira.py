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
# # 06 LiRA membership inference: does a classifier trained on synthetic data leak its private data? (Sec. 4.5, Fig. 3)
#
# The paper's privacy protocol (Sec. 4.5): "we initially divide the privacy data in IN-10 into two
# halves: member data and non-member data. We only employ LoRA to finetune the diffusion model on the
# member data, then generate synthetic data of equal size. Subsequently, we train a ResNet50 on
# synthetic data." Two classifiers are attacked with LiRA (Carlini et al. 2022, "Membership Inference
# Attacks From First Principles"):
#
# - **(a)** a classifier trained on the members directly (`lira.real_target`);
# - **(b)** `lira.synthetic_target`: the LoRA variant behind 03's default set (the full method), trained
#   on the members with **02's resolved configuration read from 02's record** (`FinetuneRecord`: the
#   same learning rate, global batch, epochs, Min-SNR gamma, DM-loss form, guidance token, flip, mixed
#   precision, trainer), one synthetic image per member with **03's settings of that set** (its record
#   and spec: LoRA scale, sampler steps, guidance scale, latent prior strength, guidance feature), the
#   guidance features of the members only, then a classifier on that set. Only the training data
#   differs from 02 / 03, so a paper preset attacks a model made exactly as the paper's.
#
# LiRA: shadow models trained on random halves of the same examples (`n_shadow`, each example in exactly
# half of them) give, per example, the distribution of the **logit-scaled confidence**
# phi = log p_y - log sum_{y' != y} p_y' of models that did and did not train on it (queries: the image
# and its horizontal flip). The **online** attack is the likelihood ratio of the target's phi under the
# two Gaussians; the **offline** attack uses the out-Gaussian only (one-sided); both also with a
# **fixed global variance**. Reported as ROC curves on log-log axes from 1e-5 (Fig. 3), AUC and TPR at
# 0.1 % and 1 % FPR, each AUC / TPR with a 95 % bootstrap interval over examples (`n_bootstrap`, seeded).
# The paper's "10 sampling iterations" are the paper presets' `n_shadow = 10`.
#
# **What the paper reports** (Fig. 3 caption, IN-10): TPR at 0.1 % FPR of **0.01 %** for the classifier
# trained on the private (real) data against **0.001 %** for the one trained on synthetic data. The
# smallest FPR a run resolves is 1 / (number of non-members): eurosat-mini (1,250 non-members) resolves
# 0.1 %; digits (about 270) reports TPR at 1 % FPR and AUC with their intervals.
#
# The shadow models are trained on **real** data (the attacker's standard approximation): faithful
# shadow models for (b) would each rerun fine-tuning + synthesis. Shadow models are resumable (each
# finished one sealed by `rundir.mark_done`, never retrained) and shardable: `shadow_shard = "0:8"` in
# one process and `"8:16"` in another, then a run with `""`. Every folder under `artifacts/lira/` is
# named by the content hash of what defines it (the split, the recipe, `n_shadow`, the configurations).

# %% tags=["parameters"]
preset = "digits"
run_dir = ""
seed = 0
device = "auto"
torch_threads = 1          # CPU threads; 1 is fastest for the tiny classifiers on a shared CPU (0: min(cores, 2))
image_size = 16
recipe = "miniature"       # classifier recipe (params/recipes/<recipe>.yaml) for the targets and shadow models
recipe_overrides = {}      # e.g. {"epochs": 10}
max_examples = 0           # private data: the real train split, or a random subset of this size (0: all)
n_shadow = 16              # even; each example is in exactly half of the shadow models (paper presets: 10)
shadow_shard = ""          # "" all, or "a:b" to train only shadow models a..b-1 in this process
synthetic_part = True      # target (b): LoRA on the members (02's config), synthesis (03's settings), a classifier
target_set = ""            # 03 set whose recipe (b) repeats; "": 03's default set (the full method)
n_bootstrap = 1000         # bootstrap resamples of the examples for the AUC / TPR intervals (0: none)
roc_points = 500           # at most this many points of each ROC curve are stored in the record

# %%
import torch

import realfake_utils as rf
from realfake_utils import classify as C
from realfake_utils import lira

run = rf.setup(globals(), "06_lira")
torch.set_num_threads(torch_threads or min(torch.get_num_threads(), 2))
for lib in ("diffusers", "transformers"):  # quiet loading bars
    __import__(lib).utils.logging.set_verbosity_error()
    __import__(lib).utils.logging.disable_progress_bar()
rc = C.load_recipe(recipe, image_size=image_size, **recipe_overrides)
private = lira.private_data(run, C.load_size(rc), max_examples, seed)  # decoded at the classifier's size
print(f"private data: {len(private.rows)} real train images ({private.n_members} members, "
      f"{private.n_nonmembers} non-members), {len(private.class_names)} classes; recipe {rc['name']} "
      f"({rc['model']}, {rc['epochs']} epochs); {n_shadow} shadow models")

# %% [markdown]
# ## Shadow models
# Each trains with the kit's classifier trainer (`classify.train_classifier`) on its half of the
# examples; its phi scores for every example (image and flip) are saved in `artifacts/lira/shadows_<hash>/`.

# %%
shadows = lira.shadow_models(run, private, rc, n_shadow, seed=seed, shard=shadow_shard, device=device)
print(f"shadow scores {shadows.scores.shape}; members per example: {set(shadows.masks.sum(0).tolist())}")

# %% [markdown]
# ## The targets: (a) a classifier trained on the members, (b) one trained on synthetic data from a generator fine-tuned on the members

# %%
real_scores = lira.real_target(run, private, rc, seed=seed, device=device)
synthetic = (lira.synthetic_target(run, private, rc, seed=seed, device=device, set_name=target_set)
             if synthetic_part else lira.SyntheticTarget(None, lira.SyntheticInfo(False, "not run (synthetic_part = False)")))
print("(b)", synthetic.info.status)

# %% [markdown]
# ## Attacks: every LiRA variant and the global threshold on both targets, with bootstrap intervals

# %%
record = lira.build_record(private, shadows, real_scores, synthetic, rc, n_bootstrap=n_bootstrap, seed=seed,
                           max_points=roc_points)
print(lira.format_attacks(record.attacks))
if record.leave_one_out:
    print("Carlini et al.'s own check, each shadow model in turn the target:")
    print(lira.format_attacks([record.leave_one_out]))

# %% [markdown]
# ## Fig. 3 analog: ROC curves on log-log axes

# %%
figure = run.save_figure(lira.plot_fig3(record), "06_lira_roc")

# %% [markdown]
# ## TPR at 0.1% FPR (online attack), side by side with the paper

# %%
print(lira.format_fig3_comparison(record))

# %%
# NBVAL_CHECK_OUTPUT
assert shadows.masks.sum(0).min() == shadows.masks.sum(0).max() == n_shadow // 2
assert all(0.0 <= a.auc <= 1.0 and len(a.fpr) == len(a.tpr) <= roc_points + 2 for a in record.attacks)
assert record.synthetic.ran == bool(record.by_target("synthetic"))
print(f"{n_shadow} shadow models, each example in exactly {n_shadow // 2}: ok")

# %%
saved = record.save(run)
