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
# # 04 Train classifiers: real, synthetic, real + synthetic, and scaled synthetic data (Sec. 4.1-4.3, Tables 1-3, Fig. 2, Table 8)
#
# A ResNet (timm; ResNet-50 for the paper presets, a tiny `resnet10t` for the miniature ones) is trained on each
# training source and evaluated on the **real test split** (top-1, top-5, confusion matrix). The sources are the
# sets in 03's record (`synthesize.SynthesisRecord`), never 03's parameters:
#
# - **Table 1**: real only; synthetic only (the full method's k = 1 sets); real + synthetic = the real train
#   split plus the k = 1 set, twice the data (Apx. G.2). Paper (ImageNette): 93.0 real, 90.5 synthetic, 95.1 both;
#   EuroSAT 97.6 / 94.6 / 98.9.
# - **Table 2**: synthetic only, the nine rows, each with every synthesis seed; the component effects are
#   paired comparisons (`stats.paired`: the same classifier seeds and synthesis seeds on both sides) with 95 %
#   intervals.
# - **Table 3 / Fig. 2**: the full method's sets at every k, synthetic only, against the real-only line; the
#   figure marks where synthetic-only crosses it (paper: 2.5x on IN-10, 6.5x on IN-100).
#
# The recipe is data (`params/recipes/<recipe>.yaml`, one per column of Table 8; per-device batch = the global
# batch / processes). `miniature` is the tiny CPU recipe (its sources say what it shortens). Every run
# checkpoints each epoch, resumes after a kill, and is read back when its marker verifies for the same recipe,
# seed and source content. `seeds` are the classifier seeds, the same for every row.

# %% tags=["parameters"]
preset = "digits"
run_dir = ""
seed = 0
device = "auto"
torch_threads = 0          # 0: min(cores, 4)
image_size = 16
recipe = "miniature"       # params/recipes/<recipe>.yaml (imagenette, imagenet100, imagenet1k, cub, cars, pets, eurosat, miniature)
recipe_overrides = {}      # e.g. {"epochs": 5, "hflip": 0.5}
pretrained_path = ""       # local ImageNet ResNet-50 weights for the fine-tuning recipes (cub, cars, pets)
seeds = [0, 1, 2]          # classifier seeds, the same for every row (paired Table 2 comparisons)
retrieved_set = ""         # optional folder of retrieved real images (manifest.jsonl format) as an extra Table 1 row

# %%
import torch

import realfake_utils as rf
from realfake_utils import classify as C

run = rf.setup(globals(), "04_train_classifier")
torch.set_num_threads(torch_threads or min(torch.get_num_threads(), 4))
rc = C.load_recipe(recipe, image_size=image_size, **recipe_overrides)
print(f"recipe {rc['name']}: {rc['model']}, {rc['opt']} lr {rc['lr']} {rc['sched']} {rc['decay_milestones']}, "
      f"{rc['epochs']} epochs, global batch {rc['global_batch_size'] or rc['batch_size']}, {rc['train_size']} px; "
      f"seeds {seeds}")

# %% [markdown]
# Training: every classifier of Tables 1-3 (resumable; a finished run is read back).

# %%
record = C.train_tables(run, rc, seeds, device=device, pretrained_path=pretrained_path, retrieved_set=retrieved_set)
print(f"{len(record.runs)} classifiers, {sum(r.train_time_s for r in record.runs):.0f} s of training")

# %% [markdown]
# **Table 1** (the paper: real + synthetic beats real only; synthetic only approaches real only).

# %%
print(C.format_table(C.table_lines(record, "table1"), "Table 1 (top-1 %, mean and 95 % interval over seeds)"))
run.save_figure(C.plot_table(record, "table1", "Table 1: real vs synthetic vs both"), "04_table1")

# %% [markdown]
# **Table 2** (the paper: each component raises synthetic-only accuracy). Set names: `base` = vanilla base model,
# `lora` = fine-tuned, `dm` / `nodm` = with / without the DM loss, `vg` / `novg` = visual guidance token,
# `lp` / `t2i` = latent prior (img2img) or text-to-image. Effects: paired over (synthesis seed, classifier seed).

# %%
print(C.format_table(C.table_lines(record, "table2"), "Table 2 (synthetic only, k = 1, top-1 %)"))
print(C.format_effects(record.effects))
run.save_figure(C.plot_table(record, "table2", "Table 2: ablation (synthetic only)"), "04_table2")

# %% [markdown]
# **Table 3 / Fig. 2**: synthetic-only accuracy against k, with 95 % intervals; the dashed line and band are real
# data only; a dotted line marks where synthetic only crosses it.

# %%
print(C.format_table(C.table_lines(record, "table3"), "Table 3 (synthetic only, top-1 %)"))
scaling = C.scaling_points(record)
print("synthetic only crosses real at k =", scaling["crossover_k"])
run.save_figure(C.plot_scaling(record), "04_fig2_scaling")

# %% [markdown]
# Confusion matrices (real test split) of the first real-only and the first default-set classifier.

# %%
for source in ("real", record.default_row):
    r = next(x for x in record.runs if source in (x.source, x.table2_row) and x.k <= 1)
    m = rf.rundir.read_json(run.root / r.path / "metrics.json")
    run.save_figure(C.confusion_figure(m["confusion"], title=f"{r.source} (k={r.k}): top-1 {100 * r.top1:.1f} %"),
                    f"04_confusion_{'real' if source == 'real' else 'synthetic'}")

# %%
# NBVAL_CHECK_OUTPUT
assert all(0.0 <= r.top1 <= r.top5 <= 1.0 for r in record.runs)
real = [r for r in record.runs if r.source == "real"]
assert len(real) == len(seeds), "the real-only baseline runs with every seed"
assert all(r.n_train == 2 * record.n_real_train for r in record.runs if r.source.startswith("real+")), \
    "real + synthetic = the real train split + the k = 1 set (twice the data, Apx. G.2)"
for table in C.TABLES:
    print(f"{table}: {len(C.table_lines(record, table))} source(s) trained")
assert rc["epochs"] < 5 or min(r.top1 for r in real) > 1.5 / len(m["confusion"]), "real-only classifiers at chance"
print("real-only baseline trained with every seed:", len(real) == len(seeds))

# %%
record.save(run)
