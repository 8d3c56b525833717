"""Figures, tables and the paper-claims report of a run folder (notebook ``09_figures_tables``).

Everything here reads only the run folder written by notebooks 00-08 (``results/*.json``,
``artifacts/``, ``figures/``, ``run.log``) and the published numbers kept as data in
``resources/paper_numbers.yaml``. The logic is pure functions on loaded dicts:

- statistics: :func:`seed_stats` (mean, sample std, min, max, n), :func:`welch` (Welch's t-test with
  ``scipy.stats.ttest_ind(equal_var=False)``), :func:`verdict` / :func:`compare` (``holds``,
  ``does not hold``, ``inconclusive (within seed noise)``, ``not measured (...)``);
- tables: :func:`table1` ... :func:`table4` -> ``{"title", "headers", "rows", "missing", ...}``,
  rendered by :func:`table_markdown` (no pandas);
- claims: :func:`all_claims` -> one dict per claim of the paper with what the run measured;
- figures: :func:`figure_table`, :func:`figure_scaling`, :func:`figure_clip_pca`, :func:`figure_lira`,
  :func:`figure_sscd`, each drawing the run beside the paper's published numbers (or saying
  "not measured" inside the figure when its inputs are missing, so the notebook always runs);
- :func:`build_report` / :func:`write_report` -> ``REPORT.md`` (written atomically).

Verdicts are computed from the numbers, never written by hand; with one seed there is no spread to
test against and the verdict says so.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from .rundir import atomic_path

PAPER_NUMBERS = Path(__file__).resolve().parent / "resources" / "paper_numbers.yaml"

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
INCONCLUSIVE = "inconclusive (within seed noise)"
INCONCLUSIVE_ONE_SEED = "inconclusive (one seed per side: no spread to test against)"
NOT_TRANSCRIBED = "not transcribed"

STEPS = {
    "00": "00_theory_checks", "01": "01_prepare", "02": "02_finetune", "03": "03_synthesize",
    "04": "04_train_classifier", "05": "05_ood_eval", "06": "06_lira", "07": "07_sscd",
    "08": "08_retrieval_baseline", "09": "09_figures_tables",
}
LIRA_FIGURES = ("06_lira_roc.png",)            # 06_lira's ROC figure
SSCD_FIGURES = ("07_sscd_top_matches.png",)   # 07_sscd's Fig. 4 analog
FIGURES = ("09_table1", "09_table2", "09_table3", "09_table4", "09_fig1_clip_pca", "09_fig2_scaling",
           "09_fig3_lira_roc", "09_fig4_sscd_matches")


def not_measured(step: str, why: str = "") -> str:
    """``not measured (run notebook 04_train_classifier)``; ``step`` is a notebook name or number."""
    name = STEPS.get(step[:2], step)
    return f"not measured ({why or f'run notebook {name}'})"


# --------------------------------------------------------------------------------------------- loading
def load_results(root: str | Path) -> dict[str, dict[str, Any]]:
    """``results/<notebook>.json`` of a run folder -> {notebook: dict} (unreadable files are skipped
    with a note under the key ``"_errors"``)."""
    out: dict[str, Any] = {}
    errors = {}
    for p in sorted((Path(root) / "results").glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as err:
            errors[p.stem] = str(err)
    if errors:
        out["_errors"] = errors
    return out


def load_paper_numbers(path: str | Path | None = None) -> dict[str, Any]:
    """The published numbers (``resources/paper_numbers.yaml``): citations, tables, claims."""
    data = yaml.safe_load(Path(path or PAPER_NUMBERS).read_text()) or {}
    data.setdefault("tables", {})
    data.setdefault("claims", {})
    data.setdefault("citations", {})
    for table, datasets in data["tables"].items():
        for dataset, rows in (datasets or {}).items():
            for row, entry in (rows or {}).items():
                if not isinstance(entry, dict) or "value" not in entry or not entry.get("source"):
                    raise ValueError(f"paper numbers: {table}/{dataset}/{row} needs a value and a source")
    return data


def paper_entries(paper: dict[str, Any], table: str) -> list[tuple[str, str, dict]]:
    """[(dataset, row, entry)] of one table of the published numbers (empty: not transcribed)."""
    out = []
    for dataset, rows in (paper.get("tables", {}).get(table) or {}).items():
        for row, entry in (rows or {}).items():
            out.append((dataset, row, entry))
    return out


def parse_run_log(root: str | Path) -> dict[str, float]:
    """Seconds per notebook from ``run.log`` (``<date> <time> NN_name ok 12.3s ...``; last run wins)."""
    path = Path(root) / "run.log"
    out: dict[str, float] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        m = re.match(r"\S+ \S+ (\d\d_\w+) ok ([0-9.]+)s", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


_MACHINE_KEYS = ("second", "time", "device", "machine", "cpu", "gpu", "cuda", "torch", "platform",
                 "threads", "images_per_s", "wall")


def machine_info(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Top-level scalar entries about time and machine of every results JSON (keys containing
    seconds / time / device / torch / threads ...; also one level down in ``settings`` / ``machine``)."""
    out: dict[str, dict[str, Any]] = {}
    for nb, res in results.items():
        if nb.startswith("_") or not isinstance(res, dict):
            continue
        items = {}
        for scope in (res, res.get("machine") or {}, res.get("timing") or {}):
            if not isinstance(scope, dict):
                continue
            for key, value in scope.items():
                if isinstance(value, (str, int, float, bool)) and any(t in key.lower() for t in _MACHINE_KEYS):
                    items[key] = value
        if items:
            out[nb] = items
    return out


# --------------------------------------------------------------------------------------------- statistics
def seed_stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (ddof 1; 0 for one value), min, max and n of per-seed values."""
    a = np.asarray([float(v) for v in values], dtype=float)
    if a.size == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Welch's t-test of mean(b) vs mean(a) (two-sided). ``diff = mean(b) - mean(a)``; ``p`` is None
    with fewer than two values on a side; with zero spread on both sides ``p`` is 0 if the means differ
    and 1 if they are equal (scipy returns nan there)."""
    from scipy import stats

    a = np.asarray([float(v) for v in a], dtype=float)
    b = np.asarray([float(v) for v in b], dtype=float)
    if a.size == 0 or b.size == 0:
        return {"diff": float("nan"), "t": None, "p": None, "n_a": int(a.size), "n_b": int(b.size)}
    diff = float(b.mean() - a.mean())
    out = {"diff": diff, "t": None, "p": None, "n_a": int(a.size), "n_b": int(b.size)}
    if a.size < 2 or b.size < 2:
        return out
    if a.std(ddof=1) == 0 and b.std(ddof=1) == 0:
        out.update(t=math.copysign(math.inf, diff) if diff else 0.0, p=0.0 if diff else 1.0)
        return out
    res = stats.ttest_ind(b, a, equal_var=False)
    out.update(t=float(res.statistic), p=float(res.pvalue))
    return out


def verdict(a: Sequence[float], b: Sequence[float], alpha: float = 0.05, expect: str = "greater",
            missing: str = "") -> tuple[str, dict[str, Any]]:
    """Does ``b`` beat ``a`` (``expect="greater"``) or fall below it (``"less"``)?

    ``holds`` / ``does not hold`` when Welch's p < ``alpha`` (in the expected / the opposite direction),
    ``inconclusive (within seed noise)`` otherwise, ``inconclusive (one seed ...)`` without spread,
    ``missing`` (a ``not measured (...)`` text) when a side has no values.
    """
    if expect not in ("greater", "less"):
        raise ValueError(f"expect must be 'greater' or 'less', got {expect!r}")
    test = welch(a, b)
    if test["n_a"] == 0 or test["n_b"] == 0:
        return missing or not_measured("", "no values"), test
    if test["p"] is None:
        return INCONCLUSIVE_ONE_SEED, test
    if test["p"] < alpha and test["diff"] != 0:
        good = test["diff"] > 0 if expect == "greater" else test["diff"] < 0
        return (HOLDS if good else DOES_NOT_HOLD), test
    return INCONCLUSIVE, test


def fmt_stats(s: dict[str, Any], digits: int = 1, unit: str = "") -> str:
    """``71.2 +- 1.3 (n=3)``; ``-`` when there are no values."""
    if not s or not s.get("n"):
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}{unit} (n=1)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}{unit} (n={s['n']})"


def fmt_p(p: float | None) -> str:
    """``p = 0.031``, ``p < 0.001``, ``p n/a``."""
    if p is None:
        return "p n/a"
    return "p < 0.001" if p < 1e-3 else f"p = {p:.3f}"


def compare(label_a: str, a: Sequence[float], label_b: str, b: Sequence[float], alpha: float = 0.05,
            expect: str = "greater", missing: str = "", unit: str = " %") -> dict[str, Any]:
    """One comparison of a claim: stats of both sides, Welch's test, the verdict and a sentence."""
    v, test = verdict(a, b, alpha, expect, missing)
    sa, sb = seed_stats(a), seed_stats(b)
    if test["n_a"] and test["n_b"]:
        sentence = (f"{label_b}: {fmt_stats(sb, unit=unit)} vs {label_a}: {fmt_stats(sa, unit=unit)}; "
                    f"difference {test['diff']:+.2f}{' points' if unit.strip() == '%' else unit}, "
                    f"Welch t-test {fmt_p(test['p'])}")
        if v == INCONCLUSIVE:
            sentence += " (difference within seed spread)"
    else:
        sentence = v
    return {"a": label_a, "b": label_b, "stats_a": sa, "stats_b": sb, **test, "verdict": v,
            "expect": expect, "statement": sentence}


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """A claim made of several comparisons: ``holds`` only if all hold; ``does not hold`` if any
    comparison contradicts it; ``not measured`` if none was measured; else inconclusive."""
    measured = [v for v in verdicts if not v.startswith("not measured")]
    if not measured:
        return verdicts[0] if verdicts else not_measured("", "no comparison")
    if any(v == DOES_NOT_HOLD for v in measured):
        return DOES_NOT_HOLD
    if all(v == HOLDS for v in measured) and len(measured) == len(verdicts):
        return HOLDS
    if all(v == HOLDS for v in measured):
        return f"{HOLDS} (where measured)"
    return INCONCLUSIVE if any(v == INCONCLUSIVE for v in measured) else measured[0]


# --------------------------------------------------------------------------------------------- 04 records
def classifier_values(r04: dict[str, Any] | None, row: str, k: int | None = None,
                      metric: str = "top1") -> list[float]:
    """Per-seed accuracies (in %) of one row of ``04_train_classifier``'s runs (``k`` None: any)."""
    if not r04:
        return []
    return [100.0 * float(r[metric]) for r in r04.get("runs", [])
            if r.get("row") == row and (k is None or int(r.get("k", 0)) == int(k))]


def missing_hint(r04: dict[str, Any] | None, prefix: str, limit: int = 2) -> str:
    """04_train_classifier's own explanation for rows it could not train (its ``missing`` list), for the
    rows whose message starts with ``prefix`` (e.g. ``"table1 row 'real + synthetic'"``)."""
    msgs = [m for m in (r04 or {}).get("missing", []) or [] if str(m).startswith(prefix)]
    if not msgs:
        return ""
    more = f" (+{len(msgs) - limit} more)" if len(msgs) > limit else ""
    return "04_train_classifier could not train " + "; ".join(msgs[:limit]) + more


def set_switches(name: str) -> dict[str, bool] | None:
    """``lora-dm-vg-lp`` -> {finetune, dm_loss, visual_guidance, latent_prior}; None if not a set name
    (see ``synthesize.set_name`` / ``finetune.variant_name``)."""
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "base" and parts[1] in ("vg", "novg") and parts[2] in ("lp", "t2i"):
        return {"finetune": False, "dm_loss": False, "visual_guidance": parts[1] == "vg",
                "latent_prior": parts[2] == "lp"}
    if (len(parts) == 4 and parts[0] == "lora" and parts[1] in ("dm", "dmofficial", "nodm")
            and parts[2] in ("vg", "novg") and parts[3] in ("lp", "t2i")):
        return {"finetune": True, "dm_loss": parts[1] != "nodm", "visual_guidance": parts[2] == "vg",
                "latent_prior": parts[3] == "lp"}
    return None


# The components of claim 1: (label, switches of the "without" set, switches of the "with" set).
# Only the named switches differ; the others must be equal (all off preferred: the paper's
# ablation adds the components one by one).
COMPONENTS = (
    ("fine-tuning with the DM loss", {"finetune": False, "dm_loss": False}, {"finetune": True, "dm_loss": True}),
    ("DM loss (vs LoRA fine-tuning with L_simple only)", {"finetune": True, "dm_loss": False},
     {"finetune": True, "dm_loss": True}),
    ("visual guidance", {"visual_guidance": False}, {"visual_guidance": True}),
    ("latent prior", {"latent_prior": False}, {"latent_prior": True}),
)
PRIMARY_COMPONENTS = ("fine-tuning with the DM loss", "visual guidance", "latent prior")


def component_pair(set_names: Sequence[str], without: dict[str, bool], with_: dict[str, bool]
                   ) -> tuple[str, str] | None:
    """Two sets of ``set_names`` that differ exactly by ``without`` -> ``with_`` (other switches equal).
    Among several pairs, prefer the one whose other switches are "on" as in the paper's cumulative
    ablation (the component is added on top of the previous ones), i.e. the pair closest to the
    sequence base -> +LoRA -> +DM -> +VG -> +LP."""
    sw = {n: set_switches(n) for n in set_names}
    sw = {n: s for n, s in sw.items() if s is not None}
    order = ("finetune", "dm_loss", "visual_guidance", "latent_prior")
    pairs = []
    for a, sa in sw.items():
        if any(sa[k] != v for k, v in without.items()):
            continue
        for b, sb in sw.items():
            if any(sb[k] != v for k, v in with_.items()):
                continue
            if all(sa[k] == sb[k] for k in order if k not in without and k not in with_):
                # cumulative-ablation score: earlier switches on, later switches off
                pos = max(order.index(k) for k in with_)
                score = sum(sa[k] for k in order[:pos]) - sum(sa[k] for k in order[pos + 1:])
                pairs.append((score, a, b))
    if not pairs:
        return None
    pairs.sort(key=lambda t: -t[0])
    return pairs[0][1], pairs[0][2]


# --------------------------------------------------------------------------------------------- tables
def table_markdown(table: dict[str, Any]) -> str:
    """A table dict (``title``, ``headers``, ``rows``, optional ``missing`` / ``notes``) as markdown."""
    lines = [f"**{table['title']}**", ""]
    if table.get("missing"):
        lines.append(f"_{table['missing']}_")
    if table.get("rows"):
        headers = [str(h) for h in table["headers"]]
        lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
        for row in table["rows"]:
            cells = [_md_cell(c) for c in row] + [""] * (len(headers) - len(row))
            lines.append("| " + " | ".join(cells) + " |")
    for note in table.get("notes", []):
        lines += ["", f"_{note}_"]
    return "\n".join(lines) + "\n"


def _md_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _paper_cell(paper: dict[str, Any], table: str, row_label: str) -> str:
    cells = [f"{e['value']:g} ({d}, {e.get('model', '')})".replace(", )", ")")
             for d, r, e in paper_entries(paper, table) if r == row_label]
    return "; ".join(cells) if cells else NOT_TRANSCRIBED


def _paper_note(paper: dict[str, Any], table: str) -> str:
    entries = paper_entries(paper, table)
    if not entries:
        return f"Paper column: {NOT_TRANSCRIBED} (no value of this table could be verified; none is guessed)."
    srcs = sorted({e["source"] for _, _, e in entries})
    return "Paper column sources: " + "; ".join(srcs) + ". Other rows: not transcribed."


def _accuracy_table(r04: dict[str, Any] | None, table: str, title: str, paper: dict[str, Any],
                    paper_label=None) -> dict[str, Any]:
    headers = ["row", "k", "n_train", "top-1 % (mean ± std over seeds)", "[min, max]", "seeds",
               "paper (top-1 %)"]
    out = {"name": table, "title": title, "headers": headers, "rows": [], "lines": [],
           "notes": [_paper_note(paper, table)]}
    if not r04:
        out["missing"] = not_measured("04")
        return out
    lines = (r04.get("tables") or {}).get(table) or []
    if not lines:
        out["missing"] = not_measured("04", f"no row of {table} was trained: see 04_train_classifier's "
                                            "'missing' list")
    for ln in lines:
        vals = classifier_values(r04, ln["row"], ln["k"])
        s = seed_stats(vals) if vals else {"n": ln.get("n", 0), "mean": ln["mean"], "std": ln["std"],
                                           "min": ln["min"], "max": ln["max"]}
        label = paper_label(ln) if paper_label else ln["label"]
        out["rows"].append([ln["label"], ln["k"], ln.get("n_train", "-"), fmt_stats(s),
                            f"[{s['min']:.1f}, {s['max']:.1f}]", s["n"], _paper_cell(paper, table, label)])
        out["lines"].append({**ln, **s, "values": vals, "paper_label": label})
    for m in r04.get("missing", []) or []:
        if m.startswith(table):
            out["notes"].append(f"not measured: {m}")
    return out


def table1(results: dict[str, Any], paper: dict[str, Any]) -> dict[str, Any]:
    """Table 1: real only / synthetic only / real + synthetic (and retrieved, if trained)."""
    return _accuracy_table(results.get("04_train_classifier"), "table1",
                           "Table 1 (miniature): real only, synthetic only, real + synthetic", paper)


def table2(results: dict[str, Any], paper: dict[str, Any]) -> dict[str, Any]:
    """Table 2: the ablation rows (synthetic only), with the switches of each set spelled out."""
    t = _accuracy_table(results.get("04_train_classifier"), "table2",
                        "Table 2 (miniature): ablation of the components, synthetic only", paper)
    for row, ln in zip(t["rows"], t["lines"]):
        sw = set_switches(ln["row"])
        if sw:
            on = [k for k in ("finetune", "dm_loss", "visual_guidance", "latent_prior") if sw[k]]
            row[0] = f"{ln['label']} ({' + '.join(on) if on else 'vanilla base model'})"
    return t


def table3(results: dict[str, Any], paper: dict[str, Any]) -> dict[str, Any]:
    """Table 3: accuracy against k (synthetic only and real + synthetic), plus the real-only line."""
    return _accuracy_table(results.get("04_train_classifier"), "table3",
                           "Table 3 (miniature): top-1 against the scale k", paper,
                           paper_label=lambda ln: f"synthetic k={ln['k']}" if ln["label"].startswith("synthetic")
                           else ln["label"])


def ood_records(r05: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Flat OOD records {classifier, row, k, seed, variant, top1 (%), top5 (%)} from ``05_ood_eval``.

    Accepts a list under ``records`` / ``runs`` (each with row, k, seed, variant/set, top1) or a mapping
    ``{classifier: {variant: {top1, top5}}}`` under ``ood`` / ``accuracy`` / ``results``."""
    if not r05:
        return []
    out = []
    for key in ("results", "records", "runs", "rows", "evaluations"):
        if isinstance(r05.get(key), list):
            for r in r05[key]:
                if not isinstance(r, dict):
                    continue
                variant = r.get("variant", r.get("set", r.get("ood_set")))
                per_set = next((r[k] for k in ("sets", "ood", "variants") if isinstance(r.get(k), dict)), None)
                if variant is not None and "top1" in r:
                    out.append(_ood_rec(r, variant, r))
                elif per_set is not None:
                    for variant, m in per_set.items():
                        if isinstance(m, dict) and "top1" in m and "(all classes)" not in str(variant):
                            out.append(_ood_rec(r, variant, m))
            if out:
                return out
    for key in ("ood", "accuracy", "results"):
        if isinstance(r05.get(key), dict):
            for clf, variants in r05[key].items():
                if isinstance(variants, dict):
                    for variant, m in variants.items():
                        if isinstance(m, dict) and "top1" in m:
                            out.append(_ood_rec({"name": clf}, variant, m))
    return out


def _ood_rec(r: dict[str, Any], variant: str, m: dict[str, Any]) -> dict[str, Any]:
    scale = 100.0 if float(m["top1"]) <= 1.0 else 1.0
    name = str(r.get("name", r.get("classifier", r.get("row", "?"))))
    row, k, seed = r.get("row"), r.get("k"), r.get("seed")
    mt = re.match(r"^(.*)__k(\d+)__s(\d+)$", name)  # classify.RunSpec.name: <row>__k<k>__s<seed>
    if row is None and mt:
        row, k, seed = mt.group(1), int(mt.group(2)), int(mt.group(3))
    return {"classifier": name, "row": str(row if row is not None else name), "k": int(k or 0), "seed": seed,
            "variant": str(variant), "top1": scale * float(m["top1"]),
            "top5": scale * float(m["top5"]) if m.get("top5") is not None else float("nan")}


def table4(results: dict[str, Any], paper: dict[str, Any]) -> dict[str, Any]:
    """Table 4: top-1 per OOD set (columns) for each trained row (mean ± std over seeds)."""
    recs = ood_records(results.get("05_ood_eval"))
    out = {"name": "table4", "title": "Table 4 (miniature): top-1 % on the OOD variants", "headers": [],
           "rows": [], "lines": [], "notes": [_paper_note(paper, "table4")]}
    if not recs:
        out["missing"] = not_measured("05")
        return out
    variants = list(dict.fromkeys(r["variant"] for r in recs))
    rows = list(dict.fromkeys((r["row"], r["k"]) for r in recs))
    out["headers"] = ["row", "k"] + variants + ["paper"]
    for row, k in rows:
        cells: list[Any] = [row, k]
        for v in variants:
            vals = [r["top1"] for r in recs if r["row"] == row and r["k"] == k and r["variant"] == v]
            s = seed_stats(vals)
            cells.append(fmt_stats(s))
            out["lines"].append({"row": row, "k": k, "variant": v, **s, "values": vals})
        cells.append(_paper_cell(paper, "table4", row))
        out["rows"].append(cells)
    r05 = results.get("05_ood_eval") or {}
    desc = next((r05[k] for k in ("sets", "variants", "descriptions") if isinstance(r05.get(k), dict)), None)
    if isinstance(desc, dict):
        for v, d in desc.items():
            text = d.get("description") if isinstance(d, dict) else d
            if isinstance(text, str):
                out["notes"].append(f"{v}: {text}")
    return out


def all_tables(results: dict[str, Any], paper: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The four tables; a table whose results cannot be read says so instead of stopping the notebook."""
    out = {}
    for name, fn in (("table1", table1), ("table2", table2), ("table3", table3), ("table4", table4)):
        try:
            out[name] = fn(results, paper)
        except Exception as err:  # a malformed result must not stop the report
            out[name] = {"name": name, "title": f"{name}", "headers": [], "rows": [], "lines": [], "notes": [],
                         "missing": f"not measured (could not read the results: {type(err).__name__}: {err})"}
    return out


# --------------------------------------------------------------------------------------------- claims
def _claim(cid: str, title: str, paper: dict[str, Any], key: str, comparisons: list[dict[str, Any]],
           verdict_: str | None = None, measured: str = "", details: Sequence[str] = ()) -> dict[str, Any]:
    pc = paper.get("claims", {}).get(key, {})
    v = verdict_ or combine_verdicts([c["verdict"] for c in comparisons])
    lines = [c["statement"] if c["verdict"] in c["statement"] else f"{c['statement']} -> {c['verdict']}"
             for c in comparisons]
    return {"id": cid, "title": title, "paper": pc.get("text", ""), "paper_source": pc.get("source", ""),
            "comparisons": comparisons, "verdict": v,
            "measured": measured or (lines[0] if len(lines) == 1 else "\n".join(f"- {ln}" for ln in lines) if lines
                                     else v), "details": list(details)}


def claim_components(results: dict[str, Any], paper: dict[str, Any], alpha: float = 0.05) -> dict[str, Any]:
    """(1) each component raises synthetic-only accuracy: Table 2 sets compared pairwise."""
    r04 = results.get("04_train_classifier")
    title = "Each component (fine-tuning with the DM loss, visual guidance, latent prior) improves synthetic-only accuracy"
    if not r04:
        return _claim("1", title, paper, "components", [], not_measured("04"))
    k = int(r04.get("ablation_k", 1))
    names = [ln["row"] for ln in (r04.get("tables") or {}).get("table2", [])] or list(r04.get("ablation_sets", []))
    comps, details = [], []
    for label, without, with_ in COMPONENTS:
        pair = component_pair(names, without, with_)
        if pair is None:
            hint = missing_hint(r04, "table2")
            msg = not_measured("03", "no pair of trained Table 2 sets differs by this component only: "
                               + (hint or "add both rows to the 03_synthesize / 04_train_classifier parameter "
                                          "ablation_rows"))
            c = {"a": "", "b": "", "verdict": msg, "statement": f"{label}: {msg}", "component": label,
                 "primary": label in PRIMARY_COMPONENTS, "n_a": 0, "n_b": 0}
        else:
            a, b = pair
            c = compare(a, classifier_values(r04, a, k), b, classifier_values(r04, b, k), alpha,
                        missing=not_measured("04", f"set {a} or {b} not trained at k={k}"))
            c["statement"] = f"{label}: {c['statement']}"
            c.update(component=label, primary=label in PRIMARY_COMPONENTS)
        comps.append(c)
        details.append(f"{c['statement']} -> {c['verdict']}" if c["verdict"] not in c["statement"] else c["statement"])
    v = combine_verdicts([c["verdict"] for c in comps if c["primary"]])
    extra = []
    vanilla = next((n for n in names if (set_switches(n) or {}).get("finetune") is False), None)
    full = next((n for n in names if set_switches(n) and all(set_switches(n).values())), None)
    if vanilla and full:  # not a verdict on "each" component, but what the run can say about all of them
        c = compare(vanilla, classifier_values(r04, vanilla, k), full, classifier_values(r04, full, k), alpha)
        if c["n_a"] and c["n_b"]:
            extra.append(f"all components together (vanilla base model -> full method): {c['statement']} "
                         f"-> {c['verdict']}")
    return _claim("1", title, paper, "components", comps, v, measured="\n".join(f"- {d}" for d in details),
                  details=extra)


def claim_real_plus_synthetic(results: dict[str, Any], paper: dict[str, Any], alpha: float = 0.05) -> dict[str, Any]:
    """(2) real + synthetic beats real only (Table 1 row at ablation_k; every k of Table 3 as details)."""
    r04 = results.get("04_train_classifier")
    title = "Synthetic + real beats real only"
    if not r04:
        return _claim("2", title, paper, "real_plus_synthetic", [], not_measured("04"))
    default = r04.get("default_set", "")
    k = int(r04.get("ablation_k", 1))
    real = classifier_values(r04, "real", 0) or classifier_values(r04, "real")
    main = compare("real only", real, f"real + {default} (k={k})", classifier_values(r04, f"real+{default}", k),
                   alpha, missing=not_measured("04", missing_hint(r04, "table1 row 'real")
                                               or f"real + synthetic at k={k} not trained"))
    details = []
    for kk in sorted({int(x) for x in r04.get("scale_k", [])} - {k}):
        c = compare("real only", real, f"real + synthetic k={kk}", classifier_values(r04, f"real+{default}", kk), alpha)
        if c["n_b"]:
            details.append(f"{c['statement']} -> {c['verdict']}")
    return _claim("2", title, paper, "real_plus_synthetic", [main], details=details)


def claim_scaling(results: dict[str, Any], paper: dict[str, Any], alpha: float = 0.05) -> dict[str, Any]:
    """(3) accuracy grows with k: synthetic only at the largest vs the smallest k (means per k listed)."""
    r04 = results.get("04_train_classifier")
    title = "Accuracy grows with the scale k of the synthetic data"
    if not r04:
        return _claim("3", title, paper, "scaling", [], not_measured("04"))
    default = r04.get("default_set", "")
    ks = sorted(k for k in {int(x) for x in r04.get("scale_k", [])} if classifier_values(r04, default, k))
    if len(ks) < 2:
        return _claim("3", title, paper, "scaling", [], not_measured(
            "04", f"synthetic-only accuracy at fewer than two k (scale_k = {r04.get('scale_k')})"
            + (f": {missing_hint(r04, 'table3 row ' + chr(39) + 'synthetic')}"
               if missing_hint(r04, "table3 row 'synthetic") else "")))
    comps, details = [], []
    for prefix, row in (("synthetic only", default), ("real + synthetic", f"real+{default}")):
        means = [(k, seed_stats(classifier_values(r04, row, k))) for k in ks]
        means = [(k, s) for k, s in means if s["n"]]
        if len(means) < 2:
            continue
        lo, hi = means[0][0], means[-1][0]
        c = compare(f"{prefix} k={lo}", classifier_values(r04, row, lo), f"{prefix} k={hi}",
                    classifier_values(r04, row, hi), alpha)
        mono = all(b[1]["mean"] >= a[1]["mean"] for a, b in zip(means, means[1:]))
        details.append(f"{prefix}: " + ", ".join(f"k={k}: {s['mean']:.1f}" for k, s in means)
                       + f" (means {'non-decreasing' if mono else 'not monotone'} in k)")
        comps.append(c)
    # the verdict is the synthetic-only comparison (the paper's Fig. 2 claim); real + synthetic is a detail
    return _claim("3", title, paper, "scaling", comps, comps[0]["verdict"], details=details)


def lira_pairs(r06: dict[str, Any] | None, fpr_key: str = "tpr_at_0.1pct_fpr"
               ) -> list[dict[str, Any]]:
    """[(attack, real metrics, synthetic metrics)] from ``06_lira``'s results.

    Looks for ``{"targets" | "attacks" | "metrics": {target: {attack: metrics}}}`` or
    ``{target: {attack: metrics}}`` at the top level, with targets named like ``real`` / ``synthetic``;
    metrics hold ``tpr_at_0.1pct_fpr`` (a fraction), ``auc``, ``n_members``, ``min_resolvable_fpr``."""
    if not r06:
        return []
    scopes = [r06] + [r06[k] for k in ("targets", "attacks", "metrics", "results") if isinstance(r06.get(k), dict)]
    for scope in scopes:
        tgt = {}
        for name, v in scope.items():
            if isinstance(v, dict) and name.lower().startswith(("real", "synthetic", "synth")):
                tgt[name] = v
        real = next((v for n, v in tgt.items() if n.lower().startswith("real")), None)
        syn = next((v for n, v in tgt.items() if n.lower().startswith("synth")), None)
        if real is None or syn is None:
            continue
        # {attack: metrics} or metrics directly
        if fpr_key in real:
            return [{"attack": "LiRA", "real": real, "synthetic": syn}]
        out = []
        for attack, m in real.items():
            if isinstance(m, dict) and fpr_key in m and isinstance(syn.get(attack), dict):
                out.append({"attack": attack, "real": m, "synthetic": syn[attack]})
        if out:
            return out
    return []


def claim_lira(results: dict[str, Any], paper: dict[str, Any], alpha: float = 0.05,
               fpr_key: str = "tpr_at_0.1pct_fpr") -> dict[str, Any]:
    """(4) synthetic training lowers LiRA TPR at low FPR (0.1 %): real-trained vs synthetic-trained
    target, per attack; a two-proportion test (Fisher's exact test on the member counts) for each."""
    from scipy import stats

    title = "Training on synthetic data lowers the LiRA TPR at low FPR"
    r06 = results.get("06_lira")
    pairs = lira_pairs(r06, fpr_key)
    if not pairs:
        why, details = "", []
        if r06 and not r06.get("synthetic"):
            why = f"06_lira's synthetic target did not run: {r06.get('synthetic_part', 'no synthetic target')}"
            for attack, m in (r06.get("real") or {}).items():
                if isinstance(m, dict) and fpr_key in m:
                    details.append(f"real-trained target only, {attack}: TPR at 0.1 % FPR {100 * float(m[fpr_key]):.2f} %, "
                                   f"AUC {float(m.get('auc', float('nan'))):.3f}")
        return _claim("4", title, paper, "lira", [], not_measured("06", why), details=details)
    comps = []
    for p in pairs:
        r, s = p["real"], p["synthetic"]
        nr, ns = int(r.get("n_members", 0) or 0), int(s.get("n_members", 0) or 0)
        tr, ts = float(r[fpr_key]), float(s[fpr_key])
        pval = None
        if nr and ns:
            xr, xs = int(round(tr * nr)), int(round(ts * ns))
            pval = float(stats.fisher_exact([[xr, nr - xr], [xs, ns - xs]])[1])
        if pval is None:
            v = INCONCLUSIVE_ONE_SEED
        elif pval < alpha and ts != tr:
            v = HOLDS if ts < tr else DOES_NOT_HOLD
        else:
            v = "inconclusive (within sampling noise)"
        res_fpr = max(float(r.get("min_resolvable_fpr", 0) or 0), float(s.get("min_resolvable_fpr", 0) or 0))
        note = ""
        if res_fpr > 1e-3 + 1e-12:
            note = (f" (0.1 % FPR is below the resolution 1/{int(round(1 / res_fpr))} of this run's "
                    f"non-members: the value is the TPR at FPR 0)")
        st = (f"{p['attack']}: TPR at 0.1 % FPR {100 * ts:.2f} % (synthetic-trained) vs {100 * tr:.2f} % "
              f"(real-trained), AUC {s.get('auc', float('nan')):.3f} vs {r.get('auc', float('nan')):.3f}, "
              f"Fisher exact test {fmt_p(pval)}{note}")
        comps.append({"attack": p["attack"], "verdict": v, "statement": st, "p": pval, "tpr_real": tr,
                      "tpr_synthetic": ts, "auc_real": r.get("auc"), "auc_synthetic": s.get("auc"),
                      "n_a": nr, "n_b": ns})
    main = next((c for c in comps if c["attack"] in ("online", "LiRA online", "LiRA")), comps[0])
    return _claim("4", title, paper, "lira", comps, main["verdict"],
                  measured="\n".join(f"- {c['statement']} -> {c['verdict']}" for c in comps))


def sscd_sets(r07: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """{set name: copy_stats} from ``07_sscd``: ``sets: {name: {"n", "raw": copy_stats,
    "background_normalized": copy_stats}}`` (``copy_stats`` keys: ``n``, ``count_above_0.75``,
    ``share_above_0.5``, ``median_top1`` ...). Flat ``{name: copy_stats}`` is accepted too."""
    if not r07:
        return {}
    if "count_above_0.75" in r07:
        return {"synthetic": r07}
    out = {}
    for key in ("sets", "copy_stats", "stats", "synthetic", "results"):
        v = r07.get(key)
        items = v.items() if isinstance(v, dict) else (
            [(str(x.get("name", x.get("set", i))), x) for i, x in enumerate(v) if isinstance(x, dict)]
            if isinstance(v, list) else [])
        for name, st in items:
            if not isinstance(st, dict):
                continue
            raw = st.get("raw") if isinstance(st.get("raw"), dict) else st
            if "count_above_0.75" in raw:
                entry = dict(raw)
                entry.setdefault("n", st.get("n", 0))
                if isinstance(st.get("background_normalized"), dict):
                    entry["background_normalized"] = st["background_normalized"]
                out[str(name)] = entry
        if out:
            return out
    return out


def claim_sscd(results: dict[str, Any], paper: dict[str, Any], threshold: float = 0.75) -> dict[str, Any]:
    """(5) no copies: no synthetic image above SSCD's copy threshold (0.75) against the real train set;
    the exact binomial (Clopper-Pearson) 95 % upper bound of the copy rate is given.

    With the miniature descriptor of ``07_sscd`` (``miniature_descriptor``) the thresholds are not
    calibrated: images above it count as copies only if the set's median top-1 similarity exceeds that
    of held-out real images (which are certainly not copies); otherwise the verdict is inconclusive."""
    from scipy import stats

    title = "No copies of training images (SSCD)"
    r07 = results.get("07_sscd") or {}
    if r07.get("stand_in_synthetic"):
        return _claim("5", title, paper, "sscd", [], not_measured(
            "03", "07_sscd ran on a stand-in set of perturbed real images: run 03_synthesize, then 07_sscd"))
    sets = sscd_sets(r07)
    sets = {n: s for n, s in sets.items() if not str(n).lower().startswith(("planted", "control", "stand-in"))}
    if not sets:
        return _claim("5", title, paper, "sscd", [], not_measured("07"))
    miniature = bool(r07.get("miniature_descriptor"))
    heldout = r07.get("heldout_real_top1_median")
    comps = []
    key = f"count_above_{threshold:g}"
    for name, s in sets.items():
        n, x = int(s.get("n", 0)), int(s.get(key, 0))
        upper = float(stats.beta.ppf(0.95, x + 1, n - x)) if n and x < n else 1.0
        med = float(s.get("median_top1", float("nan")))
        if not n:
            v = not_measured("07", "no synthetic image")
        elif x == 0:
            v = HOLDS
        elif miniature and heldout is not None and med <= float(heldout):
            v = ("inconclusive (uncalibrated miniature descriptor: held-out real images, which are not copies, "
                 "are at least as similar to the training images)")
        elif miniature and heldout is not None:
            v = (f"{DOES_NOT_HOLD} (miniature descriptor: the synthetic images are closer to their nearest "
                 "training image than held-out real images are)")
        else:
            v = DOES_NOT_HOLD
        st = (f"{name}: {x} of {n} synthetic images above the copy threshold {threshold:g} "
              f"(95 % upper bound of the copy rate {100 * upper:.2f} %); "
              f"{int(s.get('count_above_0.5', 0))} above the replication threshold 0.5; "
              f"top-1 similarity median {med:.3f}, max {float(s.get('max_top1', float('nan'))):.3f}")
        if heldout is not None:
            st += f" (held-out real images, not copies: median {float(heldout):.3f})"
        bn = s.get("background_normalized")
        if isinstance(bn, dict) and key in bn:
            st += f"; after background normalisation {int(bn[key])} above {threshold:g}"
        comps.append({"set": name, "verdict": v, "statement": st, "n": n, "copies": x, "upper95": upper})
    details = []
    if miniature:
        details.append("descriptor: the miniature one trained by 07_sscd; its similarity scale is not SSCD's, "
                       "so the 0.5 / 0.75 thresholds are indicative only")
    if isinstance(r07.get("planted_copy_top1_recall"), dict):
        details.append("planted copies retrieved as top-1 (sanity check): "
                       + ", ".join(f"{k} {float(v):.2f}" for k, v in r07["planted_copy_top1_recall"].items()))
    vs = [c["verdict"] for c in comps]
    v = next((x for x in vs if x.startswith(DOES_NOT_HOLD)), None) or next(
        (x for x in vs if x.startswith("inconclusive")), None) or combine_verdicts(vs)
    return _claim("5", title, paper, "sscd", comps, v,
                  measured="\n".join(f"- {c['statement']} -> {c['verdict']}" for c in comps), details=details)


def retrieval_values(r08: dict[str, Any] | None) -> dict[str, list[float]]:
    """{line: per-seed top-1 %} from ``08_retrieval_baseline``: lines ``real``, ``synthetic``,
    ``retrieved-<strategy>``. Reads ``runs`` / ``records`` (row, top1) or ``lines`` ({mean, std, values})."""
    if not r08:
        return {}
    out: dict[str, list[float]] = {}

    def line_values(ln: Any) -> list[float]:
        if not isinstance(ln, dict):
            return []
        if isinstance(ln.get("per_seed"), dict) and ln["per_seed"]:
            return [float(v) for _, v in sorted(ln["per_seed"].items(), key=lambda kv: str(kv[0]))]
        if isinstance(ln.get("values"), list):
            return [float(v) for v in ln["values"]]
        return [float(ln["mean"])] if "mean" in ln else []

    # 08_retrieval_baseline's layout: real / synthetic lines and strategies.<s>.accuracy, each a line
    # {label, n_train, mean, std, per_seed: {seed: top-1 %}}
    for name in ("real", "synthetic"):
        if line_values(r08.get(name)):
            out[name] = line_values(r08[name])
    for st, info in (r08.get("strategies") or {}).items():
        if isinstance(info, dict) and line_values(info.get("accuracy")):
            out[f"retrieved-{st}"] = line_values(info["accuracy"])
    if out:
        return out
    for key in ("runs", "records"):
        for r in r08.get(key, []) or []:
            if isinstance(r, dict) and "top1" in r and r.get("row") is not None:
                v = float(r["top1"])
                out.setdefault(_retrieval_line(str(r["row"])), []).append(100 * v if v <= 1 else v)
        if out:
            return out
    for key in ("lines", "summary", "table"):
        lines = r08.get(key)
        if isinstance(lines, dict):
            for name, ln in lines.items():
                if isinstance(ln, dict):
                    vals = ln.get("values") or ([ln["mean"]] if "mean" in ln else [])
                    out[_retrieval_line(name)] = [float(x) for x in vals]
            if out:
                return out
    return out


def _retrieval_line(row: str) -> str:
    if row == "real" or row.startswith("retrieved"):
        return row
    if row.startswith("real+"):
        return row
    return "synthetic" if set_switches(row) is not None or row.startswith("synthetic") else row


def claim_retrieval(results: dict[str, Any], paper: dict[str, Any], alpha: float = 0.05) -> dict[str, Any]:
    """(6) Geng et al.: retrieved real images (equal budget) match or beat synthetic ones. Verdict on
    the best retrieval strategy vs the synthetic set; every strategy is listed."""
    title = "Retrieval vs synthesis (Geng et al. 2024): retrieved real images match or beat synthetic ones"
    r08 = results.get("08_retrieval_baseline")
    lines = retrieval_values(r08)
    retr = {n: v for n, v in lines.items() if n.startswith("retrieved") and v}
    if not retr or not lines.get("synthetic"):
        why = ""
        if r08 and not lines.get("synthetic"):
            why = "08_retrieval_baseline found no synthetic set to compare with: run 03_synthesize, then 08"
        elif r08:
            why = "08_retrieval_baseline retrieved no image with any strategy"
        return _claim("6", title, paper, "retrieval", [], not_measured("08", why))
    syn = lines["synthetic"]
    comps = [compare("synthetic", syn, n, v, alpha) for n, v in sorted(retr.items())]
    best = max(comps, key=lambda c: c["stats_b"]["mean"])
    details = [f"{c['statement']} -> {c['verdict']}" for c in comps if c is not best]
    if lines.get("real"):
        details.append(f"real target data: {fmt_stats(seed_stats(lines['real']))}")
    strategies = (r08 or {}).get("strategies") or {}
    for st, info in strategies.items():
        if isinstance(info, dict) and info.get("label_precision") is not None:
            details.append(f"retrieved-{st}: {info.get('n_images', '?')} images, label precision "
                           f"{float(info['label_precision']):.3f}")
    budget = (r08 or {}).get("budget") or {}
    if budget.get("total") is not None:
        details.append(f"budget: {budget['total']} images (equal to the synthetic set {budget.get('synthetic_set')})")
    v = best["verdict"]
    if v == INCONCLUSIVE:
        v = INCONCLUSIVE + " - consistent with Geng et al.'s 'matched'"
    return _claim("6", title, paper, "retrieval", [best], v,
                  measured=f"best strategy {best['b']}: {best['statement']}", details=details)


def all_claims(results: dict[str, Any], paper: dict[str, Any], alpha: float = 0.05) -> list[dict[str, Any]]:
    """The six claims, each degrading to ``not measured (run notebook NN)`` when its inputs are missing."""
    out = []
    titles = ("Each component improves synthetic-only accuracy", "Synthetic + real beats real only",
              "Accuracy grows with the scale k", "Synthetic training lowers the LiRA TPR at low FPR",
              "No copies of training images (SSCD)", "Retrieval vs synthesis (Geng et al. 2024)")
    for title, fn in zip(titles, (claim_components, claim_real_plus_synthetic, claim_scaling, claim_lira,
                                  claim_sscd, claim_retrieval)):
        try:
            out.append(fn(results, paper, alpha) if fn is not claim_sscd else fn(results, paper))
        except Exception as err:  # a malformed result must not stop the report: say what failed
            out.append({"id": str(len(out) + 1), "title": title, "paper": "", "paper_source": "",
                        "comparisons": [], "verdict": f"not measured (could not read the results: "
                                                      f"{type(err).__name__}: {err})",
                        "measured": "", "details": []})
    return out


def claims_markdown(claims: Sequence[dict[str, Any]]) -> str:
    lines = ["| # | claim | verdict in miniature |", "|---|---|---|"]
    for c in claims:
        v = c["verdict"] if len(c["verdict"]) <= 160 else c["verdict"][:150].rstrip() + " ... (see below)"
        lines.append(f"| {c['id']} | {_md_cell(c['title'])} | **{_md_cell(v)}** |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- figures
def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _paper_panel(ax, paper: dict[str, Any], table: str, title: str = "paper (published)") -> None:
    entries = paper_entries(paper, table)
    if not entries:
        _placeholder(ax, f"paper: {NOT_TRANSCRIBED}\n(no verified value;\nnone guessed)")
        ax.set_title(title, fontsize=9)
        return
    labels = [f"{row}\n({d})" for d, row, _ in entries]
    vals = [float(e["value"]) for _, _, e in entries]
    ax.bar(range(len(vals)), vals, color="0.55")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.set_ylabel(entries[0][2].get("unit", ""))
    ax.set_title(title, fontsize=9)


def figure_table(table: dict[str, Any], paper: dict[str, Any]):
    """Bars of one accuracy table (mean ± std, each seed a dot) beside the paper's published values."""
    import matplotlib.pyplot as plt

    lines = table.get("lines", [])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    if not lines:
        _placeholder(ax, table.get("missing") or "no rows")
    elif table["name"] == "table4":
        variants = list(dict.fromkeys(ln["variant"] for ln in lines))
        rows = list(dict.fromkeys((ln["row"], ln["k"]) for ln in lines))
        w = 0.8 / max(1, len(rows))
        for j, (row, k) in enumerate(rows):
            sel = [next((ln for ln in lines if ln["row"] == row and ln["k"] == k and ln["variant"] == v), None)
                   for v in variants]
            xs = [i + (j - (len(rows) - 1) / 2) * w for i in range(len(variants))]
            ax.bar(xs, [s["mean"] if s and s["n"] else 0 for s in sel], w,
                   yerr=[s["std"] if s and s["n"] else 0 for s in sel], capsize=2, label=f"{row} k={k}")
        ax.set_xticks(range(len(variants)), variants, fontsize=8)
        ax.legend(fontsize=6, ncol=2)
        ax.set_ylabel("top-1 (%)")
    else:
        for i, ln in enumerate(lines):
            color = "C1" if ln["row"] == "real" else ("C2" if ln["row"].startswith("real+") else "C0")
            ax.bar(i, ln["mean"], yerr=ln["std"], color=color, alpha=0.8, capsize=4)
            vals = ln.get("values") or []
            ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(lines)), [ln["label"] + (f"\nk={ln['k']}" if ln["k"] and "k=" not in ln["label"] else "") for ln in lines],
                      rotation=25, ha="right", fontsize=6.5)
        lo = min(ln["min"] for ln in lines)
        ax.set_ylim(max(0, lo - 10), min(100, max(ln["max"] for ln in lines) + 5))
        ax.set_ylabel("top-1 on the real test split (%)")
    ax.set_title(f"{table['title']}\n(this run: mean ± std over seeds, dots: seeds)", fontsize=9)
    _paper_panel(ax2, paper, table["name"])
    fig.tight_layout()
    return fig


def figure_scaling(t3: dict[str, Any], t1: dict[str, Any], paper: dict[str, Any]):
    """Fig. 2: top-1 against k (synthetic only, real + synthetic) with the real-only line, beside the
    paper's published synthetic-only points."""
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    lines = t3.get("lines", [])
    if not lines:
        _placeholder(ax, t3.get("missing") or "no rows")
    else:
        for prefix, color in (("synthetic", "C0"), ("real + synthetic", "C2")):
            pts = sorted((ln["k"], ln["mean"], ln["std"]) for ln in lines
                         if ln["label"].startswith(prefix + " k="))
            if pts:
                k, m, s = map(np.asarray, zip(*pts))
                ax.errorbar(k, m, yerr=s, marker="o", capsize=4, color=color, label=prefix)
        real = next((ln for ln in t1.get("lines", []) if ln["row"] == "real"), None)
        if real:
            ax.axhline(real["mean"], color="C1", ls="--", label="real only")
            ax.axhspan(real["mean"] - real["std"], real["mean"] + real["std"], color="C1", alpha=0.15)
        ax.set_xscale("log")
        ks = sorted({ln["k"] for ln in lines})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.legend(fontsize=8)
    ax.set_xlabel("k (synthetic images per real training image)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Fig. 2 (miniature): scaling, mean ± std over seeds", fontsize=9)
    pts = sorted((e.get("k", 0), float(e["value"]), d) for d, _, e in paper_entries(paper, "table3"))
    if pts:
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="0.4", label=f"synthetic only ({pts[0][2]})")
        for k, v, _ in pts:
            ax2.annotate(f"{v:g}", (k, v), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=8)
        ax2.set_xscale("log")
        ax2.set_xticks([p[0] for p in pts], [str(p[0]) for p in pts])
        ax2.set_xlabel("k")
        ax2.set_ylabel("top-1 (%)")
        ax2.legend(fontsize=8)
        ax2.set_title("paper (abstract of arXiv:2310.10402)", fontsize=9)
    else:
        _paper_panel(ax2, paper, "table3")
    fig.tight_layout()
    return fig


def _load_features(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    from safetensors.numpy import load_file

    return np.asarray(load_file(str(path))["features"], dtype=np.float64)


def clip_pca_groups(root: str | Path, results: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Fig. 1 inputs: (label, CLIP features) for the real train set (``artifacts/features/
    clip_image.safetensors``), the vanilla base model's synthetic set and the default (fine-tuned) set
    (``artifacts/synthetic/<set>/k<k>/clip_features.safetensors``, written by 03_synthesize)."""
    root = Path(root)
    groups = []
    real = _load_features(root / "artifacts" / "features" / "clip_image.safetensors")
    if real is not None:
        groups.append(("real train", real))
    r03 = results.get("03_synthesize") or {}
    sets = r03.get("sets", []) or []
    vanilla = sorted((s for s in sets if set_switches(s.get("name", "")) and not set_switches(s["name"])["finetune"]),
                     key=lambda s: s.get("k", 0))
    default_name = str(r03.get("default_set", "")).split("/")[0]
    tuned = sorted((s for s in sets if s.get("name") == default_name), key=lambda s: s.get("k", 0))
    for label, cand in (("vanilla-synthetic", vanilla), ("fine-tuned-synthetic", tuned)):
        if cand:
            f = _load_features(root / cand[0]["dir"] / "clip_features.safetensors")
            if f is not None:
                groups.append((f"{label} ({cand[0]['name']}, k={cand[0].get('k')})", f))
    return groups


def pca_2d(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Project ``fit`` and ``others`` on the first two principal components of ``fit`` (numpy SVD)."""
    mu = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mu, full_matrices=False)
    comp = vt[:2]
    return [(x - mu) @ comp.T for x in (fit, *others)]


def figure_clip_pca(root: str | Path, results: dict[str, Any], max_points: int = 1000, seed: int = 0):
    """Fig. 1 (left): CLIP-feature PCA (fit on the real features) of real, vanilla-synthetic and
    fine-tuned-synthetic images, with each set's MMD^2 to the real train set from 03_synthesize."""
    import matplotlib.pyplot as plt

    groups = clip_pca_groups(root, results)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    if not groups or not groups[0][0].startswith("real"):
        _placeholder(ax, not_measured("03", "no CLIP features in artifacts/: run notebooks 02_finetune and "
                                            "03_synthesize"))
    else:
        rng = np.random.default_rng(seed)
        sub = [g[1][rng.permutation(len(g[1]))[:max_points]] for g in groups]
        zs = pca_2d(sub[0], *sub[1:])
        for (label, _), z, color in zip(groups, zs, ("tab:blue", "tab:orange", "tab:green")):
            ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.5, color=color, label=label)
        ax.set_xlabel("PC 1 (of the real CLIP features)")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7, markerscale=2)
    ax.set_title("Fig. 1 (miniature): CLIP image features", fontsize=9)
    mmd = (results.get("03_synthesize") or {}).get("mmd2_to_real_train") or {}
    if mmd:
        names = list(mmd)
        ax2.barh(range(len(names)), [mmd[n] for n in names], color="tab:green")
        ax2.set_yticks(range(len(names)), names, fontsize=7)
        ax2.set_xlabel("MMD$^2$ to the real train set (CLIP space)")
        ax2.set_title("this run: MMD$^2$ per synthetic set\n(paper Fig. 1: qualitative, fine-tuned covers real)",
                      fontsize=8)
    else:
        _placeholder(ax2, "paper Fig. 1: qualitative (fine-tuned synthetic features cover the real ones,\n"
                          "vanilla ones do not); no number transcribed")
    fig.tight_layout()
    return fig


def figure_lira(root: str | Path, results: dict[str, Any], paper: dict[str, Any]):
    """Fig. 3: LiRA ROC of the real-trained and the synthetic-trained classifier (from the curves saved
    by 06_lira: ``artifacts/lira/roc.json`` / ``results.curves``, else its own figure), beside the
    published TPR at 0.1 % FPR."""
    import matplotlib.pyplot as plt

    root = Path(root)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.3, 1]})
    curves = lira_curves(root, results.get("06_lira"))
    if curves:
        xmin = 1e-5
        grid = np.logspace(np.log10(xmin), 0, 200)
        ax.plot(grid, grid, ls="--", color="gray", lw=0.8, label="chance")
        for label, c in curves.items():
            ax.plot(np.clip(c["fpr"], xmin, 1), np.clip(c["tpr"], xmin, 1), lw=1.4,
                    label=label + (f" (AUC {c['auc']:.3f})" if c.get("auc") is not None else ""))
        ax.set(xscale="log", yscale="log", xlim=(xmin, 1), ylim=(xmin, 1), xlabel="False positive rate",
               ylabel="True positive rate")
        ax.axvline(1e-3, color="k", ls=":", lw=0.8)
        ax.legend(fontsize=6, loc="lower right")
    else:
        if not _show_png(ax, _find_figure(root, LIRA_FIGURES)):
            _placeholder(ax, "no ROC curve saved by 06_lira (figures/06_lira_roc.png)"
                         if "06_lira" in results else not_measured("06"))
    ax.set_title("Fig. 3 (miniature): LiRA ROC", fontsize=9)
    _paper_panel(ax2, paper, "fig3_lira", "paper: TPR at 0.1 % FPR\n(as quoted in the issue tracker)")
    if paper_entries(paper, "fig3_lira"):
        ax2.set_yscale("log")
    fig.tight_layout()
    return fig


def lira_curves(root: Path, r06: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """ROC curves {label: {fpr, tpr, auc}} saved by 06_lira in its results (``curves``/``roc``) or in a
    JSON / NPZ file under ``artifacts/lira``."""
    out: dict[str, dict[str, Any]] = {}

    def take(d: Any, prefix: str = "") -> None:
        if not isinstance(d, dict):
            return
        if "fpr" in d and "tpr" in d:
            out[prefix or "ROC"] = {"fpr": np.asarray(d["fpr"], float), "tpr": np.asarray(d["tpr"], float),
                                    "auc": d.get("auc")}
            return
        for k, v in d.items():
            take(v, f"{prefix}, {k}" if prefix else str(k))

    for key in ("curves", "roc", "rocs"):
        if r06 and isinstance(r06.get(key), dict):
            take(r06[key])
    if not out:
        for p in sorted((root / "artifacts" / "lira").glob("*roc*.json")) if (root / "artifacts" / "lira").exists() else []:
            try:
                take(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError):
                pass
    if not out and (root / "artifacts" / "lira").exists():
        for p in sorted((root / "artifacts" / "lira").glob("*roc*.npz")):
            with np.load(p) as z:
                fprs = [k for k in z.files if k.endswith("fpr")]
                for k in fprs:
                    t = k[:-3] + "tpr"
                    if t in z.files:
                        out[k[:-3].strip("_/") or p.stem] = {"fpr": z[k], "tpr": z[t], "auc": None}
    return out


def _find_figure(root: Path, patterns: Sequence[str]) -> Path | None:
    """The first PNG of ``figures/`` matching one of the glob ``patterns`` (in order; never a 09_ one)."""
    figs = root / "figures"
    for pattern in patterns:
        hits = sorted(p for p in figs.glob(pattern) if not p.name.startswith("09_")) if figs.exists() else []
        if hits:
            return hits[0]
    return None


def _show_png(ax, path: Path | None) -> bool:
    if path is None or not path.exists():
        return False
    import matplotlib.image as mpimg

    ax.imshow(mpimg.imread(str(path)))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"(figure of the step: figures/{path.name})", fontsize=7)
    return True


def figure_sscd(root: str | Path, results: dict[str, Any], claim: dict[str, Any] | None = None):
    """Fig. 4: the SSCD top matches drawn by 07_sscd (its figure, read from ``figures/``) beside the
    run's copy statistics and the paper's statement (no number)."""
    import matplotlib.pyplot as plt

    root = Path(root)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    if not _show_png(ax, _find_figure(root, SSCD_FIGURES)):
        _placeholder(ax, "07_sscd's top-match figure (figures/07_sscd_top_matches.png) not found" if "07_sscd" in results
                     else not_measured("07"))
    ax.set_title("Fig. 4 (miniature): synthetic images and their top SSCD matches", fontsize=9)
    claim = claim or claim_sscd(results, load_paper_numbers())
    text = "this run:\n" + ("\n".join(_wrap(c["statement"], 60) for c in claim["comparisons"])
                            if claim["comparisons"] else claim["verdict"])
    text += "\n\npaper (Fig. 4): top matches are not copies\n(qualitative; no number transcribed)"
    ax2.text(0.02, 0.98, text, ha="left", va="top", fontsize=7, transform=ax2.transAxes)
    ax2.axis("off")
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def make_figures(root: str | Path, results: dict[str, Any], tables: dict[str, dict[str, Any]],
                 claims: Sequence[dict[str, Any]], paper: dict[str, Any], max_points: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """The eight figures {name: Figure} (names in :data:`FIGURES`)."""
    sscd_claim = next((c for c in claims if c["id"] == "5"), None)
    makers = {
        "09_table1": lambda: figure_table(tables["table1"], paper),
        "09_table2": lambda: figure_table(tables["table2"], paper),
        "09_table3": lambda: figure_table(tables["table3"], paper),
        "09_table4": lambda: figure_table(tables["table4"], paper),
        "09_fig1_clip_pca": lambda: figure_clip_pca(root, results, max_points, seed),
        "09_fig2_scaling": lambda: figure_scaling(tables["table3"], tables["table1"], paper),
        "09_fig3_lira_roc": lambda: figure_lira(root, results, paper),
        "09_fig4_sscd_matches": lambda: figure_sscd(root, results, sscd_claim),
    }
    out = {}
    for name, make in makers.items():
        try:
            out[name] = make()
        except Exception as err:  # a malformed input must not stop the report: say so in the figure
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 2))
            _placeholder(ax, _wrap(f"{name}: could not draw ({type(err).__name__}: {err})", 80))
            out[name] = fig
    return out


def figure_inputs(root: str | Path, results: dict[str, Any]) -> dict[str, bool]:
    """Whether each figure has its inputs in the run folder (the notebook asserts those figures exist)."""
    root = Path(root)
    r04 = results.get("04_train_classifier") or {}
    t = r04.get("tables") or {}
    return {
        "09_table1": bool(t.get("table1")), "09_table2": bool(t.get("table2")),
        "09_table3": bool(t.get("table3")), "09_table4": bool(ood_records(results.get("05_ood_eval"))),
        "09_fig1_clip_pca": (root / "artifacts" / "features" / "clip_image.safetensors").exists(),
        "09_fig2_scaling": bool(t.get("table3")),
        "09_fig3_lira_roc": "06_lira" in results, "09_fig4_sscd_matches": "07_sscd" in results,
    }


# --------------------------------------------------------------------------------------------- report
def _params_section(results: dict[str, Any]) -> list[str]:
    lines = []
    r04 = results.get("04_train_classifier") or {}
    rc = r04.get("recipe") or {}
    if rc:
        keys = ("name", "model", "opt", "lr", "epochs", "batch_size", "train_size")
        lines.append("- classifier recipe: " + ", ".join(f"{k} {rc[k]}" for k in keys if k in rc))
    for k in ("seeds", "default_set", "ablation_sets", "ablation_k", "scale_k"):
        if k in r04:
            lines.append(f"- {k}: {r04[k]}")
    st = (results.get("03_synthesize") or {}).get("settings") or {}
    if st:
        keys = ("base_model", "lora_scale", "strength", "num_inference_steps", "guidance_scale", "guidance_feature",
                "image_size", "source_per_class")
        lines.append("- synthesis: " + ", ".join(f"{k} {st[k]}" for k in keys if k in st))
    return lines


def build_report(root: str | Path, results: dict[str, Any], tables: dict[str, dict[str, Any]],
                 claims: Sequence[dict[str, Any]], paper: dict[str, Any], figures: Sequence[str] = FIGURES,
                 preset: str = "", params: dict[str, Any] | None = None, alpha: float = 0.05) -> str:
    """REPORT.md text: verdicts, claims with what was measured, tables, figures, parameters, machine/time."""
    root = Path(root)
    steps_run = [s for s in STEPS.values() if s in results]
    out = [f"# Real-Fake in miniature: report of `{root.name}`", ""]
    out += [f"Preset **{preset or '?'}**; steps with results: {', '.join(steps_run) or 'none'}. "
            f"Generated by `09_figures_tables` from the run folder only. Paper: "
            f"{paper.get('citations', {}).get('realfake', '')}", ""]
    if preset == "smoke":
        out += ["**Preset `smoke`: CI size. The numbers below exercise the pipeline and mean nothing; the verdicts "
                "are computed from them all the same.**", ""]
    out += ["Verdicts compare per-seed accuracies with Welch's t-test (two-sided, alpha = "
            f"{alpha:g}): *holds* / *does not hold* when p < alpha in the paper's / the opposite direction, "
            "*inconclusive (within seed noise)* otherwise. They say whether the paper's direction shows up in "
            "this miniature run; the numbers are not comparable in size with the paper's.", ""]
    out += ["## Claims", "", claims_markdown(claims)]
    for c in claims:
        out += [f"### {c['id']}. {c['title']}", ""]
        if c.get("paper"):
            out += [f"- **paper**: {c['paper']} ({c['paper_source']})"]
        measured = c.get("measured") or ""
        if measured == c["verdict"]:
            pass  # nothing measured: the verdict line says which step to run
        elif measured.startswith("- "):
            out += ["- **measured**:", "\n".join("  " + ln for ln in measured.splitlines())]
        else:
            out += [f"- **measured**: {measured or '-'}"]
        for d in c.get("details", []):
            out += [f"  - {d}"]
        out += [f"- **verdict in miniature**: {c['verdict']}", ""]
    out += ["## Tables", ""]
    for t in tables.values():
        out += [table_markdown(t)]
    out += ["## Figures", ""]
    for name in figures:
        png, pdf = root / "figures" / f"{name}.png", root / "figures" / f"{name}.pdf"
        if png.exists():
            out.append(f"- [{name}](figures/{name}.png) ([pdf](figures/{name}.pdf))" if pdf.exists()
                       else f"- [{name}](figures/{name}.png)")
        else:
            out.append(f"- {name}: not written")
    others = sorted(p.name for p in (root / "figures").glob("*.png")
                    if not p.name.startswith("09_")) if (root / "figures").exists() else []
    if others:
        out += ["", "Figures of the earlier steps: " + ", ".join(f"[{n}](figures/{n})" for n in others)]
    out += ["", "## Preset and key parameters", "", f"- preset: {preset or '?'}"]
    for k, v in (params or {}).items():
        out.append(f"- 09_figures_tables {k}: {v}")
    out += _params_section(results)
    out += ["", "## Machine and time", ""]
    log = parse_run_log(root)
    if log:
        out.append("Notebook wall times from run.log: " + ", ".join(f"{k} {v:.0f} s" for k, v in log.items())
                   + f" (total {sum(log.values()) / 60:.1f} min)")
    info = machine_info(results)
    for nb, items in info.items():
        out.append(f"- {nb}: " + ", ".join(f"{k} = {_fmt_val(v)}" for k, v in sorted(items.items())))
    if not log and not info:
        out.append("No timing recorded in this run folder.")
    if results.get("_errors"):
        out += ["", "Unreadable results: " + ", ".join(f"{k} ({v})" for k, v in results["_errors"].items())]
    out += ["", "## Published numbers", "",
            "Kept as data in `realfake_utils/resources/paper_numbers.yaml`, each with its source; values that "
            f"could not be verified are shown as \"{NOT_TRANSCRIBED}\" and are never guessed.", ""]
    for key, text in paper.get("citations", {}).items():
        out.append(f"- {key}: {text}")
    return "\n".join(out).rstrip() + "\n"


def _fmt_val(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_report(root: str | Path, text: str, name: str = "REPORT.md") -> Path:
    """Write the report atomically (temporary file, then rename) into the run folder."""
    path = Path(root) / name
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
