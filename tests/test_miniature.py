"""The miniature world's upstream pool (realfake_utils.pool): pool/target split, the pool's gap
(captions, image shift); and the thin ``miniature`` entry."""
from __future__ import annotations

import pytest
import torch

from realfake_utils import pool as M

torch.set_num_threads(1)
NAMES = ["zero", "one", "two", "three"]

def test_pool_and_target_are_disjoint(tmp_path):
    from realfake_utils import data

    man = data.prepare_data("digits", "", tmp_path / "data", {"pool": 0.5, "train": 0.3, "test": 0.2}, 0)
    rows = data.read_manifest(man)
    ids = {s: {r["id"] for r in rows if r["split"] == s} for s in ("pool", "train", "test")}
    assert ids["pool"] and ids["train"] and ids["test"]
    assert not ids["pool"] & ids["train"] and not ids["pool"] & ids["test"] and not ids["train"] & ids["test"]
    assert sum(len(v) for v in ids.values()) == len(rows) == 1797
    assert abs(len(ids["pool"]) / len(rows) - 0.5) < 0.01
    # every class is in the pool and in the target
    for s in ("pool", "train"):
        assert {r["label"] for r in rows if r["split"] == s} == set(range(10))


def test_captions_deterministic_and_rates():
    n = 3000
    ids = [f"item_{i}" for i in range(n)]
    labels = [i % len(NAMES) for i in range(n)]
    kw = dict(wrong_rate=0.15, missing_rate=0.25, noise_rate=0.5)
    a = M.web_captions(ids, labels, NAMES, seed=3, **kw)
    assert a == M.web_captions(ids, labels, NAMES, seed=3, **kw)
    assert a[100:200] == M.web_captions(ids[100:200], labels[100:200], NAMES, seed=3, **kw)  # per id
    assert a != M.web_captions(ids, labels, NAMES, seed=4, **kw)
    stats = M.caption_stats(a)
    assert abs(stats["wrong"] - 0.15) < 0.025 and abs(stats["missing"] - 0.25) < 0.03
    for c, y in zip(a, labels):
        words = set(c["caption"].split())
        named = {k for k, name in enumerate(NAMES) if name in words}
        if c["kind"] == "correct":
            assert named == {y} and c["caption_label"] == y
        elif c["kind"] == "wrong":
            assert named == {c["caption_label"]} and c["caption_label"] != y
        else:
            assert not named and c["caption_label"] == -1
    clean = M.web_captions(ids[:200], labels[:200], NAMES, 0, 0.0, 0.0, 0.0)
    assert all(c["kind"] == "correct" for c in clean)
    with pytest.raises(ValueError):
        M.web_captions(ids, labels, NAMES, 0, wrong_rate=0.7, missing_rate=0.5)


def test_shift_deterministic_and_shifts():
    x = torch.zeros(12, 3, 16, 16, dtype=torch.uint8)
    x[:, :, 4:12, 7:9] = 255  # a bar on black
    x[6:] = 255 - x[6:]       # dark ink on white
    ids = [str(i) for i in range(12)]
    y1, st1 = M.shift_images(x, ids, 0, M.DEFAULT_SHIFT)
    y2, st2 = M.shift_images(x, ids, 0, M.DEFAULT_SHIFT)
    assert torch.equal(y1, y2) and st1 == st2 and y1.dtype == torch.uint8 and y1.shape == x.shape
    assert (y1.float() - x.float()).abs().mean() > 5
    same, _ = M.shift_images(x, ids, 0, {})
    assert torch.equal(same, x)
    # thickening adds ink pixels in both polarities
    thick, styles = M.shift_images(x, ids, 0, {"thicken": 1.0, "thicken_prob": 1.0})
    ink = lambda im, bright: ((im.float().mean(1) > 127) == bright).sum().item()  # noqa: E731
    assert ink(thick[:6], True) > ink(x[:6], True) and ink(thick[6:], False) > ink(x[6:], False)
    assert all("bold" in s for s in styles)
    with pytest.raises(ValueError):
        M.shift_images(x, ids, 0, {"blur": 1.0})


def test_miniature_entry_reexports_the_split_modules():
    from realfake_utils import miniature, prepare, pretrain, probe

    assert miniature.make_pool is M.make_pool and miniature.build_miniature is pretrain.build_miniature
    assert miniature.PrepareRecord is prepare.PrepareRecord and miniature.sample_base is probe.sample_prompts
