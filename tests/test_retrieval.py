"""Retrieval baseline: caption matching, CLIP k-NN, exclusivity, test de-duplication, set writing."""
import json

import pytest
import torch
from PIL import Image

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
