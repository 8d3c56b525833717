"""realfake_utils.report: verdicts, Welch test, markdown tables, missing inputs, the report file."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from realfake_utils import report as R


def _runs(row, k, vals):
    return [{"row": row, "k": k, "seed": i, "top1": v / 100, "top5": 1.0, "n_train": 100}
            for i, v in enumerate(vals)]


def _line(label, row, k, vals):
    s = R.seed_stats(vals)
    return {"label": label, "row": row, "k": k, "n": s["n"], "n_train": 100, "mean": s["mean"], "std": s["std"],
            "min": s["min"], "max": s["max"]}


@pytest.fixture
def r04():
    d = "lora-dm-vg-lp"
    data = {
        ("real", 0): [80, 81, 79],
        (d, 1): [65, 66, 64],
        (f"real+{d}", 1): [85, 86, 84],
        (d, 2): [72, 73, 71],
        (f"real+{d}", 2): [80.5, 79.5, 80],
        ("base-novg-t2i", 1): [30, 31, 29],
        ("lora-nodm-novg-t2i", 1): [40, 41, 39],
        ("lora-dm-novg-t2i", 1): [50, 51, 49],
        ("lora-dm-vg-t2i", 1): [60, 61, 59.5],
    }
    runs = [r for (row, k), v in data.items() for r in _runs(row, k, v)]
    abl = ["base-novg-t2i", "lora-nodm-novg-t2i", "lora-dm-novg-t2i", "lora-dm-vg-t2i", d]
    tables = {
        "table1": [_line("real only", "real", 0, data[("real", 0)]), _line("synthetic only", d, 1, data[(d, 1)]),
                   _line("real + synthetic", f"real+{d}", 1, data[(f"real+{d}", 1)])],
        "table2": [_line(n, n, 1, data[(n, 1)]) for n in abl],
        "table3": [_line(f"synthetic k={k}", d, k, data[(d, k)]) for k in (1, 2)]
        + [_line(f"real + synthetic k={k}", f"real+{d}", k, data[(f"real+{d}", k)]) for k in (1, 2)],
    }
    return {"runs": runs, "tables": tables, "default_set": d, "ablation_sets": abl, "ablation_k": 1,
            "scale_k": [1, 2], "seeds": [0, 1, 2], "missing": [], "recipe": {"name": "miniature", "epochs": 3}}


@pytest.fixture
def paper():
    return R.load_paper_numbers()


def test_welch_matches_scipy_and_edge_cases():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.5, 5.0, 6.0]
    t = R.welch(a, b)
    ref = stats.ttest_ind(b, a, equal_var=False)
    assert t["p"] == pytest.approx(ref.pvalue) and t["t"] == pytest.approx(ref.statistic)
    assert t["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    assert R.welch([1.0], [2.0, 3.0])["p"] is None          # one seed: no test
    assert R.welch([1.0, 1.0], [2.0, 2.0])["p"] == 0.0      # zero spread, different means
    assert R.welch([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
    assert R.welch([], [1.0])["n_a"] == 0


def test_verdicts():
    assert R.verdict([1, 2, 3], [10, 11, 12])[0] == R.HOLDS
    assert R.verdict([10, 11, 12], [1, 2, 3])[0] == R.DOES_NOT_HOLD
    assert R.verdict([10, 11, 12], [1, 2, 3], expect="less")[0] == R.HOLDS
    assert R.verdict([1, 5, 9], [2, 6, 10])[0] == R.INCONCLUSIVE
    assert R.verdict([1], [2])[0] == R.INCONCLUSIVE_ONE_SEED
    assert R.verdict([], [2], missing="not measured (run notebook 04)")[0].startswith("not measured")
    assert R.combine_verdicts([R.HOLDS, R.HOLDS]) == R.HOLDS
    assert R.combine_verdicts([R.HOLDS, R.DOES_NOT_HOLD]) == R.DOES_NOT_HOLD
    assert R.combine_verdicts([R.HOLDS, R.INCONCLUSIVE]) == R.INCONCLUSIVE
    assert R.combine_verdicts(["not measured (x)"]) == "not measured (x)"


def test_seed_stats_and_format():
    s = R.seed_stats([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["n"]) == (2.0, 1.0, 3)
    assert R.fmt_stats(s) == "2.0 ± 1.0 (n=3)"
    assert R.fmt_stats(R.seed_stats([5.0])) == "5.0 (n=1)"
    assert R.fmt_stats(R.seed_stats([])) == "-"
    assert math.isnan(R.seed_stats([])["mean"])


def test_markdown_table():
    t = {"title": "T", "headers": ["a", "b"], "rows": [["x|y", 1.234], [None, float("nan")]], "notes": ["n"]}
    md = R.table_markdown(t).splitlines()
    assert md[0] == "**T**" and md[2] == "| a | b |" and md[3] == "|---|---:|"
    assert md[4] == "| x\\|y | 1.23 |" and md[5] == "| - | - |" and md[-1] == "_n_"
    md = R.table_markdown({"title": "T", "headers": [], "rows": [], "missing": "not measured (run notebook 05_ood_eval)"})
    assert "_not measured (run notebook 05_ood_eval)_" in md and "|" not in md


def test_paper_numbers_are_structured_with_sources(paper, tmp_path):
    entries = R.paper_entries(paper, "table3")
    assert {r: e["value"] for _, r, e in entries} == {"synthetic k=1": 70.9, "synthetic k=10": 76.0}
    assert all("2310.10402" in e["source"] for _, _, e in entries)
    assert R.paper_entries(paper, "table2") == []  # not transcribed, not guessed
    bad = tmp_path / "p.yaml"
    bad.write_text("tables:\n  table1:\n    X:\n      row: {value: 1.0}\n")
    with pytest.raises(ValueError, match="source"):
        R.load_paper_numbers(bad)


def test_tables_from_results(r04, paper):
    t = R.all_tables({"04_train_classifier": r04}, paper)
    assert [r[0] for r in t["table1"]["rows"]] == ["real only", "synthetic only", "real + synthetic"]
    assert t["table1"]["rows"][1][-1].startswith("70.9 (ImageNet-1K")
    assert t["table1"]["rows"][0][-1] == R.NOT_TRANSCRIBED
    assert t["table2"]["rows"][0][0].startswith("base-novg-t2i (vanilla base model)")
    assert t["table3"]["rows"][0][-1].startswith("70.9") and t["table3"]["rows"][1][-1] == R.NOT_TRANSCRIBED
    assert t["table4"]["missing"] == "not measured (run notebook 05_ood_eval)"
    md = R.table_markdown(t["table1"])
    assert "65.0 ± 1.0 (n=3)" in md


def test_ood_records_shapes():
    a = {"records": [{"row": "real", "k": 0, "seed": 0, "variant": "sketch", "top1": 0.5, "top5": 0.9}]}
    b = {"ood": {"real__k0__s0": {"sketch": {"top1": 0.5, "top5": 0.9}}}}
    c = {"results": [{"name": "real__k0__s0", "row": "real", "k": 0, "seed": 0,
                      "sets": {"sketch": {"top1": 0.5, "top5": 0.9}, "sketch (all classes)": {"top1": 0.4, "top5": 0.9}}}],
         "sets": {"sketch": "edge rendering"}}
    assert len(R.ood_records(c)) == 1
    assert "sketch: edge rendering" in R.table4({"05_ood_eval": c}, R.load_paper_numbers())["notes"]
    for r05 in (a, b, c):
        recs = R.ood_records(r05)
        assert recs[0]["row"] == "real" and recs[0]["variant"] == "sketch" and recs[0]["top1"] == 50.0
    t = R.table4({"05_ood_eval": a}, R.load_paper_numbers())
    assert t["headers"][:3] == ["row", "k", "sketch"] and t["rows"][0][2] == "50.0 (n=1)"


def test_component_pairs_follow_the_cumulative_ablation():
    names = ["base-novg-t2i", "lora-nodm-novg-t2i", "lora-dm-novg-t2i", "lora-dm-vg-t2i", "lora-dm-vg-lp"]
    got = {lab: R.component_pair(names, w, wi) for lab, w, wi in R.COMPONENTS}
    assert got["fine-tuning with the DM loss"] == ("base-novg-t2i", "lora-dm-novg-t2i")
    assert got["visual guidance"] == ("lora-dm-novg-t2i", "lora-dm-vg-t2i")
    assert got["latent prior"] == ("lora-dm-vg-t2i", "lora-dm-vg-lp")
    assert R.component_pair(["lora-dm-vg-lp"], {"latent_prior": False}, {"latent_prior": True}) is None
    assert R.set_switches("lora-dmofficial-novg-lp") == {"finetune": True, "dm_loss": True,
                                                         "visual_guidance": False, "latent_prior": True}
    assert R.set_switches("real") is None


def test_claims_from_hand_made_results(r04, paper):
    res = {"04_train_classifier": r04}
    c = {x["id"]: x for x in R.all_claims(res, paper)}
    assert c["1"]["verdict"] == R.HOLDS                      # every component adds ~10 points
    assert c["2"]["verdict"] == R.HOLDS                      # 85 vs 80 at k=1
    assert "does not hold" in "\n".join(c["2"]["details"]) or "inconclusive" in "\n".join(c["2"]["details"])
    assert c["3"]["verdict"] == R.HOLDS                      # 65 -> 72
    for i in ("4", "5", "6"):
        assert c[i]["verdict"].startswith("not measured (run notebook 0")
    # the verdict follows the numbers: make real + synthetic worse than real
    worse = json.loads(json.dumps(r04))
    for r in worse["runs"]:
        if r["row"] == "real+lora-dm-vg-lp" and r["k"] == 1:
            r["top1"] -= 0.2
    assert R.claim_real_plus_synthetic({"04_train_classifier": worse}, paper)["verdict"] == R.DOES_NOT_HOLD


def test_claims_all_missing_degrade(paper):
    for c in R.all_claims({}, paper):
        assert c["verdict"].startswith("not measured (run notebook"), c


def test_lira_sscd_retrieval_claims(paper):
    m = lambda tpr, n=1000: {"tpr_at_0.1pct_fpr": tpr, "auc": 0.6, "n_members": n, "min_resolvable_fpr": 1e-3}
    # 06_lira's layout: {"real": {attack label: summary}, "synthetic": {...}, "synthetic_part": status}
    res = {"06_lira": {"real": {"LiRA offline": m(0.05), "LiRA online": m(0.20)},
                       "synthetic": {"LiRA offline": m(0.04), "LiRA online": m(0.01)}, "synthetic_part": "ran"}}
    c = R.claim_lira(res, paper)
    assert c["verdict"] == R.HOLDS
    assert {x["attack"]: x["verdict"] for x in c["comparisons"]}["LiRA offline"] == "inconclusive (within sampling noise)"
    skipped = {"06_lira": {"real": {"LiRA online": m(0.2)}, "synthetic": {}, "synthetic_part": "SKIPPED: x"}}
    c = R.claim_lira(skipped, paper)
    assert "synthetic target did not run: SKIPPED: x" in c["verdict"] and "20.00 %" in c["details"][0]
    raw = {"n": 200, "count_above_0.75": 0, "count_above_0.5": 3, "median_top1": 0.3, "max_top1": 0.6}
    res["07_sscd"] = {"sets": {"lora-dm-vg-lp/k1": {"n": 200, "raw": raw}}, "miniature_descriptor": False,
                      "stand_in_synthetic": False, "planted_copy_top1_recall": {"exact": 1.0}}
    s = R.claim_sscd(res, paper)
    assert s["verdict"] == R.HOLDS and "0 of 200" in s["measured"]
    raw["count_above_0.75"] = 2
    assert R.claim_sscd(res, paper)["verdict"] == R.DOES_NOT_HOLD
    # miniature descriptor: above the (uncalibrated) threshold, but no more similar than held-out real images
    res["07_sscd"].update(miniature_descriptor=True, heldout_real_top1_median=0.5)
    assert R.claim_sscd(res, paper)["verdict"].startswith("inconclusive (uncalibrated")
    res["07_sscd"]["heldout_real_top1_median"] = 0.2
    assert R.claim_sscd(res, paper)["verdict"].startswith("does not hold (miniature descriptor")
    res["07_sscd"]["stand_in_synthetic"] = True
    assert R.claim_sscd(res, paper)["verdict"].startswith("not measured (07_sscd ran on a stand-in")
    res["08_retrieval_baseline"] = {"runs": [{"row": "lora-dm-vg-lp", "top1": v} for v in (0.5, 0.52, 0.51)]
                                    + [{"row": "retrieved-clip_i2i", "top1": v} for v in (0.7, 0.71, 0.72)]
                                    + [{"row": "retrieved-caption", "top1": v} for v in (0.4, 0.6, 0.5)]}
    r = R.claim_retrieval(res, paper)
    assert r["verdict"] == R.HOLDS and "retrieved-clip_i2i" in r["measured"]
    # 08_retrieval_baseline's own layout: lines with per-seed values
    line = lambda *v: {"mean": sum(v) / len(v), "per_seed": {str(i): x for i, x in enumerate(v)}}
    res["08_retrieval_baseline"] = {"real": line(80, 81, 79), "synthetic": line(70, 71, 69),
                                    "strategies": {"caption": {"accuracy": line(60, 61, 59), "label_precision": 0.9,
                                                               "n_images": 30},
                                                   "clip_t2i": {"accuracy": None, "n_images": 0}},
                                    "budget": {"total": 30, "synthetic_set": "lora-dm-vg-lp/k1"}}
    assert R.retrieval_values(res["08_retrieval_baseline"]) == {
        "real": [80.0, 81.0, 79.0], "synthetic": [70.0, 71.0, 69.0], "retrieved-caption": [60.0, 61.0, 59.0]}
    r = R.claim_retrieval(res, paper)
    assert r["verdict"] == R.DOES_NOT_HOLD and any("label precision 0.900" in d for d in r["details"])


def test_report_and_figures_from_an_empty_and_a_partial_run(tmp_path, r04, paper):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from realfake_utils.rundir import RunDir, write_json

    run = RunDir("x", tmp_path / "run")
    for results in ({}, {"04_train_classifier": r04}):
        if results:
            write_json(run.result_path("04_train_classifier"), r04)
        loaded = R.load_results(run.root)
        assert set(loaded) == set(results)
        tables = R.all_tables(loaded, paper)
        claims = R.all_claims(loaded, paper)
        figs = R.make_figures(run.root, loaded, tables, claims, paper)
        assert list(figs) == list(R.FIGURES)
        for name, fig in figs.items():
            if results:  # the empty run only has to draw (placeholders); save the partial run's figures
                fig.savefig(run.figures / f"{name}.png", dpi=40)  # (the notebook uses run.save_figure: PNG + PDF)
            plt.close(fig)
        text = R.build_report(run.root, loaded, tables, claims, paper, preset="x", params={"alpha": 0.05})
        path = R.write_report(run.root, text)
        body = path.read_text()
        assert "## Claims" in body and "not measured (run notebook 06_lira)" in body
        assert ("- [09_table1](figures/09_table1.png)" in body) == bool(results)
        assert ("- 09_table1: not written" in body) == (not results)
    assert "| 1 | Each component" in body and "**holds**" in body
    assert not list(run.root.glob(".REPORT.md*"))  # atomic: no temporary file left
    inputs = R.figure_inputs(run.root, loaded)
    assert inputs["09_table1"] and not inputs["09_table4"] and not inputs["09_fig3_lira_roc"]


def test_machine_info_and_run_log(tmp_path):
    (tmp_path / "run.log").write_text("2026-11-22 02:00:00 00_theory_checks ok 26.9s params={}\n"
                                      "2026-11-22 02:01:00 run of [...] done in 30.0s\n")
    assert R.parse_run_log(tmp_path) == {"00_theory_checks": 26.9}
    info = R.machine_info({"00_theory_checks": {"seconds": 26.9, "preset": "smoke", "x": {"device": "cpu"}},
                           "03_synthesize": {"images_per_s": 3.5, "settings": {}}})
    assert info == {"00_theory_checks": {"seconds": 26.9}, "03_synthesize": {"images_per_s": 3.5}}


def test_malformed_results_do_not_stop_the_report(paper, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bad = {"04_train_classifier": {"tables": {"table1": [{"label": "x"}]}, "runs": "oops"},
           "06_lira": {"real": {"LiRA online": {"tpr_at_0.1pct_fpr": "?"}}, "synthetic": {"LiRA online": {}}}}
    tables = R.all_tables(bad, paper)
    assert tables["table1"]["missing"].startswith("not measured (could not read")
    claims = R.all_claims(bad, paper)
    assert len(claims) == 6 and all(c["verdict"] for c in claims)
    figs = R.make_figures(tmp_path, bad, tables, claims, paper)
    assert len(figs) == 8
    for f in figs.values():
        plt.close(f)
    assert "## Claims" in R.build_report(tmp_path, bad, tables, claims, paper)


def test_missing_rows_are_explained_with_04s_messages(paper):
    r04 = {"runs": [{"row": "real", "k": 0, "seed": 0, "top1": 0.5}], "tables": {"table1": [], "table2": []},
           "default_set": "lora-dm-vg-lp", "ablation_k": 1, "scale_k": [1, 2],
           "missing": ["table1 row 'real + synthetic': no synthetic set X/k1 - run 03_synthesize",
                       "table2 row 'lora-dm-vg-t2i': no synthetic set Y/k1 - 03_synthesize parameter ablation_rows",
                       "table3 row 'synthetic k=2': no synthetic set X/k2 - 03_synthesize parameter scale_k"]}
    c = {x["id"]: x for x in R.all_claims({"04_train_classifier": r04}, paper)}
    assert "no synthetic set X/k1" in c["2"]["verdict"]
    assert "no synthetic set Y/k1" in c["1"]["verdict"]
    assert "no synthetic set X/k2" in c["3"]["verdict"]
