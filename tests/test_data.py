"""realfake_utils.data: loaders, splits, manifest, exclusion of bad files, image geometry."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from realfake_utils import data as D

EUROSAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "eurosat-rgb-mini"
FRACTIONS = {"pool": 0.2, "train": 0.5, "test": 0.3}


def _save(path: Path, color=(200, 30, 30), size=(20, 12), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def _tree(root: Path, per_class=4, classes=("n01440764", "n02102040", "n02979186")):
    for c, wnid in enumerate(classes):
        for i in range(per_class):
            _save(root / wnid / f"{wnid}_{i}.png", color=(40 * c, 100, 200 - 40 * i))
    return root


# ---------------------------------------------------------------- digits

def test_digits_shapes_labels_ranges():
    rows, excluded, names = D.scan("digits")
    assert len(rows) == 1797 and excluded == []
    assert names == list(D.DIGIT_NAMES) and names[7] == "seven"
    assert {r["label"] for r in rows} == set(range(10))
    assert all(r["path"] == "" and r["class_name"] == names[r["label"]] for r in rows)
    for size in (8, 16, 32):
        x = D.load_images(rows[:20], size)
        assert x.shape == (20, 3, size, size) and x.dtype == torch.uint8
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey as RGB
        assert int(x.min()) == 0 and int(x.max()) == 255
    from sklearn.datasets import load_digits
    raw = load_digits().images[:20]
    expected = np.round(raw * 255 / 16).astype(np.uint8)
    assert np.array_equal(D.load_images(rows[:20], 8)[:, 0].numpy(), expected)


def test_digits_upsampling_keeps_the_digit():
    x8 = D.digits_array(range(50), 8).float()
    x16 = D.digits_array(range(50), 16).float()
    down = torch.nn.functional.avg_pool2d(x16, 2)
    corr = torch.corrcoef(torch.stack([down.flatten(), x8.flatten()]))[0, 1]
    assert corr > 0.9  # bilinear upsampling keeps the 8x8 content (smoothed strokes)
    assert x16.flatten(1).float().std(1).min() > 30  # not washed out


# ---------------------------------------------------------------- splits and manifest

def test_split_deterministic_stratified_disjoint():
    rows, _, _ = D.scan("digits")
    a = D.split_rows(rows, FRACTIONS, seed=0)
    b = D.split_rows(list(reversed(rows)), FRACTIONS, seed=0)  # input order does not matter
    c = D.split_rows(rows, FRACTIONS, seed=1)
    assert a == b and a != c
    ids = {s: {r["id"] for r in a if r["split"] == s} for s in D.SPLITS}
    assert not (ids["pool"] & ids["train"]) and not (ids["pool"] & ids["test"]) \
        and not (ids["train"] & ids["test"])
    assert sum(len(v) for v in ids.values()) == len(rows)
    for label in range(10):
        n = sum(1 for r in rows if r["label"] == label)
        for s, f in FRACTIONS.items():
            k = sum(1 for r in a if r["label"] == label and r["split"] == s)
            assert abs(k - f * n) <= 1, (label, s, k, f * n)


def test_split_pool_zero_and_partial_fractions():
    rows, _, _ = D.scan("digits")
    a = D.split_rows(rows, {"pool": 0.0, "train": 0.8, "test": 0.2}, seed=0)
    assert {r["split"] for r in a} == {"train", "test"} and len(a) == len(rows)
    small = D.split_rows(rows, {"train": 0.02, "test": 0.01}, seed=0)  # a smoke-size subset
    counts = D.count_table(small)
    assert all(counts[n]["train"] >= 3 and counts[n]["test"] >= 1 for n in D.DIGIT_NAMES)
    assert len(small) < 100
    with pytest.raises(D.DataError, match="sum to"):
        D.split_rows(rows, {"train": 0.8, "test": 0.3}, seed=0)
    with pytest.raises(D.DataError, match="unknown split"):
        D.split_rows(rows, {"val": 0.5}, seed=0)


def test_manifest_round_trip(tmp_path, capsys):
    path = D.prepare_data("digits", "", tmp_path / "data", FRACTIONS, seed=3)
    assert path == tmp_path / "data" / "manifest.csv"
    out = capsys.readouterr().out
    assert "1797 images in 10 classes, 0 excluded" in out and "seven" in out
    rows = D.read_manifest(path)
    assert rows == D.read_manifest(tmp_path / "data")  # folder or file
    assert rows == D.split_rows(D.scan("digits")[0], FRACTIONS, seed=3)
    assert set(rows[0]) == set(D.MANIFEST_FIELDS)
    assert isinstance(rows[0]["label"], int) and isinstance(rows[0]["index"], int)
    D.write_manifest(rows, tmp_path / "copy.csv")
    assert D.read_manifest(tmp_path / "copy.csv") == rows
    assert (tmp_path / "copy.csv").read_bytes() == path.read_bytes()
    assert D.read_manifest(path, split="test") == [r for r in rows if r["split"] == "test"]
    info = D.read_info(tmp_path / "data")
    assert info["num_classes"] == 10 and info["counts"]["total"]["train"] == \
        sum(r["split"] == "train" for r in rows)
    assert D.class_names(rows) == list(D.DIGIT_NAMES)
    with pytest.raises(FileNotFoundError, match="01_prepare"):
        D.read_manifest(tmp_path / "nowhere" / "manifest.csv")
    mtime = path.stat().st_mtime_ns
    D.prepare_data("digits", "", tmp_path / "data", FRACTIONS, seed=3)  # rerun: same split, file kept
    assert path.stat().st_mtime_ns == mtime
    D.prepare_data("digits", "", tmp_path / "data", FRACTIONS, seed=4)
    assert D.read_manifest(path) != rows


# ---------------------------------------------------------------- EuroSAT (real subset)

@pytest.mark.skipif(not EUROSAT.exists(), reason=f"EuroSAT mini subset not found at {EUROSAT} "
                    "(expected ../shared/data/eurosat-rgb-mini beside the checkout)")
def test_eurosat_real_subset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative root is taken from the repository root
    rows, excluded, names = D.scan("eurosat", "../shared/data/eurosat-rgb-mini", check_images=False)
    assert len(rows) == 10000 and excluded == []
    assert names[0] == "Annual Crop Land" and names[-1] == "Sea or Lake" and len(names) == 10
    rows2, _, _ = D.scan("eurosat", EUROSAT / "2750", check_images=False)  # root at 2750/ directly
    assert [r["id"] for r in rows2] == [r["id"] for r in rows]
    split = D.split_rows(rows, FRACTIONS, seed=0)
    counts = D.count_table(split)
    assert all(counts[n] == {"pool": 200, "train": 500, "test": 300} for n in names)
    sample = [r for r in split if r["split"] == "test"][::150]
    x = D.load_images(sample, 32)
    assert x.shape == (len(sample), 3, 32, 32) and x.dtype == torch.uint8 and x.float().std() > 5
    ds = D.ImageDataset(sample, 64)
    img, label = ds[0]
    assert img.size == (64, 64) and img.mode == "RGB" and label == sample[0]["label"]
    full = D.load_images(sample[:3], 64)
    assert torch.equal(full[0], torch.from_numpy(np.array(img)).permute(2, 0, 1))


# ---------------------------------------------------------------- imagefolder: bad files, errors

def test_imagefolder_excludes_corrupt_and_non_image(tmp_path, capsys):
    root = _tree(tmp_path / "tree")
    good = root / "n01440764" / "good.jpg"
    _save(good, size=(32, 32), fmt="JPEG")
    bad = root / "n01440764" / "truncated.jpg"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (root / "n02102040" / "notes.txt").write_text("not an image")
    (root / "n02979186" / "fake.png").write_bytes(b"this is not a png at all")
    (root / "n02979186" / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored silently
    out = tmp_path / "data"
    D.prepare_data("imagefolder", root, out, {"train": 0.5, "test": 0.5}, seed=0)
    printed = capsys.readouterr()
    assert "13 images in 3 classes, 3 excluded" in printed.out
    assert "truncated.jpg" in printed.err
    ex = {Path(e["path"]).name: e["reason"] for e in D.read_excluded(out)}
    assert set(ex) == {"truncated.jpg", "notes.txt", "fake.png"}
    assert "truncated" in ex["truncated.jpg"].lower()
    assert "not an image file" in ex["notes.txt"]
    assert "cannot identify" in ex["fake.png"]
    rows = D.read_manifest(out)
    assert len(rows) == 13 and not any("truncated" in r["id"] for r in rows)
    assert D.count_table(rows)["n01440764"] == {"pool": 0, "train": 3, "test": 2}
    assert len(D.load_images(rows, 8)) == 13


def test_wnid_map_names(tmp_path):
    root = _tree(tmp_path / "tree", per_class=2)
    (tmp_path / "map.txt").write_text("n01440764 tench, Tinca tinca\nn02102040 English springer\n"
                                      "n02979186 cassette player\n")
    _, _, names = D.scan("imagefolder", root, tmp_path / "map.txt", check_images=False)
    assert names == ["tench", "English springer", "cassette player"]
    (tmp_path / "map.json").write_text(json.dumps({"n01440764": "tench", "n02979186": "cassette player"}))
    rows, _, names = D.scan("imagefolder", root, tmp_path / "map.json", check_images=False)
    assert names == ["tench", "n02102040", "cassette player"]  # unmapped folder keeps its name
    assert {r["class_name"] for r in rows if r["label"] == 0} == {"tench"}
    (tmp_path / "index.json").write_text(json.dumps({"0": ["n01440764", "tench"],
                                                     "1": ["n02102040", "English_springer"]}))
    _, _, names = D.scan("imagefolder", root, tmp_path / "index.json", check_images=False)
    assert names[:2] == ["tench", "English springer"]
    _, _, names = D.scan("imagefolder", root, check_images=False)
    assert names == ["n01440764", "n02102040", "n02979186"]
    assert D.readable_name("001.Black_footed_Albatross") == "Black footed Albatross"


def test_empty_class_missing_root_no_folders(tmp_path):
    root = _tree(tmp_path / "tree", per_class=2)
    (root / "n09999999").mkdir()
    (root / "n09999999" / "broken.jpg").write_bytes(b"\xff\xd8\xff nothing")
    with pytest.raises(D.DataError, match=r"n09999999 has no readable images \(1 file"):
        D.prepare_data("imagefolder", root, tmp_path / "d", FRACTIONS, 0)
    with pytest.raises(D.DataError, match=r"does not exist.*data_root"):
        D.prepare_data("imagefolder", tmp_path / "missing", tmp_path / "d", FRACTIONS, 0)
    with pytest.raises(D.DataError, match=r"missing.*2750"):
        D.scan("eurosat", tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat" / "a.png")
    with pytest.raises(D.DataError, match=r"no class folders.*<class>"):
        D.scan("imagefolder", tmp_path / "flat")
    with pytest.raises(D.DataError, match="needs data_root"):
        D.scan("eurosat", "")
    with pytest.raises(D.DataError, match="unknown dataset"):
        D.scan("mnist")
    assert not (tmp_path / "d" / "manifest.csv").exists()


# ---------------------------------------------------------------- geometry

def test_resize_center_crop_keeps_aspect():
    # 60x30 (w x h): left third red, middle third green, right third blue
    a = np.zeros((30, 60, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:40] = (0, 255, 0)
    a[:, 40:] = (0, 0, 255)
    out = np.asarray(D.resize_center_crop(Image.fromarray(a), 16))
    assert out.shape == (16, 16, 3)
    # height 30 -> 16, width 60 -> 32, crop x in [8, 24): green spans [~10.7, ~21.3) of the 32
    assert (out[:, 5:11, 1] > 200).all() and (out[:, 5:11, 0] < 40).all()  # centre is green
    assert (out[:, 0, 0] > 150).all() and (out[:, 0, 1] < 100).all()  # left edge: red side
    assert (out[:, -1, 2] > 150).all() and (out[:, -1, 1] < 100).all()  # right edge: blue side
    tall = np.asarray(D.resize_center_crop(Image.fromarray(a.transpose(1, 0, 2).copy()), 16))
    assert (tall[5:11, :, 1] > 200).all() and (tall[0, :, 0] > 150).all()  # same along y
    grey = D.resize_center_crop(Image.new("L", (10, 40), 128), 8)
    assert grey.mode == "RGB" and grey.size == (8, 8)


def test_load_images_files_cache(tmp_path):
    root = _tree(tmp_path / "tree", per_class=3)
    rows = D.split_rows(D.scan("imagefolder", root)[0], {"train": 1.0}, 0)
    cache = tmp_path / "c.safetensors"
    x = D.load_images(rows, 12, cache=cache)
    assert x.shape == (9, 3, 12, 12) and cache.exists()
    assert torch.equal(D.load_images(rows, 12, cache=cache), x)
    assert D.load_images(rows[:4], 12, cache=cache).shape[0] == 4  # key mismatch: reloaded
    assert torch.equal(x[0, :, 0, 0], torch.tensor([0, 100, 200], dtype=torch.uint8))
    assert tuple(D.load_images([], 12).shape) == (0, 3, 12, 12)
    D.write_manifest(rows, tmp_path / "data" / "manifest.csv")
    images, labels, split = D.load_split(tmp_path / "data", "train", 12)
    assert torch.equal(images, x) and labels.tolist() == [r["label"] for r in rows] and split == rows
    assert (tmp_path / "data" / "cache" / "train_12.safetensors").exists()
    digit_rows = D.scan("digits")[0][:2]
    mixed = D.load_images([digit_rows[0], rows[0], digit_rows[1]], 12)  # real digits + PNG files
    assert torch.equal(mixed[1], x[0]) and torch.equal(mixed[[0, 2]], D.load_images(digit_rows, 12))


def test_jpeg_draft_matches_full_decode(tmp_path):
    yy, xx = np.mgrid[0:300, 0:400]
    a = np.stack([xx * 255 // 400, yy * 255 // 300, (xx + yy) * 255 // 700], -1).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "big.jpg", quality=95)
    fast = np.asarray(D.open_image(tmp_path / "big.jpg", 32)).astype(float)
    full = np.asarray(D.resize_center_crop(Image.open(tmp_path / "big.jpg"), 32)).astype(float)
    assert fast.shape == (32, 32, 3) and np.abs(fast - full).mean() < 3


def test_image_dataset_with_dataloader():
    rows = D.split_rows(D.scan("digits")[0], {"train": 0.01}, 0)
    ds = D.ImageDataset(rows, 16, transform=lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1))
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
    assert torch.equal(x, D.load_images(rows, 16)) and y.tolist() == [r["label"] for r in rows]
    assert D.ImageDataset(rows, 0)[0][0].size == (8, 8)


def test_image_dataset_native_size(tmp_path):
    _save(tmp_path / "t" / "a" / "x.png", size=(30, 20))
    rows = D.split_rows(D.scan("imagefolder", tmp_path / "t")[0], {"train": 1.0}, 0)
    assert D.ImageDataset(rows, None)[0][0].size == (30, 20)
    assert D.ImageDataset(rows, 16)[0][0].size == (16, 16)


def test_separate_test_root_and_split_folder_hint(tmp_path, capsys):
    train = _tree(tmp_path / "imnet" / "train", per_class=4)
    val = _tree(tmp_path / "imnet" / "val", per_class=2, classes=("n01440764", "n02979186"))
    with pytest.raises(D.DataError, match=r"split folders.*imnet/train"):
        D.scan("imagefolder", tmp_path / "imnet")
    with pytest.raises(D.DataError, match="test fraction to 0"):
        D.prepare_data("imagefolder", train, tmp_path / "d", FRACTIONS, 0, test_root=val)
    path = D.prepare_data("imagefolder", train, tmp_path / "d", {"pool": 0.25, "train": 0.75}, 0,
                          test_root=val)
    rows = D.read_manifest(path)
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) == 4 and {r["label"] for r in test} == {0, 2}  # labels follow train folders
    assert all(r["id"].startswith("test/") and "/val/" in r["path"] for r in test)
    assert len({r["index"] for r in rows}) == len(rows) == 16
    assert D.count_table(rows)["n02102040"] == {"pool": 1, "train": 3, "test": 0}
    _save(val / "n07999999" / "x.png")
    with pytest.raises(D.DataError, match="n07999999"):
        D.prepare_data("imagefolder", train, tmp_path / "d", {"train": 1.0}, 0, test_root=val)
