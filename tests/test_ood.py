"""OOD evaluation: class lists, logit restriction, ImageNet-style folders, miniature variants."""
import numpy as np
import pytest
import torch
from PIL import Image

from realfake_utils import classify as C
from realfake_utils import ood

torch.set_num_threads(1)


def test_class_lists_are_the_official_ones():
    imagenet = ood.read_wnids("imagenet")
    r, a = ood.read_wnids("imagenet_r"), ood.read_wnids("imagenet_a")
    assert len(imagenet) == len(set(imagenet)) == 1000 and imagenet == sorted(imagenet)
    assert len(set(r)) == 200 and len(set(a)) == 200 and set(r) <= set(imagenet) and set(a) <= set(imagenet)
    r_idx, a_idx = ood.subset_indices(r, imagenet), ood.subset_indices(a, imagenet)
    # spot checks against hendrycks/imagenet-r eval.py and hendrycks/natural-adv-examples eval.py
    assert r_idx[:10] == [1, 2, 4, 6, 8, 9, 11, 13, 22, 23] and r_idx[-3:] == [981, 983, 988]
    assert a_idx[:10] == [6, 11, 13, 15, 17, 22, 23, 27, 30, 37] and a_idx[-3:] == [986, 987, 988]
    assert imagenet[1] == "n01443537" and imagenet[6] == "n01498041"
    # index sums of the full lists in the official eval code (verified element-wise when the lists were written)
    assert (sum(r_idx), sum(a_idx)) == (86135, 102178)


def test_restriction_changes_argmax_correctly():
    logits = torch.tensor([[9.0, 1.0, 3.0, 2.0],
                           [0.0, 1.0, 2.0, 8.0],
                           [5.0, 0.0, 0.0, 4.0]])
    allowed = [1, 3]
    assert ood.restricted_predict(logits, None).tolist() == [0, 3, 0]
    assert ood.restricted_predict(logits, allowed).tolist() == [3, 3, 3]
    assert ood.restrict_logits(logits, allowed).argmax(1).tolist() == [3, 3, 3]
    labels = torch.tensor([3, 3, 1])
    free = C.accuracy_metrics(logits, labels, 4)
    res = C.accuracy_metrics(logits, labels, 4, allowed=allowed)
    assert free["top1"] == pytest.approx(1 / 3) and res["top1"] == pytest.approx(2 / 3)


def _folder(root, names, n=2, size=10):
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / name / f"{i}.JPEG")
    return root


def test_ood_folders_map_to_model_classes(tmp_path):
    imagenet = ood.read_wnids("imagenet")
    r_wnids = ood.read_wnids("imagenet_r")
    folder = _folder(tmp_path / "r", r_wnids[:3])
    ds = ood.OODFolder(folder, "r")
    assert len(ds) == 6 and len(ds.allowed) == 200
    assert {y for _, y in ds.samples} == {imagenet.index(w) for w in r_wnids[:3]}
    v2 = ood.OODFolder(_folder(tmp_path / "v2", ["0", "999"]), "v2")
    assert v2.allowed is None and {y for _, y in v2.samples} == {0, 999}
    # a model with fewer classes (e.g. ImageNet-100): unknown folders skipped, restriction re-indexed
    small = [imagenet[1], imagenet[2], imagenet[3]]
    ds_small = ood.OODFolder(folder, "r", model_wnids=small)
    assert {y for _, y in ds_small.samples} == {0, 1} and ds_small.allowed == [0, 1]
    img, y = ds_small[0]
    assert img.size == (10, 10)


def test_miniature_variants():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat(5)
    imgs = torch.randint(0, 256, (30, 3, 12, 12), dtype=torch.uint8, generator=g)
    train_x = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=g)
    train_y = torch.arange(6).repeat(7)[:40]
    v = ood.build_miniature_variants(imgs, labels, train_x, train_y, num_classes=6, seed=0, hard_fraction=0.5)
    assert set(v) == {"v2-like", "sketch", "rendition", "hard"}
    assert v["v2-like"]["images"].shape == imgs.shape and not torch.equal(v["v2-like"]["images"], imgs)
    assert torch.equal(ood.resample_variant(imgs, 0), v["v2-like"]["images"])       # deterministic
    sk = v["sketch"]["images"]
    assert torch.equal(sk[:, 0], sk[:, 1]) and sk.dtype == torch.uint8             # grey-scale strokes
    assert v["rendition"]["allowed"] == [0, 2, 4] and set(v["rendition"]["labels"].tolist()) == {0, 2, 4}
    rend = v["rendition"]["images"]
    assert rend.shape[0] == 15 and torch.equal(rend, ood.rendition_variant(imgs[labels % 2 == 0]))
    hard = v["hard"]
    assert len(hard["labels"]) == 15 and hard["allowed"] is None
    model = C.build_model(C.load_recipe("miniature", image_size=12,
                                        model_kwargs={"channels": [8, 8, 8, 8], "stem_width": 8}), 6)
    res = ood.evaluate_variants(model, v, 6, clean=(imgs, labels))
    assert list(res) == ["clean", "v2-like", "sketch", "rendition", "hard"]
    assert res["rendition"]["restricted"] and not res["sketch"]["restricted"]
    assert res["rendition"]["top5"] == 1.0          # 3 allowed classes: every label is in the top 5
    for m in res.values():
        assert 0.0 <= m["top1"] <= m["top5"] <= 1.0


def test_hard_subset_is_hard_for_independent_models():
    rng = np.random.default_rng(0)
    n = 60
    y = torch.tensor(rng.integers(0, 2, n))
    x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    x[y == 1] = 200
    ty = torch.tensor([0, 1, 0, 1])
    tx = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    tx[1] = 200
    tx[2] = 200          # labelled 0 but looks like class 1: the hardest
    s = ood.hard_scores(x, y, tx, ty)
    assert int(np.argmin(s)) == 2


def test_filter_models_choose_the_hard_subset(tmp_path):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(2).repeat(12)
    x = torch.randint(0, 60, (24, 3, 8, 8), dtype=torch.uint8, generator=g)
    x[y == 1, 0] += 180
    recipe = C.load_recipe("miniature", image_size=8, epochs=4, batch_size=8,
                           model_kwargs={"channels": [8, 8, 8, 8], "stem_width": 8})
    models = ood.train_filter_models(x, y, 2, recipe, tmp_path, n_models=1)
    again = ood.train_filter_models(x, y, 2, recipe, tmp_path, n_models=1)      # cached, not retrained
    assert torch.equal(C.predict_logits(models[0], x), C.predict_logits(again[0], x))
    p = ood.model_true_prob(models, x, y)
    assert p.shape == (24,) and ((0 <= p) & (p <= 1)).all()
    v = ood.build_miniature_variants(x, y, x, y, 2, hard_fraction=0.25, filter_models=models)
    kept = v["hard"]["labels"]
    assert len(kept) == 6
    assert v["hard"]["filter_true_prob"] == pytest.approx(float(np.sort(p)[:6].mean()))


# ---------------------------------------------------------------- the step: evaluation, summary, record
def _result(source, k, cseed, sseed, name, top1, restricted=False):
    return ood.OODResult(classifier=f"artifacts/classifiers/{source}__k{k}__s{cseed}__g{sseed}", source=source,
                         k=k, synthesis_seed=sseed, classifier_seed=cseed, ood_set=name, top1=top1,
                         top5=min(1.0, top1 + 0.1), n=50, restricted=restricted)


def test_summary_uses_the_seed_statistics_and_record_round_trips(tmp_path):
    from realfake_utils import stats

    res = [_result("lora-dm-vg-lp", 1, c, g, "sketch", 0.30 + 0.01 * c + 0.02 * g) for c in range(3) for g in range(2)]
    res += [_result("real", 0, c, 0, "sketch", 0.5 + 0.01 * c) for c in range(3)]
    res += [_result("real", 0, c, 0, "rendition", 0.6, True) for c in range(3)]
    res += [_result("real", 0, c, 0, "rendition (all classes)", 0.55) for c in range(3)]
    rec = ood.build_record(res, {"sketch": {"description": "edges"}}, {}, default_set="lora-dm-vg-lp",
                           hard_fraction=0.1, hard_filter="cnn", hard_filter_models=2)
    line = rec.line("lora-dm-vg-lp", 1, "sketch")
    est = stats.seed_stats([100 * r.top1 for r in res[:6]])
    assert line.n == 6 and (line.mean, line.lo, line.hi) == pytest.approx((est.mean, est.lo, est.hi))
    assert rec.line("real", 0, "sketch", "top5").mean == pytest.approx(61.0)
    assert rec.ood_sets == ["sketch", "rendition"]
    assert ood.restriction_gaps(rec) == {"rendition": pytest.approx(5.0)}
    rec.save(tmp_path)
    back = ood.OODRecord.load(tmp_path)
    assert back == rec and isinstance(back.results[0], ood.OODResult) and isinstance(back.summary_top1[0], ood.OODLine)
    table = ood.format_ood_table(back.summary_top1, back.ood_sets)
    assert "lora-dm-vg-lp" in table and "+-" in table
    fig = ood.plot_ood_vs_k(back)
    assert fig.axes[0].get_xlabel().startswith("k")


def _one_trained_run(tmp_path, n: int):
    """``n`` random 8x8 images of 4 classes, one classifier of the miniature recipe trained on them for an
    epoch under ``artifacts/classifiers/`` (``ood.train_filter_models``) and 04's run entry for it."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(n // 4)
    x = torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    recipe = C.load_recipe("miniature", image_size=8, epochs=1, batch_size=16,
                           model_kwargs={"channels": [8, 8, 8, 8], "stem_width": 8})
    ood.train_filter_models(x, y, 4, recipe, tmp_path / "artifacts" / "classifiers", n_models=1)
    runs = [C.ClassifierRun(source="real", tables=["table1"], k=0, synthesis_seed=None, classifier_seed=0,
                            top1=0.5, top5=0.9, n_train=n, path="artifacts/classifiers/filter_s10000")]
    return x, y, runs


def test_evaluate_classifiers_reads_every_run(tmp_path):
    """04's runs (classify.ClassifierRun) -> one result per (classifier, set), restricted sets twice."""
    x, y, runs = _one_trained_run(tmp_path, 32)
    variants = ood.build_miniature_variants(x, y, x, y, 4, hard_fraction=0.25)
    res = ood.evaluate_classifiers(tmp_path, runs, variants, {}, 4, clean=(x, y))
    names = [r.ood_set for r in res]
    assert names == ["clean", "v2-like", "sketch", "rendition", "hard", "rendition (all classes)"]
    assert all(r.classifier == runs[0].path and r.source == "real" and r.synthesis_seed is None for r in res)
    by = {r.ood_set: r for r in res}
    assert by["rendition"].restricted and by["rendition"].top1 >= by["rendition (all classes)"].top1
    assert by["rendition"].n == int(torch.isin(y, torch.tensor([0, 2])).sum())
    assert "restricted to 2 classes" in ood.describe_sets(variants, {})


def test_no_ood_set_still_scores_every_classifier_on_the_clean_split(tmp_path):
    """A paper preset without OOD folders (imagenette: Table 4 is ImageNet-1K's): 05 scores each of 04's
    classifiers on the clean test split, so its "every classifier evaluated" check holds (it failed)."""
    x, y, runs = _one_trained_run(tmp_path, 16)
    res = ood.evaluate_classifiers(tmp_path, runs, {}, {}, 4, clean=(x, y))
    assert [r.ood_set for r in res] == ["clean"] and {r.classifier for r in res} == {runs[0].path}
    record = ood.build_record(res, {}, {})
    assert record.ood_sets == [] and "clean test split only" in ood.describe_sets({}, {})


def test_paper_preset_clean_split_is_streamed_from_the_manifest(tmp_path):
    """Without miniature variants the clean test split is a file-backed set (never one tensor in memory)
    scored like an OOD folder, and no OOD set is claimed."""
    import csv

    data_dir = tmp_path / "artifacts" / "data"
    data_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        path = data_dir / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"c{i % 2}/img{i}.png", "path": str(path), "index": i, "label": i % 2,
                     "class_name": f"c{i % 2}", "split": "test" if i < 4 else "train"})
    with open(data_dir / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    recipe = C.load_recipe("miniature", image_size=8, epochs=1, batch_size=4,
                           model_kwargs={"channels": [8, 8, 8, 8], "stem_width": 8})
    variants, folders, clean = ood.build_ood_sets(tmp_path, 8, recipe, miniature_variants=False)
    assert variants == {} and clean is None and list(folders) == ["clean"] and len(folders["clean"]) == 4
    assert isinstance(folders["clean"], ood.SplitImages) and "clean test split only" in ood.describe_sets(variants, folders)
    ood.train_filter_models(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), 2, recipe,
                            tmp_path / "artifacts" / "classifiers", n_models=1)
    runs = [C.ClassifierRun(source="real", tables=["table1"], k=0, synthesis_seed=None, classifier_seed=0,
                            top1=0.5, top5=1.0, n_train=4, path="artifacts/classifiers/filter_s10000")]
    res = ood.evaluate_classifiers(tmp_path, runs, variants, folders, 2, clean=clean)
    assert [(r.ood_set, r.n, r.restricted) for r in res] == [("clean", 4, False)]
    record = ood.build_record(res, variants, folders)
    assert record.ood_sets == [] and record.sets == {}
