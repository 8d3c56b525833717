"""Tables 1-4 of Real-Fake, measured, beside the paper's published numbers (notebook 09, REPORT.md).

Inputs are typed records only (:class:`RunRecords` loads them, one per step, with the producers' own
classes; nothing here parses a layout): 03's :class:`synthesize.SynthesisRecord`, 04's
:class:`classify.ClassifierRecord`, 05's :class:`ood.OODRecord`. Published numbers come from
``resources/paper_numbers.yaml`` through :mod:`realfake_utils.paper` (every cell with its table / row / column).

Each table is a :class:`Table` (title, headers, rows of cells, notes) rendered by :func:`markdown`.
Per-seed values become estimates (mean, 95 % t interval) only through :mod:`realfake_utils.stats`.

Which paper column a run sits beside (:func:`paper_column`): the paper's data set for a paper preset
(``imagenette`` -> IN-10, ``eurosat`` -> EuroSAT ...), ``eurosat-mini`` beside EuroSAT, and ``digits`` /
``smoke`` beside IN-10 *labelled as the closest small set* (10 classes, the smallest of Table 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from . import classify, finetune, lira, ood, prepare, probe, retrieval, sscd, stats, synthesize
from .paper import PaperNumbers, paper_column
from .records import Record

TABLE2_ROWS = synthesize.ROWS          # Table 2's nine rows in the paper's order (row 1 ... 9)
DEFAULT_ROW = synthesize.DEFAULT_ROW    # the full method (Table 2 row 9, "OURS" of Tables 1, 3, 4)
TABLE2_COLUMNS = ("IN-10", "IN-100")   # the paper ran the ablation on these two only (Sec. 4.1)


# --------------------------------------------------------------------------------------------- records
RECORDS: tuple[tuple[str, type[Record]], ...] = (
    ("prepare", prepare.PrepareRecord), ("finetune", finetune.FinetuneRecord),
    ("synthesis", synthesize.SynthesisRecord), ("classifier", classify.ClassifierRecord),
    ("ood", ood.OODRecord), ("lira", lira.LiraRecord), ("sscd", sscd.SSCDRecord),
    ("retrieval", retrieval.RetrievalRecord),
)


@dataclass
class RunRecords:
    """The records of a run folder the report reads (None: that step has not run here)."""

    prepare: Any = None        # prepare.PrepareRecord (01)
    finetune: Any = None       # finetune.FinetuneRecord (02)
    synthesis: Any = None      # synthesize.SynthesisRecord (03)
    classifier: Any = None     # classify.ClassifierRecord (04)
    ood: Any = None            # ood.OODRecord (05)
    lira: Any = None           # lira.LiraRecord (06)
    sscd: Any = None           # sscd.SSCDRecord (07)
    retrieval: Any = None      # retrieval.RetrievalRecord (08)

    @classmethod
    def load(cls, run: Any) -> "RunRecords":
        out = cls()
        for attr, record in RECORDS:
            setattr(out, attr, record.load_or_none(run))
        return out

    def steps(self) -> dict[str, bool]:
        return {"01_prepare": self.prepare is not None, "02_finetune": self.finetune is not None,
                "03_synthesize": self.synthesis is not None, "04_train_classifier": self.classifier is not None,
                "05_ood_eval": self.ood is not None, "06_lira": self.lira is not None,
                "07_sscd": self.sscd is not None, "08_retrieval_baseline": self.retrieval is not None}


@dataclass(frozen=True)
class Accuracy:
    """One trained classifier as the report compares it (top-1 / top-5 in %): from 04's
    :class:`classify.ClassifierRun` or 05's :class:`ood.OODResult`."""

    source: str                   # "real", a set name (synthetic only) or "real+<set name>"
    k: int                        # 0 for real only
    synthesis_seed: Optional[int]
    classifier_seed: int
    top1: float
    top5: Optional[float]
    n_train: int


def accuracies(rec: Any, table: str, source: str, k: int | None = None) -> list[Accuracy]:
    """The runs of ``table`` in 04's :class:`classify.ClassifierRecord` trained on ``source`` (a source
    name, or a Table 2 row: its synthetic set, e.g. ``lora-dmofficial-vg-lp`` for ``lora-dm-vg-lp``), at
    ``k`` (None: any), as :class:`Accuracy` (the record's fractions -> %). Real + synthetic runs only
    match their own source name (``real+<set>``)."""
    if rec is None:
        return []
    return [Accuracy(r.source, int(r.k), r.synthesis_seed, int(r.classifier_seed), 100.0 * r.top1, 100.0 * r.top5,
                     int(r.n_train)) for r in rec.select(table, None, k)
            if r.source == source or (r.table2_row == source and not r.source.startswith("real"))]


def _key(a: Accuracy) -> tuple:
    return (-1 if a.synthesis_seed is None else a.synthesis_seed, a.classifier_seed)


def compare_runs(a: Sequence[Accuracy], b: Sequence[Accuracy], metric: str = "top1") -> stats.Comparison:
    """``b - a`` over seeds: paired (:func:`stats.paired`) when both sides ran the same (synthesis seed,
    classifier seed) pairs, or the same classifier seeds once each (real vs one synthetic set); Welch's
    test otherwise."""
    def vals(side, keyf):
        return {keyf(x): getattr(x, metric) for x in side}

    for keyf in (_key, lambda x: x.classifier_seed):
        va, vb = vals(a, keyf), vals(b, keyf)
        if len(va) == len(a) and len(vb) == len(b) and va and set(va) == set(vb):
            keys = sorted(va)
            return stats.paired([va[k] for k in keys], [vb[k] for k in keys])
    return stats.welch([getattr(x, metric) for x in a], [getattr(x, metric) for x in b])


def estimate(runs: Sequence[Accuracy], metric: str = "top1") -> stats.Estimate:
    return stats.seed_stats([getattr(r, metric) for r in runs if getattr(r, metric) is not None])


def fmt_diff(c: stats.Comparison, digits: int = 1) -> str:
    """``+2.3 [+0.4, +4.1] (paired t, n=3)``; ``n/a`` when nothing to compare."""
    if c.n_a == 0 or c.n_b == 0 or math.isnan(c.diff):
        return "n/a"
    if not (math.isfinite(c.lo) and math.isfinite(c.hi)):
        return f"{c.diff:+.{digits}f} (one seed: no interval)"
    return f"{c.diff:+.{digits}f} [{c.lo:+.{digits}f}, {c.hi:+.{digits}f}] ({c.test}, n={min(c.n_a, c.n_b)})"


# --------------------------------------------------------------------------------------------- tables
@dataclass
class Table:
    name: str
    title: str
    headers: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: str = ""


def not_measured(step: str, why: str = "") -> str:
    return f"not measured ({why or f'run notebook {step}'})"


def _paper(p: PaperNumbers, table: str, column: str, row: str) -> str:
    v = p.value(table, column, row)
    return "-" if v is None else f"{v:g}"


def table1(recs: RunRecords, paper: PaperNumbers, preset: str) -> Table:
    """Table 1: synthetic only (the default row, k = 1), real only, real + synthetic, beside the paper's
    OURS / real only / OURS + real of the matching column."""
    col, label = paper_column(preset)
    t = Table("table1", "Table 1: synthetic only, real only, real + synthetic (top-1 %)",
              ["row", "k", "n_train", "this run: top-1 % (95 % interval)", f"paper {label}"])
    rec = recs.classifier
    if rec is None:
        t.missing = not_measured("04_train_classifier")
        return t
    for name, source, k, prow in (("synthetic only", rec.default_row, 1, "OURS"), ("real only", "real", 0, "real only"),
                                  ("real + synthetic", f"real+{rec.default_row}", 1, "OURS + real")):
        runs = accuracies(rec, "table1", source, k)
        t.rows.append([f"{name} ({source})", k, runs[0].n_train if runs else "-",
                       estimate(runs).fmt() if runs else not_measured("04_train_classifier", "not trained"),
                       _paper(paper, "table1", col, prow)])
    t.notes.append(f"paper column: Table 1, column '{col}' ({label}).")
    t.notes += [f"not trained: {m}" for m in rec.missing if m.startswith("table1")]
    return t


def table2(recs: RunRecords, paper: PaperNumbers) -> Table:
    """Table 2: the nine ablation rows in the paper's order (synthetic only, k = 1), with the switches,
    beside the paper's IN-10 and IN-100 values."""
    t = Table("table2", "Table 2: ablation, synthetic only, k = 1 (top-1 %)",
              ["#", "row", "LP", "VG", "DM", "FT", "this run: top-1 % (95 % interval)", "set",
               *[f"paper {c}" for c in TABLE2_COLUMNS]])
    rec = recs.classifier
    if rec is None:
        t.missing = not_measured("04_train_classifier")
        return t
    for i, row in enumerate(TABLE2_ROWS, 1):
        runs = accuracies(rec, "table2", row, 1)
        sw = synthesize.row_switches(row)
        ticks = ["✓" if sw[s] else "" for s in ("latent_prior", "visual_guidance", "dm_loss", "finetune")]
        t.rows.append([i, row, *ticks,
                       estimate(runs).fmt() if runs else not_measured("03_synthesize", "row not run"),
                       runs[0].source if runs else "-", *[_paper(paper, "table2", c, row) for c in TABLE2_COLUMNS]])
    t.notes.append("rows in the paper's order; paper columns: Table 2, ImageNette (IN-10) and ImageNet100 (IN-100); "
                   "'set': the synthetic set 03 made for the row (lora-dmofficial-...: DM variants trained with the "
                   "official loss form).")
    t.notes += [f"not trained: {m}" for m in rec.missing if m.startswith("table2")]
    return t


def table3(recs: RunRecords, paper: PaperNumbers) -> Table:
    """Table 3: top-1 / top-5 of the default row against k (synthetic only) and real only, beside the
    paper's ImageNet-1K rows."""
    t = Table("table3", "Table 3: scaling the synthetic data, k x the real train size",
              ["row", "k", "n_train", "this run: top-1 %", "this run: top-5 %", "paper IN-1K top-1",
               "paper IN-1K top-5"])
    rec = recs.classifier
    if rec is None:
        t.missing = not_measured("04_train_classifier")
        return t
    rows = [(f"synthetic k={k}", "table3", rec.default_row, k) for k in sorted({r.k for r in rec.select("table3")})]
    for label, table, source, k in rows + [("real only", "table1", "real", 0)]:
        runs = accuracies(rec, table, source, k)
        t.rows.append([label, k, runs[0].n_train if runs else "-", estimate(runs).fmt(), estimate(runs, "top5").fmt(),
                       _paper(paper, "table3", "IN-1K top-1", label), _paper(paper, "table3", "IN-1K top-5", label)])
    t.notes.append("the paper's Table 3 is ImageNet-1K only (ResNet-50); Fig. 2's crossovers for IN-10 / IN-100 are "
                   "in claim 3.")
    return t


# 05's OOD set -> the paper's Table 4 column it stands for (miniature variant or the ImageNet set itself)
OOD_COLUMNS = {"v2-like": "ImageNet-v2", "imagenet-v2": "ImageNet-v2", "sketch": "ImageNet-Sketch",
               "imagenet-sketch": "ImageNet-Sketch", "rendition": "ImageNet-R", "imagenet-r": "ImageNet-R",
               "hard": "ImageNet-A", "imagenet-a": "ImageNet-A"}


def ood_rows(rec: Any) -> dict[str, tuple[str, int, str]]:
    """Table 4's rows as 05 measured them: {label: (source, k, paper row)}: the default set at each k
    (``OURS``, ``OURS x2``, ...), real only, real + the default set."""
    default = rec.default_set
    keys = list(dict.fromkeys((r.source, r.k) for r in rec.results))
    out: dict[str, tuple[str, int, str]] = {}
    for source, k in sorted((sk for sk in keys if sk[0] == default), key=lambda sk: sk[1]):
        out[f"synthetic k={k} ({source})"] = (source, k, "OURS" if k == 1 else f"OURS x{k}")
    for source, k in keys:
        if source == "real":
            out["real only"] = (source, k, "real only")
        elif source == f"real+{default}":
            out[f"real + synthetic k={k}"] = (source, k, "OURS + real" if k == 1 else "")
    return out


def table4(recs: RunRecords, paper: PaperNumbers) -> Table:
    """Table 4: top-1 / top-5 of 04's classifiers on 05's OOD sets (05's own seed summaries), each
    beside the paper's cell of the same row in the ImageNet set the variant stands for."""
    t = Table("table4", "Table 4: out-of-distribution accuracy, top-1 / top-5 % (paper beside each)", [])
    rec = recs.ood
    if rec is None:
        t.missing = not_measured("05_ood_eval")
        return t
    sets = rec.ood_sets
    t.headers = ["row"] + [f"{s} (paper: {OOD_COLUMNS.get(s, '-')})" for s in sets]
    for label, (source, k, prow) in ood_rows(rec).items():
        cells: list[Any] = [label]
        for s in sets:
            l1, l5 = rec.line(source, k, s, "top1"), rec.line(source, k, s, "top5")
            col = OOD_COLUMNS.get(s)
            p1 = _paper(paper, "table4", f"{col} top-1", prow) if col and prow else "-"
            p5 = _paper(paper, "table4", f"{col} top-5", prow) if col and prow else "-"
            cells.append(f"{l1.fmt().strip() if l1 else '-'} / {l5.fmt().strip() if l5 else '-'} (paper {p1} / {p5})")
        t.rows.append(cells)
    t.notes += [f"{name}: {what}" for name, what in rec.sets.items()]
    t.notes.append("paper: Table 4, ResNet-50 trained on ImageNet-1K data (synthetic k x or real).")
    return t


# 02's resolved settings the report states (each a parameter name of 02; see params/_schema.yaml)
FINETUNE_KEYS = ("num_train_epochs", "global_batch_size", "learning_rate", "snr_gamma", "dm_loss_form",
                 "dm_loss_weight", "lora_rank", "guidance_token_position", "guidance_feature_train", "image_size")


def protocol(recs: RunRecords) -> dict[str, Any]:
    """What the run was: 01's data set, splits and models, 02's LoRA variants and settings, 03's rows
    and k (from their records; the report's "Protocol" section)."""
    out: dict[str, Any] = {}
    p = recs.prepare
    if p is not None:
        out.update(dataset=p.dataset, image_size=p.image_size, classes=len(p.class_names), images=dict(p.counts),
                   excluded=p.excluded, base_model=p.base_model, clip_model=p.clip_model, captioner=p.captioner)
    f = recs.finetune
    if f is not None:
        out["lora_variants"] = sorted(f.variants)
        out["finetune"] = {k: f.config[k] for k in FINETUNE_KEYS if k in f.config}
    s = recs.synthesis
    if s is not None:
        out.update(rows=list(s.rows), scale_k=list(s.scale_k), synthesis_seeds=list(s.synthesis_seeds),
                   n_real_train=s.n_real_train, skipped=list(s.skipped))
    c = recs.classifier
    if c is not None:
        out.update(classifier_recipe=c.recipe.get("name", ""), classifier_seeds=list(c.seeds))
    return out


def protocol_markdown(p: dict[str, Any]) -> str:
    if not p:
        return "_not measured (run notebooks 01-04)_\n"
    return "\n".join(f"- {k}: {v}" for k, v in p.items()) + "\n"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def generator_checks(recs: RunRecords) -> Table:
    """Did the generator learn the target? The capacity oracle of 01 (its samples train a classifier
    within ``max_gap`` points of real data) and, for 02's base and LoRA samples, the sample probe
    (>= ``probe.PROBE_GOAL``) and the MMD² ratio to the real noise floor (<= ``probe.MMD_RATIO_GOAL``)."""
    t = Table("checks", "Generator checks (01 capacity oracle, 02 samples): does the generator learn the target?",
              ["check", "measured", "goal", "met"])
    o = recs.prepare.oracle if recs.prepare is not None else None
    if o is not None:
        t.rows.append([f"capacity oracle ({o.steps} steps on the target train split), synthetic-only vs real top-1 %",
                       f"{o.synthetic_top1:.1f} vs {o.real_top1:.1f} (gap {o.gap:.1f}; sample probe {o.probe:.2f})",
                       f"gap <= {o.max_gap:g}", _met(o.gap <= o.max_gap)])
    f = recs.finetune
    if f is not None:
        sets = [(name, f.base_probe.get(name), f.base_mmd_ratio.get(name), f.base_mmd2.get(name), None)
                for name in sorted(f.base_mmd2)]
        sets += [(name, {"pixels": v.probe_accuracy, "clip": v.probe_clip}, v.mmd_ratio, v.mmd2_after, v.mmd2_before)
                 for name, v in sorted(f.variants.items())]
        for name, pr, ratio, after, before in sets:
            if pr and pr.get("pixels") is not None:
                ok = {k: v is not None and not math.isnan(v) and v >= probe.PROBE_GOAL for k, v in pr.items()}
                t.rows.append([f"{name} samples: sample probe (pixels / CLIP features)",
                               " / ".join("-" if pr.get(k) is None or math.isnan(pr[k]) else f"{pr[k]:.2f}"
                                          for k in ("pixels", "clip")),
                               f">= {probe.PROBE_GOAL:.2f}", f"pixels {_met(ok['pixels'])} / CLIP {_met(ok['clip'])}"])
            if ratio is not None:
                mmd = f"MMD² {after:.4f}" if before is None else f"MMD² {before:.4f} -> {after:.4f}"
                t.rows.append([f"{name} samples: MMD² over the real noise floor (biased, CLIP space)",
                               f"{ratio:.1f}x ({mmd})", f"<= {probe.MMD_RATIO_GOAL:g}x",
                               _met(ratio <= probe.MMD_RATIO_GOAL)])
    if not t.rows:
        t.missing = not_measured("01_prepare / 02_finetune", "run notebooks 01 and 02 with samples")
    return t


def retrieval_scratch(recs: RunRecords) -> Table:
    """08's second table (not Geng et al.'s protocol): 04's from-scratch classifier trained on the real
    train split, on 03's default set at k = 1 and on each retrieved set, top-1 % over seeds."""
    r = recs.retrieval
    label = r.scratch_label if r is not None else "second table: from-scratch classifier"
    t = Table("retrieval_scratch", f"08_retrieval_baseline, {label}",
              ["training data", "images", "top-1 % (95 % interval)", "seeds"])
    for row in (r.scratch_table if r is not None else []):
        est = stats.seed_stats(list(row["per_seed"].values()))
        t.rows.append([row["label"], row["n_train"], est.fmt(), len(row["per_seed"])])
    if not t.rows:
        t.missing = not_measured("08_retrieval_baseline")
    return t


def all_tables(recs: RunRecords, paper: PaperNumbers, preset: str) -> dict[str, Table]:
    return {"checks": generator_checks(recs), "table1": table1(recs, paper, preset), "table2": table2(recs, paper),
            "table3": table3(recs, paper), "table4": table4(recs, paper), "retrieval_scratch": retrieval_scratch(recs)}


# --------------------------------------------------------------------------------------------- markdown
def _md_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(table: Table) -> str:
    """A :class:`Table` as a GitHub markdown table, with its notes and a missing-input line."""
    lines = [f"**{table.title}**", ""]
    if table.missing:
        lines.append(f"_{table.missing}_")
    if table.rows:
        lines.append("| " + " | ".join(_md_cell(h) for h in table.headers) + " |")
        numeric = [all(isinstance(r[i], (int, float)) or str(r[i])[:1] in "0123456789-+" for r in table.rows
                       if i < len(r)) for i in range(len(table.headers))]
        lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        for row in table.rows:
            cells = [_md_cell(c) for c in row] + [""] * (len(table.headers) - len(row))
            lines.append("| " + " | ".join(cells) + " |")
    for note in table.notes:
        lines += ["", f"_{note}_"]
    return "\n".join(lines) + "\n"
