"""Pretraining of the miniature world (realfake_utils.pretrain): cached parts with their training log,
resumable training with EMA, the one-block VAE, and the saved CLIP / base model formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from realfake_utils import pretrain as P

torch.set_num_threads(1)
NAMES = ["zero", "one", "two", "three"]

def test_part_same_params_reused_changed_params_rebuilt(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "weights.txt").write_text(str(len(calls)))
        return [3.0, 2.0, 1.0]

    out = tmp_path / "art"
    p = {"steps": 3, "width": 8}
    first = P.build_part(out, "clip", p, build, log=lambda *a: None)
    assert first.built and first.steps == 3 and first.final_loss == pytest.approx(2.0)
    again = P.build_part(out, "clip", {"width": 8, "steps": 3}, build, log=lambda *a: None)
    assert not again.built and len(calls) == 1 and (out / "weights.txt").read_text() == "1"
    # a reused part keeps its summary and its loss log (issue 14 item 7)
    assert (again.steps, again.final_loss, again.params_hash) == (first.steps, first.final_loss, first.params_hash)
    assert P.training_log(out)["losses"] == [3.0, 2.0, 1.0]
    assert json.loads(P.key_path(out).read_text())["params"] == p
    assert P.part_hash(out) == first.params_hash == P.part_key("clip", p)
    assert P.build_part(out, "clip", {"steps": 4, "width": 8}, build, log=lambda *a: None).built
    assert (out / "weights.txt").read_text() == "2"
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".art.")]  # no temp folders left
    # a file changed after the marker was written: the part is not trusted, it is rebuilt
    (out / "weights.txt").write_text("tampered")
    assert P.build_part(out, "clip", {"steps": 4, "width": 8}, build, log=lambda *a: None).built


def test_part_failed_build_keeps_nothing_half_written(tmp_path):
    out = tmp_path / "art"

    def write(text, losses):
        def build(tmp):
            (tmp / "ok").write_text(text)
            return losses
        return build

    P.build_part(out, "vae", {"a": 1}, write("old", [1.0]), log=lambda *a: None)

    def broken(tmp):
        (tmp / "ok").write_text("half")
        raise KeyboardInterrupt  # a kill mid-build

    with pytest.raises(KeyboardInterrupt):
        P.build_part(out, "vae", {"a": 2}, broken, log=lambda *a: None)
    assert (out / "ok").read_text() == "old"  # the old part is intact, and not taken for the new one
    assert P.build_part(out, "vae", {"a": 2}, write("new", [0.5]), log=lambda *a: None).built
    assert (out / "ok").read_text() == "new"


def _digits(n=48, size=16):
    from realfake_utils.data import digits_array

    return digits_array(range(n), size)


def test_a_few_clip_steps_reduce_the_loss():
    from realfake_utils.models import build_tokenizer
    from realfake_utils.pool import vocabulary

    x = _digits(32)
    tok = build_tokenizer(vocabulary(NAMES), None, 8)
    clip = P.build_clip(tok, 16, width=16, layers=1, heads=2, patch_size=8)
    caps = [f"photo of {NAMES[i % 4]}" for i in range(32)]
    x4 = torch.stack([x[i] if i % 4 == 0 else x[i] // (1 + i % 4) for i in range(32)])
    losses = P.train_clip(clip, x4, P.tokenize(tok, caps), steps=15, batch_size=16, lr=3e-3,
                          log=lambda *a: None)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def make():
    """The model of the train_loop tests: a seeded 4 -> 1 linear layer."""
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def loss_of(model, kill_at=None):
    """A train_loop loss on a fixed linear regression; raises KeyboardInterrupt at step ``kill_at`` (a kill)."""
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    target = data @ torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None]

    def fn(step, gen):
        if step == kill_at:
            raise KeyboardInterrupt
        idx = torch.randint(0, 64, (8,), generator=gen)
        return torch.nn.functional.mse_loss(model(data[idx]), target[idx])
    return fn


def test_train_loop_resumes_after_a_kill(tmp_path):
    ref_model = make()
    ref = P.train_loop(ref_model, loss_of(ref_model), 20, 0.05, log=lambda *a: None)
    ckpt = tmp_path / "ck.pt"
    model = make()
    with pytest.raises(KeyboardInterrupt):
        P.train_loop(model, loss_of(model, kill_at=13), 20, 0.05, ckpt=ckpt, ckpt_every=5,
                     log=lambda *a: None)
    assert ckpt.exists()
    model = make()
    got = P.train_loop(model, loss_of(model), 20, 0.05, ckpt=ckpt, ckpt_every=5, log=lambda *a: None)
    assert np.allclose(got, ref) and len(got) == 20 and not ckpt.exists()
    assert torch.allclose(model.weight, ref_model.weight)


TINY = dict(clip_width=16, clip_layers=1, clip_heads=2, clip_patch=8, clip_steps=2, clip_batch=16,
            vae_channels=[8], vae_steps=2, vae_batch=8, unet_channels=[16, 32], unet_steps=2,
            unet_batch=8, model_max_length=8, unet_ema=0.9, oracle_steps=2)


def built(res):
    return {k: p.built for k, p in res["parts"].items()}


def test_miniature_world_saves_loadable_models_and_caches(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    rows = [{"id": f"d{i}", "label": i % 4, "path": ""} for i in range(24)]
    x = _digits(24)
    cfg = P.MiniatureConfig(**TINY)
    logs = []
    res = P.build_miniature(tmp_path, rows, x, NAMES, cfg, log=logs.append)
    assert built(res) == {"clip": True, "vae": True, "base": True}

    pipe = StableDiffusionPipeline.from_pretrained(res["base"], safety_checker=None,
                                                   requires_safety_checker=False)
    vision = CLIPVisionModelWithProjection.from_pretrained(res["clip"])
    # training-time normalisation == the saved CLIPImageProcessor's (features agree with the cached path)
    from transformers import CLIPImageProcessor
    from realfake_utils.features import extract_clip_features
    proc = CLIPImageProcessor.from_pretrained(res["clip"])
    cached = extract_clip_features((vision, proc), x[:6], [r["id"] for r in rows[:6]], tmp_path / "f.safetensors",
                                   progress=False)
    assert torch.allclose(cached, P.clip_image_embeds(vision, x[:6]), atol=1e-4)
    assert vision.config.projection_dim == pipe.text_encoder.config.hidden_size == 16
    assert CLIPModel.from_pretrained(res["clip"]).config.projection_dim == 16
    # the base's text encoder is the CLIP's text tower
    clip = CLIPModel.from_pretrained(res["clip"])
    te = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 4 / 5 layouts
    assert torch.equal(clip.text_model.embeddings.token_embedding.weight, te.embeddings.token_embedding.weight)
    assert torch.equal(clip.text_model.final_layer_norm.weight, te.final_layer_norm.weight)
    assert pipe.unet.config.cross_attention_dim == 16 and pipe.unet.config.sample_size == 16  # one-block VAE: latent = image size
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
    res2 = P.build_miniature(tmp_path, rows, x, NAMES, cfg, log=logs.append)
    assert built(res2) == {"clip": False, "vae": False, "base": False}
    assert {k: p.final_loss for k, p in res2["parts"].items()} == {k: p.final_loss for k, p in res["parts"].items()}
    res3 = P.build_miniature(tmp_path, rows, x, NAMES, P.MiniatureConfig(**dict(TINY, unet_steps=3)),
                             log=logs.append)
    assert built(res3) == {"clip": False, "vae": False, "base": True}
    assert res3["parts"]["base"].params_hash != res2["parts"]["base"].params_hash
    # a changed caption parameter changes the pool: everything retrains
    res4 = P.build_miniature(tmp_path, rows, x, NAMES,
                             P.MiniatureConfig(**dict(TINY, caption_wrong_rate=0.3)), log=logs.append)
    assert built(res4) == {"clip": True, "vae": True, "base": True}


def test_one_block_vae_keeps_the_image_size_and_learns_the_identity():
    x = _digits(32)
    vae = P.build_vae(16, [8], seed=0)
    before = P.reconstruction_error(vae, x)
    assert P.encode_latents(vae, x[:2])[0].shape == (2, 4, 16, 16)
    losses = P.train_vae(vae, x, steps=30, batch_size=8, lr=1e-2, log=lambda *a: None)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert P.reconstruction_error(vae, x) < 0.5 * before


def test_ema_weights_are_the_average_and_resume_with_it(tmp_path):
    ref, raw = make(), make()
    P.train_loop(ref, loss_of(ref), 20, 0.05, log=lambda *a: None, ema=0.9)
    P.train_loop(raw, loss_of(raw), 20, 0.05, log=lambda *a: None)
    assert not torch.allclose(ref.weight, raw.weight)  # the EMA weights are saved, not the last ones
    model = make()
    with pytest.raises(KeyboardInterrupt):
        P.train_loop(model, loss_of(model, kill_at=13), 20, 0.05, ckpt=tmp_path / "c.pt", ckpt_every=5,
                     log=lambda *a: None, ema=0.9)
    model = make()
    P.train_loop(model, loss_of(model), 20, 0.05, ckpt=tmp_path / "c.pt", ckpt_every=5, log=lambda *a: None, ema=0.9)
    assert torch.allclose(model.weight, ref.weight)
