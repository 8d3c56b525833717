"""The report's own composite figures (notebook 09): each drawn by one function from typed records.

Figures a step owns are drawn by that step's function and only called here (:func:`step_figures`):
Fig. 1's MMD^2 per set -> ``synthesize.figure_mmd``, Fig. 2 scaling -> ``classify.plot_scaling``, Table 4 against k -> ``ood.plot_ood_vs_k``, Fig. 3 LiRA ROC ->
``lira.plot_fig3``, Geng et al.'s data-size sweep -> ``retrieval.plot_sweep``. What is drawn here compares the run with the paper:

- :func:`figure_table2`: Table 2's nine rows (this run, mean and 95 % interval, every seed a dot) beside
  the paper's IN-10 / IN-100 values, in the paper's order;
(Fig. 1 as a number, each set's MMD^2 to the real train set, is 03's ``synthesize.figure_mmd``.)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from . import classify, lira, ood, retrieval, synthesize
from .paper import PaperNumbers
from .tables import TABLE2_ROWS, RunRecords, accuracies, estimate


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def figure_table2(recs: RunRecords, paper: PaperNumbers):
    """Table 2 as bars: this run's top-1 per row (95 % interval, seeds as dots) and the paper's IN-10 /
    IN-100 values, rows in the paper's order."""
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    rec = recs.classifier
    x = np.arange(len(TABLE2_ROWS))
    if rec is not None:
        for i, row in enumerate(TABLE2_ROWS):
            runs = accuracies(rec, "table2", row, 1)
            if not runs:
                continue
            e = estimate(runs)
            err = e.half_width if math.isfinite(e.half_width) else 0.0
            ax.bar(i, e.mean, yerr=err, color="C2" if row == TABLE2_ROWS[-1] else "C0", alpha=0.8, capsize=3)
            ax.scatter([i] * len(runs), [r.top1 for r in runs], color="k", s=8, zorder=3)
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 on the real test split (%)")
    else:
        _placeholder(ax, "not measured (run notebook 04_train_classifier)")
    ax.set_title("this run: mean, 95 % interval, seeds", fontsize=9)
    w = 0.4
    for j, col in enumerate(("IN-10", "IN-100")):
        vals = [paper.value("table2", col, r) for r in TABLE2_ROWS]
        ax2.bar(x + (j - 0.5) * w, [v or 0 for v in vals], w, label=col, color=("0.35", "0.65")[j])
    ax2.set_ylim(60, 95)
    ax2.legend(fontsize=8)
    ax2.set_title("paper, Table 2 (top-1 %)", fontsize=9)
    for a in (ax, ax2):
        a.set_xticks(x, [f"{i + 1} {r}" for i, r in enumerate(TABLE2_ROWS)], rotation=35, ha="right", fontsize=7)
    fig.suptitle("Table 2: ablation (synthetic only, k = 1)", fontsize=10)
    fig.tight_layout()
    return fig


def fig2_paper_points(paper: PaperNumbers) -> dict[int, float]:
    """The published synthetic-only points against k (Table 3, ImageNet-1K top-1): {k: top-1}."""
    cells = (paper.tables.get("table3") or {}).get("IN-1K top-1") or {}
    return {int(e["k"]): float(e["value"]) for row, e in cells.items() if row.startswith("synthetic k=")}


def step_figures(recs: RunRecords, paper: PaperNumbers) -> dict[str, Callable[[], Any]]:
    """The figures the steps own, drawn by their own functions from their records (09 saves them under
    its own names): Fig. 2 (classify), Fig. 3 (lira), Geng et al.'s sweep (retrieval)."""
    out: dict[str, Callable[[], Any]] = {}
    if recs.synthesis is not None and recs.synthesis.mmd2_to_real_train:
        # Fig. 1 as a number (03's own figure; its CLIP PCA needs 03's models and stays in 03)
        out["09_fig1_mmd"] = lambda: synthesize.figure_mmd(recs.synthesis)
    if recs.classifier is not None and recs.classifier.select("table3"):
        # the paper's synthetic-only curve against k is printed for ImageNet-1K only (Table 3); Fig. 2's
        # IN-10 / IN-100 crossovers (2.5x / 6.5x) are text: claim 3 states them beside the run's
        out["09_fig2_scaling"] = lambda: classify.plot_scaling(
            recs.classifier, fig2_paper_points(paper), None,
            "this run (mean, 95 % interval); paper panel: Table 3, ImageNet-1K")
    if recs.ood is not None and recs.ood.results:
        out["09_table4_ood_vs_k"] = lambda: ood.plot_ood_vs_k(recs.ood)
    if recs.lira is not None:
        out["09_fig3_lira_roc"] = lambda: lira.plot_fig3(recs.lira)
    if recs.retrieval is not None:
        out["09_retrieval_sweep"] = lambda: retrieval.plot_sweep(recs.retrieval)
    return out


def make_figures(recs: RunRecords, paper: PaperNumbers) -> dict[str, Any]:
    """{figure name: Figure}: Table 2 drawn here; Fig. 1-3, Table 4 vs k and the sweep by their steps."""
    figs = {"09_table2": figure_table2(recs, paper)}
    figs.update({name: make() for name, make in step_figures(recs, paper).items()})
    return figs
