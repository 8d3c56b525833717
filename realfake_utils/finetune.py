"""LoRA fine-tuning of the base model with the DM loss and the visual guidance token (Sec. 3.1-3.2).

Real-Fake fine-tunes Stable Diffusion on the target training set so that the generator's distribution
moves towards the target's: LoRA (rank ``r``, alpha) on the UNet attention projections
``to_q, to_k, to_v, to_out.0``, trained with Eq. 21

    L_overall = L_simple (Min-SNR-gamma weighted, Table 7)  +  L_DM  ("paper" or "official" form)

and the visual guidance token (Sec. 3.2): a CLIP image feature appended to the text embeddings (the
paper) or overwriting their last position (the official code), the class mean (the paper) or each
sample's own feature (the official code); see :mod:`realfake_utils.finetune_config`. Everything runs
on stock diffusers: prompt embeddings are computed here and passed to the UNet / pipeline.

Stages (timm's split is the model): :func:`build_train_set` / :func:`load_train_set` (data),
:func:`setup_training` (accelerator, frozen parts, LoRA, optimizer), :func:`resume_or_start`
(latest complete checkpoint of the same cache key), :func:`train_one_epoch`, :func:`save_checkpoint`,
:func:`save_final`; :func:`train_lora` runs them. :func:`train_variants` is the whole of 02: each
Table 2 LoRA variant, samples before / after, MMD before / after, the :class:`FinetuneRecord`.

Batches: the data stream is a concatenation of seeded per-epoch permutations; one optimizer step
consumes the next ``global_batch_size`` items, split over processes and accumulation micro-steps
(per device = global / (processes x accumulation)), so the data order does not depend on the number
of processes, and ``num_train_epochs`` passes over the data are ``ceil(epochs x N / global)`` steps.
Noise and timesteps are functions of ``(seed, micro-step, rank)``: a resumed run sees exactly what an
uninterrupted one would (tested).

Output, in ``artifacts/lora/<variant>/``::

    pytorch_lora_weights.safetensors   loadable by stock ``pipe.load_lora_weights(dir)``
    train_config.json                  configuration, cache key, summary
    steps.jsonl                        one line per optimizer step (appended; a resumed step's line is
                                       appended again and the last one counts, see read_history)
    DONE.json                          written last (rundir.mark_done): key + SHA-256 of the three files
    checkpoints/checkpoint_<i>/        accelerate states while training (removed when done)

A folder is reused only when ``DONE.json`` holds the same cache key (``rundir.content_hash`` of the
configuration, the base model's content identity and the train set's fingerprint: no absolute paths,
no mtimes) and the files still have the hashed bytes; anything else is trained again.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

from . import data, features, losses, models, probe
from .finetune_config import (DM_LOSS_FORMS, GUIDANCE_FEATURES_TRAIN, GUIDANCE_TOKEN_POSITIONS,
                              LORA_TARGET_MODULES, TABLE2_VARIANTS, FinetuneConfig, parse_variant,
                              resolve_variants, variant_name)
from .params import notebook_defaults
from .records import Record
from .rundir import (atomic_path, content_hash, done_info, is_done, mark_done, read_json, tree_sha256,
                     unit_finished, write_json)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRAIN_SET_NAME = "train_set.safetensors"
LOG_NAME = "steps.jsonl"
SUMMARY_NAME = "train_config.json"


# --------------------------------------------------------------------------------------------------
# Training set (images, prompts, CLIP image embeddings), stored once per run folder
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainSet:
    """Target training data as the fine-tuning loop consumes it."""
    images: Any                          # torch.uint8 [N, 3, H, W]
    prompts: list[str]
    labels: Any                          # torch.int64 [N]
    image_embeds: Any = None             # torch.float32 [N, D] (CLIP image embeddings) or None
    ids: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(json.dumps([self.prompts, self.ids, self.class_names]).encode())
        h.update(self.labels.numpy().tobytes())
        if self.image_embeds is not None:
            h.update(self.image_embeds.float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def save_train_set(path: str | os.PathLike, ts: TrainSet) -> Path:
    """Write a :class:`TrainSet` to one safetensors file (tensors + JSON metadata), atomically."""
    from safetensors.torch import save_file

    tensors = {"images": ts.images.contiguous(), "labels": ts.labels.long().contiguous()}
    if ts.image_embeds is not None:
        tensors["image_embeds"] = ts.image_embeds.float().contiguous()
    meta = {"prompts": json.dumps(ts.prompts), "ids": json.dumps(list(ts.ids)),
            "class_names": json.dumps(list(ts.class_names))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_train_set(path: str | os.PathLike) -> TrainSet:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    return TrainSet(images=t["images"], labels=t["labels"], image_embeds=t.get("image_embeds"),
                    prompts=json.loads(meta["prompts"]), ids=json.loads(meta["ids"]),
                    class_names=json.loads(meta["class_names"]))


def build_train_set(run_root: str | os.PathLike, image_size: int, clip_model: str = "",
                    split: str = "train", device: str = "auto", features_path: str = "",
                    out_path: str = "") -> Path:
    """Collect the target ``split`` of a run folder (written by 01_prepare) into one file.

    Images from ``artifacts/data/manifest.csv`` (``data.load_images`` at ``image_size``), prompts
    ``features.build_prompt(class, caption)`` with captions from ``artifacts/captions.json`` when
    present, CLIP image embeddings from the feature cache ``features_path`` (default
    ``artifacts/features/clip_image.safetensors``; computed and cached there by
    ``features.extract_clip_features`` if missing, with ``clip_model`` or the miniature CLIP).
    Returns the path of ``artifacts/lora/train_set.safetensors``, rewritten only when its content
    changes (a retrained CLIP or a new split changes the fingerprint, hence every LoRA's config hash).
    """
    import torch

    root = Path(run_root)
    art = root / "artifacts"
    manifest = art / "data" / "manifest.csv"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} does not exist: run 01_prepare first")
    out = Path(out_path) if out_path else art / "lora" / TRAIN_SET_NAME
    rows = [r for r in data.read_manifest(manifest) if r["split"] == split]
    if not rows:
        raise ValueError(f"no '{split}' rows in {manifest}")
    images = data.load_images(rows, image_size)
    captions = {}
    if (art / "captions.json").exists():
        captions = json.loads((art / "captions.json").read_text())
    ids = [str(r["id"]) for r in rows]
    prompts = [features.build_prompt(r["class_name"], captions.get(i, "")) for r, i in zip(rows, ids)]
    clip = clip_model or str(art / "miniature" / "clip")
    fpath = Path(features_path) if features_path else art / "features" / "clip_image.safetensors"
    all_rows = data.read_manifest(manifest)
    names = data.class_names(all_rows)
    embeds = features.extract_clip_features(clip, images, ids, fpath, device=device)
    ts = TrainSet(images=images, prompts=prompts, labels=torch.tensor([int(r["label"]) for r in rows]),
                  image_embeds=torch.as_tensor(embeds).float(), ids=ids, class_names=list(names))
    if out.exists():
        try:
            if load_train_set(out).fingerprint() == ts.fingerprint():
                return out
        except Exception:  # unreadable: rewrite it
            pass
    return save_train_set(out, ts)


# --------------------------------------------------------------------------------------------------
# Deterministic data order and randomness
# --------------------------------------------------------------------------------------------------
def _epoch_perm(n: int, seed: int, epoch: int):
    import torch

    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def batch_indices(micro_step: int, batch_size: int, n: int, seed: int, rank: int = 0,
                  world: int = 1) -> list[int]:
    """Sample indices of one micro-batch on one process.

    The data stream is the concatenation of per-epoch permutations seeded by ``(seed, epoch)``; the
    global micro-batch ``micro_step`` takes the next ``batch_size * world`` items and process
    ``rank`` its slice. A pure function of its arguments, so a resumed run replays the same order.
    """
    gb = batch_size * world
    start = micro_step * gb + rank * batch_size
    out: list[int] = []
    perms: dict[int, Any] = {}
    for pos in range(start, start + batch_size):
        epoch, off = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = _epoch_perm(n, seed, epoch)
        out.append(int(perms[epoch][off]))
    return out


def step_generator(seed: int, micro_step: int, rank: int = 0):
    """CPU generator for the noise, timesteps, VAE sampling and flips of one micro-step."""
    import torch

    return torch.Generator().manual_seed(((int(seed) * 1_000_003 + int(micro_step)) * 257 + rank) % (2**63))


# --------------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------------
def add_lora(unet, rank: int, alpha: float, target_modules: Sequence[str] = LORA_TARGET_MODULES) -> list:
    """Freeze ``unet`` and add a peft LoRA adapter on its attention projections; returns the
    trainable parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian",
                                target_modules=list(target_modules)))
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state_dict(unet) -> dict:
    """LoRA weights of ``unet`` in the diffusers format that ``save_lora_weights`` writes."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, out_dir: str | os.PathLike) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (atomically) with stock
    ``StableDiffusionPipeline.save_lora_weights``."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=out_dir))
    try:
        state = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()}
        StableDiffusionPipeline.save_lora_weights(str(tmp), unet_lora_layers=state,
                                                  weight_name=LORA_WEIGHT_NAME)
        os.replace(tmp / LORA_WEIGHT_NAME, out_dir / LORA_WEIGHT_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / LORA_WEIGHT_NAME


def training_guidance_features(train_set: TrainSet, mode: str = "class_mean"):
    """The guidance feature of each training sample ``[N, D]``: the mean CLIP image embedding of its
    class over the train set (``class_mean``, Sec. 3.2: "the mean of image embeddings ... of a
    class") or its own embedding (``sample``, the official code's ``img_features``)."""
    import torch

    if mode not in GUIDANCE_FEATURES_TRAIN:
        raise ValueError(f"guidance_feature_train must be one of {GUIDANCE_FEATURES_TRAIN}, got {mode!r}")
    if train_set.image_embeds is None:
        raise ValueError("visual guidance needs the train set's CLIP image embeddings (none stored)")
    emb = train_set.image_embeds.float()
    if mode == "sample":
        return emb
    labels = train_set.labels.long()
    out = torch.empty_like(emb)
    for c in labels.unique().tolist():     # classes of this set (06's members may lack some)
        sel = labels == c
        out[sel] = emb[sel].double().mean(0).float()
    return out


def condition(text_encoder, tokenizer, prompts: Sequence[str], image_embeds=None,
              position: str = "replace_last"):
    """Text-encoder hidden states for ``prompts``; with ``image_embeds`` [B, D] the visual guidance
    token (Sec. 3.2) at ``position`` (``append``: ``[B, L+1, D]``; ``replace_last``: last token
    overwritten), see :func:`features.guidance_prompt_embeds`."""
    embeds = features.encode_prompts(text_encoder, tokenizer, list(prompts))
    if image_embeds is None:
        return embeds
    return features.guidance_prompt_embeds(embeds, image_embeds.to(embeds.device, embeds.dtype), position)


def diffusion_loss(unet, latents, encoder_hidden_states, noise_scheduler, cfg: FinetuneConfig, generator):
    """One forward pass and the Real-Fake objective (Eq. 21, :func:`losses.overall_loss`): returns
    (loss, l_simple, l_dm) as tensors. Noise and timesteps come from ``generator`` (CPU)."""
    import torch

    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                              generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"only epsilon prediction is supported (Real-Fake / SD 1.5), got "
                         f"{noise_scheduler.config.prediction_type!r}")
    eps_hat = unet(noisy, timesteps, encoder_hidden_states).sample.float()
    weights = None
    if cfg.snr_gamma and cfg.snr_gamma > 0:
        weights = losses.min_snr_weights(timesteps, noise_scheduler.alphas_cumprod.to(latents.device),
                                         cfg.snr_gamma)
    weight = cfg.dm_loss_weight if cfg.dm_loss_weight >= 0 else None  # None: the form's default
    total, ls, ld = losses.overall_loss(eps_hat, noise.float(), dm=cfg.dm_loss, form=cfg.dm_loss_form,
                                        weight=weight, snr_weights=weights)
    return total, ls.detach(), ld.detach()


# --------------------------------------------------------------------------------------------------
# Cache keys and checkpoints
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _tree_sha_memo(folder: str, stamp: tuple) -> str:   # the stamp only invalidates this in-process memo
    return tree_sha256(folder)


def base_model_identity(base_model: str) -> str:
    """Content identity of the base model (part of the LoRA cache key; never its path): the hash in
    its params record (``<folder>.params.json``, written by 01 for the miniature base) when there is
    one, else ``rundir.tree_sha256`` of the folder; a hub id stands for itself."""
    p = Path(str(base_model)).expanduser()
    if p.is_dir():
        key = p.with_name(p.name + ".params.json")
        if key.exists():
            try:
                h = read_json(key).get("hash")
            except (OSError, ValueError):
                h = None
            if h:
                return f"params:{h}"
        stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.rglob("*")) if f.is_file())
        return "sha256:" + _tree_sha_memo(str(p.resolve()), stamp)
    return f"id:{base_model}"


def lora_key(cfg: FinetuneConfig, train_set_fingerprint: str) -> str:
    """The cache key of one LoRA: :func:`rundir.content_hash` of the settings that shape the weights,
    the base model's content identity and the train set's fingerprint."""
    return content_hash({"config": cfg.hashed_dict(), "base": base_model_identity(cfg.base_model),
                         "train_set": train_set_fingerprint})


config_hash = lora_key   # the earlier name

STATE_FILE = "train_state.json"   # written last into a checkpoint folder: marks it complete


def _ckpt_index(p: Path) -> int:
    try:
        return int(p.name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(out_dir: str | os.PathLike, key: str | None = None) -> Path | None:
    """The newest complete checkpoint folder of ``out_dir/checkpoints`` ("latest" semantics).

    Folders without ``train_state.json`` (a run killed while saving) are ignored; with ``key`` only
    checkpoints of the same cache key count.
    """
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for p in sorted(root.glob("checkpoint_*"), key=_ckpt_index, reverse=True):
        state = p / STATE_FILE
        if state.exists():
            try:
                got = json.loads(state.read_text()).get("config_hash")
            except ValueError:
                continue
            if key is None or got == key:
                return p
    return None


def is_trained(out_dir: str | os.PathLike, key: str) -> bool:
    """A finished LoRA of this cache key: ``DONE.json`` written last, files unchanged since."""
    return is_done(out_dir, key)


# --------------------------------------------------------------------------------------------------
# Training stages
# --------------------------------------------------------------------------------------------------
def _to(module, device, dtype):
    """Move ``module``; cast only when the dtype changes (diffusers warns on a no-op cast)."""
    import torch

    module.to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)
    return module


def _load_frozen(base_model: str, dtype, device):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {}
    if Path(base_model).is_dir():
        kw["local_files_only"] = True
    tokenizer = CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", **kw)
    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae", **kw)
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **kw)
    scheduler = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler", **kw)
    for m in (text_encoder, vae):
        m.requires_grad_(False)
        m.eval()
        _to(m, device, dtype)
    return tokenizer, text_encoder, vae, unet, scheduler


@dataclass
class TrainContext:
    """Everything the training stages share (built by :func:`setup_training`)."""
    cfg: FinetuneConfig
    train_set: TrainSet
    out: Path
    key: str
    accelerator: Any
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    params: list
    weight_dtype: Any
    per_device_batch: int
    total_steps: int
    guidance: Any = None                 # [N, D] guidance feature per sample, or None
    global_step: int = 0
    start_step: int = 0
    history: list = field(default_factory=list)
    seen: Any = None                     # [N] times each sample was drawn (this process, this session)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def setup_training(cfg: FinetuneConfig, train_set: TrainSet, key: str) -> TrainContext:
    """Accelerator, frozen VAE / text encoder, UNet with LoRA (peft, seeded gaussian init), AdamW, the
    lr schedule, checkpoint hooks that store the LoRA weights only."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    out = Path(cfg.output_dir)
    mixed = cfg.mixed_precision
    want_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if want_cpu and mixed == "fp16":
        warnings.warn("fp16 mixed precision is not available on CPU; training in fp32", stacklevel=2)
        mixed = "no"
    accelerator = Accelerator(
        mixed_precision=mixed, cpu=want_cpu,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(out), automatic_checkpoint_naming=True,
                                            total_limit=cfg.checkpoints_total_limit))
    world = accelerator.num_processes
    per_device = cfg.per_device_batch_size(world)          # a clear error if not divisible
    set_seed(cfg.seed)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                       torch.float32)
    tokenizer, text_encoder, vae, unet, noise_scheduler = _load_frozen(cfg.base_model, weight_dtype, device)
    torch.manual_seed(cfg.seed)  # LoRA init (gaussian) is seeded
    add_lora(unet, cfg.lora_rank, cfg.lora_alpha)
    _to(unet, device, weight_dtype)
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)  # LoRA weights train in fp32
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    params = [p for p in unet.parameters() if p.requires_grad]
    total = cfg.total_steps(len(train_set))
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=total * world)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if cfg.compile_unet:
        unet = torch.compile(unet)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for m in models:
                sd = get_peft_model_state_dict(accelerator.unwrap_model(m))
                save_file({k: v.detach().float().cpu().contiguous() for k, v in sd.items()},
                          os.path.join(output_dir, "lora.safetensors"))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        sd = load_file(os.path.join(input_dir, "lora.safetensors"))
        while models:
            m = accelerator.unwrap_model(models.pop())
            set_peft_model_state_dict(m, sd)
            if weight_dtype != torch.float32:
                cast_training_params(m, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    guidance = training_guidance_features(train_set, cfg.guidance_feature_train) if cfg.visual_guidance else None
    return TrainContext(cfg=cfg, train_set=train_set, out=out, key=key, accelerator=accelerator, unet=unet,
                        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        noise_scheduler=noise_scheduler, optimizer=optimizer, lr_scheduler=lr_scheduler,
                        params=params, weight_dtype=weight_dtype, per_device_batch=per_device,
                        total_steps=total, guidance=guidance,
                        seen=torch.zeros(len(train_set), dtype=torch.long))


def resume_or_start(ctx: TrainContext, resume: bool = True) -> None:
    """Load the latest complete checkpoint of this cache key ("latest" semantics) or start at step 0
    (other keys' or broken checkpoints are removed)."""
    acc, out = ctx.accelerator, ctx.out
    ckpt = latest_checkpoint(out, ctx.key) if resume else None
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")
        elif ckpt is not None:
            for p in (out / "checkpoints").glob("checkpoint_*"):   # incomplete / newer-but-broken ones
                if _ckpt_index(p) > _ckpt_index(ckpt):
                    shutil.rmtree(p)
    acc.wait_for_everyone()
    if ckpt is not None:
        acc.load_state(str(ckpt))
        acc.project_configuration.iteration = _ckpt_index(ckpt) + 1
        state = json.loads((ckpt / STATE_FILE).read_text())
        ctx.global_step = int(state["global_step"])
        ctx.history = list(state["history"])
        acc.print(f"resumed from {ckpt.name} at step {ctx.global_step}/{ctx.total_steps}")
    ctx.start_step = ctx.global_step


def _open_log(path: Path):
    """Append to steps.jsonl (never replaced), after closing a line a killed writer left torn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "a") as f:
                f.write("\n")
    return open(path, "a")


def _train_step(ctx: TrainContext) -> dict[str, Any]:
    """One optimizer step (``gradient_accumulation_steps`` micro-batches on every process)."""
    import torch

    cfg, acc, ts = ctx.cfg, ctx.accelerator, ctx.train_set
    device, n, bs, accum = acc.device, len(ts), ctx.per_device_batch, cfg.gradient_accumulation_steps
    sums = {"loss": 0.0, "l_simple": 0.0, "l_dm": 0.0}
    n_samples = 0
    for a in range(accum):
        micro = ctx.global_step * accum + a
        idx = batch_indices(micro, bs, n, cfg.seed, ctx.rank, ctx.world)
        ctx.seen.index_add_(0, torch.tensor(idx), torch.ones(len(idx), dtype=torch.long))
        g = step_generator(cfg.seed, micro, ctx.rank)
        pixels = ts.images[idx].float().div(127.5).sub(1.0)
        if cfg.random_flip:
            flip = torch.rand(len(idx), generator=g) < 0.5
            pixels[flip] = pixels[flip].flip(-1)
        pixels = pixels.to(device, ctx.weight_dtype)
        emb = ctx.guidance[idx] if ctx.guidance is not None else None
        with torch.no_grad():
            latents = ctx.vae.encode(pixels).latent_dist.sample(generator=g) * ctx.vae.config.scaling_factor
            hidden = condition(ctx.text_encoder, ctx.tokenizer, [ts.prompts[i] for i in idx], emb,
                               cfg.guidance_token_position)
        hidden = hidden.to(device, ctx.weight_dtype)
        if cfg.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        with acc.accumulate(ctx.unet):
            with acc.autocast():
                loss, ls, ld = diffusion_loss(ctx.unet, latents, hidden, ctx.noise_scheduler, cfg, g)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(ctx.params, cfg.max_grad_norm)
            ctx.optimizer.step()
            ctx.lr_scheduler.step()
            ctx.optimizer.zero_grad(set_to_none=True)
        vals = acc.gather(torch.tensor([[loss.detach().float().item(), ls.float().item(),
                                         ld.float().item(), float(len(idx))]], device=device)).reshape(-1, 4)
        for k, v in zip(("loss", "l_simple", "l_dm"), vals[:, :3].mean(0).tolist()):
            sums[k] += v / accum
        n_samples += int(vals[:, 3].sum().item())
    if not acc.sync_gradients:  # cannot happen with our stepping; keep the invariant
        raise RuntimeError("gradient accumulation out of sync")
    prev = ctx.history[-1]["samples_seen"] if ctx.history else 0
    return {"step": ctx.global_step, **{k: round(v, 7) for k, v in sums.items()},
            "lr": ctx.lr_scheduler.get_last_lr()[0], "samples": n_samples,
            "samples_seen": prev + n_samples, "key": ctx.key}


def save_checkpoint(ctx: TrainContext) -> None:
    """``accelerator.save_state`` (LoRA weights, optimizer, scheduler, RNG), then the state file last."""
    path = ctx.accelerator.save_state()
    if ctx.accelerator.is_main_process:
        write_json(Path(path) / STATE_FILE, {"global_step": ctx.global_step, "history": ctx.history,
                                             "config_hash": ctx.key})
    ctx.accelerator.wait_for_everyone()
    unit_finished("checkpoint")   # the kill tests' deterministic stop point (REALFAKE_KILL_AFTER_UNITS)


def train_one_epoch(ctx: TrainContext, epoch: int, logf=None) -> int:
    """Optimizer steps of pass ``epoch`` over the data (``steps_per_epoch`` of the global batch; the
    last pass ends at the total), from the current step; checkpoints every ``checkpoint_every``
    steps. Returns the steps done."""
    cfg = ctx.cfg
    stop = min(ctx.total_steps, (epoch + 1) * cfg.steps_per_epoch(len(ctx.train_set)))
    done = 0
    while ctx.global_step < stop:
        rec = _train_step(ctx)
        ctx.history.append(rec)
        ctx.global_step += 1
        done += 1
        if logf is not None:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
        if cfg.log_every and ctx.global_step % cfg.log_every == 0:
            ctx.accelerator.print(f"step {ctx.global_step}/{ctx.total_steps} loss {rec['loss']:.4f} "
                                  f"(L_simple {rec['l_simple']:.4f}, L_DM {rec['l_dm']:.5f})")
        if ctx.global_step % cfg.checkpoint_every == 0 and ctx.global_step < ctx.total_steps:
            save_checkpoint(ctx)
    return done


def _replayed_counts(ctx: TrainContext, steps: int):
    """How often each sample was drawn in the first ``steps`` optimizer steps (all processes): the
    pure data-order function replayed, for the steps of earlier sessions of a resumed run."""
    import torch

    counts = torch.zeros(len(ctx.train_set), dtype=torch.long)
    cfg = ctx.cfg
    per_micro = ctx.per_device_batch * ctx.world
    for micro in range(steps * cfg.gradient_accumulation_steps):
        idx = batch_indices(micro, per_micro, len(ctx.train_set), cfg.seed)
        counts.index_add_(0, torch.tensor(idx), torch.ones(len(idx), dtype=torch.long))
    return counts


def save_final(ctx: TrainContext, seconds: float) -> dict[str, Any]:
    """LoRA weights, ``train_config.json`` (summary), then ``DONE.json`` last (``rundir.mark_done``
    with the SHA-256 of the weights, the summary and steps.jsonl); checkpoints removed."""
    import torch

    acc = ctx.accelerator
    seen = acc.reduce(ctx.seen.to(acc.device), reduction="sum").cpu() + _replayed_counts(ctx, ctx.start_step)
    summary: dict[str, Any] = {}
    if acc.is_main_process:
        save_lora(acc.unwrap_model(ctx.unet), ctx.out)
        done = ctx.global_step - ctx.start_step
        n = len(ctx.train_set)
        device = acc.device
        last = ctx.history[-1] if ctx.history else {}
        summary = {
            "variant": ctx.cfg.variant, "config": ctx.cfg.to_dict(), "config_hash": ctx.key,
            "train_set": {"n": n, "fingerprint": ctx.train_set.fingerprint(),
                          "resolution": int(ctx.train_set.images.shape[-1])},
            "steps": ctx.global_step, "steps_this_session": done, "resumed_from_step": ctx.start_step,
            "seconds_this_session": round(seconds, 2),
            "steps_per_s": round(done / seconds, 3) if seconds > 0 and done else None,
            "samples_per_s": round(done * ctx.cfg.global_batch_size / seconds, 2) if seconds > 0 and done else None,
            "num_processes": ctx.world, "per_device_batch_size": ctx.per_device_batch,
            "global_batch_size": ctx.cfg.global_batch_size,
            "samples_seen": int(seen.sum()), "passes_min": int(seen.min()), "passes_max": int(seen.max()),
            "epochs_seen": round(float(seen.sum()) / n, 4),
            "mixed_precision": acc.mixed_precision, "device": str(device),
            "final_loss": last.get("loss"), "final_l_simple": last.get("l_simple"),
            "final_l_dm": last.get("l_dm"),
            "trainable_params": int(sum(p.numel() for p in ctx.params)),
            "peak_cuda_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda" else None,
            "weights": LORA_WEIGHT_NAME, "reused": False,
        }
        write_json(ctx.out / SUMMARY_NAME, summary)
        mark_done(ctx.out, ctx.key, [LORA_WEIGHT_NAME, SUMMARY_NAME, LOG_NAME], info=summary)
        if (ctx.out / "checkpoints").exists():
            shutil.rmtree(ctx.out / "checkpoints")   # finished: the final weights supersede them
    acc.wait_for_everyone()
    return summary


def train_lora(cfg: FinetuneConfig, train_set: TrainSet | str | os.PathLike, resume: bool = True,
               force: bool = False) -> dict[str, Any]:
    """Fine-tune LoRA weights on ``train_set``; returns the summary (also in train_config.json and in
    ``DONE.json``'s info).

    - Reuses a finished run of the same cache key (:func:`lora_key`, :func:`is_trained`) unless
      ``force``; a folder without a valid ``DONE.json`` (a killed or concurrent run, copied pieces) is
      trained again.
    - Resumes from the latest complete checkpoint of the same key (``resume=True``).
    - Call it directly (one process) or under ``accelerate launch`` / ``notebook_launcher``: the
      per-device batch is ``global_batch_size / (processes x accumulation)``.
    """
    import torch

    cfg.validate()
    if not cfg.output_dir:
        raise ValueError("output_dir is empty")
    if not isinstance(train_set, TrainSet):
        train_set = load_train_set(train_set)
    if cfg.visual_guidance and train_set.image_embeds is None:
        raise ValueError("visual_guidance=True but the training set has no CLIP image embeddings")
    out = Path(cfg.output_dir)
    key = lora_key(cfg, train_set.fingerprint())
    if not force and is_trained(out, key):
        return dict(done_info(out), reused=True)

    ctx = setup_training(cfg, train_set, key)
    if ctx.accelerator.is_main_process:
        (out / "DONE.json").unlink(missing_ok=True)   # whatever was here is not this key's finished unit
    resume_or_start(ctx, resume)
    device = ctx.accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ctx.unet.train()
    t0 = time.time()
    logf = _open_log(out / LOG_NAME) if ctx.accelerator.is_main_process else None
    try:
        spe = cfg.steps_per_epoch(len(train_set))
        for epoch in range(ctx.global_step // spe, -(-ctx.total_steps // spe)):
            train_one_epoch(ctx, epoch, logf)
    finally:
        if logf is not None:
            logf.close()
    elapsed = time.time() - t0
    ctx.accelerator.wait_for_everyone()
    summary = save_final(ctx, elapsed)
    ctx.accelerator.end_training()
    return summary


def read_history(out_dir: str | os.PathLike, key: str | None = None) -> list[dict[str, Any]]:
    """The per-step log of a LoRA folder, one entry per step in step order: of cache ``key`` (default:
    the finished unit's key, else the key of the last line), the last line of each step winning (a
    resumed run appends the steps it replays). Torn lines (a killed writer) are skipped."""
    path = Path(out_dir) / LOG_NAME
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    if not rows:
        return []
    if key is None:
        marker = Path(out_dir) / "DONE.json"
        key = read_json(marker).get("key") if marker.exists() else rows[-1].get("key")
    by_step: dict[int, dict] = {}
    for r in rows:
        if r.get("key") == key:
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def _train_from_files(cfg_dict: dict[str, Any], train_set_path: str) -> None:
    train_lora(FinetuneConfig.from_dict(cfg_dict), train_set_path)


def launch_training(cfg: FinetuneConfig, train_set_path: str | os.PathLike,
                    num_processes: int | None = None) -> dict[str, Any]:
    """Train in this process, or on every GPU when more than one is visible.

    Multi-GPU goes through ``accelerate.notebook_launcher`` (from a notebook, CUDA must not be
    initialised yet in the kernel); if CUDA already is, it falls back to ``accelerate launch -m
    realfake_utils.finetune`` in a subprocess. Returns the summary of the finished unit.
    """
    import torch

    n_gpu = torch.cuda.device_count() if cfg.device != "cpu" else 0
    num_processes = num_processes or n_gpu
    if num_processes <= 1:
        return train_lora(cfg, train_set_path)
    ts = load_train_set(train_set_path)
    key = lora_key(cfg, ts.fingerprint())
    if is_trained(cfg.output_dir, key):
        return dict(done_info(cfg.output_dir), reused=True)
    if not torch.cuda.is_initialized():
        from accelerate import notebook_launcher

        notebook_launcher(_train_from_files, args=(cfg.to_dict(), str(train_set_path)),
                          num_processes=num_processes, mixed_precision=cfg.mixed_precision)
    else:
        import subprocess

        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(num_processes), "-m", "realfake_utils.finetune",
               "--train-set", str(train_set_path), *config_to_argv(cfg)]
        subprocess.run(cmd, check=True)
    if not is_trained(cfg.output_dir, key):
        raise RuntimeError(f"{cfg.output_dir}: the {num_processes}-process training ended without a "
                           "finished LoRA (DONE.json); see the output above")
    return done_info(cfg.output_dir)


# --------------------------------------------------------------------------------------------------
# Sampling with stock diffusers (prompt embeddings computed here)
# --------------------------------------------------------------------------------------------------
def sample_per_class(pipe, class_names: Sequence[str], n_per_class: int, class_embeds=None,
                     num_inference_steps: int = 25, guidance_scale: float = 2.0, seed: int = 0,
                     batch_size: int = 64, negative_prompt: str | None = None,
                     height: int | None = None, width: int | None = None,
                     guidance_token_position: str = "append"):
    """Generate ``n_per_class`` images per class with prompt ``photo of <class>`` at ``height`` x
    ``width`` (default: the pipeline's); with ``class_embeds`` [C, D] the class-mean CLIP embedding
    is the visual guidance token at ``guidance_token_position`` (the negative prompt padded to the
    same length). Returns (uint8 [C*n, 3, H, W], labels int64 [C*n]); empty tensors for
    ``n_per_class == 0``."""
    import numpy as np
    import torch

    if negative_prompt is None:
        negative_prompt = features.NEGATIVE_PROMPT
    labels = [c for c in range(len(class_names)) for _ in range(int(n_per_class))]
    if not labels:
        h = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
        return torch.zeros(0, 3, h, width or h, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    out = []
    for start in range(0, len(labels), batch_size):
        lab = labels[start:start + batch_size]
        prompts = [features.build_prompt(class_names[c]) for c in lab]
        emb = None
        if class_embeds is not None:
            emb = torch.as_tensor(class_embeds)[lab].float().to(device)
        with torch.no_grad():
            pe = condition(pipe.text_encoder, pipe.tokenizer, prompts, emb,
                           guidance_token_position).to(device, dtype)
            ne = features.encode_prompts(pipe.text_encoder, pipe.tokenizer, [negative_prompt] * len(lab))
            if emb is not None:
                ne = features.guidance_prompt_embeds(ne, None, guidance_token_position)
            ne = ne.to(device, dtype)
        g = torch.Generator().manual_seed(int(seed) * 100_003 + start)
        res = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=g, output_type="np", height=height, width=width)
        out.append(torch.from_numpy((np.clip(res.images, 0, 1) * 255).round().astype("uint8")).permute(0, 3, 1, 2))
    return torch.cat(out), torch.tensor(labels)


# --------------------------------------------------------------------------------------------------
# 02 as one call: every LoRA variant, samples before / after, MMD before / after, the record
# --------------------------------------------------------------------------------------------------
@dataclass
class SampleSettings:
    """02's before / after samples (not part of any LoRA's key)."""
    n_per_class: int = 20
    num_inference_steps: int = 20
    guidance_scale: float = 2.0
    lora_scale: float = 1.0
    use_negative_prompt: bool = False
    negative_prompt: str = features.NEGATIVE_PROMPT   # its wording (paper presets: Apx. E's)
    image_size: int = 0                 # height = width of the samples (0: the pipeline's default)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "SampleSettings":
        p = dict(notebook_defaults("02_finetune"))
        p.update({k: v for k, v in params.items() if k in p})
        return cls(n_per_class=int(p["n_per_class"]), num_inference_steps=int(p["sample_steps"]),
                   guidance_scale=float(p["guidance_scale"]), lora_scale=float(p["lora_scale"]),
                   use_negative_prompt=bool(p["use_negative_prompt"]), negative_prompt=str(p["negative_prompt"]),
                   image_size=int(p["image_size"]))


@dataclass
class VariantResult:
    """One trained LoRA variant (a Table 2 row's generator)."""
    name: str
    path: str                            # relative to the run folder
    steps: int
    samples_seen: int
    epochs_seen: float
    passes_min: int
    passes_max: int
    final_loss: Optional[float]
    final_l_simple: Optional[float]
    final_l_dm: Optional[float]
    reused: bool
    seconds: float
    config_key: str
    num_processes: int
    before: str = ""                     # the base-model sample set it is compared with (base-vg | base-novg)
    mmd2_before: Optional[float] = None
    mmd2_after: Optional[float] = None
    samples: str = ""                    # relative path of its samples (safetensors), "" when none
    # the sample probe (issue goal >= 0.90): a classifier fitted on the REAL target train images labels
    # the samples; on pixels with the luminance standardised per image, and on CLIP image features
    probe_accuracy: Optional[float] = None
    probe_clip: Optional[float] = None
    # biased MMD² of the samples over that of the real test split (both to the real train split in CLIP
    # space; ``probe.mmd_report``): the number the goal "within 3x of the real noise floor" is read on
    mmd_ratio: Optional[float] = None


@dataclass
class FinetuneRecord(Record):
    """02's results: the resolved configuration (06 rebuilds exactly this), each LoRA variant."""
    STEP = "02_finetune"
    config: dict[str, Any]
    main_variant: str
    variants: dict[str, VariantResult]
    base_samples: dict[str, str] = field(default_factory=dict)    # base-vg / base-novg -> samples path
    base_mmd2: dict[str, float] = field(default_factory=dict)
    base_probe: dict[str, dict[str, float]] = field(default_factory=dict)   # {base-vg: {pixels, clip}}
    base_mmd_ratio: dict[str, float] = field(default_factory=dict)          # as VariantResult.mmd_ratio
    mmd2_real_test: Optional[float] = None                         # the noise floor (real train vs test)
    mmd_bandwidth: Optional[float] = None
    n_train: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, run: Any) -> "FinetuneRecord":
        rec = super().load(run)
        rec._root = _run_root(run)   # resolves the run-relative base model path
        return rec

    def config_of(self, variant: str, run: Any = None) -> dict[str, Any]:
        """The resolved configuration a variant was trained with (for :meth:`FinetuneConfig.from_record`);
        a base model inside the run folder (stored relative to it) is resolved against ``run`` (default:
        the folder this record was loaded from)."""
        if variant not in self.variants:
            raise KeyError(f"02 trained no LoRA '{variant}' (it trained {sorted(self.variants)}): add it "
                           "to 02's `variants` and rerun 02")
        sw = parse_variant(variant)
        d = dict(self.config, dm_loss=sw["dm_loss"], dm_loss_form=sw["dm_loss_form"],
                 visual_guidance=sw["visual_guidance"])
        root = _run_root(run) if run is not None else getattr(self, "_root", None)
        if d.get("base_model") and d.get("base_model_in_run") and root is not None:
            d["base_model"] = str(root / d["base_model"])
        d.pop("base_model_in_run", None)
        return d

    def lora_dir(self, run: Any, variant: str) -> Path:
        return _run_root(run) / self.variants[variant].path

    def history(self, run: Any, variant: str) -> list[dict[str, Any]]:
        return read_history(self.lora_dir(run, variant), self.variants[variant].config_key)

    def load_samples(self, run: Any, name: str):
        """``(images uint8 [M, 3, H, W], labels [M])`` of a variant's or base set's samples."""
        rel = self.variants[name].samples if name in self.variants else self.base_samples.get(name, "")
        if not rel:
            raise KeyError(f"no samples of '{name}' in 02's record (n_per_class = 0?)")
        from safetensors.torch import load_file

        t = load_file(str(_run_root(run) / rel))
        return t["images"], t["labels"]


def _run_root(run: Any) -> Path:
    """The run folder of a ``RunDir`` or a path (``pathlib.Path.root`` is "/", never use getattr)."""
    return Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.root)


def _save_samples(path: Path, images, labels) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"images": images.contiguous(), "labels": labels.long().contiguous()}, str(tmp))


def _clip_features(clip_model: str, images, device: str):
    with tempfile.TemporaryDirectory() as d:
        return features.extract_clip_features(clip_model, images, [str(i) for i in range(len(images))],
                                              Path(d) / "f.safetensors", device=device, progress=False).float()


def _sample_probe(ts: TrainSet, images, labels, feats, seed: int) -> dict[str, float]:
    """The sample probe of ``probe.py`` fitted on the real train split: on pixels (luminance standardised)
    and on CLIP image features (the class in the colours, as EuroSAT's)"""
    out = {"pixels": probe.probe_accuracy(ts.images, ts.labels, {"s": (images, labels)}, seed=seed)["s"],
           "clip": float("nan")}
    if ts.image_embeds is not None:
        out["clip"] = probe.feature_probe_accuracy(ts.image_embeds.float(), ts.labels, {"s": (feats, labels)},
                                                   seed=seed)["s"]
    return out


def train_variants(run: Any, cfg: FinetuneConfig, variants: Sequence[str], clip_model: str = "",
                   image_size: int = 0, sampling: SampleSettings | None = None,
                   num_processes: int | None = None, main_variant: str = "",
                   train_set: str | os.PathLike = "", log=print) -> FinetuneRecord:
    """The whole of 02 in one call (Sec. 3.1-3.2, Table 2).

    1. the target train split as a :class:`TrainSet` (images at ``image_size``, prompts, CLIP
       embeddings of ``clip_model``, default the run's miniature CLIP; or the file ``train_set``);
    2. each LoRA variant of :func:`resolve_variants` (``lora-dm-*`` take ``cfg.dm_loss_form``),
       trained with ``cfg`` and the variant's switches into ``artifacts/lora/<variant>`` (reused when
       finished with the same key, resumed when interrupted);
    3. unless ``sampling.n_per_class == 0``: samples of the base model (``base-vg`` / ``base-novg``)
       and of each variant (LoRA scale ``sampling.lora_scale``) at ``image_size``, the same seeds;
       MMD^2 in CLIP space to the real train features (Gaussian kernel, bandwidth from the median
       heuristic on the real train features), before (the base model with the same guidance) and
       after; the real train vs test MMD^2 as the noise floor;
    4. the :class:`FinetuneRecord`, saved to ``results/02_finetune.json``.
    """
    import torch

    root = _run_root(run)
    art = root / "artifacts"
    clip = clip_model or str(art / "miniature" / "clip")
    names = resolve_variants(variants, cfg.dm_loss_form)
    if main_variant:
        names = list(dict.fromkeys([*resolve_variants([main_variant], cfg.dm_loss_form), *names]))
    if not names:
        raise ValueError("train_variants: no LoRA variant to train (variants lists only base-* names)")
    if not image_size:
        image_size = _model_resolution(cfg.base_model)
    ts_path = Path(train_set) if train_set else build_train_set(root, image_size, clip_model=clip,
                                                                device=cfg.device)
    ts = load_train_set(ts_path)
    summaries: dict[str, dict[str, Any]] = {}
    for name in names:
        sw = parse_variant(name)
        vcfg = cfg.replace(dm_loss=sw["dm_loss"], dm_loss_form=sw["dm_loss_form"],
                           visual_guidance=sw["visual_guidance"], output_dir=str(art / "lora" / name))
        s = launch_training(vcfg, ts_path, num_processes)
        summaries[name] = s
        how = "reused" if s.get("reused") else f"{s['steps_this_session']} steps in {s['seconds_this_session']:.0f}s"
        log(f"{name}: {how}, {s['steps']} steps, {s['samples_seen']} samples seen "
            f"({s['epochs_seen']} passes over {len(ts)} images), final loss {s['final_loss']:.4f}")

    results = {
        name: VariantResult(
            name=name, path=Record.rel(root, art / "lora" / name), steps=int(s["steps"]),
            samples_seen=int(s["samples_seen"]), epochs_seen=float(s["epochs_seen"]),
            passes_min=int(s["passes_min"]), passes_max=int(s["passes_max"]), final_loss=s.get("final_loss"),
            final_l_simple=s.get("final_l_simple"), final_l_dm=s.get("final_l_dm"),
            reused=bool(s.get("reused")), seconds=float(s.get("seconds_this_session") or 0.0),
            config_key=s["config_hash"], num_processes=int(s.get("num_processes", 1)),
            before=variant_name(False, False, parse_variant(name)["visual_guidance"]))
        for name, s in summaries.items()}
    sampling = sampling or SampleSettings(n_per_class=0)
    stored = cfg.replace(output_dir="").to_dict()
    rel_base = Record.rel(root, cfg.base_model) if Path(cfg.base_model).exists() else cfg.base_model
    if rel_base != cfg.base_model and not Path(rel_base).is_absolute():
        stored.update(base_model=rel_base, base_model_in_run=True)   # records hold run-relative paths
    rec = FinetuneRecord(config=stored,
                         main_variant=names[0], variants=results, n_train=len(ts),
                         sampling=dataclasses.asdict(sampling))
    if sampling.n_per_class > 0:
        rows = data.read_manifest(art / "data" / "manifest.csv")
        class_names = data.class_names(rows)
        size = sampling.image_size or image_size
        pipe = models.load_pipeline(cfg.base_model, device=cfg.device, scheduler=None)
        class_means = features.class_mean_features(ts.image_embeds, ts.labels, len(class_names))
        neg = sampling.negative_prompt if sampling.use_negative_prompt else ""
        real = ts.image_embeds.float()
        bandwidth = losses.median_bandwidth(real)
        rec.mmd_bandwidth = bandwidth
        test_rows = [r for r in rows if r["split"] == "test"]
        test_feats = None
        if len(test_rows) >= 2:
            test_feats = features.extract_clip_features(
                clip, data.load_images(test_rows, image_size), [r["id"] for r in test_rows],
                art / "features" / "clip_image.safetensors", device=cfg.device, progress=False).float()
            rec.mmd2_real_test = float(losses.mmd2(real, test_feats, bandwidth=bandwidth))
        kw = dict(num_inference_steps=sampling.num_inference_steps, guidance_scale=sampling.guidance_scale,
                  seed=cfg.seed, negative_prompt=neg, height=size, width=size,
                  guidance_token_position=cfg.guidance_token_position)
        sample_dir = art / "lora" / "samples"
        for vg in sorted({parse_variant(n)["visual_guidance"] for n in names}):
            bname = variant_name(False, False, vg)
            imgs, labels = sample_per_class(pipe, class_names, sampling.n_per_class,
                                            class_means if vg else None, **kw)
            _save_samples(sample_dir / f"{bname}.safetensors", imgs, labels)
            rec.base_samples[bname] = Record.rel(root, sample_dir / f"{bname}.safetensors")
            feats = _clip_features(clip, imgs, cfg.device)
            rec.base_mmd2[bname] = float(losses.mmd2(real, feats, bandwidth=bandwidth))
            rec.base_probe[bname] = _sample_probe(ts, imgs, labels, feats, cfg.seed)
            if test_feats is not None:
                rec.base_mmd_ratio[bname] = probe.mmd_report(feats, real, test_feats)["ratio"]
        for name, res in results.items():
            pipe.load_lora_weights(str(art / "lora" / name), adapter_name="ft")
            pipe.set_adapters(["ft"], adapter_weights=[sampling.lora_scale])
            try:
                imgs, labels = sample_per_class(pipe, class_names, sampling.n_per_class,
                                                class_means if parse_variant(name)["visual_guidance"] else None,
                                                **kw)
            finally:
                pipe.unload_lora_weights()
            _save_samples(sample_dir / f"{name}.safetensors", imgs, labels)
            res.samples = Record.rel(root, sample_dir / f"{name}.safetensors")
            feats = _clip_features(clip, imgs, cfg.device)
            res.mmd2_after = float(losses.mmd2(real, feats, bandwidth=bandwidth))
            res.mmd2_before = rec.base_mmd2[res.before]
            pr = _sample_probe(ts, imgs, labels, feats, cfg.seed)
            res.probe_accuracy, res.probe_clip = pr["pixels"], pr["clip"]
            if test_feats is not None:
                res.mmd_ratio = probe.mmd_report(feats, real, test_feats)["ratio"]
            log(f"MMD2(real train, {name}) = {res.mmd2_after:.4f} (before: {res.before} {res.mmd2_before:.4f}); "
                f"sample probe {pr['pixels']:.3f} (pixels) / {pr['clip']:.3f} (CLIP) "
                f"(before: {rec.base_probe[res.before]['pixels']:.3f} / {rec.base_probe[res.before]['clip']:.3f})")
    rec.save(root)
    return rec


# --------------------------------------------------------------------------------------------------
# Command line: python -m realfake_utils.finetune / accelerate launch -m realfake_utils.finetune
# --------------------------------------------------------------------------------------------------
def _cli_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_to_argv(cfg: FinetuneConfig) -> list[str]:
    argv = []
    for k, v in cfg.to_dict().items():
        argv += [_cli_name(k), str(v)]
    return argv


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m realfake_utils.finetune",
        description="LoRA fine-tuning with the DM loss and the visual guidance token. Several processes: "
                    "accelerate launch --num_processes N -m realfake_utils.finetune --run-dir RUN [options] "
                    "(--global-batch-size stays the paper's; the per-device batch follows).")
    p.add_argument("--run-dir", default="", help="run folder (artifacts/lora/<variant>/ is written there)")
    p.add_argument("--train-set", default="", help="train set file (default <run>/artifacts/lora/"
                   f"{TRAIN_SET_NAME}, built from the run folder when missing)")
    p.add_argument("--variant", default="", help="a Table 2 variant name (lora-dm-vg, lora-nodm-novg, "
                   "lora-dmofficial-vg ...): sets dm_loss, dm_loss_form and visual_guidance")
    p.add_argument("--image-size", type=int, default=0, help="when building the train set (default: "
                   "the base model's resolution)")
    p.add_argument("--clip-model", default="", help="CLIP for the image embeddings (default: miniature)")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--force", action="store_true", help="retrain even if finished weights match")
    for f in dataclasses.fields(FinetuneConfig):
        typ = {bool: _parse_bool, int: int, float: float, str: str}[type(f.default)]
        p.add_argument(_cli_name(f.name), type=typ, default=None, help=f"default {f.default!r}")
    return p


def _model_resolution(base_model: str) -> int:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    kw = {"local_files_only": True} if Path(base_model).is_dir() else {}
    ucfg = UNet2DConditionModel.load_config(base_model, subfolder="unet", **kw)
    vcfg = AutoencoderKL.load_config(base_model, subfolder="vae", **kw)
    return int(ucfg["sample_size"]) * 2 ** (len(vcfg["block_out_channels"]) - 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)
                 if getattr(args, f.name) is not None}
    if args.variant:
        v = parse_variant(args.variant)
        if not v["finetune"]:
            raise SystemExit(f"variant {args.variant} is the base model: nothing to fine-tune")
        overrides.update({k: v[k] for k in ("dm_loss", "dm_loss_form", "visual_guidance")})
    cfg = FinetuneConfig(**overrides)
    run_root = Path(args.run_dir).resolve() if args.run_dir else None
    if not cfg.base_model and run_root is not None:
        cfg.base_model = str(run_root / "artifacts" / "miniature" / "base")
    if not cfg.output_dir:
        if run_root is None:
            raise SystemExit("give --run-dir or --output-dir")
        cfg.output_dir = str(run_root / "artifacts" / "lora" / cfg.variant)
    train_set = args.train_set
    if not train_set:
        if run_root is None:
            raise SystemExit("give --run-dir or --train-set")
        size = args.image_size or _model_resolution(cfg.base_model)
        from accelerate import PartialState

        state = PartialState()
        with state.main_process_first():
            train_set = str(build_train_set(run_root, size, clip_model=args.clip_model, device=cfg.device))
    summary = train_lora(cfg, train_set, resume=not args.no_resume, force=args.force)
    if summary:
        print(json.dumps({k: summary[k] for k in ("variant", "steps", "samples_seen", "final_loss",
                                                  "steps_per_s", "reused") if k in summary}))
    return summary


# --------------------------------------------------------------------------------------------------
# Step 02's figures (one function each)
# --------------------------------------------------------------------------------------------------
def plot_loss_curves(run: Any, record: FinetuneRecord):
    """Per variant, the logged L_simple (Min-SNR-weighted when the record's ``snr_gamma`` > 0) and the
    weighted L_DM as added to the loss (Eq. 21), per optimizer step, smoothed over a tenth of the run."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for name in record.variants:
        hist = record.history(run, name)
        k = max(1, len(hist) // 10)
        for ax, key in zip(axes, ("l_simple", "l_dm")):
            ax.plot(np.arange(k - 1, len(hist)), np.convolve([h[key] for h in hist], np.ones(k) / k, "valid"),
                    label=name)
    axes[0].set_title("L_simple (Min-SNR weighted)" if record.config.get("snr_gamma", 0) > 0 else "L_simple")
    axes[1].set_title("L_DM (weighted, as added to the loss)")
    axes[1].set_yscale("symlog", linthresh=1e-4)
    for ax in axes:
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=7)
    return fig


def mmd_table(record: FinetuneRecord) -> dict[str, float]:
    """MMD² to the target train set in CLIP space: the real test split (the noise floor), the base
    model's samples (with / without the guidance token) and each variant's samples after fine-tuning."""
    return {"real test (noise floor)": record.mmd2_real_test or 0.0, **record.base_mmd2,
            **{k: v.mmd2_after for k, v in record.variants.items()}}


def plot_mmd(mmd: dict[str, float]):
    """:func:`mmd_table` as bars: the noise floor grey, the base model orange, the fine-tuned variants green."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.4 * len(mmd) + 1))
    ax.barh(list(mmd), list(mmd.values()), color=["tab:gray"] + ["tab:orange" if k.startswith("base") else "tab:green"
                                                                 for k in list(mmd)[1:]])
    ax.set_xlabel("MMD$^2$ to the target train set (CLIP space)")
    return fig


__all__ = [
    "DM_LOSS_FORMS", "GUIDANCE_FEATURES_TRAIN", "GUIDANCE_TOKEN_POSITIONS", "LORA_TARGET_MODULES",
    "LORA_WEIGHT_NAME", "TABLE2_VARIANTS", "FinetuneConfig", "FinetuneRecord", "SampleSettings",
    "TrainContext", "TrainSet", "VariantResult", "base_model_identity", "batch_indices",
    "build_train_set", "condition", "diffusion_loss", "is_trained", "latest_checkpoint", "launch_training",
    "load_train_set", "lora_key", "main", "mmd_table", "parse_variant", "plot_loss_curves", "plot_mmd",
    "read_history", "resolve_variants",
    "resume_or_start", "sample_per_class", "save_checkpoint", "save_final", "save_train_set",
    "setup_training", "step_generator", "train_lora", "train_one_epoch", "train_variants",
    "training_guidance_features", "variant_name",
]


if __name__ == "__main__":
    main()
