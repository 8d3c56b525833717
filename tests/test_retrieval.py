"""Retrieval baseline: caption matching, CLIP k-NN, exclusivity, test de-duplication, set writing."""
import json

import pytest
import torch
from PIL import Image

from realfake_utils import pool as pl
from realfake_utils import retrieval


def test_caption_match_is_whole_word_and_case_insensitive():
    caps = ["Photo of a SEVEN on paper", "sevenfold pattern", "a one and a seven", "nothing"]
    m = retrieval.caption_match(caps, ["one", "seven"])
    assert m.tolist() == [[False, False, True, False], [True, False, True, False]]


def test_select_per_class_budget_exclusivity_and_best_first():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.95, 0.2, 0.6, 0.1]])
    picks = retrieval.select_per_class(scores, [2, 2])
    assert picks[1] == [0, 2]          # image 0 scores higher for class 1: it goes there
    assert picks[0] == [1, 3]          # class 0 gets its best remaining images
    assert not set(picks[0]) & set(picks[1])


def test_clip_knn_finds_planted_class_members():
    torch.manual_seed(0)
    means = torch.eye(3, 8) * 5
    labels = torch.arange(60) % 3
    pool = means[labels] + torch.randn(60, 8)
    picks = retrieval.retrieve("clip_i2i", [10, 10, 10], pool_feats=pool, class_mean_feats=means)
    assert retrieval.label_precision(picks, labels.tolist()) == 1.0
    assert [len(p) for p in picks] == [10, 10, 10]
    picks_t = retrieval.retrieve("clip_t2i", [5, 5, 5], pool_feats=pool, text_feats=means)
    assert retrieval.label_precision(picks_t, labels.tolist()) == 1.0


def test_test_duplicates_are_excluded():
    torch.manual_seed(1)
    pool = torch.randn(20, 16)
    test = torch.cat([pool[:3] + 0.01 * torch.randn(3, 16), torch.randn(5, 16)])
    dup = retrieval.duplicate_mask(pool, test, threshold=0.75, chunk=7)
    assert dup[:3].all() and not dup[3:].any()
    picks = retrieval.retrieve("clip_i2i", [20], pool_feats=pool, class_mean_feats=pool[:1], exclude=dup)
    assert not {0, 1, 2} & set(picks[0]) and len(picks[0]) == 17


def test_caption_strategy_respects_matches_and_errors():
    picks = retrieval.retrieve("caption", [5, 5], captions=["one", "two", "one two", "x"],
                               class_names=["one", "two"])
    assert set(picks[0]) | set(picks[1]) == {0, 1, 2} and 3 not in picks[0] + picks[1]
    with pytest.raises(ValueError, match="unknown retrieval strategy"):
        retrieval.retrieve("bm25", [1])
    with pytest.raises(ValueError, match="needs the pool captions"):
        retrieval.retrieve("caption", [1])


def test_write_image_set(tmp_path):
    images = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)
    out = retrieval.write_image_set(tmp_path / "set", images, [[0, 2], [3]], ["a", "b"],
                                    ["p0", "p1", "p2", "p3"], tag="clip_i2i")
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["file"], r["label"]) for r in rows] == [("a/p0.png", 0), ("a/p2.png", 0), ("b/p3.png", 1)]
    back = torch.tensor(list(Image.open(out / "a/p2.png").getdata())).T.reshape(3, 8, 8)
    assert torch.equal(back, images[2].long())
    assert not list(out.rglob("*.tmp*"))


def test_write_image_set_safe_names_prompts_and_stale_files(tmp_path):
    images = torch.randint(0, 255, (3, 3, 4, 4), dtype=torch.uint8)
    out = retrieval.write_image_set(tmp_path / "s", images, [[0, 1], [2]], ["Annual Crop", "b"],
                                    ["pool/x 1", "p1", "p2"], tag="caption", prompts=["c0", "c1", "c2"])
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows[0]["file"] == "Annual_Crop/pool_x_1.png" and rows[0]["prompt"] == "c0"
    assert rows[0]["class_name"] == "Annual Crop"
    h1 = retrieval.set_hash(out)
    retrieval.write_image_set(out, images, [[1], [2]], ["Annual Crop", "b"], ["pool/x 1", "p1", "p2"], tag="caption")
    assert not (out / "Annual_Crop/pool_x_1.png").exists() and (out / "Annual_Crop/p1.png").exists()
    assert retrieval.set_hash(out) != h1


def test_budget_and_claims():
    assert retrieval.budget_from_set([{"label": 1}, {"label": 1}, {"label": 0}], 3) == [1, 2, 0]
    line = lambda *v: {"mean": sum(v) / len(v), "per_seed": dict(enumerate(v))}  # noqa: E731
    lines = {"real": line(90.0, 90.0), "synthetic": line(70.0, 71.0, 69.0),
             "retrieved-caption": line(75.0, 76.0, 74.5), "retrieved-clip_i2i": line(65.0, 66.0, 64.0)}
    c = retrieval.claims(lines)
    assert c["realfake_gap_real_minus_synthetic"] == 20.0
    assert c["best_retrieval"] == "retrieved-caption" and c["verdict"] == "holds"
    assert c["comparison"]["test"] == "paired t" and not c["every_strategy_beats_synthetic"]
    lines["retrieved-caption"] = line(80.0, 60.0, 75.0)   # same mean margin, seed noise: not resolvable
    assert retrieval.claims(lines)["verdict"] == "inconclusive"


def test_read_pool_index_layouts(tmp_path):
    img = Image.new("RGB", (6, 6), (10, 20, 30))
    for layout in ("jsonl", "csv", "files"):
        d = tmp_path / layout
        (d / "00000").mkdir(parents=True)
        img.save(d / "00000" / "a.png")
        img.save(d / "00000" / "b.png")
        if layout == "jsonl":
            (d / "captions.jsonl").write_text(json.dumps({"file": "00000/a.png", "caption": "a cat", "label": 1})
                                              + "\n" + json.dumps({"file": "00000/b.png", "caption": "x"}) + "\n")
        elif layout == "csv":
            (d / "captions.csv").write_text("file,caption,class_name\n00000/a.png,a cat,cat\n00000/b.png,x,\n")
        else:
            (d / "00000" / "a.txt").write_text("a cat\n")
        rows, excluded = pl.read_pool_index(d, ["dog", "cat"])
        assert excluded == []
        assert [r["caption"] for r in rows] == ["a cat", "" if layout == "files" else "x"]
        assert rows[0]["path"] == str(d / "00000" / "a.png")
        assert [r["label"] for r in rows] == ([-1, -1] if layout == "files" else [1, -1])
    with pytest.raises(FileNotFoundError, match="pool_index"):
        pl.read_pool_index(tmp_path / "missing")


def test_stale_runs(tmp_path):
    from types import SimpleNamespace

    spec = SimpleNamespace(name="retrieved-caption__k0__s0", extra={"set_hash": "h1"})
    (tmp_path / spec.name).mkdir()
    cfg = {"recipe": {"lr": 0.1, "milestones": [1, 2]}, "info": {"set_hash": "h1"}}
    (tmp_path / spec.name / "config.json").write_text(json.dumps(cfg))
    assert retrieval.stale_runs(tmp_path, [spec], {"lr": 0.1, "milestones": (1, 2)}) == []
    assert retrieval.stale_runs(tmp_path, [spec], {"lr": 0.2, "milestones": [1, 2]}) == [tmp_path / spec.name]
    spec.extra["set_hash"] = "h2"
    assert retrieval.stale_runs(tmp_path, [spec], cfg["recipe"]) == [tmp_path / spec.name]


def test_clip_text_features_match_clipmodel(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    from realfake_utils import models

    path = models.build_tiny_clip(tmp_path / "clip", words=["a", "seven", "one"], hidden=16, projection_dim=8,
                                  text_hidden=16, layers=1, text_layers=1)
    prompts = [retrieval.text_query(c) for c in ("seven", "one")]
    feats = retrieval.clip_text_features(path, prompts)
    tok = CLIPTokenizer.from_pretrained(path)
    model = CLIPModel.from_pretrained(path).eval()
    enc = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    with torch.no_grad():
        ref = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    ref = getattr(ref, "pooler_output", ref)
    assert feats.shape == (2, 8) and torch.allclose(feats, ref, atol=1e-5)
    assert not torch.allclose(feats[0], feats[1])


def test_plot_retrieved_marks_wrong_labels():
    import matplotlib

    matplotlib.use("Agg")
    images = torch.randint(0, 255, (6, 3, 4, 4), dtype=torch.uint8)
    fig = retrieval.plot_retrieved(images, {"caption": [[0, 1], [2]], "clip_i2i": [[3], [4, 5]]}, ["a", "b"],
                                   true_labels=[0, 1, 1, 0, 1, 1], per_class=2)
    red = [ax for ax in fig.axes if ax.spines["top"].get_visible()]
    assert len(fig.axes) == 2 * 5 and len(red) == 1


def test_label_precision_ignores_unknown_labels():
    assert retrieval.label_precision([[0, 1], [2]], [0, -1, 0]) == 0.5
    assert retrieval.label_precision([[1]], [-1, -1]) != retrieval.label_precision([[1]], [-1, -1])  # nan


def test_summarise_runs_groups_seeds_and_checks_the_recipe(tmp_path):
    def run(row, seed, top1, recipe="miniature"):
        d = tmp_path / f"{row}_{seed}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"recipe": recipe}))
        return {"row": row, "seed": seed, "top1": top1, "n_train": 200, "path": str(d)}

    records = [run("real", 0, 0.96), run("real", 1, 0.98), run("lora-dm-vg-lp", 0, 0.40),
               run("lora-dm-vg-lp", 1, 0.50, recipe="other"), run("retrieved-caption", 0, 0.3)]
    lines = retrieval.summarise_runs(records, "synthetic lora-dm-vg-lp/k1", "miniature")
    assert set(lines) == {"real", "synthetic", "retrieved-caption"}
    assert lines["real"]["mean"] == pytest.approx(97.0) and lines["real"]["std"] == pytest.approx(2 ** 0.5)
    assert lines["real"]["per_seed"] == {0: pytest.approx(96.0), 1: pytest.approx(98.0)}
    assert lines["real"]["same_recipe"] and not lines["synthetic"]["same_recipe"]
    assert lines["synthetic"]["label"] == "synthetic lora-dm-vg-lp/k1"
    assert lines["retrieved-caption"]["std"] == 0.0


def test_pool_index_paths_are_confined_and_unreadable_images_excluded(tmp_path):
    from realfake_utils.rundir import UnsafePathError

    d = tmp_path / "idx"
    d.mkdir()
    Image.new("RGB", (4, 4)).save(d / "ok.png")
    (d / "broken.png").write_bytes(b"not an image")
    for bad in ("../../../etc/hostname", "/etc/shadow"):
        (d / "captions.jsonl").write_text(json.dumps({"file": bad, "caption": "x"}) + "\n")
        with pytest.raises(UnsafePathError):
            pl.read_pool_index(d)
    (d / "captions.jsonl").write_text("".join(json.dumps({"file": f, "caption": f}) + "\n"
                                              for f in ("ok.png", "broken.png", "gone.png")))
    rows, excluded = pl.read_pool_index(d)
    assert [r["caption"] for r in rows] == ["ok.png"]
    assert [e["path"].endswith(n) for e, n in zip(excluded, ("broken.png", "gone.png"))] == [True, True]
    assert excluded[1]["reason"] == "missing file"


def _planted_pool():
    """6 pool items, 2 classes, 2-d embeddings: the expected picks are known by construction."""
    captions = ["a zero here", "one", "photo of zero", "nothing", "zero and one", "ONE hd"]
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.5, 0.8], [0.2, 0.98], [0.1, 0.9]])
    cap = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.95, 0.05], [0.3, 0.9], [0.7, 0.6], [0.05, 0.95]])
    # class x template text embeddings [C=2, T=2, D=2]: per class a sharp and a blurred template
    tmpl = torch.tensor([[[1.0, 0.0], [0.8, 0.6]], [[0.0, 1.0], [0.6, 0.8]]])
    return captions, img, cap, tmpl


def test_geng_strategies_on_a_planted_pool_give_the_expected_picks():
    captions, img, cap, tmpl = _planted_pool()
    big = [6, 6]
    # caption match: class words as whole words, an image naming both classes goes to one class only
    picks = retrieval.retrieve("caption", big, captions=captions, class_names=["zero", "one"], seed=0)
    assert sorted(picks[0] + picks[1]) == [0, 1, 2, 4, 5] and {0, 2} <= set(picks[0]) and {1, 5} <= set(picks[1])
    # k-NN over image embeddings: best template cosine, each image to its best class, best first
    picks = retrieval.retrieve("knn_image", big, pool_feats=img, template_feats=tmpl)
    assert picks == [[0, 2], [1, 3, 5, 4]]       # item 3 scores 0.996 through the blurred template
    picks = retrieval.retrieve("knn_caption", [1, 2], caption_feats=cap, template_feats=tmpl)
    assert picks == [[0], [1, 5]]
    excl = torch.tensor([False, True, False, False, False, False])
    assert retrieval.retrieve("knn_image", [1, 1], pool_feats=img, template_feats=tmpl, exclude=excl) == [[0], [3]]
    with pytest.raises(ValueError, match="knn_caption needs"):
        retrieval.retrieve("knn_caption", big, pool_feats=img, template_feats=tmpl)


def test_clip_score_filter_and_deduplication_on_a_planted_pool():
    _, img, _, tmpl = _planted_pool()
    text = tmpl[:, 0]                                          # one text embedding per class
    picks = [[0, 2], [1, 3, 5, 4]]
    # cosines with the own class's text: 0 -> 1.0, 2 -> 0.994, 1 -> 1.0, 3 -> 0.848, 5 -> 0.994, 4 -> 0.980
    assert retrieval.clip_score_filter(picks, img, text, threshold=0.9) == [[0, 2], [1, 5, 4]]
    assert retrieval.clip_score_filter(picks, img, text, threshold=0.99) == [[0, 2], [1, 5]]
    assert retrieval.clip_score_filter(picks, img, text, percentile=50) == [[0], [1, 5]]
    assert retrieval.clip_score_filter(picks, img, text) == picks
    dup = torch.cat([img, img[:1] * 2.0])                     # item 6 duplicates item 0
    assert retrieval.deduplicate([[0, 6, 2], [1]], dup, threshold=0.999) == [[0, 2], [1]]


def test_sweep_points_and_proportional_subsets():
    pts = retrieval.sweep_points(200, [0.1, 0.25, 0.5, 1.0], [2, 4])
    assert pts == {"retrieved": [20, 50, 100, 200], "synthetic": [20, 50, 100, 200, 400, 800]}
    per_class = [list(range(0, 30)), list(range(30, 40))]
    sub = retrieval.proportional_subset(per_class, 8, seed=0)
    assert [len(s) for s in sub] == [6, 2] and set(sub[0]) <= set(per_class[0])
    assert sub == retrieval.proportional_subset(per_class, 8, seed=0) != retrieval.proportional_subset(per_class, 8, 1)
    assert retrieval.proportional_subset(per_class, 40, seed=3) == per_class
    with pytest.raises(ValueError):
        retrieval.proportional_subset(per_class, 41, 0)


def _record(retr, syn, sizes=(10, 20, 30)):
    # a per-seed offset shared by both sources, and a zero-mean one of the retrieved side (seeds differ)
    pts = [retrieval.SweepPoint(src, n, s, v + 0.3 * s + j, v + 0.2 * s + j)
           for src, vals in (("retrieved", retr), ("synthetic", syn)) for n, v in zip(sizes + (40,), vals)
           for s in range(3) if src == "synthetic" or n != 40
           for j in [0.2 * (s - 1) if src == "retrieved" else 0.0]]
    return retrieval.RetrievalRecord(
        strategies={}, sweep_strategy="knn_image", retrieved_max=max(sizes),
        sizes={"retrieved": list(sizes), "synthetic": list(sizes) + [40]}, seeds=[0, 1, 2],
        off_the_shelf={"zero_shot": 30.0, "linear_probe": 60.0}, sweep=pts,
        source_labels={"retrieved": "retrieved", "synthetic": "synthetic"}, synthetic_sets={}, dedup={},
        pool={}, adapt_config={}, templates=["photo of {}"])


def test_claim_per_size_across_sizes_and_beyond_the_maximum(tmp_path):
    rec = _record(retr=[60.0, 70.0, 75.0], syn=[50.0, 55.0, 58.0, 59.0])
    c = retrieval.claim(rec)
    assert c["verdict"] == "holds"
    assert [(r["metric"], r["size"], r["verdict"]) for r in c["per_size"]][:2] == [
        ("zero_shot", 10, "holds"), ("zero_shot", 20, "holds")]
    assert c["per_size"][0]["comparison"]["diff"] == pytest.approx(10.0)
    assert c["beyond_max"][0]["synthetic_size"] == 40 and c["beyond_max"][0]["verdict"] == "holds"
    rec2 = _record(retr=[50.0, 55.0, 56.0], syn=[60.0, 70.0, 72.0, 73.0])
    assert retrieval.claim(rec2)["verdict"] == "contradicted"
    assert len(retrieval.claim_lines(c)) == len(c["per_size"]) + len(c["across_sizes"]) + len(c["beyond_max"]) + 1
    rec.save(tmp_path)
    back = retrieval.RetrievalRecord.load(tmp_path)
    assert back == rec and retrieval.claim(back) == c
    import matplotlib
    matplotlib.use("Agg")
    fig = retrieval.plot_sweep(back)
    assert len(fig.axes) == 2


def _pool(n: int = 4) -> dict:
    """A pool as ``pool.make_pool`` returns it: ids, labels, uint8 images, captions with their kind."""
    g = torch.Generator().manual_seed(0)
    return {"ids": [f"digits/{i}" for i in range(n)], "labels": [i % 2 for i in range(n)],
            "images": torch.randint(0, 255, (n, 3, 8, 8), generator=g, dtype=torch.uint8),
            "captions": [{"caption": f"photo of {'two' if i % 2 else 'one'} hd", "kind": "correct",
                          "caption_label": i % 2} for i in range(n)]}


def test_01s_pool_index_round_trips_through_its_record_into_08(tmp_path):
    from realfake_utils import prepare

    pool = _pool()
    idx = pl.save_pool(tmp_path / "artifacts" / "data" / "pool", pool, ["one", "two"])
    assert idx.n == 4 and (tmp_path / "artifacts/data/pool/captions.jsonl").exists()
    assert pl.save_pool(tmp_path / "artifacts" / "data" / "pool", pool, ["one", "two"]).key == idx.key  # reused
    rec = _fill(prepare.PrepareRecord, class_names=["one", "two"], parts={}, base_model="", clip_model="")
    rec = prepare.PrepareRecord.build(tmp_path, {}, **{k: v for k, v in vars(rec).items() if k != "parts"}
                                      | {"pool_index": idx})
    assert rec.pool_index.path == "artifacts/data/pool"            # relative to the run folder
    rec.save(tmp_path)
    back = prepare.PrepareRecord.load(tmp_path).pool_index
    got = retrieval.load_pool(tmp_path, ["one", "two"], 8, prepared=back)
    assert got.ids == pool["ids"] and got.labels == pool["labels"] and got.source["kind"] == "01_prepare"
    assert got.captions == [c["caption"] for c in pool["captions"]] and torch.equal(got.images, pool["images"])
    moved = tmp_path.parent / "moved"
    tmp_path.rename(moved)                                          # a run folder can be moved
    assert retrieval.load_pool(moved, ["one", "two"], 8, prepared=back).ids == pool["ids"]
    Image.new("RGB", (8, 8)).save(moved / "artifacts/data/pool/images/000001.png")
    with pytest.raises(RuntimeError, match="rerun 01_prepare"):    # a changed file is caught, not trusted
        retrieval.load_pool(moved, ["one", "two"], 8, prepared=back)
    with pytest.raises(ValueError, match="set 08's pool_index"):
        retrieval.load_pool(moved, ["one", "two"], 8)
    own = retrieval.load_pool(moved, ["one", "two"], 8, pool_index=str(moved / "artifacts/data/pool"))
    assert own.source["kind"] == "pool_index" and len(own.ids) == 4


def _fill(cls, **given):
    """An instance of a record dataclass with ``given`` fields and neutral values for the other required ones."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in given or f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        t = typing.get_origin(hints[f.name]) or hints[f.name]
        kw[f.name] = {str: "", int: 0, float: 0.0, bool: False, dict: {}, list: []}.get(t)
    return cls(**{**kw, **given})


def test_sweep_sources_read_03s_record(tmp_path):
    from realfake_utils import sscd
    from realfake_utils import synthesize as syn

    images = torch.arange(6 * 3 * 4 * 4, dtype=torch.int64).reshape(6, 3, 4, 4).remainder(255).to(torch.uint8)
    art = tmp_path / "artifacts" / "synthetic"
    sets = []
    for name, row, k, s in (("base-novg-t2i", "base-novg-t2i", 1, 0), ("base-novg-t2i", "base-novg-t2i", 1, 1),
                            ("lora-dm-vg-lp", "lora-dm-vg-lp", 1, 0), ("lora-dm-vg-lp", "lora-dm-vg-lp", 2, 0)):
        d = art / name / f"k{k}" / f"s{s}"
        retrieval.write_image_set(d, images, [[0, 1], [2, 3, 4]], ["a", "b"], [f"i{i}" for i in range(6)], tag="t")
        sets.append(_fill(syn.SyntheticSet, name=name, table2_row=row, k=k, synthesis_seed=s, size=5,
                          path=str(d.relative_to(tmp_path)), complete=True))
    _fill(syn.SynthesisRecord, sets=sets, default_row="lora-dm-vg-lp").save(tmp_path)
    src = retrieval.synthetic_source(tmp_path, "base-novg-t2i", 4, "synthetic", "syn")
    assert [len(p) for p in src.per_class] == [4, 6] and src.images.shape == (10, 3, 4, 4)
    full = retrieval.synthetic_source(tmp_path, "lora-dm-vg-lp", 4, "realfake", "rf", max_k=1)
    assert [len(p) for p in full.per_class] == [2, 3]
    assert retrieval.default_set_dir(tmp_path) == art / "lora-dm-vg-lp" / "k1" / "s0"
    found, main = sscd.synthetic_sets(tmp_path, 4)
    assert main == "lora-dm-vg-lp/k1" and set(found) == {"base-novg-t2i/k1", "base-novg-t2i/k1/s1",
                                                         "lora-dm-vg-lp/k1", "lora-dm-vg-lp/k2"}
    pool = retrieval.Pool([f"p{i}" for i in range(6)], images, [""] * 6, [0, 0, 1, 1, 1, 0], {})
    task = retrieval.Task(["a", "b"], (images, torch.tensor([0, 0, 1, 1, 1, 0])), (images, torch.zeros(6)), pool, "", "")
    sources, sizes = retrieval.sweep_sources(tmp_path, task, [[0, 1], [2, 3]], "caption",
                                             {"retrieved": [2, 4], "synthetic": [2, 4, 8, 12]})
    assert [s.name for s in sources] == ["retrieved", "synthetic", "realfake"]
    assert sizes == {"retrieved": [2, 4], "synthetic": [2, 4, 8], "realfake": [2, 4]}


def test_retrieve_all_composes_exclusion_dedup_and_the_clip_score_filter_on_a_planted_pool():
    captions, img, cap, tmpl = _planted_pool()
    images = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    pool = retrieval.Pool([f"p{i}" for i in range(6)], images, captions, [0, 1, 0, 1, 1, 1], {})
    task = retrieval.Task(["zero", "one"], (images, torch.zeros(6)), (images, torch.zeros(6)), pool, "", "")
    index = retrieval.Index(None, tmpl[:, 0], img, cap, tmpl)
    exclude = torch.tensor([False, True, False, False, False, False])   # item 1 copies a test image
    picks, st = retrieval.retrieve_all(task, index, ["caption", "knn_image"], exclude=exclude, knn_per_class=0,
                                       dedup_within=1.0, clip_score_threshold=0.99)
    # knn_image, 2 per class (0: the caption matches' mean per class, 4 / 2): [[0, 2], [3, 5]] after the
    # exclusion; the 0.99 CLIP score drops item 3 (cosine 0.848 with "one")
    assert picks["knn_image"] == [[0, 2], [5]]
    k = st["knn_image"]
    assert (k.n_images, k.per_class, k.label_precision) == (3, [2, 1], 1.0)
    assert (k.test_duplicates_removed, k.removed_by_dedup, k.removed_by_clip_score) == (1, 0, 1)
    # caption: matches 0, 2, 4, 5 (1 excluded); item 4 ("zero and one") fails 0.99 in either class
    assert sorted(picks["caption"][0] + picks["caption"][1]) == [0, 2, 5]
    assert (st["caption"].test_duplicates_removed, st["caption"].removed_by_clip_score) == (1, 1)
    assert retrieval.strategy_lines(st)[1].startswith("knn_image") and "3 images" in retrieval.strategy_lines(st)[1]
