"""Classifier training: recipes, timm model building, metrics, resumable training, sweeps."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from realfake_utils import classify as C

torch.set_num_threads(1)
TINY = {"channels": [8, 8, 8, 8], "stem_width": 8}


def tiny_recipe(**kw):
    base = dict(epochs=3, batch_size=16, model_kwargs=TINY, scale=[0.9, 1.0])
    base.update(kw)
    return C.load_recipe("miniature", image_size=8, **base)


def make_set(root: Path, n_per_class=12, size=8, seed=0, classes=("red", "blue")) -> Path:
    """A fake synthetic set: real PNG files + manifest.jsonl rows (the synthesis helper's format)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            arr[..., 0 if label == 0 else 2] += 180
            f = f"{name}/{i:04d}.png"
            Image.fromarray(arr).save(root / f)
            rows.append({"file": f, "label": label, "class_name": name, "source_id": f"r{i}", "round": 0,
                         "seed": i, "prompt": f"photo of {name}", "lora": "", "settings_hash": "x"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_recipes_are_data():
    names = C.list_recipes()
    for n in ("imagenette", "imagenet100", "imagenet1k", "cub", "cars", "pets", "eurosat", "miniature"):
        assert n in names
    sgd = C.load_recipe("imagenette")
    assert (sgd["opt"], sgd["lr"], sgd["weight_decay"], sgd["decay_rate"]) == ("sgd", 0.1, 5e-4, 0.2)
    assert sgd["decay_milestones"] == [50, 100, 150] and sgd["model"] == "resnet50"
    in1k = C.load_recipe("imagenet1k")
    assert (in1k["opt"], in1k["sched"], in1k["lr"], in1k["mixup"], in1k["cutmix"]) == ("lamb", "cosine", 5e-3, 0.2, 1.0)
    assert in1k["bce_loss"] and in1k["auto_augment"].startswith("rand-m7-mstd0.5") and in1k["drop_path_rate"] > 0
    assert C.load_recipe("cub")["pretrained"] and not C.load_recipe("eurosat")["pretrained"]
    mini = C.load_recipe("miniature", image_size=16)
    assert mini["decay_milestones"] == [2, 5, 8] and mini["train_size"] == mini["test_size"] == 16
    with pytest.raises(KeyError, match="lr_typo"):
        C.load_recipe("miniature", image_size=16, lr_typo=1)


def test_factories_build_from_recipe():
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    r = C.load_recipe("imagenet1k")
    model = C.build_model(dict(r, model="resnet10t", model_kwargs=TINY), num_classes=5)
    opt = create_optimizer_v2(model.net, opt=r["opt"], lr=r["lr"], weight_decay=r["weight_decay"])
    assert type(opt).__name__ == "Lamb"
    sched, n = create_scheduler_v2(opt, sched=r["sched"], num_epochs=r["epochs"],
                                   warmup_epochs=r["warmup_epochs"], warmup_lr=r["warmup_lr"])
    sched.step(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(r["warmup_lr"])
    train_tf, _ = C.build_transforms(dict(r, train_size=32, test_size=32))
    assert "RandAugment" in repr(train_tf)
    mini = tiny_recipe()
    m = C.build_model(mini, 3)
    opt = create_optimizer_v2(m.net, opt="sgd", lr=0.1, weight_decay=0, momentum=0.9)
    sched, _ = create_scheduler_v2(opt, sched="multistep", num_epochs=20, decay_milestones=[5, 10, 15],
                                   decay_rate=0.2)
    lrs = []
    for e in (0, 5, 10, 15):
        sched.step(e)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.02, 0.004, 0.0008])


def test_predict_logits_uint8_and_resize():
    m = C.build_model(tiny_recipe(), 4).eval()
    x = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    logits = C.predict_logits(m, x, batch_size=2)
    assert logits.shape == (5, 4) and logits.dtype == torch.float32
    same = C.predict_logits(m, C.torch.nn.functional.interpolate(x.float() / 255, size=(8, 8),
                                                                 mode="bilinear", antialias=True))
    assert torch.allclose(logits, same, atol=1e-4)


def test_accuracy_metrics_and_restriction():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0],    # argmax 1
                           [3.0, 0.0, 2.0, 1.0],    # argmax 0
                           [0.0, 9.0, 0.0, 1.0]])   # argmax 1, but 3 within {0, 2, 3}
    labels = torch.tensor([1, 2, 3])
    m = C.accuracy_metrics(logits, labels, 4)
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == 1.0
    assert m["per_class"] == [None, 1.0, 0.0, 0.0]
    assert m["confusion"][2][0] == 1 and m["confusion"][3][1] == 1
    r = C.accuracy_metrics(logits, labels, 4, allowed=[0, 2, 3])
    assert r["confusion"][3][3] == 1 and r["top1"] == pytest.approx(1 / 3)   # 3rd now right, 1st wrong


def test_train_on_synthetic_folder_resumable_and_cached(tmp_path):
    syn = make_set(tmp_path / "syn", seed=0)
    test = make_set(tmp_path / "test", n_per_class=6, seed=1)
    recipe = tiny_recipe(epochs=6, lr=0.05, batch_size=8)
    train = C.FileImages(C.read_image_set(syn), 8)
    test_ds = C.FileImages(C.read_image_set(test), 8)
    out = tmp_path / "run"
    m = C.train_classifier(out, train, test_ds, 2, recipe, seed=3, device="cpu",
                           info={"source": "synthetic", "k": 1}, class_names=["red", "blue"])
    assert m["top1"] >= 0.9, m["top1"]
    assert m["info"]["k"] == 1 and len(m["history"]) == 6 and m["train_time_s"] > 0
    assert {"config.json", "last.pt", "model.pt", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob(".*tmp*"))
    # finished: read back, no training
    again = C.train_classifier(out, None, None, 2, recipe, seed=3)
    assert again["top1"] == m["top1"]
    model = C.load_classifier(out)
    x, y = C.to_uint8(test_ds, 8)
    assert (C.predict_logits(model, x).argmax(1) == y).float().mean().item() == pytest.approx(m["top1"])
    fig = C.confusion_figure(m["confusion"], ["red", "blue"])
    assert fig.axes


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_classify import tiny_recipe
    from realfake_utils import classify as C
    r = tiny_recipe(epochs=12, lr=0.05)
    tr = C.FileImages(C.read_image_set({syn!r}), 8)
    C.train_classifier({out!r}, tr, None, 2, r, seed=7, device="cpu")
""")


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    syn = make_set(tmp_path / "syn", n_per_class=8)
    recipe = tiny_recipe(epochs=12, lr=0.05)
    tr = C.FileImages(C.read_image_set(syn), 8)
    te = C.FileImages(C.read_image_set(syn), 8)
    killed = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), syn=str(syn), out=str(killed))
    # the child SIGKILLs itself right after the checkpoint of its 3rd epoch (rundir.unit_finished)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "REALFAKE_KILL_AFTER_UNITS": "epoch:3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] == 3
    assert not (killed / "metrics.json").exists()
    resumed = C.train_classifier(killed, tr, te, 2, recipe, seed=7, device="cpu")
    full = C.train_classifier(tmp_path / "full", tr, te, 2, recipe, seed=7, device="cpu")
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]], rel=1e-4)
    assert resumed["top1"] == full["top1"] and resumed["confusion"] == full["confusion"]
    a = torch.load(killed / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_stop_after_epoch_then_resume(tmp_path):
    syn = make_set(tmp_path / "syn", n_per_class=4)
    tr = C.FileImages(C.read_image_set(syn), 8)
    r = tiny_recipe(epochs=3)
    out = tmp_path / "r"
    assert C.train_classifier(out, tr, tr, 2, r, seed=0, stop_after_epoch=1) == {"stopped_after_epoch": 1}
    m = C.train_classifier(out, tr, tr, 2, r, seed=0)
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]


def test_mixup_bce_recipe_trains(tmp_path):
    syn = make_set(tmp_path / "syn", n_per_class=8)
    tr = C.FileImages(C.read_image_set(syn), 8)
    r = tiny_recipe(epochs=2, mixup=0.2, cutmix=1.0, label_smoothing=0.1, bce_loss=True,
                    auto_augment="rand-m7-mstd0.5-inc1", opt="lamb", lr=5e-3, sched="cosine",
                    warmup_epochs=1, batch_size=15)
    m = C.train_classifier(tmp_path / "mx", tr, tr, 2, r, seed=0)
    assert np.isfinite(m["history"][-1]["loss"])


def test_pretrained_weights_from_local_file(tmp_path):
    import timm

    src = timm.create_model("resnet10t", num_classes=1000, **TINY)
    path = tmp_path / "r10t.pth"
    torch.save(src.state_dict(), path)
    r = tiny_recipe(pretrained=True)
    m = C.build_model(r, 3, pretrained_path=str(path))
    assert torch.equal(m.net.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert m.net.fc.out_features == 3
    with pytest.raises(ValueError, match="pretrained_path"):
        C.build_model(r, 3)


def _run(source, tables, k, ss, seed, top1, row=""):
    return C.ClassifierRun(source=source, tables=tables, k=k, synthesis_seed=ss, classifier_seed=seed, top1=top1,
                           top5=1.0, n_train=10 * max(k, 1), path=f"c/{source}{k}{ss}{seed}", table2_row=row)


def test_table2_effects_are_paired_and_fig2_marks_the_crossover(tmp_path):
    from realfake_utils import stats

    a = [0.50, 0.60, 0.55, 0.52]   # (synthesis seed, classifier seed) = (0,0) (0,1) (1,0) (1,1)
    b = [0.58, 0.66, 0.60, 0.61]
    keys = [(0, 0), (0, 1), (1, 0), (1, 1)]
    runs = [_run("base-novg-t2i", ["table2"], 1, ss, s, v, "base-novg-t2i") for (ss, s), v in zip(keys, a)]
    runs += [_run("lora-nodm-novg-t2i", ["table2"], 1, ss, s, v, "lora-nodm-novg-t2i")
             for (ss, s), v in reversed(list(zip(keys, b)))]   # order in the record does not matter
    (eff,) = C.table2_effects(runs)
    ref = stats.paired([100 * x for x in a], [100 * x for x in b])
    assert eff.name == "LoRA fine-tuning" and eff.n == 4
    assert (eff.diff, eff.lo, eff.hi) == pytest.approx((ref.diff, ref.lo, ref.hi))
    assert eff.verdict == "holds"
    # Fig. 2: synthetic only crosses the real line between k = 2 and k = 5 (interpolated in log k)
    assert C.crossover_k([1, 2, 5], [80.0, 90.0, 100.0], 95.0) == pytest.approx(math.exp(
        math.log(2) + 0.5 * (math.log(5) - math.log(2))))
    assert C.crossover_k([1, 2], [80.0, 90.0], 95.0) is None
    assert C.crossover_k([1, 2], [96.0, 99.0], 95.0) == 1.0
    runs += [_run("real", ["table1"], 0, None, s, 0.9) for s in (0, 1)]
    runs += [_run("lora-dm-vg-lp", ["table1", "table2", "table3"] if k == 1 else ["table3"], k, 0, s,
                  {1: 0.8, 2: 0.88, 5: 0.95}[k] + 0.01 * s, "lora-dm-vg-lp") for k in (1, 2, 5) for s in (0, 1)]
    rec = C.ClassifierRecord(runs=runs, recipe={"name": "x"}, seeds=[0, 1], default_row="lora-dm-vg-lp",
                             scale_k=[1, 2, 5], n_real_train=10, effects=C.table2_effects(runs))
    pts = C.scaling_points(rec)
    assert pts["k"] == [1, 2, 5] and pts["real"].n == 2 and 2 < pts["crossover_k"] < 5
    fig = C.plot_scaling(rec, paper={1: 70.9, 2: 72.9}, paper_crossover=2.5)
    assert any("crosses real" in t.get_text() for t in fig.axes[0].texts)
    rec.save(tmp_path)
    assert C.ClassifierRecord.load(tmp_path) == rec
    lines = C.table_lines(rec, "table2")
    assert [ln["source"] for ln in lines] == ["base-novg-t2i", "lora-nodm-novg-t2i", "lora-dm-vg-lp"]
    assert lines[0]["estimate"].n == 4


def test_train_tables_reads_03s_record_pairs_seeds_and_reuses_by_content(tmp_path):
    from realfake_utils import data
    from realfake_utils import synthesize as syn
    from realfake_utils.rundir import RunDir

    run = RunDir("test", tmp_path / "run")
    manifest = data.prepare_data("digits", "", run.artifacts / "data", {"pool": 0.8, "train": 0.1, "test": 0.1},
                                 seed=0)
    rows = data.read_manifest(manifest)
    names = data.class_names(rows)
    train = [r for r in rows if r["split"] == "train"]
    sets = []
    for row, ss in (("base-novg-t2i", 0), ("base-novg-t2i", 1), ("lora-dm-vg-lp", 0), ("lora-dm-vg-lp", 1)):
        d = syn.set_folder(run.artifacts / "synthetic", row, 1, ss)
        d.mkdir(parents=True)
        out = []
        for i, r in enumerate(train):   # stand-in "synthetic" images: the real ones (format test only)
            img, _ = data.ImageDataset([r], 8)[0]
            img.save(d / f"{i}.png")
            out.append({"file": f"{i}.png", "label": r["label"], "class_name": names[r["label"]]})
        data.write_image_set(d, out)
        sets.append(syn.SyntheticSet(name=row, table2_row=row, row=syn.row_switches(row), variant=syn.lora_variant(row),
                                     k=1, synthesis_seed=ss, size=len(out), n_real_train=len(train),
                                     path=syn.Record.rel(run, d), complete=True))
    syn.SynthesisRecord(sets=sets, default_row="lora-dm-vg-lp", rows=["base-novg-t2i", "lora-dm-vg-lp"],
                        scale_k=[1], synthesis_seeds=[0, 1], n_real_train=len(train)).save(run)
    recipe = tiny_recipe(epochs=1)
    rec = C.train_tables(run, recipe, [0, 1], device="cpu", verbose=False)
    # real x 2 seeds + default k=1 synthetic (2 synthesis seeds x 2) + real+default (2 x 2) + base (2 x 2)
    assert len(rec.runs) == 2 + 4 + 4 + 4
    assert {r.classifier_seed for r in rec.runs if r.source == "base-novg-t2i"} == \
        {r.classifier_seed for r in rec.runs if r.source == "lora-dm-vg-lp"} == {0, 1}
    both = [r for r in rec.runs if r.source == "real+lora-dm-vg-lp"]
    assert all(r.n_train == 2 * len(train) for r in both) and len(both) == 4   # Apx. G.2: twice the data
    syn_runs = [r for r in rec.runs if r.source == "lora-dm-vg-lp"]
    # trained once, listed in every table it belongs to (Table 3 / Fig. 2: the first synthesis seed)
    assert [r.tables for r in syn_runs] == [["table1", "table2", "table3"]] * 2 + [["table1", "table2"]] * 2
    (eff,) = [e for e in rec.effects if e.name == "full method vs vanilla base"]
    assert eff.n == 4
    assert not any(p.is_absolute() for p in map(Path, (r.path for r in rec.runs)))
    # rerun: every classifier read back (same recipe, seed, source content)
    again = C.train_tables(run, recipe, [0, 1], device="cpu", verbose=False)
    assert [r.top1 for r in again.runs] == [r.top1 for r in rec.runs]
    assert sum(r.train_time_s for r in again.runs) == sum(r.train_time_s for r in rec.runs)
    # other content in a set -> its classifiers are retrained, the others are not
    d = run.root / sets[0].path
    (d / "0.png").write_bytes((d / "1.png").read_bytes())
    key_before = C.run_key(C.RunSpec("base-novg-t2i", [C.Source("synthetic", str(d))]), recipe)
    data.write_image_set(d, data.read_image_set(d)[1:])
    assert C.run_key(C.RunSpec("base-novg-t2i", [C.Source("synthetic", str(d))]), recipe) != key_before


def test_run_experiments_digits_real_and_synthetic(tmp_path):
    from realfake_utils import data
    manifest = data.prepare_data("digits", "", tmp_path / "data", {"pool": 0.5, "train": 0.3, "test": 0.2}, seed=0)
    rows = data.read_manifest(manifest)
    names = data.class_names(rows)
    train_rows = [r for r in rows if r["split"] == "train"][:40]
    syn = tmp_path / "syn"
    syn.mkdir()
    ds = data.ImageDataset(train_rows, 8)
    out_rows = []
    for i in range(len(ds)):
        img, y = ds[i]
        img.save(syn / f"{i}.png")
        out_rows.append({"file": f"{i}.png", "label": y, "class_name": names[y]})
    (syn / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    recipe = tiny_recipe(epochs=1)
    specs = [C.RunSpec("synthetic", [C.Source("synthetic", str(syn), k=1)], seed=0, k=1, table="t1"),
             C.RunSpec("real+synthetic", [C.Source("real", str(manifest)), C.Source("synthetic", str(syn), k=1)],
                       seed=0, k=1, table="t1")]
    recs = C.run_experiments(specs, manifest, tmp_path / "clf", recipe, device="cpu", verbose=False)
    assert [r["row"] for r in recs] == ["synthetic", "real+synthetic"]
    assert recs[1]["n_train"] == recs[0]["n_train"] + sum(r["split"] == "train" for r in rows)
    again = C.run_experiments(specs, manifest, tmp_path / "clf", recipe, device="cpu", verbose=False)
    assert [r["top1"] for r in again] == [r["top1"] for r in recs]
