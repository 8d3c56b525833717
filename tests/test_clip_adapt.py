"""CLIP adaptation (Geng et al. 2024's learner): zero-shot head, end-to-end fine-tuning, linear probe."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from realfake_utils import clip_adapt
from realfake_utils.models import build_tokenizer
from realfake_utils.miniature import build_clip

CLASSES = ["red", "blue"]


def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A separable toy task: class 0 = reddish images, class 1 = bluish images (with noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    base = torch.rand(n, 3, 8, 8, generator=g) * 80
    base[labels == 0, 0] += 150
    base[labels == 1, 2] += 150
    return base.clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    tok = build_tokenizer(CLASSES + ["photo", "of", "a", "image"], tmp_path_factory.mktemp("tok"), 8)
    model = build_clip(tok, image_size=8, width=16, layers=1, heads=2, patch_size=4, seed=0).eval()
    return model, tok


def test_zero_shot_head_is_normalised_prompt_ensemble(tiny_clip):
    model, tok = tiny_clip
    head = clip_adapt.zero_shot_head(model, tok, CLASSES, ["photo of {}", "a {}"])
    assert head.shape == (2, model.config.projection_dim)
    assert torch.allclose(head.norm(dim=1), torch.ones(2), atol=1e-5)
    single = clip_adapt.zero_shot_head(model, tok, CLASSES, ["photo of {}"])
    assert not torch.allclose(head, single)  # the templates are averaged, not the first one taken


def test_adaptation_improves_zero_shot_accuracy_on_a_separable_task(tiny_clip):
    model, tok = tiny_clip
    head = clip_adapt.zero_shot_head(model, tok, CLASSES, ["photo of {}", "image of {}"])
    x, y = _toy(128, 0)
    xt, yt = _toy(128, 1)
    before = clip_adapt.zero_shot_accuracy(model, head, xt, yt)
    cfg = clip_adapt.AdaptConfig(lr=3e-3, batch_size=32, epochs=8, weight_decay=0.1, warmup_steps=4)
    adapted, losses = clip_adapt.adapt(model, head, x, y, cfg, seed=0)
    after = clip_adapt.zero_shot_accuracy(adapted, head, xt, yt)
    assert after >= 0.95 and after > before, (before, after)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    # the original model and its text tower are untouched
    assert torch.equal(model.text_projection.weight, adapted.text_projection.weight)
    assert clip_adapt.zero_shot_accuracy(model, head, xt, yt) == before


def test_linear_probe_equals_scikit_learn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 6))
    y = rng.integers(0, 3, 90)
    x = centers[y] + rng.normal(scale=1.2, size=(90, 6))
    yt = rng.integers(0, 3, 60)
    xt = centers[yt] + rng.normal(scale=1.2, size=(60, 6))
    for C in (0.1, 1.0, 10.0):
        ours = clip_adapt.linear_probe(torch.tensor(x), y, torch.tensor(xt), yt, C=C)
        ref = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(x, y)
        np.testing.assert_allclose(ours["probs"].numpy(), ref.predict_proba(xt), atol=1e-4)
        np.testing.assert_allclose(ours["weight"].numpy(), ref.coef_, atol=1e-3)
        assert ours["accuracy"] == pytest.approx(ref.score(xt, yt))


def test_warmup_then_cosine_schedule():
    cfg = clip_adapt.AdaptConfig(lr=1.0, warmup_steps=4)
    lrs = [clip_adapt.lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.02
    assert clip_adapt.PAPER == clip_adapt.AdaptConfig(lr=1e-5, batch_size=512, epochs=30, weight_decay=0.1,
                                                      warmup_steps=500)


def test_adapt_unit_is_a_resumable_finished_unit(tiny_clip, tmp_path):
    model, tok = tiny_clip
    head = clip_adapt.zero_shot_head(model, tok, CLASSES, ["photo of {}"])
    x, y = _toy(32, 0)
    cfg = clip_adapt.AdaptConfig(lr=1e-3, batch_size=16, epochs=1, warmup_steps=1)
    m1 = clip_adapt.adapt_unit(tmp_path / "u", model, head, x, y, (x, y), (x, y), cfg, 0, {"set": "a"})
    (tmp_path / "u" / "metrics.json").write_text("{}")  # tampered: the marker no longer verifies
    m2 = clip_adapt.adapt_unit(tmp_path / "u", model, head, x, y, (x, y), (x, y), cfg, 0, {"set": "a"})
    assert m1 == m2 and set(m1) >= {"zero_shot", "linear_probe", "n"}
    from realfake_utils.rundir import read_json
    assert read_json(tmp_path / "u" / "metrics.json")["n"] == 32


def test_adapt_config_from_08s_parameters_and_batched_text_embeddings(tiny_clip):
    p = {"adapt_lr": 1e-5, "adapt_batch_size": 512, "adapt_epochs": 30, "adapt_weight_decay": 0.1,
         "adapt_warmup_steps": 500, "adapt_train_head": False, "lp_C": 1.0, "seed": 3}
    assert clip_adapt.AdaptConfig.from_params(p) == clip_adapt.PAPER
    model, tok = tiny_clip
    texts = ["photo of red", "a blue image", "red"]
    one = clip_adapt.encode_texts(model, tok, texts, batch_size=1)
    assert one.shape == (3, model.config.projection_dim)
    assert torch.allclose(one, clip_adapt.encode_texts(model, tok, texts), atol=1e-5)
    assert not torch.allclose(one[0], one[1])
