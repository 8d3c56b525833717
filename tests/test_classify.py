"""Classifier training: recipes, timm model building, metrics, resumable training, sweeps."""
import json
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
    assert mini["decay_milestones"] == [4, 8, 11] and mini["train_size"] == mini["test_size"] == 16
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


def test_discover_sets_and_summarise(tmp_path):
    root = tmp_path / "synthetic"
    make_set(root / "realfake" / "k1", n_per_class=1)
    make_set(root / "realfake" / "k2", n_per_class=2)
    make_set(root / "vanilla" / "k1", n_per_class=1)
    (root / "partial" / "k1").mkdir(parents=True)           # no manifest yet: not a finished set
    sets = C.discover_sets(root)
    assert sorted(sets) == ["realfake", "vanilla"] and sorted(sets["realfake"]) == [1, 2]
    recs = [{"table": "t1", "row": "real", "k": 0, "top1": v} for v in (0.8, 0.9, 1.0)]
    s = C.summarise(recs)[0]
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1) and s["n"] == 3


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
