"""Pretraining of the miniature world's models from scratch on the upstream pool, in their real formats.

The paper's generator (Stable Diffusion 1.5) and CLIP (ViT-L/14) were pretrained on LAION, not on the
target task (Real-Fake, Sec. 3 and 4.1). In miniature, on the shifted, web-captioned pool of
:mod:`realfake_utils.pool` (:func:`build_miniature`), each part a folder in its real on-disk format:

- ``artifacts/miniature/clip``: a tiny ``CLIPModel`` (ViT + text tower) trained contrastively on pool
  image / caption pairs; ``CLIPVisionModelWithProjection.from_pretrained`` loads its vision tower and its
  ``projection_dim`` equals its text width (the visual guidance token of Sec. 3.2 puts an image embedding
  in place of a text token, as ViT-L/14's 768 equals SD 1.5's text width);
- ``artifacts/miniature/vae``: a tiny ``AutoencoderKL`` (digits default ``[32, 64]``: 16x16x3 -> 8x8x4).
  With ONE block (``vae_channels = [16]``) it does not downsample: the latent has the image's size and 4
  channels and the VAE is trained to be near the identity (mean abs. error ~7/255 after 400 steps), so the
  diffusion model works in effect in pixel space. Measured on digits at this CPU budget (UNet
  ``[16, 32, 64]`` at 16x16, 1500 steps of 32): the base model's samples show the prompted class 0.32 of
  the time (sample probe, guidance 2) against 0.72 for the 8x8 latent, so it is an option, not the
  default. ``scaling_factor`` = 1 / std of the latents. The VAE's training length sets the capacity
  ceiling (issue 12, digits, measured on the 2-core machine): decoded *sampled* latents of the real train
  images (what the UNet learns to produce) train the kit's classifier to 84.4 % (real 97.2 %) after 300
  steps (posterior std 0.17 of a latent std 2.2, mean abs. error 11.8/255) and to 92.5 % after 1200 (std
  0.055, error 5.4/255): the digits default is 1200;
- ``artifacts/miniature/base``: a ``StableDiffusionPipeline`` folder: that VAE, a ``UNet2DConditionModel``
  conditioned on the **frozen** CLIP text tower's last hidden states (as SD is on ViT-L/14's), trained
  with epsilon prediction (L_simple, DDPM Eq. 14 as in SD), a cosine noise schedule, prompt dropout for
  classifier-free guidance and EMA weights (the weights saved are the EMA's, as SD's releases are), the
  CLIP text tower and tokenizer, and a DDIM scheduler config (``models.load_pipeline`` samples with UniPC
  from it, as the official synthesis code does).

:func:`train_oracle` trains the same UNet architecture (same VAE and text encoder) on the **target train
split** itself: the capacity check. If samples of this oracle do not train a classifier nearly as well as
the real images, the architecture / budget cannot represent the target and no fine-tuning result means
anything.

Caching: each part's folder holds ``DONE.json`` (``rundir.mark_done``: the content hash of the part's
parameters, of the pool and of the parts it builds on, plus the hash of every file) and
``training_log.json`` (losses per step, steps, seconds, final loss): a rerun with the same parameters
reuses the part and rebuilds its summary and loss curve from that log; a changed parameter retrains it
and what depends on it. Training checkpoints every ``ckpt_every`` steps under ``artifacts/miniature/.work/``
(read with ``torch.load(weights_only=True)``), so a killed run resumes; folders are written to a temporary
name and renamed.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .features import encode_prompts
from .models import (_quiet_transformers, atomic_dir, build_tokenizer, clip_image_processor,
                     save_clip_tokenizer, save_sd_pipeline)
from .pool import PoolConfig, make_pool, pool_fingerprint, vocabulary
from .rundir import atomic_path, content_hash, done_info, is_done, mark_done, read_json, write_json

VERSION = 2  # bump when the training code changes in a way that invalidates cached parts
TRAINING_LOG = "training_log.json"
PARTS = ("clip", "vae", "base")


# --------------------------------------------------------------------------------------------------
# Resumable training loop (AdamW, one-cycle schedule, optional EMA)
# --------------------------------------------------------------------------------------------------
def _save_ckpt(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_loop(model: torch.nn.Module, loss_fn: Callable[[int, torch.Generator], torch.Tensor],
               steps: int, lr: float, ckpt: str | os.PathLike | None = None, ckpt_every: int = 100,
               weight_decay: float = 0.01, seed: int = 0, log_every: int = 50, name: str = "",
               log=print, ema: float = 0.0) -> list[float]:
    """AdamW with a one-cycle learning rate over ``steps``; ``loss_fn(step, generator)`` returns the
    loss of one batch (drawn from ``generator``, re-seeded from ``(seed, step)`` so a resumed run
    draws exactly the batches it would have). With ``ema`` > 0, an exponential moving average of the
    weights (decay ``min(ema, (1 + t) / (10 + t))``, the warm-up of ``diffusers.EMAModel``) is kept and
    copied into ``model`` at the end. With ``ckpt`` (a file), model, EMA, optimiser, schedule and loss
    history are saved every ``ckpt_every`` steps and a rerun resumes from there (``weights_only=True``);
    the file is removed at the end. Returns the per-step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1),
                                                pct_start=0.15, anneal_strategy="cos")
    shadow = [p.detach().clone() for p in params] if ema > 0 else None
    losses: list[float] = []
    start = 0
    ckpt = Path(ckpt) if ckpt else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("steps") == steps:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            if shadow is not None:
                shadow = [t.clone() for t in state["ema"]]
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
        if shadow is not None:
            decay = min(ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(shadow, [p.detach() for p in params], 1 - decay)
        losses.append(float(loss.detach()))
        done = step + 1
        if log_every and (done % log_every == 0 or done == steps):
            recent = np.mean(losses[-log_every:])
            log(f"{name}: step {done}/{steps} loss {recent:.4f} ({time.perf_counter() - t0:.0f} s)")
        if ckpt is not None and ckpt_every and done % ckpt_every == 0 and done < steps:
            _save_ckpt(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(),
                              "sched": sched.state_dict(), "losses": losses, "step": done,
                              "steps": steps, "ema": shadow if shadow is not None else []})
    if shadow is not None:
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s)
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
def build_vae(image_size: int, channels: Sequence[int] = (16,), latent_channels: int = 4,
              seed: int = 0):
    """A tiny ``AutoencoderKL``: ``image_size`` -> ``image_size / 2**(len(channels)-1)`` latents. One
    block (``channels = [16]``) does not downsample: a 16x16x3 image has a 16x16x4 latent (the mid block's
    attention is off, as it is pointless at this size)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    channels = tuple(int(c) for c in channels)
    if not channels:
        raise ValueError("vae_channels needs at least one entry, e.g. [32] (no downsampling)")
    if image_size % (2 ** (len(channels) - 1)):
        raise ValueError(f"image_size {image_size} is not divisible by the VAE's down factor "
                         f"{2 ** (len(channels) - 1)} (vae_channels {list(channels)})")
    groups = math.gcd(*channels, 16)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=channels, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels),
                         norm_num_groups=groups, sample_size=image_size,
                         mid_block_add_attention=len(channels) > 1)


def to_vae_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1] (the range SD's VAE works in)."""
    return images.float() / 127.5 - 1.0


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-6, seed: int = 0, ckpt=None, ckpt_every: int = 100,
              log=print) -> list[float]:
    """Reconstruction (MSE in [-1, 1]) + ``kl_weight`` * KL per element; returns the losses."""
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


@torch.no_grad()
def reconstruction_error(vae, images: torch.Tensor) -> float:
    """Mean absolute error in [0, 255] of decode(encode mean) (how near the identity the VAE is)."""
    mean, _ = encode_latents(vae, images)
    rec = torch.cat([vae.decode(mean[s:s + 256]).sample for s in range(0, mean.shape[0], 256)])
    return float(((rec.clamp(-1, 1) + 1) * 127.5 - images.float()).abs().mean())


def build_unet(latent_size: int, cross_attention_dim: int, channels: Sequence[int] = (16, 32, 64),
               latent_channels: int = 4, layers_per_block: int = 1, attention_head_dim: int = 8,
               max_attention_size: int = 8, seed: int = 0):
    """A small ``UNet2DConditionModel`` conditioned on text hidden states of width
    ``cross_attention_dim``: cross-attention (``CrossAttn*Block2D``) at every level whose resolution is
    at most ``max_attention_size`` (8x8 and 4x4 for a 16x16 latent; every level for an 8x8 one), plain
    ResNet blocks above (attention over 256 positions costs more than it gives at this size)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    channels = tuple(int(c) for c in channels)
    n = len(channels)
    if latent_size % (2 ** (n - 1)):
        raise ValueError(f"latent size {latent_size} is not divisible by 2**{n - 1} (unet_channels "
                         f"{list(channels)}): use fewer levels or a larger image")
    attn = [latent_size // 2 ** i <= max_attention_size for i in range(n)]
    if not any(attn):
        attn[-1] = True
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=channels, layers_per_block=layers_per_block,
        down_block_types=down, up_block_types=up,
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=math.gcd(*channels, 16))


def noise_scheduler():
    """DDPM training schedule of the miniature base model: 1000 steps, cosine ("squaredcos_cap_v2",
    Nichol & Dhariwal 2021: better than SD's scaled-linear betas at small image sizes)."""
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
               text_embeds: torch.Tensor, uncond_embed: torch.Tensor, steps: int, batch_size: int = 64,
               lr: float = 2e-3, prompt_dropout: float = 0.1, seed: int = 0, ckpt=None,
               ckpt_every: int = 100, log=print, ema: float = 0.0, name: str = "unet") -> list[float]:
    """epsilon-prediction L_simple (Ho et al. 2020, Eq. 14; SD's objective) on VAE latents (sampled
    from the posterior, scaled), conditioned on precomputed frozen text hidden states; with probability
    ``prompt_dropout`` a sample's condition is the empty prompt's (classifier-free guidance)."""
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
                      name=name, log=log, ema=ema)


# --------------------------------------------------------------------------------------------------
# Parts: cached folders with their training log
# --------------------------------------------------------------------------------------------------
@dataclass
class PartSummary:
    """How one part of the miniature world was obtained in this run (a field of ``PrepareRecord``)."""
    name: str
    built: bool            # trained in this run (False: reused from the run folder)
    steps: int
    final_loss: float | None
    seconds: float         # training time when it was built (also for a reused part)
    params_hash: str       # rundir.content_hash of its parameters, pool and upstream parts
    path: str = ""


def final_loss(losses: Sequence[float], last: int = 20) -> float | None:
    """Mean of the last ``last`` per-step losses (None when there are none)."""
    return float(np.mean(losses[-last:])) if len(losses) else None


def key_path(out_dir: str | os.PathLike) -> Path:
    """``<folder>.params.json`` beside a part: its parameters in readable form (the pool settings
    ``retrieval.miniature_pool_config`` reads from the CLIP's)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".params.json")


def part_key(name: str, params: dict[str, Any]) -> str:
    """The cache key of a part: ``rundir.content_hash`` of its name, the code version and ``params``."""
    return content_hash({"part": name, "version": VERSION, "params": params})


def part_hash(out_dir: str | os.PathLike) -> str:
    """The cache key recorded in a finished part's ``DONE.json`` ('' when it is not finished)."""
    marker = Path(out_dir) / "DONE.json"
    return str(read_json(marker).get("key", "")) if marker.exists() else ""


def training_log(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The part's ``training_log.json`` (losses per step, steps, seconds, final loss); {} if none."""
    p = Path(out_dir) / TRAINING_LOG
    return read_json(p) if p.exists() else {}


def build_part(out_dir: str | os.PathLike, name: str, params: dict[str, Any],
               build: Callable[[Path], Sequence[float]], force: bool = False, log=print) -> PartSummary:
    """Build a part folder once per :func:`part_key`.

    A finished folder (``rundir.is_done`` with that key: every file it lists unchanged) is reused and its
    summary rebuilt from ``DONE.json``. Else ``build(tmp)`` writes the part into a temporary folder and
    returns its per-step losses; ``training_log.json`` and the done marker are written into it last and
    the folder then replaces ``out_dir`` (a kill at any point leaves the old part or nothing, never a
    half-written one under the final name)."""
    out_dir = Path(out_dir)
    key = part_key(name, params)
    if not force and is_done(out_dir, key):
        info = done_info(out_dir)
        log(f"{name}: cached ({key}), skipping training")
        return PartSummary(name, False, int(info.get("steps", 0)), info.get("final_loss"),
                           float(info.get("seconds", 0.0)), key, str(out_dir))
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        losses = [float(v) for v in build(tmp)]
        info = {"steps": len(losses), "final_loss": final_loss(losses),
                "seconds": round(time.perf_counter() - t0, 1), "params_hash": key}
        write_json(tmp / TRAINING_LOG, dict(info, part=name, losses=losses))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                       if p.is_file() and not p.name.startswith("."))
        mark_done(tmp, key, files, info)
    write_json(key_path(out_dir), {"hash": key, "params": params, "version": VERSION})
    return PartSummary(name, True, info["steps"], info["final_loss"], info["seconds"], key, str(out_dir))


# --------------------------------------------------------------------------------------------------
# The whole miniature world
# --------------------------------------------------------------------------------------------------
@dataclass
class MiniatureConfig(PoolConfig):
    """The pool's gap (inherited from :class:`pool.PoolConfig`) and the sizes / steps of the miniature
    pretraining (the ``01_prepare`` parameters of these names)."""
    image_size: int = 16
    model_max_length: int = 16
    clip_width: int = 64
    clip_layers: int = 2
    clip_heads: int = 4
    clip_patch: int = 4
    clip_steps: int = 300
    clip_batch: int = 256
    clip_lr: float = 1e-3
    vae_channels: list = field(default_factory=lambda: [32, 64])
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_channels: list = field(default_factory=lambda: [32, 64])
    unet_layers_per_block: int = 1
    unet_steps: int = 1200
    unet_batch: int = 64
    unet_lr: float = 2e-3
    unet_ema: float = 0.995
    prompt_dropout: float = 0.1
    oracle_steps: int = 0          # 0: no oracle; else the UNet steps of the capacity oracle
    ckpt_every: int = 100

    def part(self, prefix: str) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k.startswith(prefix)}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "MiniatureConfig":
        """The config from a notebook's parameters (the keys of the fields' names; others ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else dict(v) if isinstance(v, dict) else v)
                      for k, v in params.items() if k in names})


def _load_text_encoder(clip_dir: Path):
    from transformers import CLIPTextModel, CLIPTokenizer

    with _quiet_transformers():  # the vision weights are "unexpected" for the text tower: expected
        text_encoder = CLIPTextModel.from_pretrained(clip_dir).eval()
    return text_encoder, CLIPTokenizer.from_pretrained(clip_dir)


def _train_diffusion(tmp: Path, clip_dir: Path, vae_dir: Path, images: torch.Tensor, prompts: Sequence[str],
                     cfg: MiniatureConfig, steps: int, ckpt: Path, log, name: str) -> list[float]:
    """Train a UNet on (images, prompts) with the frozen CLIP text tower and the VAE, save the
    ``StableDiffusionPipeline`` folder into ``tmp``; returns the losses."""
    from diffusers import AutoencoderKL

    text_encoder, tok = _load_text_encoder(clip_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    mean, std = encode_latents(vae, images)
    with torch.no_grad():
        embeds = torch.cat([encode_prompts(text_encoder, tok, list(prompts[s:s + 512]))
                            for s in range(0, len(prompts), 512)])
        uncond = encode_prompts(text_encoder, tok, [""])[0]
    unet = build_unet(mean.shape[-1], text_encoder.config.hidden_size, cfg.unet_channels,
                      vae.config.latent_channels, cfg.unet_layers_per_block, seed=cfg.seed)
    losses = train_unet(unet, mean, std, vae.config.scaling_factor, embeds, uncond, steps, cfg.unet_batch,
                        cfg.unet_lr, cfg.prompt_dropout, cfg.seed, ckpt, cfg.ckpt_every, log,
                        ema=cfg.unet_ema, name=name)
    save_sd_pipeline(tmp, vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                     scheduler=sampling_scheduler())
    return losses


def build_miniature(art_dir: str | os.PathLike, pool_rows: Sequence[dict], pool_images: torch.Tensor,
                    class_names: Sequence[str], cfg: MiniatureConfig, force: bool = False,
                    log=print) -> dict[str, Any]:
    """Pretrain (or reuse) the miniature CLIP, VAE and base model on the pool.

    ``art_dir`` is the run's ``artifacts/`` folder; ``pool_images`` uint8 ``[N,3,S,S]`` are the
    **unshifted** pool images (the shift and captions are applied here, deterministically).
    Returns ``{"clip", "vae", "base": paths, "parts": {name: PartSummary}, "pool": make_pool(...)}``.
    """
    art = Path(art_dir)
    mini = art / "miniature"
    work = mini / ".work"
    work.mkdir(parents=True, exist_ok=True)
    pool = make_pool(pool_rows, pool_images, class_names, cfg)
    data_key = {"pool": pool_fingerprint(pool_rows), "image_size": cfg.image_size, "seed": cfg.seed,
                "class_names": list(class_names)}
    pool_key = dict(data_key, shift=cfg.pool_shift, **cfg.part("caption_"))
    res: dict[str, Any] = {"parts": {}, "pool": pool}

    clip_params = dict(pool_key, model_max_length=cfg.model_max_length, **cfg.part("clip_"))

    def build_clip_dir(tmp: Path) -> list[float]:
        tok = build_tokenizer(vocabulary(class_names), None, cfg.model_max_length)
        model = build_clip(tok, cfg.image_size, cfg.clip_width, cfg.clip_layers, cfg.clip_heads,
                           cfg.clip_patch, cfg.seed)
        tokens = tokenize(tok, [c["caption"] for c in pool["captions"]])
        losses = train_clip(model, pool["images"], tokens, cfg.clip_steps, cfg.clip_batch, cfg.clip_lr,
                            cfg.seed, work / f"clip-{part_key('clip', clip_params)}.pt", cfg.ckpt_every, log)
        save_clip(model, tok, tmp, cfg.image_size)
        return losses

    res["parts"]["clip"] = build_part(mini / "clip", "clip", clip_params, build_clip_dir, force, log)

    vae_params = dict(pool_key, **cfg.part("vae_"))

    def build_vae_dir(tmp: Path) -> list[float]:
        vae = build_vae(cfg.image_size, cfg.vae_channels, seed=cfg.seed)
        losses = train_vae(vae, pool["images"], cfg.vae_steps, cfg.vae_batch, cfg.vae_lr, cfg.vae_kl_weight,
                           cfg.seed, work / f"vae-{part_key('vae', vae_params)}.pt", cfg.ckpt_every, log)
        mean, _ = encode_latents(vae, pool["images"])
        vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
        vae.save_pretrained(tmp, safe_serialization=True)
        return losses

    res["parts"]["vae"] = build_part(mini / "vae", "vae", vae_params, build_vae_dir, force, log)

    base_params = dict(pool_key, clip=res["parts"]["clip"].params_hash, vae=res["parts"]["vae"].params_hash,
                       **cfg.part("unet_"), prompt_dropout=cfg.prompt_dropout)

    def build_base_dir(tmp: Path) -> list[float]:
        return _train_diffusion(tmp, mini / "clip", mini / "vae", pool["images"],
                                [c["caption"] for c in pool["captions"]], cfg, cfg.unet_steps,
                                work / f"unet-{part_key('base', base_params)}.pt", log, "unet")

    res["parts"]["base"] = build_part(mini / "base", "base", base_params, build_base_dir, force, log)
    for k in PARTS:
        res[k] = mini / k
    return res


def train_oracle(art_dir: str | os.PathLike, train_rows: Sequence[dict], train_images: torch.Tensor,
                 prompts: Sequence[str], cfg: MiniatureConfig, force: bool = False, log=print) -> PartSummary:
    """The capacity oracle: the base model's architecture (same VAE, same frozen text tower, same UNet
    config, EMA and schedule) trained from scratch for ``cfg.oracle_steps`` on the **target train split**
    (its images with the fine-tuning prompts ``photo of [classname], [caption]``), saved as
    ``artifacts/miniature/oracle`` (a ``StableDiffusionPipeline`` folder). Its samples measure what
    this generator can represent of the target at this budget: an upper reference for fine-tuning."""
    if cfg.oracle_steps <= 0:
        raise ValueError("oracle_steps must be > 0 to train the capacity oracle")
    mini = Path(art_dir) / "miniature"
    params = {"train": pool_fingerprint(train_rows), "prompts": content_hash(list(prompts)),
              "clip": part_hash(mini / "clip"), "vae": part_hash(mini / "vae"), "seed": cfg.seed,
              "steps": cfg.oracle_steps, **cfg.part("unet_"), "prompt_dropout": cfg.prompt_dropout}
    if not params["clip"] or not params["vae"]:
        raise FileNotFoundError(f"no finished miniature CLIP / VAE under {mini}: run build_miniature first")

    def build(tmp: Path) -> list[float]:
        return _train_diffusion(tmp, mini / "clip", mini / "vae", train_images, prompts, cfg, cfg.oracle_steps,
                                mini / ".work" / f"oracle-{part_key('oracle', params)}.pt", log, "oracle")

    return build_part(mini / "oracle", "oracle", params, build, force, log)


def loss_figure(parts: dict[str, PartSummary | str | os.PathLike], smooth: int = 30):
    """One panel per part: its per-step training loss (moving average), read from the part's
    ``training_log.json`` (so a reused part keeps its panel)."""
    import matplotlib.pyplot as plt

    logs = {name: training_log(p.path if isinstance(p, PartSummary) else p) for name, p in parts.items()}
    logs = {k: v for k, v in logs.items() if v.get("losses")}
    fig, axes = plt.subplots(1, max(1, len(logs)), figsize=(3.2 * max(1, len(logs)), 2.4), squeeze=False)
    for ax, (name, lg) in zip(axes[0], logs.items()):
        ls = np.asarray(lg["losses"], dtype=float)
        k = max(1, len(ls) // smooth)
        ax.plot(np.convolve(ls, np.ones(k) / k, mode="valid"))
        ax.set_title(f"{name} loss (final {lg.get('final_loss', float('nan')):.4f})", fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def remove_work(art_dir: str | os.PathLike) -> None:
    """Remove leftover training checkpoints of the miniature pretraining."""
    shutil.rmtree(Path(art_dir) / "miniature" / ".work", ignore_errors=True)


__all__ = [
    "MiniatureConfig", "PARTS", "PartSummary", "build_clip", "build_miniature", "build_part", "build_unet",
    "build_vae", "clip_image_embeds", "clip_normalize", "encode_latents", "final_loss", "key_path",
    "loss_figure", "noise_scheduler", "part_hash", "part_key", "reconstruction_error", "remove_work",
    "sampling_scheduler", "save_clip", "tokenize", "train_clip", "train_loop", "train_oracle", "train_unet",
    "train_vae", "training_log", "to_vae_range",
]
