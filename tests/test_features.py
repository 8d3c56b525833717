"""Prompts, guidance token, class means, CLIP feature cache (resume), captions cache (resume)."""
import pytest
import torch

from realfake_utils import features as F
from realfake_utils import models as M

torch.set_num_threads(2)


def test_build_prompt_and_negative_prompt():
    assert F.build_prompt("golden retriever", "a dog on grass") == "photo of golden retriever, a dog on grass"
    assert F.build_prompt("AnnualCrop") == "photo of AnnualCrop"
    assert F.build_prompt("cat", "   ") == "photo of cat"
    assert F.NEGATIVE_PROMPT == "distorted, unrealistic, blurry, out of frame, cropped, deformed"
    with pytest.raises(ValueError):
        F.build_prompt("")


def test_guidance_token_replaces_only_the_last_position():
    torch.manual_seed(0)
    emb = torch.randn(3, 5, 4)
    img = torch.randn(3, 4)
    before = emb.clone()
    out = F.guidance_token(emb, img)
    assert torch.equal(emb, before)                       # pure
    assert torch.equal(out[:, :-1], emb[:, :-1])          # positions 0..L-2 untouched
    assert torch.equal(out[:, -1], img)                   # last position = image embedding, as is
    one = F.guidance_token(emb, img[0])                   # one embedding for the whole batch
    assert torch.equal(one[:, -1], img[0].expand(3, 4))
    half = F.guidance_token(emb.half(), img)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="batch of 3"):
        F.guidance_token(emb, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        F.guidance_token(emb[0], img)
    with pytest.raises(ValueError, match="768"):
        F.guidance_token(emb, torch.randn(3, 6))


def test_guidance_prompt_embeds_append_and_replace_last():
    """Sec. 3.2 (append: one more token after the text) vs the official code (replace the last one);
    without a feature, `append` pads by repeating the last position so a negative prompt matches."""
    torch.manual_seed(0)
    emb, img = torch.randn(3, 5, 4), torch.randn(3, 4)
    before = emb.clone()
    app = F.guidance_prompt_embeds(emb, img, "append")
    assert torch.equal(emb, before) and app.shape == (3, 6, 4)
    assert torch.equal(app[:, :5], emb) and torch.equal(app[:, 5], img)
    assert torch.equal(F.guidance_prompt_embeds(emb, img[0], "append")[:, 5], img[0].expand(3, 4))
    assert torch.equal(F.guidance_prompt_embeds(emb, img, "replace_last"), F.guidance_token(emb, img))
    pad = F.guidance_prompt_embeds(emb, None, "append")
    assert pad.shape == (3, 6, 4) and torch.equal(pad[:, 5], emb[:, 4]) and torch.equal(pad[:, :5], emb)
    assert torch.equal(F.guidance_prompt_embeds(emb, None, "replace_last"), emb)
    assert F.guidance_prompt_embeds(emb.half(), img, "append").dtype == torch.float16
    with pytest.raises(ValueError, match="append"):
        F.guidance_prompt_embeds(emb, img, "prepend")
    with pytest.raises(ValueError, match="768"):
        F.guidance_prompt_embeds(emb, torch.randn(3, 6), "append")
    with pytest.raises(ValueError, match="batch of 3"):
        F.guidance_prompt_embeds(emb, torch.randn(2, 4), "append")


def test_class_mean_features_by_hand():
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 6.0]])
    labels = [0, 0, 1, 0]
    means = F.class_mean_features(feats, labels, 2)
    assert torch.allclose(means, torch.tensor([[3.0, 4.0], [10.0, 0.0]]))
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        F.class_mean_features(feats, labels, 3)
    with pytest.raises(ValueError, match="outside"):
        F.class_mean_features(feats, [0, 0, 5, 0], 2)


class Boom(Exception):
    pass


class Images:
    """Indexable uint8 images that count reads and can fail at one index (a killed run)."""

    def __init__(self, n, fail_at=None):
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
        self.fail_at, self.reads = fail_at, []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise Boom(i)
        self.reads.append(i)
        return self.data[i]


def test_clip_features_cache_resume_equals_one_shot(tmp_path):
    clip = M.build_tiny_clip(tmp_path / "clip", image_size=16, projection_dim=32, hidden=32)
    model = M.load_clip_vision(str(clip), device="cpu")
    ids = [f"img{i}" for i in range(10)]
    one_shot = F.extract_clip_features(model, Images(10), ids, tmp_path / "a.safetensors",
                                       batch_size=3, progress=False)
    assert one_shot.shape == (10, 32)

    cache = tmp_path / "b.safetensors"
    with pytest.raises(Boom):  # killed inside the 3rd batch; two batches were saved
        F.extract_clip_features(model, Images(10, fail_at=7), ids, cache, batch_size=3, save_every=1,
                                progress=False)
    cached_ids, cached, meta = F.load_feature_cache(cache)
    assert cached_ids == ids[:6] and meta["model"] == F.model_fingerprint(str(clip))
    assert meta["model"].startswith("local#") and str(clip) not in meta["model"]  # content, not place
    assert not cache.exists() and len(list(tmp_path.glob("b.safetensors.parts/part-*"))) == 2
    imgs = Images(10)
    resumed = F.extract_clip_features(model, imgs, ids, cache, batch_size=3, progress=False)
    assert sorted(imgs.reads) == [6, 7, 8, 9]               # only the rest is computed
    # the resumed run consolidated the parts into one file
    assert cache.exists() and not (tmp_path / "b.safetensors.parts").exists()
    assert torch.allclose(resumed, one_shot, atol=1e-6)
    imgs = Images(10)
    again = F.extract_clip_features(model, imgs, ids[::-1], cache, batch_size=3, progress=False)
    assert imgs.reads == [] and torch.equal(again, resumed.flip(0))   # all from cache, in ids order
    # by path (same loading code as for openai/clip-vit-large-patch14)
    by_path = F.extract_clip_features(str(clip), Images(10), ids, tmp_path / "c.safetensors",
                                      batch_size=5, device="cpu", progress=False)
    assert torch.allclose(by_path, one_shot, atol=1e-6)
    # another model (here: the CLIP folder rebuilt with another seed) invalidates the cache
    M.build_tiny_clip(tmp_path / "clip", image_size=16, projection_dim=32, hidden=32, seed=1)
    imgs = Images(10)
    other = F.extract_clip_features(str(clip), imgs, ids, cache, batch_size=5, device="cpu",
                                    progress=False)
    assert len(imgs.reads) == 10 and not torch.allclose(other, one_shot)
    with pytest.raises(ValueError, match="ids"):
        F.extract_clip_features(model, Images(10), ids[:9], tmp_path / "d.safetensors", progress=False)


def test_caption_images_resumes(tmp_path):
    class Fake:
        def __init__(self):
            self.seen = 0

        def caption(self, images):
            self.seen += len(images)
            return [f"cap{int(im[0, 0, 0])}" for im in images]

    imgs = Images(5)
    ids = [f"i{k}" for k in range(5)]
    path = tmp_path / "captions.json"

    def stop(n):
        if n == 2:
            raise Boom()

    cap = Fake()
    with pytest.raises(Boom):
        F.caption_images(cap, imgs, ids, path, batch_size=2, progress=False, on_batch=stop)
    cap = Fake()
    out = F.caption_images(cap, imgs, ids, path, batch_size=2, progress=False)
    assert cap.seen == 1 and list(out) == ids
    assert out["i3"] == f"cap{int(imgs.data[3, 0, 0, 0])}"
    assert F.caption_images(F.NoCaptioner(), imgs, ids, tmp_path / "n.json",
                            progress=False) == {k: "" for k in ids}
