"""The paper's claims, each measured on a run and judged with :func:`stats.verdict` (REPORT.md).

A :class:`Claim` holds the paper's statement and source, one :class:`Finding` per comparison (the
measured difference with its 95 % interval, the paper's number beside it where printed) and the verdict:
``holds`` (the interval lies on the paper's side), ``contradicted`` (on the other side),
``inconclusive`` (it straddles: within seed noise, or one seed) or ``not measured (...)``.

1. Table 2: each component raises synthetic-only accuracy -- 04's paired effects along the paper's rows
   (same synthesis and classifier seeds on both sides), the paper's IN-10 / IN-100 differences beside them.
2. Table 1: real + synthetic beats real only.
3. Table 3 / Fig. 2: accuracy grows with k; the crossover scale at which synthetic-only passes real only
   (paper: 2.5x IN-10, 6.5x IN-100).
4. Fig. 3: training on synthetic data lowers the LiRA TPR at low FPR (06's paired bootstrap differences).
5. Fig. 4: no copies: SSCD copy rate at the calibrated threshold (07).
6. Geng et al. 2024: retrieved real images match or beat synthetic ones (08's own claim function).
7. Table 4: OOD accuracy of synthetic data at the largest k against real data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import classify, retrieval, stats
from .paper import PaperNumbers
from .tables import (OOD_COLUMNS, TABLE2_ROWS, Accuracy, RunRecords, accuracies, compare_runs, fmt_diff,
                     not_measured, ood_rows)

HOLDS, CONTRADICTED, INCONCLUSIVE = "holds", "contradicted", "inconclusive"


@dataclass
class Finding:
    """One measured comparison of a claim."""

    label: str
    measured: str                  # e.g. "+2.1 [+0.3, +3.9] (paired t, n=3)"
    verdict: str
    paper: str = ""                # the paper's number for the same comparison, where printed
    diff: float = float("nan")
    lo: float = float("nan")
    hi: float = float("nan")


@dataclass
class Claim:
    id: str
    title: str
    paper: str
    paper_source: str
    verdict: str
    findings: list[Finding] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


def combine(verdicts: Sequence[str]) -> str:
    """A claim of several comparisons: ``contradicted`` if any is, ``holds`` if all hold, ``not
    measured`` if none was measured, else ``inconclusive``."""
    measured = [v for v in verdicts if not v.startswith("not measured")]
    if not measured:
        return verdicts[0] if verdicts else not_measured("", "no comparison")
    if CONTRADICTED in measured:
        return CONTRADICTED
    if all(v == HOLDS for v in measured):
        return HOLDS if len(measured) == len(verdicts) else f"{HOLDS} (where measured)"
    return INCONCLUSIVE


def _finding(label: str, c: stats.Comparison, expect: str = "greater", paper: str = "") -> Finding:
    v = stats.verdict(c, expect) if c.n_a and c.n_b else not_measured("04_train_classifier", "a side has no run")
    return Finding(label, fmt_diff(c), v, paper, c.diff, c.lo, c.hi)


def _claim(cid: str, title: str, paper: PaperNumbers, key: str, findings: list[Finding],
           verdict: str | None = None, details: Sequence[str] = ()) -> Claim:
    text, source = paper.claim(key)
    return Claim(cid, title, text, source, verdict or combine([f.verdict for f in findings]), findings,
                 list(details))


def _paper_diff(paper: PaperNumbers, table: str, columns: Sequence[str], a: str, b: str) -> str:
    out = []
    for col in columns:
        va, vb = paper.value(table, col, a), paper.value(table, col, b)
        if va is not None and vb is not None:
            out.append(f"{col} {vb - va:+.1f}")
    return ", ".join(out)


def claim_components(recs: RunRecords, paper: PaperNumbers) -> Claim:
    """(1) Table 2: each component raises synthetic-only top-1 (k = 1): 04's own paired effects
    (:func:`classify.table2_effects`, ``stats.paired`` over the (synthesis seed, classifier seed) pairs
    both rows share, ``stats.verdict(..., "greater")``), beside the paper's IN-10 / IN-100 differences."""
    title = "Each component (distribution matching, visual guidance, latent prior) improves synthetic-only accuracy"
    rec = recs.classifier
    if rec is None:
        return _claim("1", title, paper, "components", [], not_measured("04_train_classifier"))
    findings = [Finding(f"{e.name}: {e.a} -> {e.b}", fmt_diff(stats.Comparison("paired t", e.diff, e.lo, e.hi, e.p,
                                                                               e.n, e.n)),
                        e.verdict, _paper_diff(paper, "table2", ("IN-10", "IN-100"), e.a, e.b), e.diff, e.lo, e.hi)
                for e in rec.effects]
    missing = [r for r in TABLE2_ROWS if not accuracies(rec, "table2", r, 1)]
    details = [f"Table 2 rows not run: {', '.join(missing)}"] if missing else []
    if not findings:
        return _claim("1", title, paper, "components", [], not_measured("03_synthesize", "no two Table 2 rows ran"),
                      details)
    return _claim("1", title, paper, "components", findings, details=details)


def claim_real_plus_synthetic(recs: RunRecords, paper: PaperNumbers, column: str) -> Claim:
    """(2) Table 1: real + synthetic (k = 1) beats real only, paired over classifier seeds."""
    title = "Synthetic + real beats real only"
    rec = recs.classifier
    if rec is None:
        return _claim("2", title, paper, "real_plus_synthetic", [], not_measured("04_train_classifier"))
    both = f"real+{rec.default_row}"
    f = _finding(f"real only -> {both} (k=1)", compare_runs(accuracies(rec, "table1", "real", 0),
                                                            accuracies(rec, "table1", both, 1)),
                 paper=_paper_diff(paper, "table1", (column,), "real only", "OURS + real"))
    return _claim("2", title, paper, "real_plus_synthetic", [f])


def claim_scaling(recs: RunRecords, paper: PaperNumbers, column: str) -> Claim:
    """(3) Table 3 / Fig. 2: synthetic-only top-1 at the largest vs the smallest k; each k against real
    only; the crossover scale of the means (``classify.scaling_points``) beside Fig. 2's."""
    title = "Accuracy grows with the scale k; synthetic data passes real data at some k (Fig. 2)"
    rec = recs.classifier
    if rec is None:
        return _claim("3", title, paper, "scaling", [], not_measured("04_train_classifier"))
    ks = sorted({r.k for r in rec.select("table3")})
    if len(ks) < 2:
        return _claim("3", title, paper, "scaling", [], not_measured(
            "04_train_classifier", f"synthetic-only runs at {len(ks)} k (need two)"))
    pts = {k: accuracies(rec, "table3", rec.default_row, k) for k in ks}
    findings = [_finding(f"synthetic only k={ks[0]} -> k={ks[-1]}", compare_runs(pts[ks[0]], pts[ks[-1]]),
                         paper=_paper_diff(paper, "table3", ("IN-1K top-1",), f"synthetic k={ks[0]}",
                                           f"synthetic k={ks[-1]}"))]
    real = accuracies(rec, "table1", "real", 0)
    details = []
    for k in ks if real else []:
        c = compare_runs(real, pts[k])
        details.append(f"synthetic k={k} vs real only: {fmt_diff(c)} -> above real: {stats.verdict(c, 'greater')}")
    x = classify.scaling_points(rec)["crossover_k"] if real else None
    pc = paper.value("fig2", column, "crossover")
    if real:
        details.append(f"crossover of the means: {f'{x:.2g}x' if x is not None else f'not reached up to k={ks[-1]}'}"
                       + (f" (paper Fig. 2, {column}: {pc:g}x)" if pc is not None else ""))
    return _claim("3", title, paper, "scaling", findings, findings[0].verdict, details)


def claim_lira(recs: RunRecords, paper: PaperNumbers, attack: str = "online") -> Claim:
    """(4) Fig. 3: the LiRA attack's TPR at 1 % / 0.1 % FPR and AUC, synthetic-trained minus real-trained
    target on the same examples, with 06's paired bootstrap intervals (:class:`lira.Difference`), judged
    by ``stats.verdict(..., "less")`` (holds: the whole interval below 0, the synthetic target leaks less)."""
    title = "Training on synthetic data lowers the LiRA TPR at low FPR"
    rec = recs.lira
    if rec is None:
        return _claim("4", title, paper, "lira", [], not_measured("06_lira"))
    real, syn, d = rec.find("real", attack), rec.find("synthetic", attack), rec.difference(attack)
    if real is None or syn is None or d is None:
        why = ("no real target" if real is None else f"no synthetic target: {rec.synthetic.status}" if syn is None
               else "06's record holds no paired difference of the two targets: rerun 06_lira")
        return _claim("4", title, paper, "lira", [], not_measured("06_lira", why))
    pr, ps = paper.value("fig3_lira", "IN-10", "real"), paper.value("fig3_lira", "IN-10", "synthetic")
    findings = []
    for metric, label, scale, unit in (("tpr_at_1pct_fpr", "TPR at 1 % FPR", 100.0, " points"),
                                       ("tpr_at_0p1pct_fpr", "TPR at 0.1 % FPR", 100.0, " points"),
                                       ("auc", "AUC", 1.0, "")):
        ci, pct = getattr(d, f"{metric}_interval"), "" if metric == "auc" else " %"
        c = stats.Comparison("paired bootstrap", scale * getattr(d, metric), scale * ci.lo, scale * ci.hi, None,
                             rec.n_examples, rec.n_examples, ci.confidence)
        pp = f"IN-10: {ps:g} % (synthetic) vs {pr:g} % (real)" if metric == "tpr_at_0p1pct_fpr" and pr is not None \
            and ps is not None else ""
        findings.append(Finding(
            f"{label}, {attack} attack: synthetic-trained {scale * getattr(syn, metric):.3g}{pct} vs real-trained "
            f"{scale * getattr(real, metric):.3g}{pct}",
            f"difference {c.diff:+.3g}{unit} [{c.lo:+.3g}, {c.hi:+.3g}] ({ci.confidence:.0%} paired bootstrap over "
            f"examples, {ci.n_bootstrap} resamples)", stats.verdict(c, "less"), pp, c.diff, c.lo, c.hi))
    details = [f"{rec.n_members} members / {rec.n_nonmembers} non-members, {rec.n_shadow} shadow models; "
               f"lowest resolvable FPR 1/{rec.n_nonmembers}"]
    return _claim("4", title, paper, "lira", findings, combine([f.verdict for f in findings[:2]]), details)


def claim_sscd(recs: RunRecords, paper: PaperNumbers) -> Claim:
    """(5) Fig. 4: no synthetic image above the calibrated copy threshold (07's :class:`sscd.SSCDRecord`:
    the threshold reaching the target precision on planted copies vs held-out real images, and per set
    the images above it)."""
    title = "No copies of training images (SSCD)"
    rec = recs.sscd
    if rec is None:
        return _claim("5", title, paper, "sscd", [], not_measured("07_sscd"))
    if rec.stand_in_synthetic:
        return _claim("5", title, paper, "sscd", [], not_measured(
            "03_synthesize", "07_sscd ran on a stand-in set of perturbed real images: run 03, then 07"))
    cal = rec.calibration
    findings = []
    for name, s in rec.sets.items():
        v = INCONCLUSIVE if not cal.achieved else HOLDS if s.copies == 0 else CONTRADICTED
        findings.append(Finding(f"{name}: images above the calibrated threshold {cal.threshold:.3g}",
                                f"{s.copies} of {s.n} ({100 * s.copy_rate:.2f} %)", v))
    details = [f"threshold calibrated to precision {cal.target_precision:g} on {cal.n_copies} planted copies vs "
               f"{cal.n_noncopies} held-out real images: {'reached' if cal.achieved else 'NOT reached'} "
               f"(recall {cal.recall:.2f})",
               f"descriptor: {rec.descriptor}" + (" (miniature, trained by 07)" if rec.miniature_descriptor else "")]
    return _claim("5", title, paper, "sscd", findings, details=details)


def claim_retrieval(recs: RunRecords, paper: PaperNumbers) -> Claim:
    """(6) Geng et al. 2024: retrieved real images match or beat synthetic ones, judged by 08's own
    :func:`retrieval.claim` on its :class:`retrieval.RetrievalRecord` (so 08 and REPORT.md agree)."""
    title = "Retrieval vs synthesis (Geng et al. 2024): retrieved real images match or beat synthetic ones"
    if recs.retrieval is None:
        return _claim("6", title, paper, "retrieval", [], not_measured("08_retrieval_baseline"))
    c = retrieval.claim(recs.retrieval)
    findings = []
    for metric, r in c["across_sizes"].items():
        cm = stats.Comparison(**r["comparison"])
        findings.append(Finding(f"{metric}, retrieved - synthetic, paired over sizes {r['sizes']}", fmt_diff(cm),
                                r["verdict"], "", cm.diff, cm.lo, cm.hi))
    return _claim("6", title, paper, "retrieval", findings, c["verdict"], retrieval.claim_lines(c))


def claim_ood(recs: RunRecords, paper: PaperNumbers) -> Claim:
    """(7) Table 4: on each OOD set, the default synthetic set at the largest k against real only (top-1,
    paired over classifier seeds where both ran them), beside the paper's difference (OURS x5 - real)."""
    title = "Scaled synthetic data generalises out of distribution at least as well as real data (Table 4)"
    rec = recs.ood
    if rec is None:
        return _claim("7", title, paper, "ood", [], not_measured("05_ood_eval"))
    rows = ood_rows(rec)
    syn = [v for lbl, v in rows.items() if lbl.startswith("synthetic k=")]
    if not syn or "real only" not in rows:
        return _claim("7", title, paper, "ood", [], not_measured("05_ood_eval", "no synthetic or no real classifier"))
    (source, k, prow), real = syn[-1], rows["real only"]
    findings = []
    for s in rec.ood_sets:
        side = [[r for r in rec.results if (r.source, r.k, r.ood_set) == (src, kk, s)]
                for src, kk, _ in (real, (source, k, prow))]
        a, b = ([Accuracy(r.source, r.k, r.synthesis_seed, r.classifier_seed, 100 * r.top1, 100 * r.top5, r.n)
                 for r in x] for x in side)
        col = OOD_COLUMNS.get(s, "")
        findings.append(_finding(f"{s}: real only -> {source} k={k}", compare_runs(a, b),
                                 paper=_paper_diff(paper, "table4", (f"{col} top-1",), "real only", prow) if col else ""))
    return _claim("7", title, paper, "ood", findings)


def all_claims(recs: RunRecords, paper: PaperNumbers, column: str) -> list[Claim]:
    """The seven claims; each says ``not measured (run notebook NN)`` when its step has not run."""
    return [claim_components(recs, paper), claim_real_plus_synthetic(recs, paper, column),
            claim_scaling(recs, paper, column), claim_lira(recs, paper), claim_sscd(recs, paper),
            claim_retrieval(recs, paper), claim_ood(recs, paper)]


def summary_markdown(claims: Sequence[Claim], verdict_header: str = "verdict") -> str:
    lines = [f"| # | claim | {verdict_header} |", "|---|---|---|"]
    for c in claims:
        lines.append(f"| {c.id} | {c.title} | **{c.verdict}** |")
    return "\n".join(lines) + "\n"


def claim_markdown(c: Claim, verdict_label: str = "verdict") -> str:
    out = [f"### {c.id}. {c.title}", ""]
    if c.paper:
        out.append(f"- **paper**: {c.paper} ({c.paper_source})")
    for f in c.findings:
        out.append(f"- {f.label}: {f.measured} -> **{f.verdict}**" + (f" (paper: {f.paper})" if f.paper else ""))
    out += [f"- {d}" for d in c.details]
    out += [f"- **{verdict_label}**: {c.verdict}", ""]
    return "\n".join(out) + "\n"


def as_dict(c: Claim) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(c)
