"""The miniature world: an upstream "web" pool with a real gap from the target task, and the base
models pretrained on it from scratch in their real on-disk formats.

The paper's situation: Stable Diffusion 1.5 and CLIP were pretrained on LAION, whose images and
captions differ from the target task; Real-Fake fine-tunes SD to close that gap. In miniature:

1. ``data.prepare_data`` splits the data set into an upstream ``pool`` and the target ``train`` /
   ``test`` (disjoint, stratified).
2. The pool gets a gap from the target the way web data has one:

   - **captions** (:func:`web_captions`): alt-text-like templates (``"7 digit"``, ``"image of seven"``),
     some with the class word **swapped** for another class (``caption_wrong_rate``), some with **no**
     class word (``caption_missing_rate``, e.g. ``"free download jpg"``), noise words (``"hd"``,
     ``"stock"``, ``caption_noise_rate``) and, sometimes, a word for the colour / stroke style of the
     image (``caption_style_rate``), as web captions describe what is visible;
   - **images** (:func:`shift_images`): a photometric and geometric shift of every pool image: a colour
     tint, lower contrast, thicker strokes (digits), a small rotation and translation.

3. Pretrained on the pool, from scratch (:func:`build_miniature`), each a cached artifact keyed by a
   hash of its parameters (:func:`cached_artifact`; ``<name>.params.json`` beside the folder):

   - ``artifacts/miniature/clip``: a tiny ``CLIPModel`` (ViT + text tower) trained contrastively on
     pool image / caption pairs; ``CLIPVisionModelWithProjection.from_pretrained`` loads its vision
     tower, and its ``projection_dim`` equals its text hidden size (the visual guidance token puts an
     image embedding in place of a text token, as ViT-L/14's 768 equals SD 1.5's text width);
   - ``artifacts/miniature/vae``: a tiny ``AutoencoderKL`` (e.g. 16x16x3 -> 8x8x4 latents);
   - ``artifacts/miniature/base``: a ``StableDiffusionPipeline`` folder: that VAE, a
     ``UNet2DConditionModel`` conditioned on the **frozen** miniature CLIP text tower's last hidden
     states (as SD is on CLIP ViT-L/14's), trained with prompt dropout for classifier-free guidance,
     the CLIP text tower and tokenizer, and a DDIM scheduler with the cosine schedule.

A rerun with the same parameters skips a finished artifact; a changed parameter (or a changed pool)
retrains it and everything built on it. Training checkpoints every ``ckpt_every`` steps under
``artifacts/miniature/.work/`` so a killed run resumes; folders are written to a temporary name and
renamed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .rundir import atomic_path, read_json, write_json

VERSION = 1  # bump when the training code changes in a way that invalidates cached artifacts

# --------------------------------------------------------------------------------------------------
# Captions: alt-text-like, partly wrong
# --------------------------------------------------------------------------------------------------
# Templates with the class word ({c}); "photo of {c}" is one of them, as web text holds it too.
CAPTION_TEMPLATES = ("{c}", "photo of {c}", "a photo of {c}", "image of {c}", "{c} picture",
                     "picture of the {c}", "{c} image", "my {c}")
# Captions that say nothing about the class (the class word is missing).
GENERIC_CAPTIONS = ("image", "untitled", "photo", "picture", "img", "new photo", "scan",
                    "free download", "view", "small image")
# Web noise words appended / prepended.
NOISE_WORDS = ("hd", "stock", "free", "download", "jpg", "wallpaper", "best", "new", "cheap",
               "vintage", "sale", "amazing", "online", "high quality", "royalty free", "clipart")
# Style words, chosen from the applied shift (the tint's hue, thick strokes).
HUE_WORDS = ("red", "yellow", "green", "cyan", "blue", "purple")
STYLE_WORDS = HUE_WORDS + ("bold", "tilted", "faded")


def _item_rng(seed: int, item_id: str, salt: int) -> np.random.Generator:
    """A generator that depends only on (seed, id, salt): one item's draws never change when other
    items are added or removed."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(item_id).encode()), salt])


def web_captions(ids: Sequence[str], labels: Sequence[int], class_names: Sequence[str], seed: int,
                 wrong_rate: float = 0.1, missing_rate: float = 0.2, noise_rate: float = 0.5,
                 style_rate: float = 0.0, styles: Sequence[Sequence[str]] | None = None) -> list[dict]:
    """Web-like captions for pool items, deterministic per (seed, id).

    Per item, one draw decides the class word: **wrong** (another class's name, probability
    ``wrong_rate``), **missing** (a generic caption, ``missing_rate``), else **correct**, written with
    one of :data:`CAPTION_TEMPLATES`. With probability ``noise_rate`` one or two
    :data:`NOISE_WORDS` are added; with ``style_rate`` the item's style words (``styles[i]``, e.g.
    ``["blue", "bold"]`` from :func:`shift_images`) are put in front.

    Returns one dict per item: ``caption``, ``kind`` (``correct`` | ``wrong`` | ``missing``) and
    ``caption_label`` (the class the caption names, -1 if none).
    """
    if wrong_rate < 0 or missing_rate < 0 or wrong_rate + missing_rate > 1:
        raise ValueError(f"caption rates must be >= 0 with wrong + missing <= 1, got "
                         f"wrong={wrong_rate}, missing={missing_rate}")
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
    n_cls = len(class_names)
    out = []
    for i, (item_id, label) in enumerate(zip(ids, labels)):
        rng = _item_rng(seed, item_id, 1)
        u = rng.random()
        label = int(label)
        if u < wrong_rate and n_cls > 1:
            kind = "wrong"
            shown = int((label + rng.integers(1, n_cls)) % n_cls)
        elif u < wrong_rate + missing_rate:
            kind, shown = "missing", -1
        else:
            kind, shown = "correct", label
        if shown >= 0:
            text = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(c=class_names[shown])
        else:
            text = GENERIC_CAPTIONS[rng.integers(len(GENERIC_CAPTIONS))]
        words = [text]
        if styles is not None and styles[i] and rng.random() < style_rate:
            words.insert(0, " ".join(styles[i]))
        if rng.random() < noise_rate:
            for _ in range(int(rng.integers(1, 3))):
                w = NOISE_WORDS[rng.integers(len(NOISE_WORDS))]
                if rng.random() < 0.5:
                    words.append(w)
                else:
                    words.insert(0, w)
        out.append({"caption": " ".join(words), "kind": kind, "caption_label": shown})
    return out


def caption_stats(captions: Sequence[dict]) -> dict[str, float]:
    """Fractions of correct / wrong / missing class words."""
    n = max(1, len(captions))
    return {k: sum(c["kind"] == k for c in captions) / n for k in ("correct", "wrong", "missing")}


def vocabulary(class_names: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Every word the captions and prompts of the miniature world use (one token each)."""
    from .features import NEGATIVE_PROMPT

    words: list[str] = []
    texts = list(class_names) + [t.replace("{c}", "") for t in CAPTION_TEMPLATES]
    texts += list(GENERIC_CAPTIONS) + list(NOISE_WORDS) + list(STYLE_WORDS) + [NEGATIVE_PROMPT]
    texts += ["photo of", ","] + list(extra)
    for t in texts:
        for w in str(t).replace(",", " , ").split():
            if w not in words:
                words.append(w)
    return words


# --------------------------------------------------------------------------------------------------
# Image shift of the pool
# --------------------------------------------------------------------------------------------------
DEFAULT_SHIFT = {"tint": 0.5, "contrast": 0.6, "thicken": 0.7, "thicken_prob": 0.5,
                 "rotate_deg": 12.0, "translate_px": 1.0}


def shift_images(images: torch.Tensor, ids: Sequence[str], seed: int,
                 shift: dict[str, float] | None = None) -> tuple[torch.Tensor, list[list[str]]]:
    """The pool's photometric and geometric shift, deterministic per (seed, id).

    ``images``: uint8 ``[N,3,H,W]``. ``shift`` keys (missing ones are 0 = off):

    - ``tint``: per-channel gains ``1 + tint * u``, ``u ~ U(-1, 1)`` per channel (a colour cast);
    - ``contrast``: contrast factor ``c ~ U(contrast, 1)`` around the image mean (0 = off);
    - ``thicken``, ``thicken_prob``: with that probability, strokes are thickened by blending
      ``thicken`` of a 3x3 morphological dilation of the ink (the ink is the colour away from the
      image border's, so it works for dark-on-light and light-on-dark);
    - ``rotate_deg``, ``translate_px``: a rotation ``~ U(-deg, deg)`` and translation
      ``~ U(-px, px)`` per axis (border pixels replicated).

    Returns ``(shifted uint8 [N,3,H,W], style words per image)`` (the tint's hue word when the cast is
    clear, ``bold`` when thickened, ``tilted`` for a rotation over 2/3 of the maximum, ``faded`` for
    a contrast under 0.75), the words a web caption might use.
    """
    import torch.nn.functional as F

    s = {k: 0.0 for k in DEFAULT_SHIFT}
    s.update(shift or {})
    unknown = set(s) - set(DEFAULT_SHIFT)
    if unknown:
        raise ValueError(f"unknown pool_shift key(s) {sorted(unknown)}; known: {sorted(DEFAULT_SHIFT)}")
    n, _, h, w = images.shape
    if len(ids) != n:
        raise ValueError(f"{n} images but {len(ids)} ids")
    if n == 0:
        return images.clone(), []
    draws = np.stack([_item_rng(seed, i, 2).random(8) for i in ids])  # [N, 8] in [0, 1)
    x = images.float() / 255.0
    styles: list[list[str]] = [[] for _ in range(n)]
    # strokes
    if s["thicken"] > 0 and s["thicken_prob"] > 0:
        border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
        bright_bg = border.mean(dim=(1, 2)) > x.mean(dim=(1, 2, 3))
        sign = torch.where(bright_bg, -1.0, 1.0)[:, None, None, None]
        dil = sign * F.max_pool2d(sign * x, 3, stride=1, padding=1)
        on = torch.from_numpy(draws[:, 0] < s["thicken_prob"]).float()[:, None, None, None]
        x = x + on * s["thicken"] * (dil - x)
        for k in np.nonzero(draws[:, 0] < s["thicken_prob"])[0]:
            styles[k].append("bold")
    # geometry
    if s["rotate_deg"] > 0 or s["translate_px"] > 0:
        ang = torch.from_numpy((draws[:, 1] * 2 - 1) * math.radians(s["rotate_deg"])).float()
        tx = torch.from_numpy((draws[:, 2] * 2 - 1) * s["translate_px"] * 2 / w).float()
        ty = torch.from_numpy((draws[:, 3] * 2 - 1) * s["translate_px"] * 2 / h).float()
        theta = torch.stack([torch.stack([ang.cos(), -ang.sin(), tx], 1),
                             torch.stack([ang.sin(), ang.cos(), ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        for k in np.nonzero(np.abs(draws[:, 1] * 2 - 1) > 2 / 3)[0]:
            if s["rotate_deg"] >= 6:
                styles[k].append("tilted")
    # photometry
    if s["contrast"] > 0:
        c = torch.from_numpy(s["contrast"] + (1 - s["contrast"]) * draws[:, 4]).float()[:, None, None, None]
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = m + c * (x - m)
        for k in np.nonzero(c.flatten().numpy() < 0.75)[0]:
            styles[k].append("faded")
    if s["tint"] > 0:
        u = np.stack([_item_rng(seed, i, 3).uniform(-1, 1, 3) for i in ids])
        gains = 1 + s["tint"] * u
        g = torch.from_numpy(gains / gains.max(axis=1, keepdims=True)).float()[:, :, None, None]
        x = x * g
        for k in range(n):
            word = _hue_word(gains[k])
            if word:
                styles[k].insert(0, word)
    out = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return out, styles


def _hue_word(gains: np.ndarray, min_spread: float = 0.25) -> str:
    """Name of the colour cast of RGB gains, '' when the cast is weak."""
    r, g, b = (gains / gains.max()).tolist()
    if max(r, g, b) - min(r, g, b) < min_spread:
        return ""
    import colorsys

    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    return HUE_WORDS[int(((hue + 30) % 360) // 60)]


# --------------------------------------------------------------------------------------------------
# Cached artifacts
# --------------------------------------------------------------------------------------------------
def params_hash(params: dict[str, Any]) -> str:
    """A stable short hash of a JSON-able parameter dict (key order does not matter)."""
    text = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_path(out_dir: str | os.PathLike) -> Path:
    """The key file beside an artifact folder: ``<folder>.params.json``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".params.json")


def is_cached(out_dir: str | os.PathLike, params: dict[str, Any]) -> bool:
    """True when the folder exists and its key file holds the hash of ``params``."""
    out_dir, key = Path(out_dir), key_path(out_dir)
    if not (out_dir.is_dir() and key.exists()):
        return False
    try:
        return read_json(key).get("hash") == params_hash(params)
    except (ValueError, OSError):
        return False


def cached_artifact(out_dir: str | os.PathLike, params: dict[str, Any],
                    build: Callable[[Path], Any], force: bool = False, log=print) -> tuple[Path, bool]:
    """Build a folder artifact once per parameter hash.

    If ``out_dir`` exists with a key file (``<out_dir>.params.json``) holding the hash of ``params``, it
    is reused. Else the key is removed, ``build(tmp)`` writes the artifact into a temporary folder
    beside ``out_dir``, which then replaces ``out_dir``, and the key is written last: a run killed at any
    point leaves either the old complete artifact with its old key, or no key (-> rebuilt).
    Returns ``(out_dir, built)``.
    """
    from .models import atomic_dir

    out_dir = Path(out_dir)
    h = params_hash(params)
    if not force and is_cached(out_dir, params):
        log(f"{out_dir.name}: cached (params {h}), skipping training")
        return out_dir, False
    key = key_path(out_dir)
    key.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        build(tmp)
    write_json(key, {"hash": h, "params": params, "seconds": round(time.perf_counter() - t0, 1),
                     "version": VERSION})
    return out_dir, True


def artifact_hash(out_dir: str | os.PathLike) -> str:
    """The hash recorded beside a built artifact ('' if none)."""
    key = key_path(out_dir)
    return read_json(key).get("hash", "") if key.exists() else ""


# --------------------------------------------------------------------------------------------------
# Resumable training loop
# --------------------------------------------------------------------------------------------------
def _save_ckpt(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_loop(model: torch.nn.Module, loss_fn: Callable[[int, torch.Generator], torch.Tensor],
               steps: int, lr: float, ckpt: str | os.PathLike | None = None, ckpt_every: int = 100,
               weight_decay: float = 0.01, seed: int = 0, log_every: int = 50, name: str = "",
               log=print) -> list[float]:
    """AdamW with a one-cycle learning rate over ``steps``; ``loss_fn(step, generator)`` returns the
    loss of one batch (drawn from ``generator``, re-seeded from ``(seed, step)`` so a resumed run
    draws exactly the batches it would have). With ``ckpt`` (a file), the model, optimiser, schedule
    and loss history are saved every ``ckpt_every`` steps and a rerun resumes from there; the file is
    removed at the end. Returns the per-step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1),
                                                pct_start=0.15, anneal_strategy="cos")
    losses: list[float] = []
    start = 0
    ckpt = Path(ckpt) if ckpt else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("steps") == steps:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            losses, start = list(state["losses"]), int(state["step"])
            log(f"{name}: resuming at step {start}/{steps}")
    model.train()
    t0 = time.perf_counter()
    gen = torch.Generator()
    for step in range(start, steps):
        gen.manual_seed(int(seed) * 1_000_003 + step)
        loss = loss_fn(step, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if log_every and (done % log_every == 0 or done == steps):
            recent = np.mean(losses[-log_every:])
            log(f"{name}: step {done}/{steps} loss {recent:.4f} ({time.perf_counter() - t0:.0f} s)")
        if ckpt is not None and ckpt_every and done % ckpt_every == 0 and done < steps:
            _save_ckpt(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(),
                              "sched": sched.state_dict(), "losses": losses, "step": done,
                              "steps": steps})
    model.eval()
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return losses


# --------------------------------------------------------------------------------------------------
# Miniature CLIP
# --------------------------------------------------------------------------------------------------
def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N,3,H,W]`` -> CLIP pixel values, exactly as ``CLIPImageProcessor`` at the model's own
    size computes them (rescale 1/255, CLIP mean / std)."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean = torch.tensor(OPENAI_CLIP_MEAN)[None, :, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[None, :, None, None]
    return (images.float() / 255.0 - mean) / std


def build_clip(tokenizer, image_size: int, width: int = 64, layers: int = 2, heads: int = 4,
               patch_size: int = 4, seed: int = 0):
    """A tiny ``CLIPModel`` whose ``projection_dim`` equals the text hidden size (``width``), with
    ``projection_dim`` inside the vision config too (as in ViT-L/14's ``config.json``: what
    ``CLIPVisionModelWithProjection.from_pretrained`` reads from a CLIPModel folder)."""
    from transformers import CLIPConfig, CLIPModel

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not divisible by clip_patch {patch_size}")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, projection_dim=width),
        vision_config=dict(image_size=image_size, patch_size=patch_size, hidden_size=width,
                           intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, projection_dim=width),
        projection_dim=width)
    return CLIPModel(config)


def tokenize(tokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Padded to ``model_max_length`` and truncated, as the SD pipeline tokenizes."""
    enc = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}


def train_clip(model, images: torch.Tensor, tokens: dict[str, torch.Tensor], steps: int,
               batch_size: int = 256, lr: float = 1e-3, seed: int = 0, ckpt=None, ckpt_every: int = 100,
               log=print) -> list[float]:
    """Contrastive (InfoNCE both ways) training of a CLIPModel on image / caption pairs."""
    pixels = clip_normalize(images)
    n = pixels.shape[0]
    bs = min(batch_size, n)

    def loss_fn(step, gen):
        idx = torch.randperm(n, generator=gen)[:bs]
        out = model(input_ids=tokens["input_ids"][idx], attention_mask=tokens["attention_mask"][idx],
                    pixel_values=pixels[idx], return_loss=True)
        return out.loss

    return train_loop(model, loss_fn, steps, lr, ckpt=ckpt, ckpt_every=ckpt_every, seed=seed,
                      name="clip", log=log)


def save_clip(model, tokenizer, out_dir: str | os.PathLike, image_size: int) -> Path:
    """Save a CLIPModel folder in ViT-L/14's layout: weights + config, ``CLIPImageProcessor``
    (``preprocessor_config.json``) and the tokenizer (``vocab.json`` + ``merges.txt``)."""
    from .models import clip_image_processor, save_clip_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    clip_image_processor(image_size).save_pretrained(out_dir)
    tok_dir = out_dir / "_tokenizer"
    save_clip_tokenizer(tokenizer, tok_dir)
    for f in tok_dir.iterdir():
        os.replace(f, out_dir / f.name)
    tok_dir.rmdir()
    return out_dir


@torch.no_grad()
def clip_image_embeds(vision, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``image_embeds`` of a ``CLIPVisionModelWithProjection`` (or ``CLIPModel``) for uint8 images,
    without a cache: for generated samples. Images of another size than the model's are resized
    (bicubic, antialiased; the miniature models need none)."""
    import torch.nn.functional as F

    out = []
    dev = next(vision.parameters()).device
    dtype = next(vision.parameters()).dtype
    cfg = getattr(vision.config, "vision_config", vision.config)
    size = int(cfg.image_size)
    for s in range(0, images.shape[0], batch_size):
        px = clip_normalize(images[s:s + batch_size])
        if px.shape[-1] != size or px.shape[-2] != size:
            px = F.interpolate(px, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        px = px.to(dev, dtype)
        if hasattr(vision, "get_image_features"):
            emb = vision.get_image_features(pixel_values=px)
            emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
        else:
            emb = vision(pixel_values=px).image_embeds
        out.append(emb.float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# Miniature VAE and UNet
# --------------------------------------------------------------------------------------------------
def build_vae(image_size: int, channels: Sequence[int] = (32, 64), latent_channels: int = 4,
              seed: int = 0):
    """A tiny ``AutoencoderKL``: ``image_size`` -> ``image_size / 2**(len(channels)-1)`` latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    groups = math.gcd(*[int(c) for c in channels], 16)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=tuple(int(c) for c in channels), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels),
                         norm_num_groups=groups, sample_size=image_size)


def to_vae_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1] (the range SD's VAE works in)."""
    return images.float() / 127.5 - 1.0


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-4, seed: int = 0, ckpt=None, ckpt_every: int = 100,
              log=print) -> list[float]:
    """Reconstruction (MSE in [-1, 1]) + ``kl_weight`` * KL; returns the losses."""
    x = to_vae_range(images)
    n = x.shape[0]
    bs = min(batch_size, n)

    def loss_fn(step, gen):
        idx = torch.randint(0, n, (bs,), generator=gen)
        xb = x[idx]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        return torch.nn.functional.mse_loss(rec, xb) + kl_weight * post.kl().mean() / xb[0].numel()

    return train_loop(vae, loss_fn, steps, lr, ckpt=ckpt, ckpt_every=ckpt_every, seed=seed,
                      name="vae", log=log)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std ``[N, C, h, w]`` of uint8 images (unscaled)."""
    means, stds = [], []
    for s in range(0, images.shape[0], batch_size):
        post = vae.encode(to_vae_range(images[s:s + batch_size])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def build_unet(latent_size: int, cross_attention_dim: int, channels: Sequence[int] = (32, 64),
               latent_channels: int = 4, layers_per_block: int = 1, attention_head_dim: int = 8,
               seed: int = 0):
    """A small ``UNet2DConditionModel`` with cross-attention at every level (8x8 and 4x4 for digits),
    conditioned on text hidden states of width ``cross_attention_dim``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(channels)
    if latent_size % (2 ** (n - 1)):
        raise ValueError(f"latent size {latent_size} is not divisible by 2**{n - 1}")
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(int(c) for c in channels), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=math.gcd(*[int(c) for c in channels], 16))


def noise_scheduler():
    """DDPM training schedule of the miniature base model: 1000 steps, cosine ("squaredcos_cap_v2")."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=False)


def sampling_scheduler():
    """The scheduler saved in the base folder: DDIM with the same cosine betas and SD's "leading"
    spacing with ``steps_offset=1`` (20 steps start at t=951). Not "trailing"/"linspace": the cosine
    schedule's alpha_bar at t=999 is ~2e-9, and a first step from there amplifies the noise
    prediction's error ~1000-fold (``load_pipeline``'s UniPC inherits this spacing from the config)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="leading")


def train_unet(unet, latent_mean: torch.Tensor, latent_std: torch.Tensor, scaling_factor: float,
               text_embeds: torch.Tensor, uncond_embed: torch.Tensor, steps: int, batch_size: int = 128,
               lr: float = 2e-3, prompt_dropout: float = 0.1, seed: int = 0, ckpt=None,
               ckpt_every: int = 100, log=print) -> list[float]:
    """epsilon-prediction L_simple on VAE latents (sampled from the posterior, scaled), conditioned on
    precomputed frozen text hidden states; with probability ``prompt_dropout`` a sample's condition is
    the empty prompt's (classifier-free guidance)."""
    sched = noise_scheduler()
    acp = sched.alphas_cumprod.float()
    n = latent_mean.shape[0]
    bs = min(batch_size, n)

    def loss_fn(step, gen):
        idx = torch.randint(0, n, (bs,), generator=gen)
        z0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen))
        z0 = z0 * scaling_factor
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (bs,), generator=gen)
        a = acp[t].sqrt()[:, None, None, None]
        s = (1 - acp[t]).sqrt()[:, None, None, None]
        cond = text_embeds[idx].clone()
        drop = torch.rand(bs, generator=gen) < prompt_dropout
        cond[drop] = uncond_embed
        pred = unet(a * z0 + s * noise, t, encoder_hidden_states=cond).sample
        return torch.nn.functional.mse_loss(pred, noise)

    return train_loop(unet, loss_fn, steps, lr, ckpt=ckpt, ckpt_every=ckpt_every, seed=seed,
                      name="unet", log=log)


# --------------------------------------------------------------------------------------------------
# The whole miniature world
# --------------------------------------------------------------------------------------------------
@dataclass
class MiniatureConfig:
    """Sizes and steps of the miniature pretraining (the ``01_prepare`` parameters of that name)."""
    image_size: int = 16
    seed: int = 0
    pool_shift: dict = field(default_factory=lambda: dict(DEFAULT_SHIFT))
    caption_wrong_rate: float = 0.1
    caption_missing_rate: float = 0.2
    caption_noise_rate: float = 0.5
    caption_style_rate: float = 0.5
    model_max_length: int = 16
    clip_width: int = 64
    clip_layers: int = 2
    clip_heads: int = 4
    clip_patch: int = 4
    clip_steps: int = 300
    clip_batch: int = 256
    clip_lr: float = 1e-3
    vae_channels: list = field(default_factory=lambda: [32, 64])
    vae_steps: int = 300
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    unet_channels: list = field(default_factory=lambda: [32, 64])
    unet_layers_per_block: int = 1
    unet_steps: int = 1200
    unet_batch: int = 64
    unet_lr: float = 2e-3
    prompt_dropout: float = 0.1
    ckpt_every: int = 100

    def part(self, prefix: str) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k.startswith(prefix)}


def pool_fingerprint(pool_rows: Sequence[dict]) -> str:
    """Hash of the pool's ids and labels (a changed split retrains everything)."""
    h = hashlib.sha256()
    for r in pool_rows:
        h.update(f"{r['id']}|{r['label']}|{r.get('path', '')}\n".encode())
    return h.hexdigest()[:16]


def make_pool(pool_rows: Sequence[dict], pool_images: torch.Tensor, class_names: Sequence[str],
              cfg: MiniatureConfig) -> dict[str, Any]:
    """The upstream "web" pool: shifted images, captions (with their kind), style words."""
    ids = [r["id"] for r in pool_rows]
    labels = [int(r["label"]) for r in pool_rows]
    images, styles = shift_images(pool_images, ids, cfg.seed, cfg.pool_shift)
    caps = web_captions(ids, labels, class_names, cfg.seed, cfg.caption_wrong_rate,
                        cfg.caption_missing_rate, cfg.caption_noise_rate, cfg.caption_style_rate, styles)
    return {"ids": ids, "labels": labels, "images": images, "styles": styles, "captions": caps}


def build_miniature(art_dir: str | os.PathLike, pool_rows: Sequence[dict], pool_images: torch.Tensor,
                    class_names: Sequence[str], cfg: MiniatureConfig, force: bool = False,
                    log=print) -> dict[str, Any]:
    """Pretrain (or reuse) the miniature CLIP, VAE and base model on the pool.

    ``art_dir`` is the run's ``artifacts/`` folder; ``pool_images`` uint8 ``[N,3,S,S]`` are the
    **unshifted** pool images (the shift and captions are applied here, deterministically).
    Returns ``{"clip", "vae", "base": paths, "built": {name: bool}, "seconds": {name: float},
    "hashes": {...}, "pool": make_pool(...), "losses": {name: [...]}}``.
    """
    from transformers import CLIPTokenizer

    from .models import build_tokenizer

    art = Path(art_dir)
    mini = art / "miniature"
    work = mini / ".work"
    work.mkdir(parents=True, exist_ok=True)
    pool = make_pool(pool_rows, pool_images, class_names, cfg)
    fp = pool_fingerprint(pool_rows)
    data_key = {"pool": fp, "image_size": cfg.image_size, "seed": cfg.seed,
                "class_names": list(class_names), "version": VERSION}
    pool_key = dict(data_key, shift=cfg.pool_shift, **cfg.part("caption_"))
    res: dict[str, Any] = {"built": {}, "seconds": {}, "losses": {}, "pool": pool}

    # --- CLIP (with the tokenizer) -----------------------------------------------------------------
    clip_params = dict(pool_key, model_max_length=cfg.model_max_length, **cfg.part("clip_"))
    clip_hash = params_hash(clip_params)

    def build_clip_dir(tmp: Path) -> None:
        tok = build_tokenizer(vocabulary(class_names), None, cfg.model_max_length)
        model = build_clip(tok, cfg.image_size, cfg.clip_width, cfg.clip_layers, cfg.clip_heads,
                           cfg.clip_patch, cfg.seed)
        tokens = tokenize(tok, [c["caption"] for c in pool["captions"]])
        res["losses"]["clip"] = train_clip(model, pool["images"], tokens, cfg.clip_steps, cfg.clip_batch,
                                           cfg.clip_lr, cfg.seed, work / f"clip-{clip_hash}.pt",
                                           cfg.ckpt_every, log)
        save_clip(model, tok, tmp, cfg.image_size)

    t0 = time.perf_counter()
    res["clip"], res["built"]["clip"] = cached_artifact(mini / "clip", clip_params, build_clip_dir,
                                                        force, log)
    res["seconds"]["clip"] = time.perf_counter() - t0

    # --- VAE ---------------------------------------------------------------------------------------
    vae_params = dict(pool_key, **cfg.part("vae_"))
    vae_hash = params_hash(vae_params)

    def build_vae_dir(tmp: Path) -> None:
        vae = build_vae(cfg.image_size, cfg.vae_channels, seed=cfg.seed)
        res["losses"]["vae"] = train_vae(vae, pool["images"], cfg.vae_steps, cfg.vae_batch, cfg.vae_lr,
                                         cfg.vae_kl_weight, cfg.seed, work / f"vae-{vae_hash}.pt",
                                         cfg.ckpt_every, log)
        mean, _ = encode_latents(vae, pool["images"])
        vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
        vae.save_pretrained(tmp, safe_serialization=True)

    t0 = time.perf_counter()
    res["vae"], res["built"]["vae"] = cached_artifact(mini / "vae", vae_params, build_vae_dir, force, log)
    res["seconds"]["vae"] = time.perf_counter() - t0

    # --- base: UNet on the frozen CLIP text tower ------------------------------------------------------
    base_params = dict(pool_key, clip=artifact_hash(res["clip"]), vae=artifact_hash(res["vae"]),
                       **cfg.part("unet_"), prompt_dropout=cfg.prompt_dropout)
    base_hash = params_hash(base_params)

    def build_base_dir(tmp: Path) -> None:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        from .features import encode_prompts
        from .models import save_sd_pipeline

        from transformers.utils import logging as tlog

        tok = CLIPTokenizer.from_pretrained(res["clip"])
        verbosity = tlog.get_verbosity()
        tlog.set_verbosity_error()  # the vision weights are "unexpected" for the text tower: expected
        try:
            text_encoder = CLIPTextModel.from_pretrained(res["clip"]).eval()  # the CLIP's text tower
        finally:
            tlog.set_verbosity(verbosity)
        vae = AutoencoderKL.from_pretrained(res["vae"]).eval()
        mean, std = encode_latents(vae, pool["images"])
        prompts = [c["caption"] for c in pool["captions"]]
        with torch.no_grad():
            embeds = torch.cat([encode_prompts(text_encoder, tok, prompts[s:s + 512])
                                for s in range(0, len(prompts), 512)])
            uncond = encode_prompts(text_encoder, tok, [""])[0]
        unet = build_unet(mean.shape[-1], text_encoder.config.hidden_size, cfg.unet_channels,
                          vae.config.latent_channels, cfg.unet_layers_per_block, seed=cfg.seed)
        res["losses"]["unet"] = train_unet(unet, mean, std, vae.config.scaling_factor, embeds, uncond,
                                           cfg.unet_steps, cfg.unet_batch, cfg.unet_lr, cfg.prompt_dropout,
                                           cfg.seed, work / f"unet-{base_hash}.pt", cfg.ckpt_every, log)
        save_sd_pipeline(tmp, vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                         scheduler=sampling_scheduler())

    t0 = time.perf_counter()
    res["base"], res["built"]["base"] = cached_artifact(mini / "base", base_params, build_base_dir,
                                                        force, log)
    res["seconds"]["base"] = time.perf_counter() - t0
    res["hashes"] = {k: artifact_hash(res[k]) for k in ("clip", "vae", "base")}
    return res


# --------------------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------------------
def sample_base(pipe, class_names: Sequence[str], n_per_class: int, guidance_scale: float = 2.0,
                num_inference_steps: int = 20, seed: int = 0, batch_size: int = 100,
                negative_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` images per class from prompts ``photo of <class>`` (stock pipeline call).
    Returns ``(uint8 [C*n,3,H,W], labels [C*n])``."""
    from .features import build_prompt

    labels = [c for c in range(len(class_names)) for _ in range(n_per_class)]
    out = []
    for s in range(0, len(labels), batch_size):
        lab = labels[s:s + batch_size]
        g = torch.Generator().manual_seed(int(seed) * 100_003 + s)
        kw = {} if negative_prompt is None else {"negative_prompt": [negative_prompt] * len(lab)}
        with torch.no_grad():
            res = pipe(prompt=[build_prompt(class_names[c]) for c in lab], guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps, generator=g, output_type="np", **kw)
        out.append(torch.from_numpy((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
                   .permute(0, 3, 1, 2))
    return torch.cat(out), torch.tensor(labels)


def probe_features(images: torch.Tensor, normalize_style: bool = True, max_size: int = 16) -> np.ndarray:
    """Pixel features for a linear probe (images average-pooled to at most ``max_size``): with
    ``normalize_style``, the luminance of each image standardised to zero mean and unit variance
    (blind to tint and contrast, so the probe measures the class content); else raw RGB in [0, 1]."""
    import torch.nn.functional as F

    x = images.float() / 255.0
    if x.shape[-1] > max_size:
        x = F.adaptive_avg_pool2d(x, max_size)
    if normalize_style:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).flatten(1)
        x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
    return x.flatten(1).numpy()


def probe_accuracy(train_images: torch.Tensor, train_labels, eval_sets: dict[str, tuple],
                   normalize_style: bool = True, seed: int = 0) -> dict[str, float]:
    """Logistic regression on real target-train pixels (:func:`probe_features`), accuracy on each
    ``name: (images, labels)`` of ``eval_sets``."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=0.5, random_state=seed)
    clf.fit(probe_features(train_images, normalize_style), np.asarray(train_labels))
    return {k: float((clf.predict(probe_features(x, normalize_style)) == np.asarray(y)).mean())
            for k, (x, y) in eval_sets.items()}


def feature_probe_accuracy(train_feats: torch.Tensor, train_labels, eval_sets: dict[str, tuple],
                           seed: int = 0) -> dict[str, float]:
    """Logistic regression on (standardised) CLIP features of the real target train set, accuracy on
    each ``name: (features, labels)`` of ``eval_sets`` (for data sets whose class is in the colours,
    such as EuroSAT, where a luminance probe is blind)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5, random_state=seed))
    clf.fit(np.asarray(train_feats, dtype=np.float64), np.asarray(train_labels))
    return {k: float((clf.predict(np.asarray(x, dtype=np.float64)) == np.asarray(y)).mean())
            for k, (x, y) in eval_sets.items()}


def mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased squared MMD, Gaussian kernel with the median heuristic (``losses.mmd2``)."""
    from .losses import mmd2 as _mmd2

    return float(_mmd2(x, y, kernel="gaussian", unbiased=True))


def reset_stale_features(features_dir: str | os.PathLike, clip_key: str) -> bool:
    """Feature caches are tied to the CLIP that made them: when ``clip_key`` (the CLIP's hash, or
    the id of ``clip_model``) differs from the one recorded in ``features/clip_key.json``, every
    ``*.safetensors`` there is removed. Returns True if something was removed."""
    d = Path(features_dir)
    d.mkdir(parents=True, exist_ok=True)
    rec = d / "clip_key.json"
    old = read_json(rec).get("clip") if rec.exists() else None
    removed = False
    if old != clip_key:
        for f in d.glob("*.safetensors"):
            f.unlink()
            removed = True
        write_json(rec, {"clip": clip_key})
    return removed


def remove_work(art_dir: str | os.PathLike) -> None:
    """Remove leftover training checkpoints of the miniature pretraining."""
    shutil.rmtree(Path(art_dir) / "miniature" / ".work", ignore_errors=True)


__all__ = [
    "CAPTION_TEMPLATES", "DEFAULT_SHIFT", "GENERIC_CAPTIONS", "MiniatureConfig", "NOISE_WORDS",
    "artifact_hash", "build_clip", "build_miniature", "build_unet", "build_vae", "cached_artifact",
    "caption_stats", "clip_image_embeds", "clip_normalize", "encode_latents", "feature_probe_accuracy",
    "is_cached", "key_path",
    "make_pool", "mmd2", "noise_scheduler", "params_hash", "pool_fingerprint", "probe_accuracy",
    "probe_features", "reset_stale_features", "sample_base", "sampling_scheduler", "save_clip",
    "shift_images", "tokenize", "train_clip", "train_loop", "train_unet", "train_vae", "vocabulary",
    "web_captions",
]
