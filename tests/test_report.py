"""09 / REPORT.md: each producer's real record (built with the producer's own dataclasses and functions,
saved into a run folder and loaded back) goes through the report's tables, claims, figures and markdown."""
from __future__ import annotations

import zlib

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from realfake_utils import claims as C  # noqa: E402
from realfake_utils import figures as F  # noqa: E402
from realfake_utils import paper as P  # noqa: E402
from realfake_utils import classify, finetune, lira, ood, prepare, report, retrieval, sscd, stats, synthesize  # noqa: E402
from realfake_utils import tables as T  # noqa: E402


@pytest.fixture(scope="module")
def paper():
    return P.PaperNumbers.load()


# ------------------------------------------------------------------------------------------ producers
def prepare_record() -> prepare.PrepareRecord:
    return prepare.PrepareRecord(dataset="digits", image_size=16, class_names=[str(i) for i in range(10)],
                                 counts={"pool": 899, "train": 539, "test": 359}, excluded=0,
                                 excluded_list="artifacts/data/excluded.csv", base_model="artifacts/miniature/base",
                                 clip_model="artifacts/miniature/clip", clip_projection_dim=32, captioner="none")


def finetune_record() -> finetune.FinetuneRecord:
    variants = {v: finetune.VariantResult(name=v, path=f"artifacts/lora/{v}", steps=10, samples_seen=320, epochs_seen=1.0,
                                          passes_min=1, passes_max=1, final_loss=0.1, final_l_simple=0.1,
                                          final_l_dm=0.01, reused=False, seconds=1.0, config_key="k", num_processes=1)
                for v in ("lora-nodm-novg", "lora-nodm-vg", "lora-dm-novg", "lora-dm-vg")}
    cfg = {"num_train_epochs": 300, "global_batch_size": 64, "dm_loss_form": "paper", "snr_gamma": 0.75,
           "guidance_token_position": "append", "not_reported": 1}
    return finetune.FinetuneRecord(config=cfg, main_variant="lora-dm-vg", variants=variants, n_train=539)


def synthesis_record(k_list=(1, 2)) -> synthesize.SynthesisRecord:
    sets = []
    for row in T.TABLE2_ROWS:
        for k in (k_list if row == T.DEFAULT_ROW else (1,)):
            sw = synthesize.row_switches(row)
            sets.append(synthesize.SyntheticSet(
                name=row, table2_row=row, row=sw, variant=row.rsplit("-", 1)[0], k=k, synthesis_seed=0,
                size=10 * k, n_real_train=10, path=f"artifacts/synthetic/{row}/k{k}-s0", complete=True))
    mmd = {s.id: 0.1 * (i + 1) for i, s in enumerate(sets) if s.k == 1}
    return synthesize.SynthesisRecord(sets=sets, default_row=T.DEFAULT_ROW, rows=list(T.TABLE2_ROWS),
                                      scale_k=list(k_list), synthesis_seeds=[0], n_real_train=10,
                                      mmd2_to_real_train=mmd)


# per-row synthetic-only top-1 (fractions): mostly rising along Table 2 (the DM loss alone lowers it), with a per-seed offset shared by all rows
ROW_TOP1 = dict(zip(T.TABLE2_ROWS, (0.30, 0.40, 0.45, 0.38, 0.50, 0.60, 0.65, 0.63, 0.70)))


def _spread(source: str, k: int, seed: int) -> float:
    """A deterministic per-(source, k) seed offset with zero mean over seeds 0-2 (+-0.4 points): paired
    differences then have a spread, as real seeds do, and the means stay the values written below."""
    u = [zlib.crc32(f"{source}|{k}|{s}".encode()) % 1000 / 1000 for s in (0, 1, 2)]
    return 0.008 * (u[seed] - sum(u) / 3)


def classifier_record(rows=T.TABLE2_ROWS) -> classify.ClassifierRecord:
    runs = []

    def add(source, tables, k, top1, synth_seed, row=""):
        for seed in (0, 1, 2):
            runs.append(classify.ClassifierRun(
                source=source, tables=tables, k=k, synthesis_seed=synth_seed, classifier_seed=seed,
                top1=top1 + 0.01 * seed + _spread(source, k, seed), top5=min(1.0, top1 + 0.2), n_train=10 * max(k, 1) * (2 if "+" in source else 1),
                path=f"artifacts/classifiers/{source}__k{k}__s{seed}", table2_row=row))

    add("real", ["table1"], 0, 0.80, None)
    for row in rows:
        add(row, ["table2"] + (["table1", "table3"] if row == T.DEFAULT_ROW else []), 1, ROW_TOP1[row], 0, row)
    add(T.DEFAULT_ROW, ["table3"], 2, 0.78, 0, T.DEFAULT_ROW)
    add(T.DEFAULT_ROW, ["table3"], 5, 0.86, 0, T.DEFAULT_ROW)
    add(f"real+{T.DEFAULT_ROW}", ["table1"], 1, 0.83, 0, T.DEFAULT_ROW)
    return classify.ClassifierRecord(runs=runs, recipe={"name": "miniature"}, seeds=[0, 1, 2], default_row=T.DEFAULT_ROW,
                                     scale_k=[1, 2, 5], n_real_train=10, effects=classify.table2_effects(runs))


def ood_record() -> ood.OODRecord:
    results = []
    for source, k, base in (("real", 0, 0.6), (T.DEFAULT_ROW, 1, 0.4), (T.DEFAULT_ROW, 2, 0.7)):
        for seed in range(3):
            for s in ("sketch", "hard"):
                results.append(ood.OODResult(classifier=f"artifacts/classifiers/{source}__k{k}__s{seed}", source=source,
                                             k=k, synthesis_seed=0, classifier_seed=seed, ood_set=s,
                                             top1=base + 0.01 * seed + _spread(source + s, k, seed), top5=min(1.0, base + 0.2), n=50,
                                             restricted=False))
    variants = {"sketch": {"description": "edges only"}, "hard": {"description": "hardest 10 %"}}
    return ood.build_record(results, variants, {}, default_set=T.DEFAULT_ROW)


def lira_record(separable_real: bool = True) -> lira.LiraRecord:
    rng = np.random.default_rng(0)
    member = np.arange(400) < 200
    scores = {t: rng.normal(size=400) + gap * member
              for t, gap in (("real", 3.0 if separable_real else 0.0), ("synthetic", 0.0))}
    attacks = [lira.evaluate_attack(t, "online", sc, member, n_bootstrap=200, seed=0) for t, sc in scores.items()]
    diff = lira.paired_difference("online", attacks[0], attacks[1], scores["real"], scores["synthetic"], member,
                                  n_bootstrap=200, seed=0)
    info = lira.SyntheticInfo(ran=True, status="trained", set_name=T.DEFAULT_ROW)
    return lira.LiraRecord(n_examples=400, n_members=200, n_nonmembers=200, n_shadow=4, recipe="tiny", epochs=1,
                           n_bootstrap=200, attacks=attacks, synthetic=info, differences=[diff])


def sscd_record(copies: int = 0) -> sscd.SSCDRecord:
    cal = sscd.calibrate_threshold([0.9, 0.95, 0.99], [True, True, True], [0.1, 0.2, 0.3], 0.9)
    top1 = torch.tensor([0.2] * (20 - copies) + [0.99] * copies)
    return sscd.SSCDRecord(descriptor="tiny", descriptor_sha256="0" * 64, miniature_descriptor=True, preprocess="resize",
                           size=32, n_reference=10, n_background=5, top_k=5, calibration=cal,
                           planted_top1_recall={"jpeg": 1.0}, heldout_real_top1_median=0.2,
                           sets={T.DEFAULT_ROW: sscd.set_copies(top1, cal)}, stand_in_synthetic=False)


def retrieval_record() -> retrieval.RetrievalRecord:
    sweep = [retrieval.SweepPoint(src, n, seed, base + 0.1 * n + seed, base + 0.2 * n + seed)
             for src, base in (("retrieved", 60.0), ("synthetic", 50.0)) for n in (10, 20) for seed in (0, 1)]
    return retrieval.RetrievalRecord(
        strategies={}, sweep_strategy="knn_image", retrieved_max=20, sizes={"retrieved": [10, 20], "synthetic": [10, 20]},
        seeds=[0, 1], off_the_shelf={"zero_shot": 40.0, "linear_probe": 45.0}, sweep=sweep,
        source_labels={"retrieved": "retrieved", "synthetic": "synthetic"}, synthetic_sets={}, dedup={}, pool={},
        adapt_config={}, templates=["a photo of a {}."])


FIELD = {"PrepareRecord": "prepare", "FinetuneRecord": "finetune", "SynthesisRecord": "synthesis", "ClassifierRecord": "classifier", "OODRecord": "ood", "LiraRecord": "lira",
         "SSCDRecord": "sscd", "RetrievalRecord": "retrieval"}


def saved(run, *records) -> T.RunRecords:
    """Save each record into the run folder and load it back with its own class."""
    out = T.RunRecords()
    for r in records:
        r.save(run)
        setattr(out, FIELD[type(r).__name__], type(r).load(run))
    return out


# ------------------------------------------------------------------------------------------ tests
def test_paper_numbers_and_columns(paper):
    assert [paper.value("table2", "IN-10", r) for r in T.TABLE2_ROWS] == [79.8, 80.8, 82.3, 81.2, 82.9, 88.0, 89.5,
                                                                         88.9, 90.5]
    assert paper.value("table2", "IN-100", "lora-dm-vg-lp") == 80.0
    assert paper.value("fig2", "IN-10", "crossover") == 2.5 and paper.value("table2", "IN-10", "nope") is None
    assert P.paper_column("eurosat-mini")[0] == "EuroSAT"
    col, label = P.paper_column("digits")
    assert col == "IN-10" and "closest small set" in label
    assert P.is_paper_preset("imagenette") and not P.is_paper_preset("digits")
    with pytest.raises(ValueError, match="schema_version"):
        P.PaperNumbers({"schema_version": 1})


def test_an_empty_run_folder_says_what_to_run(tmp_path, paper):
    recs = T.RunRecords()
    assert not any(recs.steps().values())
    tabs = T.all_tables(recs, paper, "digits")
    assert all(t.missing.startswith("not measured") for t in tabs.values())
    cl = C.all_claims(recs, paper, "IN-10")
    assert len(cl) == 7 and all(c.verdict.startswith("not measured (run notebook") for c in cl)


def test_synthesis_record_into_fig1(tmp_path, paper):
    recs = saved(tmp_path, synthesis_record())
    assert recs.synthesis.default_row == T.DEFAULT_ROW
    fig = F.step_figures(recs, paper)["09_fig1_mmd"]()        # 03's own figure, from its record
    assert len(fig.axes[0].patches) == len(recs.synthesis.mmd2_to_real_train)
    plt.close(fig)


def test_ood_record_into_table4_and_claim(tmp_path, paper):
    recs = saved(tmp_path, ood_record())
    t = T.table4(recs, paper)
    assert [r[0] for r in t.rows] == [f"synthetic k=1 ({T.DEFAULT_ROW})", f"synthetic k=2 ({T.DEFAULT_ROW})", "real only"]
    assert "ImageNet-Sketch" in t.headers[1] and "(paper 21.9 / 38.2)" in t.rows[0][1]   # Table 4, OURS
    assert "(paper 28.1 / 45.8)" in t.rows[2][1]                                          # real only
    c = C.claim_ood(recs, paper)
    # k=2 beats real by 10 points on every seed (paired over classifier seeds): holds on both sets
    assert [f.verdict for f in c.findings] == ["holds", "holds"] and c.verdict == "holds"
    assert c.findings[0].diff == pytest.approx(10.0) and "paired" in c.findings[0].measured


def test_lira_record_into_claim_and_fig3(tmp_path, paper):
    recs = saved(tmp_path, lira_record(separable_real=True))
    assert isinstance(recs.lira.attacks[0].fpr, list) and len(recs.lira.attacks[0].fpr) > 2   # ROC round-trips
    c = C.claim_lira(recs, paper)
    assert c.verdict == "holds", [f.measured for f in c.findings]
    assert "IN-10: 0.001 % (synthetic) vs 0.01 % (real)" in c.findings[1].paper
    recs2 = saved(tmp_path, lira_record(separable_real=False))
    assert C.claim_lira(recs2, paper).verdict == "inconclusive"
    figs = F.step_figures(recs, paper)
    fig = figs["09_fig3_lira_roc"]()
    assert fig.axes and fig.axes[0].get_xscale() == "log"
    plt.close(fig)


def test_sscd_record_into_claim(tmp_path, paper):
    assert C.claim_sscd(saved(tmp_path, sscd_record(0)), paper).verdict == "holds"
    c = C.claim_sscd(saved(tmp_path, sscd_record(2)), paper)
    assert c.verdict == "contradicted" and "2 of 20" in c.findings[0].measured


def test_retrieval_record_into_claim6_agrees_with_08(tmp_path, paper):
    recs = saved(tmp_path, retrieval_record())
    c = C.claim_retrieval(recs, paper)
    assert c.verdict == retrieval.claim(recs.retrieval)["verdict"]
    assert c.details == retrieval.claim_lines(retrieval.claim(recs.retrieval))
    fig = F.step_figures(recs, paper)["09_retrieval_sweep"]()
    plt.close(fig)


def test_classifier_record_into_tables_1_to_3(tmp_path, paper):
    recs = saved(tmp_path, classifier_record())
    t1 = T.table1(recs, paper, "digits")
    assert [r[0] for r in t1.rows] == [f"synthetic only ({T.DEFAULT_ROW})", "real only (real)",
                                      f"real + synthetic (real+{T.DEFAULT_ROW})"]
    top1 = lambda src, k: [100 * r.top1 for r in recs.classifier.runs if (r.source, r.k) == (src, k)]  # noqa: E731
    assert t1.rows[0][3] == stats.seed_stats(top1(T.DEFAULT_ROW, 1)).fmt() and t1.rows[0][3].startswith("71.0 +- ")
    assert t1.rows[1][3].startswith(stats.seed_stats(top1("real", 0)).fmt()) and [r[4] for r in t1.rows] == ["90.5", "93", "95.1"]  # IN-10
    assert T.table1(recs, paper, "eurosat-mini").rows[1][4] == "97.6"                                   # EuroSAT
    t2 = T.table2(recs, paper)
    assert [r[1] for r in t2.rows] == list(T.TABLE2_ROWS) and t2.rows[0][2:6] == ["", "", "", ""]
    assert t2.rows[8][2:6] == ["✓"] * 4 and (t2.rows[8][8], t2.rows[8][9]) == ("90.5", "80")
    t3 = T.table3(recs, paper)
    assert [r[0] for r in t3.rows] == ["synthetic k=1", "synthetic k=2", "synthetic k=5", "real only"]
    assert t3.rows[1][5] == "72.9" and t3.rows[3][5] == "79.6"
    md = T.markdown(t2)
    assert md.count("\n| ") == 10 and "lora-dm-vg-lp" in md


def test_classifier_record_into_claims_1_to_3(tmp_path, paper):
    recs = saved(tmp_path, classifier_record())
    c1 = C.claim_components(recs, paper)
    assert len(c1.findings) == len(classify.TABLE2_EFFECTS)
    ft = c1.findings[0]
    assert ft.label.startswith("LoRA fine-tuning: base-novg-t2i -> lora-nodm-novg-t2i")
    # every seed gains the same 10 points: a paired interval of zero width
    assert ft.diff == pytest.approx(10.0) and ft.verdict == "holds" and ft.paper == "IN-10 +1.0, IN-100 +7.3"
    dm = next(f for f in c1.findings if f.label.startswith("DM loss:"))
    assert dm.verdict == "contradicted" and dm.diff == pytest.approx(-2.0)   # 0.38 vs 0.40 in ROW_TOP1
    assert c1.verdict == "contradicted"
    c2 = C.claim_real_plus_synthetic(recs, paper, "IN-10")
    assert c2.verdict == "holds" and c2.findings[0].paper == "IN-10 +2.1" and "paired" in c2.findings[0].measured
    c3 = C.claim_scaling(recs, paper, "IN-10")
    assert c3.verdict == "holds" and any("crossover of the means: 2.5x (paper Fig. 2, IN-10: 2.5x)" in d
                                         for d in c3.details), c3.details
    partial = saved(tmp_path, classifier_record(rows=(T.DEFAULT_ROW,)))
    assert "Table 2 rows not run: base-novg-t2i" in C.claim_components(partial, paper).details[0]
    figs = F.make_figures(recs, paper)
    assert {"09_table2", "09_fig2_scaling"} <= set(figs)
    for f in figs.values():
        plt.close(f)


def test_protocol_from_prepare_and_finetune_records(tmp_path):
    recs = saved(tmp_path, prepare_record(), finetune_record(), synthesis_record())
    p = T.protocol(recs)
    assert p["dataset"] == "digits" and p["images"]["train"] == 539 and p["rows"] == list(T.TABLE2_ROWS)
    assert p["lora_variants"] == ["lora-dm-novg", "lora-dm-vg", "lora-nodm-novg", "lora-nodm-vg"]
    assert p["finetune"] == {"num_train_epochs": 300, "global_batch_size": 64, "snr_gamma": 0.75, "dm_loss_form": "paper",
                             "guidance_token_position": "append"}
    assert "- dataset: digits" in T.protocol_markdown(p) and "not measured" in T.protocol_markdown({})


def test_run_records_load_every_producer(tmp_path):
    for r in (prepare_record(), finetune_record(), synthesis_record(), classifier_record(), ood_record(), lira_record(), sscd_record(), retrieval_record()):
        r.save(tmp_path)
    recs = T.RunRecords.load(tmp_path)
    assert all(recs.steps().values())
    assert recs.classifier.runs[0].source == "real" and recs.lira.attacks[0].auc_interval.n_bootstrap == 200


def test_fmt_diff():
    assert T.fmt_diff(stats.paired([1, 2, 3], [2, 3, 5])).startswith("+1.3 [")
    assert "one seed" in T.fmt_diff(stats.paired([1], [2]))


def test_report_record_round_trip_markdown_and_readme(tmp_path, paper):
    run = tmp_path / "runs" / "digits"
    recs = saved(run, synthesis_record(), classifier_record(), ood_record(), lira_record(), sscd_record(),
                 retrieval_record())
    rec = report.build(run, "digits", figures=["figures/09_table2.png"], recs=recs)
    path = report.write_report(run, rec)
    back = report.ReportRecord.load(run)
    assert back.claims[0].title == rec.claims[0].title and isinstance(back.tables["table4"], T.Table)
    text = path.read_text()
    assert "verdict in miniature" in text and "closest small set" in text and "## Machine and time" in text
    paper_rec = report.build(run, "imagenette", recs=recs)
    assert "verdict in miniature" not in report.report_markdown(paper_rec)
    readme = tmp_path / "README.md"
    readme.write_text(f"# kit\n\n{report.RESULTS_START}\nstale numbers\n{report.RESULTS_END}\n\nrest\n")
    written = report.update_readme([run], readme, tmp_path / "docs")
    new = readme.read_text()
    assert "stale numbers" not in new and new.endswith("rest\n") and "`digits`" in new and "cores" in new
    assert (tmp_path / "docs" / "results-digits.md").exists() and len(written) == 2
    with pytest.raises(ValueError, match="markers"):
        report.replace_section("no markers", "x")


def test_readme_is_short_and_has_its_generated_sections():
    from realfake_utils.params import REPO_ROOT

    text = (REPO_ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert text.count(report.RESULTS_START) == 1 and text.count(report.RESULTS_END) == 1
    assert text.count("<!-- paper-vs-official:start -->") == 1
    assert report.replace_section(text, report.RESULTS_START + "\nX\n" + report.RESULTS_END).count("\nX\n") == 1
    for link in ("docs/manual.md", "docs/scale-out.md", "docs/paper-shapes.md", "DEVELOPING.md"):
        assert link in text


def test_generator_checks_from_01s_oracle_and_02s_samples(tmp_path):
    """The generator checks of REPORT.md (issue 12's goals) read 01's oracle and 02's probe / MMD ratio."""
    prep = prepare_record()
    prep.oracle = prepare.OracleCheck(steps=600, n_samples=539, real_top1=97.0, synthetic_top1=95.5, gap=1.5,
                                      probe=0.97, sample_steps=20, guidance_scale=2.0, recipe="miniature",
                                      max_gap=3.0, within_goal=True)
    fine = finetune_record()
    fine.base_mmd2, fine.base_mmd_ratio = {"base-vg": 0.15}, {"base-vg": 40.0}
    fine.base_probe = {"base-vg": {"pixels": 0.5, "clip": 0.4}}
    v = fine.variants["lora-dm-vg"]
    v.mmd2_before, v.mmd2_after, v.mmd_ratio, v.probe_accuracy, v.probe_clip = 0.15, 0.01, 2.5, 0.93, float("nan")
    recs = saved(tmp_path, prep, fine)
    t = T.generator_checks(recs)
    rows = {r[0]: r for r in t.rows}
    oracle = next(r for r in t.rows if r[0].startswith("capacity oracle"))
    assert oracle[1].startswith("95.5 vs 97.0 (gap 1.5") and oracle[3] == "yes"
    assert rows["base-vg samples: sample probe (pixels / CLIP features)"][3] == "pixels **no** / CLIP **no**"
    assert rows["base-vg samples: MMD² over the real noise floor (biased, CLIP space)"][3] == "**no**"
    assert rows["lora-dm-vg samples: sample probe (pixels / CLIP features)"][1:] == ["0.93 / -", ">= 0.90",
                                                                                   "pixels yes / CLIP **no**"]
    assert rows["lora-dm-vg samples: MMD² over the real noise floor (biased, CLIP space)"][1:] == [
        "2.5x (MMD² 0.1500 -> 0.0100)", "<= 3x", "yes"]
    assert T.generator_checks(T.RunRecords()).missing.startswith("not measured")


def test_retrieval_second_table_from_08s_record(tmp_path):
    rec = retrieval_record()
    rec.scratch_table = [{"group": "real", "label": "real (full train split)", "n_train": 539, "mean": 97.0,
                          "per_seed": {"0": 96.0, "1": 98.0}},
                         {"group": "retrieved-caption", "label": "caption match", "n_train": 648, "mean": 76.0,
                          "per_seed": {"0": 76.0}}]
    t = T.retrieval_scratch(saved(tmp_path, rec))
    assert "second table" in t.title and "not Geng et al.'s protocol" in t.title
    assert t.rows == [["real (full train split)", 539, stats.seed_stats([96.0, 98.0]).fmt(), 2],
                      ["caption match", 648, "76.0 (n=1)", 1]]
    assert T.retrieval_scratch(T.RunRecords()).missing.startswith("not measured")
