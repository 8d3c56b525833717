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
# # 05 OOD evaluation: ImageNet-v2 / -Sketch / -R / -A and their miniature stand-ins (Table 4, Apx. G.3)
#
# Every classifier that `04_train_classifier` trained (read from its record, `classify.ClassifierRecord`:
# real, synthetic x k, real + synthetic, the ablation sets) is evaluated on out-of-distribution test sets; the paper's claim (Table 4) is that training on its
# synthetic data, and more of it, also helps out of distribution.
#
# - **Paper presets** (ImageNet-1K): folders of ImageNet-v2 (class folders `0`..`999`), ImageNet-Sketch,
#   ImageNet-R and ImageNet-A (wnid folders), given by the `*_root` parameters. R and A cover 200 of the
#   1000 classes: the logits are **restricted to those 200** before the arg-max (the lists are
#   `realfake_utils/resources/imagenet_{r,a}_wnids.txt`, from the datasets' own evaluation code). The official
#   Real-Fake code takes the arg-max over all 1000 classes, which lowers R and A accuracy; both numbers
#   are printed.
# - **Miniature presets**: four variants of the held-out real test images, each a documented
#   transformation standing for one set: `v2-like` (re-drawn through a small random affine: a new sample
#   of the same distribution), `sketch` (edge rendering), `rendition` (cartoon-like: posterised colours,
#   over-enhanced edges; a class
#   subset, every other class, with restricted logits, as R), `hard` (the test images hardest for
#   filter models independent of the evaluated ones - `hard_filter_models` small CNNs trained here on the
#   real train split with their own seeds, as ImageNet-A kept the images ResNet-50s get wrong; over all
#   classes, since a restricted 10-class hard set is easy again).
# - **The other paper presets** (ImageNette, ImageNet-100, the fine-grained sets, EuroSAT): Table 4 is an
#   ImageNet-1K experiment, so no OOD folder is set; every classifier is scored on the clean test split
#   only (give the `*_root` folders to add OOD sets).
#
# Table 4 of the paper (ResNet-50 on ImageNet-1K, top-1 %) is transcribed in
# `realfake_utils/resources/paper_numbers.yaml` and shown beside this run's numbers by `09_figures_tables`.
# The summary here is mean and t 95 % interval over the seeds (classifier seeds x synthesis seeds) of
# each (training set, k, OOD set), computed by `realfake_utils.stats` (as 09 and REPORT.md do).

# %% tags=["parameters"]
preset = "digits"
run_dir = ""
seed = 0
device = "auto"
torch_threads = 1          # 1 is fastest on a CPU shared with other jobs; 0: min(cores, 4)
image_size = 16
hard_fraction = 0.1        # share of the test images kept as the "hard" set
hard_filter = "cnn"        # cnn: filter classifiers trained here (as ImageNet-A's ResNet-50s) | pixels: no training
hard_filter_models = 2
miniature_variants = True  # build and evaluate the four miniature stand-ins
imagenet_v2_root = ""      # paper presets: folders of the four OOD sets; empty: skip
imagenet_sketch_root = ""
imagenet_r_root = ""
imagenet_a_root = ""

# %%
import torch

import realfake_utils as rf
from realfake_utils import classify as C
from realfake_utils import data, models, ood
from realfake_utils import synthesize as syn

run = rf.setup(globals(), "05_ood_eval")
torch.set_num_threads(torch_threads or min(torch.get_num_threads(), 4))
trained = C.ClassifierRecord.load(run)   # which classifiers exist: 04's record (a clear error if 04 has not run)
default_set = syn.SynthesisRecord.load(run).default().name  # which sets exist: 03's record (the curve vs k)
class_names = data.class_names(data.read_manifest(run.artifacts / "data" / "manifest.csv"))
dev = str(models.resolve_device(device))
print(f"{len(trained.runs)} classifiers from 04_train_classifier, {len(class_names)} classes; default set {default_set}")

# %% [markdown]
# The OOD sets: the miniature variants, built once from the real test split (and, for the hard subset,
# filter CNNs trained with 04's recipe on the real train split), and the ImageNet folders given.

# %%
variants, folders, clean = ood.build_ood_sets(
    run, image_size, trained.recipe, miniature_variants=miniature_variants, hard_fraction=hard_fraction,
    hard_filter=hard_filter, hard_filter_models=hard_filter_models, seed=seed, device=device,
    roots={"imagenet-v2": imagenet_v2_root, "imagenet-sketch": imagenet_sketch_root,
           "imagenet-r": imagenet_r_root, "imagenet-a": imagenet_a_root})
print(ood.describe_sets(variants, folders))
if variants:
    figure = run.save_figure(ood.variants_figure(clean, variants), "05_ood_variants")

# %% [markdown]
# Evaluate every classifier: top-1 / top-5 on the clean test split and each OOD set (restricted where
# the set covers a class subset), plus the unrestricted arg-max on the restricted sets for comparison.

# %%
results = ood.evaluate_classifiers(run, trained.runs, variants, folders, len(class_names), clean=clean, device=dev)
record = ood.build_record(results, variants, folders, default_set=default_set,
                          hard_fraction=hard_fraction, hard_filter=hard_filter,
                          hard_filter_models=hard_filter_models)
columns = ["clean"] * any(r.ood_set == "clean" for r in record.results) + record.ood_sets
print(ood.format_ood_table(record.summary_top1, columns))
print()
print(ood.format_ood_table(record.summary_top5, columns))

# %% [markdown]
# Restricting the arg-max to the covered classes (as the datasets' own evaluation does) against the
# arg-max over all classes (as the official Real-Fake evaluation does) on the class-subset sets:

# %%
for name, gap in ood.restriction_gaps(record).items():
    print(f"{name:<16} restricted - unrestricted top-1: mean {gap:+.1f} points over the classifiers")

# %% [markdown]
# OOD accuracy against k (the full method's synthetic sets of Table 3, 95 % intervals over seeds;
# dashed lines: the real-only classifier on the same set).

# %%
if record.ood_sets and any(ln.source == record.default_set for ln in record.summary_top1):
    figure = run.save_figure(ood.plot_ood_vs_k(record), "05_ood_vs_k")

# %%
# NBVAL_CHECK_OUTPUT
assert {r.classifier for r in record.results} == {str(r.path) for r in trained.runs}
for r in record.results:
    assert 0.0 <= r.top1 <= r.top5 <= 1.0, r
assert all(gap >= -1e-9 for gap in ood.restriction_gaps(record).values())  # restriction never hurts
print("every classifier evaluated on", len(record.ood_sets), "sets; restriction never lowers top-1: True")

# %%
saved = record.save(run)
