"""The miniature world: pool/target split, the pool's gap (captions, image shift), the hash-keyed
artifact cache, resumable training, and the saved CLIP / base model formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from realfake_utils import miniature as M

torch.set_num_threads(1)
NAMES = ["zero", "one", "two", "three"]


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------
def test_cache_same_params_skip_changed_params_rebuild(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "weights.txt").write_text(str(len(calls)))

    out = tmp_path / "art"
    p = {"steps": 3, "width": 8}
    assert M.cached_artifact(out, p, build, log=lambda *a: None) == (out, True)
    assert M.cached_artifact(out, {"width": 8, "steps": 3}, build, log=lambda *a: None) == (out, False)
    assert len(calls) == 1 and (out / "weights.txt").read_text() == "1"
    key = json.loads(M.key_path(out).read_text())
    assert key["hash"] == M.params_hash(p) and key["params"] == p
    assert M.cached_artifact(out, {"steps": 4, "width": 8}, build, log=lambda *a: None)[1] is True
    assert (out / "weights.txt").read_text() == "2"
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".art.")]  # no temp folders left


def test_cache_failed_build_keeps_nothing_half_written(tmp_path):
    out = tmp_path / "art"
    M.cached_artifact(out, {"a": 1}, lambda tmp: (tmp / "ok").write_text("old"), log=lambda *a: None)

    def broken(tmp):
        (tmp / "ok").write_text("half")
        raise KeyboardInterrupt  # a kill mid-build

    with pytest.raises(KeyboardInterrupt):
        M.cached_artifact(out, {"a": 2}, broken, log=lambda *a: None)
    assert (out / "ok").read_text() == "old"  # the old artifact is intact ...
    assert not M.is_cached(out, {"a": 1}) and not M.is_cached(out, {"a": 2})  # ... but is rebuilt next time
    built = M.cached_artifact(out, {"a": 2}, lambda tmp: (tmp / "ok").write_text("new"), log=lambda *a: None)
    assert built[1] and (out / "ok").read_text() == "new"


# --------------------------------------------------------------------------------------------------
# pool vs target
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
def _digits(n=48, size=16):
    from realfake_utils.data import digits_array

    return digits_array(range(n), size)


def test_a_few_vae_and_clip_steps_reduce_the_loss():
    from realfake_utils.models import build_tokenizer

    x = _digits(32)
    vae = M.build_vae(16, (8, 16), seed=0)
    losses = M.train_vae(vae, x, steps=30, batch_size=16, lr=3e-3, log=lambda *a: None)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])

    tok = build_tokenizer(M.vocabulary(NAMES), None, 8)
    clip = M.build_clip(tok, 16, width=16, layers=1, heads=2, patch_size=8)
    caps = [f"photo of {NAMES[i % 4]}" for i in range(32)]
    x4 = torch.stack([x[i] if i % 4 == 0 else x[i] // (1 + i % 4) for i in range(32)])
    losses = M.train_clip(clip, x4, M.tokenize(tok, caps), steps=30, batch_size=32, lr=3e-3,
                          log=lambda *a: None)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_train_loop_resumes_after_a_kill(tmp_path):
    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 1)

    data = torch.randn(64, 4)
    target = data @ torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None]

    def loss_of(model, kill_at=None):
        def fn(step, gen):
            if step == kill_at:
                raise KeyboardInterrupt
            idx = torch.randint(0, 64, (8,), generator=gen)
            return torch.nn.functional.mse_loss(model(data[idx]), target[idx])
        return fn

    ref_model = make()
    ref = M.train_loop(ref_model, loss_of(ref_model), 20, 0.05, log=lambda *a: None)
    ckpt = tmp_path / "ck.pt"
    model = make()
    with pytest.raises(KeyboardInterrupt):
        M.train_loop(model, loss_of(model, kill_at=13), 20, 0.05, ckpt=ckpt, ckpt_every=5,
                     log=lambda *a: None)
    assert ckpt.exists()
    model = make()
    got = M.train_loop(model, loss_of(model), 20, 0.05, ckpt=ckpt, ckpt_every=5, log=lambda *a: None)
    assert np.allclose(got, ref) and len(got) == 20 and not ckpt.exists()
    assert torch.allclose(model.weight, ref_model.weight)


# --------------------------------------------------------------------------------------------------
# the whole miniature world, tiny, in the real formats
# --------------------------------------------------------------------------------------------------
TINY = dict(clip_width=16, clip_layers=1, clip_heads=2, clip_patch=8, clip_steps=2, clip_batch=16,
            vae_channels=[8, 16], vae_steps=2, vae_batch=8, unet_channels=[16, 32], unet_steps=2,
            unet_batch=8, model_max_length=8)


def test_miniature_world_saves_loadable_models_and_caches(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    rows = [{"id": f"d{i}", "label": i % 4, "path": ""} for i in range(24)]
    x = _digits(24)
    cfg = M.MiniatureConfig(**TINY)
    logs = []
    res = M.build_miniature(tmp_path, rows, x, NAMES, cfg, log=logs.append)
    assert res["built"] == {"clip": True, "vae": True, "base": True}

    pipe = StableDiffusionPipeline.from_pretrained(res["base"], safety_checker=None,
                                                   requires_safety_checker=False)
    vision = CLIPVisionModelWithProjection.from_pretrained(res["clip"])
    # training-time normalisation == the saved CLIPImageProcessor's (features agree with the cached path)
    from transformers import CLIPImageProcessor
    from realfake_utils.features import extract_clip_features
    proc = CLIPImageProcessor.from_pretrained(res["clip"])
    cached = extract_clip_features((vision, proc), x[:6], [r["id"] for r in rows[:6]], tmp_path / "f.safetensors",
                                   progress=False)
    assert torch.allclose(cached, M.clip_image_embeds(vision, x[:6]), atol=1e-4)
    assert vision.config.projection_dim == pipe.text_encoder.config.hidden_size == 16
    assert CLIPModel.from_pretrained(res["clip"]).config.projection_dim == 16
    # the base's text encoder is the CLIP's text tower
    clip = CLIPModel.from_pretrained(res["clip"])
    te = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 4 / 5 layouts
    assert torch.equal(clip.text_model.embeddings.token_embedding.weight, te.embeddings.token_embedding.weight)
    assert torch.equal(clip.text_model.final_layer_norm.weight, te.final_layer_norm.weight)
    assert pipe.unet.config.cross_attention_dim == 16 and pipe.unet.config.sample_size == 8
    assert pipe.vae.config.scaling_factor != 0.18215
    img = pipe("photo of two", num_inference_steps=2, guidance_scale=2.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3)
    # the kit's loader (UniPC from the saved config), txt2img and img2img
    from realfake_utils import models
    i2i = models.load_pipeline(res["base"], kind="img2img", device="cpu")
    out = i2i(prompt="photo of two", image=img, strength=0.5, num_inference_steps=4, guidance_scale=2.0,
              output_type="np").images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()

    # same parameters: nothing retrains; a changed UNet parameter retrains only the base
    res2 = M.build_miniature(tmp_path, rows, x, NAMES, cfg, log=logs.append)
    assert res2["built"] == {"clip": False, "vae": False, "base": False}
    res3 = M.build_miniature(tmp_path, rows, x, NAMES, M.MiniatureConfig(**dict(TINY, unet_steps=3)),
                             log=logs.append)
    assert res3["built"] == {"clip": False, "vae": False, "base": True}
    assert res3["hashes"]["base"] != res2["hashes"]["base"]
    # a changed caption parameter changes the pool: everything retrains
    res4 = M.build_miniature(tmp_path, rows, x, NAMES,
                             M.MiniatureConfig(**dict(TINY, caption_wrong_rate=0.3)), log=logs.append)
    assert res4["built"] == {"clip": True, "vae": True, "base": True}
