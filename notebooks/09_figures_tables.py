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
# # 09 Figures, tables and the paper-claims report (Tables 1-4, Fig. 1-3, Geng et al.)
#
# Reads **only the records** the steps wrote into the run folder (`results/NN_step.json`, loaded with each
# step's own record class: 03 `SynthesisRecord`, 04 `ClassifierRecord`, 05 `OODRecord`, 06 `LiraRecord`,
# 07 `SSCDRecord`, 08 `RetrievalRecord`) and the paper's published numbers
# (`realfake_utils/resources/paper_numbers.yaml`, every cell with its table / row / column).
#
# - **Table 1** beside the paper's column for this data set (digits beside IN-10, labelled as the closest
#   small set; eurosat-mini beside EuroSAT); **Table 2**: all nine ablation rows in the paper's order beside
#   its IN-10 / IN-100 values; **Table 3** beside ImageNet-1K; **Table 4** (OOD) beside the paper's four sets.
# - **Claims** (REPORT.md): (1) each component of Table 2 as a paired comparison over classifier seeds with
#   its 95 % interval, beside the paper's difference; (2) real + synthetic beats real; (3) accuracy grows with
#   k, with the crossover scale beside Fig. 2's 2.5x / 6.5x; (4) LiRA TPR at 1 % / 0.1 % FPR and AUC with
#   06's bootstrap intervals; (5) SSCD copies at 07's calibrated threshold; (6) Geng et al.'s retrieval claim,
#   judged by 08's own function; (7) OOD at the largest k against real data.
# - **Figures**: Table 2 beside the paper is drawn here; Fig. 1 (MMD^2 per set), Fig. 2 (scaling),
#   Fig. 3 (LiRA ROC) and Geng et al.'s sweep by the steps' own plotting functions.
#
# Verdicts come from `realfake_utils.stats` (the same computation the steps print): *holds*, *contradicted*,
# *inconclusive*, or *not measured (run notebook NN)*. A miniature preset's report says "verdict in
# miniature"; a paper preset's says "verdict".

# %% tags=["parameters"]
preset = "digits"
run_dir = ""
seed = 0
paper_numbers = ""       # empty: the packaged realfake_utils/resources/paper_numbers.yaml

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

import realfake_utils as rf
from realfake_utils import claims, figures, report, tables
from realfake_utils import paper as rf_paper

run = rf.setup(globals(), "09_figures_tables")
recs = tables.RunRecords.load(run.root)
paper = rf_paper.PaperNumbers.load(paper_numbers or None)
for step, ran in recs.steps().items():
    print(f"{step:24s} {'record found' if ran else 'no record (not run in this folder)'}")

# %% [markdown]
# ## Figures
# Each figure is drawn by one function; a step's own figure is drawn by that step's function from its record.

# %%
figs = figures.make_figures(recs, paper)
saved = [run.save_figure(fig, name) for name, fig in figs.items()]
plt.show()

# %% [markdown]
# ## Tables and claims

# %%
rec = report.build(run, preset, paper_numbers or None, [str(p.relative_to(run.root)) for p in saved], recs)
for t in rec.tables.values():
    display(Markdown(tables.markdown(t)))
display(Markdown(claims.summary_markdown(rec.claims, rec.verdict_label)))
for c in rec.claims:
    display(Markdown(claims.claim_markdown(c, rec.verdict_label)))

# %%
report_path = report.write_report(run, rec, paper_numbers or None)
text = report_path.read_text()
assert "## Claims" in text and len(rec.claims) == 7 and all(c.verdict for c in rec.claims)
assert ("verdict in miniature" in text) != rec.paper_preset
assert len(rec.tables["table2"].rows) in (0, len(tables.TABLE2_ROWS))  # all nine rows, in the paper's order

# %%
# NBVAL_CHECK_OUTPUT
print(f"REPORT.md written with {len(rec.claims)} claims and {len(rec.tables)} tables: True")
