"""LoRA fine-tuning of the base model with the DM loss and the visual guidance token (Sec. 3.1-3.2).

Real-Fake fine-tunes Stable Diffusion on the target training set so that the generator's distribution
moves towards the target's: LoRA (rank ``r``, alpha) on the UNet attention projections
``to_q, to_k, to_v, to_out.0``, trained with

    loss = L_simple (optionally Min-SNR-gamma weighted)  +  L_DM  (Eq. 7 / 21, "paper" or "official")

and, per training sample, the sample's CLIP image embedding replacing the last token of the text
encoder's hidden states (the visual guidance token, Sec. 3.2). Everything runs on stock diffusers: the
prompt embeddings are computed here and passed to the UNet / pipeline, no fork, no monkeypatching.

The loop uses accelerate (mixed precision, gradient accumulation, multi-GPU through
``accelerate launch -m realfake_utils.finetune`` or :func:`launch_training` / ``notebook_launcher``).
It checkpoints every ``checkpoint_every`` optimizer steps with ``accelerator.save_state`` (automatic
checkpoint naming, ``checkpoints_total_limit``) and resumes from the latest complete checkpoint
("latest" semantics). Data order, noise and timesteps are functions of ``(seed, micro-step, rank)``,
so a resumed run sees exactly the batches and noise an uninterrupted run would: the final weights are
the same (tested: ``tests/test_finetune.py::test_kill_and_resume``).

Output, in ``artifacts/lora/<variant>/``::

    pytorch_lora_weights.safetensors   loadable by stock ``pipe.load_lora_weights(dir)``
    train_config.json                  configuration, its hash, summary (written last: completion mark)
    steps.jsonl                        one line per optimizer step: step, loss, l_simple, l_dm, lr
    checkpoints/checkpoint_<i>/        accelerate states (LoRA weights only, optimizer, scheduler, RNG)

The variant name encodes the Table 2 switches, see :func:`variant_name`.
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
from pathlib import Path
from typing import Any, Sequence

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
DM_LOSS_FORMS = ("paper", "official")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRAIN_SET_NAME = "train_set.safetensors"


# --------------------------------------------------------------------------------------------------
# Variant names (Table 2 rows)
# --------------------------------------------------------------------------------------------------
def variant_name(finetune: bool, dm_loss: bool, visual_guidance: bool, dm_loss_form: str = "paper") -> str:
    """Folder / set name of one Table 2 row.

    ``lora-dm-vg``, ``lora-nodm-novg``, ... for fine-tuned rows (``lora-dmofficial-vg`` when the DM loss
    takes the official code's form); ``base-vg`` / ``base-novg`` for the vanilla base model (no LoRA; the
    DM switch is meaningless without fine-tuning and is ignored).
    """
    vg = "vg" if visual_guidance else "novg"
    if not finetune:
        return f"base-{vg}"
    if dm_loss_form not in DM_LOSS_FORMS:
        raise ValueError(f"dm_loss_form must be one of {DM_LOSS_FORMS}, got {dm_loss_form!r}")
    dm = ("dm" if dm_loss_form == "paper" else "dmofficial") if dm_loss else "nodm"
    return f"lora-{dm}-{vg}"


def parse_variant(name: str) -> dict[str, Any]:
    """Inverse of :func:`variant_name`: ``"lora-dm-vg"`` -> {finetune, dm_loss, dm_loss_form,
    visual_guidance}."""
    parts = name.split("-")
    err = ValueError(f"not a variant name: {name!r} (expected lora-<dm|dmofficial|nodm>-<vg|novg> "
                     "or base-<vg|novg>)")
    if len(parts) == 2 and parts[0] == "base" and parts[1] in ("vg", "novg"):
        return dict(finetune=False, dm_loss=False, dm_loss_form="paper", visual_guidance=parts[1] == "vg")
    if len(parts) != 3 or parts[0] != "lora" or parts[1] not in ("dm", "dmofficial", "nodm") \
            or parts[2] not in ("vg", "novg"):
        raise err
    return dict(finetune=True, dm_loss=parts[1] != "nodm",
                dm_loss_form="official" if parts[1] == "dmofficial" else "paper",
                visual_guidance=parts[2] == "vg")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """All settings of one fine-tuning run (the notebook's parameters map onto these names).

    Defaults are the official code's (``finetune/train_lora.sh``): lr 1e-4 constant, batch 8,
    Min-SNR gamma 5, LoRA rank 4 (diffusers' default); the DM weight defaults to the chosen form's
    published value (``losses.PAPER_DM_WEIGHT`` / ``losses.OFFICIAL_DM_WEIGHT`` = 0.003).
    """
    base_model: str = ""
    output_dir: str = ""
    lora_rank: int = 4
    lora_alpha: float = 4.0
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int = 100
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    snr_gamma: float = 5.0              # <= 0: plain L_simple (no Min-SNR weighting)
    dm_loss: bool = True
    dm_loss_form: str = "paper"         # "paper" | "official"
    dm_loss_weight: float = -1.0        # < 0: the form's published weight (paper 0.05, official 0.003)
    visual_guidance: bool = True
    random_flip: bool = False
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 1e-2
    mixed_precision: str = "no"         # "no" | "fp16" | "bf16"
    seed: int = 0
    device: str = "auto"                # "auto" | "cpu" | "cuda"
    checkpoint_every: int = 50
    checkpoints_total_limit: int = 2
    channels_last: bool = False
    compile_unet: bool = False
    log_every: int = 0                  # print a line every N steps (0: only a summary)
    # not part of the result: a test hook that slows each optimizer step down (seconds)
    sleep_per_step: float = 0.0

    # keys that do not change the trained weights
    _NOT_HASHED = ("output_dir", "device", "checkpoint_every", "checkpoints_total_limit", "log_every",
                   "sleep_per_step", "compile_unet", "channels_last")

    def validate(self) -> None:
        if self.dm_loss_form not in DM_LOSS_FORMS:
            raise ValueError(f"dm_loss_form must be one of {DM_LOSS_FORMS}, got {self.dm_loss_form!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no|fp16|bf16, got {self.mixed_precision!r}")
        for key in ("lora_rank", "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                    "checkpoint_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.base_model:
            raise ValueError("base_model is empty: give a diffusers id or a pipeline folder")

    @property
    def variant(self) -> str:
        return variant_name(True, self.dm_loss, self.visual_guidance, self.dm_loss_form)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def hashed_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in self._NOT_HASHED}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown fine-tuning settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


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

    from .rundir import atomic_path

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

    from . import data, features

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


def condition(text_encoder, tokenizer, prompts: Sequence[str], image_embeds=None):
    """Text-encoder hidden states for ``prompts``; with ``image_embeds`` [B, D] the last token of each
    is replaced by the sample's CLIP image embedding (visual guidance token, Sec. 3.2)."""
    from . import features

    embeds = features.encode_prompts(text_encoder, tokenizer, list(prompts))
    if image_embeds is not None:
        if image_embeds.shape[-1] != embeds.shape[-1]:
            raise ValueError(
                f"visual guidance: the CLIP image embedding has {image_embeds.shape[-1]} dimensions but the "
                f"text encoder's hidden size is {embeds.shape[-1]}; use a CLIP whose projection dim equals "
                "it (ViT-L/14 for SD 1.5, the miniature CLIP for the miniature base model)")
        embeds = features.guidance_token(embeds, image_embeds.to(embeds.device, embeds.dtype))
    return embeds


def diffusion_loss(unet, latents, encoder_hidden_states, noise_scheduler, cfg: FinetuneConfig, generator):
    """One forward pass and the Real-Fake objective: returns (loss, l_simple, l_dm) as tensors.

    Noise and timesteps come from ``generator`` (CPU), so the result is reproducible.
    """
    import torch

    from . import losses

    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                              generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"only epsilon prediction is supported (Real-Fake / SD 1.5), got "
                         f"{noise_scheduler.config.prediction_type!r}")
    eps_hat = unet(noisy, timesteps, encoder_hidden_states).sample.float()
    eps = noise.float()
    weights = None
    if cfg.snr_gamma and cfg.snr_gamma > 0:
        weights = losses.min_snr_weights(timesteps, noise_scheduler.alphas_cumprod.to(latents.device),
                                         cfg.snr_gamma)
    l_simple = losses.l_simple(eps_hat, eps, snr_weights=weights)
    if cfg.dm_loss:
        weight = cfg.dm_loss_weight if cfg.dm_loss_weight >= 0 else None  # None: the form's default
        l_dm = losses.dm_loss(eps_hat, eps, form=cfg.dm_loss_form, weight=weight, snr_weights=weights)
    else:
        l_dm = torch.zeros((), device=eps_hat.device)
    return l_simple + l_dm, l_simple.detach(), l_dm.detach()


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
STATE_FILE = "train_state.json"   # written last into a checkpoint folder: marks it complete


def _ckpt_index(p: Path) -> int:
    try:
        return int(p.name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(out_dir: str | os.PathLike, config_hash: str | None = None) -> Path | None:
    """The newest complete checkpoint folder of ``out_dir/checkpoints`` ("latest" semantics).

    Folders without ``train_state.json`` (a run killed while saving) are ignored; with
    ``config_hash`` only checkpoints of the same configuration count.
    """
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for p in sorted(root.glob("checkpoint_*"), key=_ckpt_index, reverse=True):
        state = p / STATE_FILE
        if state.exists():
            if config_hash is None or json.loads(state.read_text()).get("config_hash") == config_hash:
                return p
    return None


def config_hash(cfg: FinetuneConfig, train_set_fingerprint: str) -> str:
    d = cfg.hashed_dict()
    base = Path(cfg.base_model)
    if base.is_dir():  # a retrained local base model changes the hash
        stamp = [(str(p.relative_to(base)), p.stat().st_size, int(p.stat().st_mtime))
                 for p in sorted(base.rglob("*.safetensors"))]
        d["base_model_files"] = stamp
    d["train_set"] = train_set_fingerprint
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Training
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


def train_lora(cfg: FinetuneConfig, train_set: TrainSet | str | os.PathLike, resume: bool = True,
               force: bool = False) -> dict[str, Any]:
    """Fine-tune LoRA weights on ``train_set``; returns the summary also stored in train_config.json.

    - Reuses a finished run with the same configuration hash (unless ``force``).
    - Resumes from the latest complete checkpoint of the same configuration (``resume=True``), skipping
      the optimizer steps already done; otherwise starts fresh (old checkpoints removed).
    - Call it directly (one process) or under ``accelerate launch`` / ``notebook_launcher``.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from .rundir import atomic_path, read_json, unit_finished, write_json

    cfg.validate()
    if not cfg.output_dir:
        raise ValueError("output_dir is empty")
    if not isinstance(train_set, TrainSet):
        train_set = load_train_set(train_set)
    if cfg.visual_guidance and train_set.image_embeds is None:
        raise ValueError("visual_guidance=True but the training set has no CLIP image embeddings")
    out = Path(cfg.output_dir)
    chash = config_hash(cfg, train_set.fingerprint())
    done_file = out / "train_config.json"
    if not force and done_file.exists() and (out / LORA_WEIGHT_NAME).exists():
        prev = read_json(done_file)
        if prev.get("config_hash") == chash:
            prev["reused"] = True
            return prev

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
    set_seed(cfg.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
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
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=cfg.max_train_steps * world)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if cfg.compile_unet:
        unet = torch.compile(unet)

    # Checkpoints hold only the LoRA weights (not the frozen UNet), plus optimizer/scheduler/RNG.
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

    # ---- resume ("latest") or start fresh
    history: list[dict[str, Any]] = []
    global_step = 0
    ckpt = latest_checkpoint(out, chash) if resume else None
    if ckpt is None and accelerator.is_main_process and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")   # another configuration's (or unusable) checkpoints
    if ckpt is not None:
        for p in (out / "checkpoints").glob("checkpoint_*"):   # incomplete / newer-but-broken ones
            if _ckpt_index(p) > _ckpt_index(ckpt) and accelerator.is_main_process:
                shutil.rmtree(p)
        accelerator.wait_for_everyone()
        accelerator.load_state(str(ckpt))
        accelerator.project_configuration.iteration = _ckpt_index(ckpt) + 1
        state = json.loads((ckpt / STATE_FILE).read_text())
        global_step = int(state["global_step"])
        history = state["history"]
        accelerator.print(f"resumed from {ckpt.name} at step {global_step}/{cfg.max_train_steps}")
    log_path = out / "steps.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(log_path) as tmp:   # the log holds exactly the steps in the current weights
            tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    accelerator.wait_for_everyone()

    resolution = int(train_set.images.shape[-1])
    n = len(train_set)
    bs, acc = cfg.train_batch_size, cfg.gradient_accumulation_steps
    unet.train()
    t0 = time.time()
    start_step = global_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    logf = open(log_path, "a") if accelerator.is_main_process else None
    try:
        while global_step < cfg.max_train_steps:
            sums = {"loss": 0.0, "l_simple": 0.0, "l_dm": 0.0}
            for a in range(acc):
                micro = global_step * acc + a
                idx = batch_indices(micro, bs, n, cfg.seed, rank, world)
                g = step_generator(cfg.seed, micro, rank)
                pixels = train_set.images[idx].float().div(127.5).sub(1.0)
                if cfg.random_flip:
                    flip = torch.rand(len(idx), generator=g) < 0.5
                    pixels[flip] = pixels[flip].flip(-1)
                pixels = pixels.to(device, weight_dtype)
                emb = train_set.image_embeds[idx] if cfg.visual_guidance else None
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample(generator=g) * vae.config.scaling_factor
                    hidden = condition(text_encoder, tokenizer, [train_set.prompts[i] for i in idx], emb)
                hidden = hidden.to(device, weight_dtype)
                if cfg.channels_last:
                    latents = latents.contiguous(memory_format=torch.channels_last)
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        loss, ls, ld = diffusion_loss(unet, latents, hidden, noise_scheduler, cfg, g)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                vals = accelerator.gather(torch.stack([loss.detach().float(), ls.float(), ld.float()])
                                          .reshape(1, 3)).reshape(-1, 3).mean(0)
                for k, v in zip(("loss", "l_simple", "l_dm"), vals.tolist()):
                    sums[k] += v / acc
            if not accelerator.sync_gradients:  # cannot happen with our stepping; keep the invariant
                raise RuntimeError("gradient accumulation out of sync")
            rec = {"step": global_step, **{k: round(v, 7) for k, v in sums.items()},
                   "lr": lr_scheduler.get_last_lr()[0]}
            history.append(rec)
            global_step += 1
            if logf is not None:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            if cfg.log_every and global_step % cfg.log_every == 0:
                accelerator.print(f"step {global_step}/{cfg.max_train_steps} loss {sums['loss']:.4f} "
                                  f"(L_simple {sums['l_simple']:.4f}, L_DM {sums['l_dm']:.5f})")
            if global_step % cfg.checkpoint_every == 0 and global_step < cfg.max_train_steps:
                path = accelerator.save_state()
                if accelerator.is_main_process:
                    write_json(Path(path) / STATE_FILE, {"global_step": global_step, "history": history,
                                                         "config_hash": chash})
                accelerator.wait_for_everyone()
                unit_finished("checkpoint")  # tests: REALFAKE_KILL_AFTER_UNITS=checkpoint:<n> stops here
            if cfg.sleep_per_step:
                time.sleep(cfg.sleep_per_step)
    finally:
        if logf is not None:
            logf.close()
    elapsed = time.time() - t0
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        save_lora(accelerator.unwrap_model(unet), out)
        done = global_step - start_step
        summary = {
            "variant": cfg.variant, "config": cfg.to_dict(), "config_hash": chash,
            "train_set": {"n": n, "fingerprint": train_set.fingerprint(), "resolution": resolution},
            "steps": global_step, "steps_this_session": done, "resumed_from_step": start_step,
            "seconds_this_session": round(elapsed, 2),
            "steps_per_s": round(done / elapsed, 3) if elapsed > 0 and done else None,
            "samples_per_s": round(done * bs * acc * world / elapsed, 2) if elapsed > 0 and done else None,
            "num_processes": world, "mixed_precision": accelerator.mixed_precision,
            "device": str(device), "final_loss": history[-1]["loss"] if history else None,
            "trainable_params": int(sum(p.numel() for p in params)),
            "peak_cuda_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda" else None,
            "weights": LORA_WEIGHT_NAME, "reused": False,
        }
        write_json(done_file, summary)
        if (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")   # finished: the final weights supersede them
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def read_history(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-step log (steps.jsonl) of a LoRA folder."""
    path = Path(out_dir) / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _train_from_files(cfg_dict: dict[str, Any], train_set_path: str) -> None:
    train_lora(FinetuneConfig.from_dict(cfg_dict), train_set_path)


def launch_training(cfg: FinetuneConfig, train_set_path: str | os.PathLike,
                    num_processes: int | None = None) -> dict[str, Any]:
    """Train in this process, or on every GPU when more than one is visible.

    Multi-GPU goes through ``accelerate.notebook_launcher`` (from a notebook, CUDA must not be
    initialised yet in the kernel); if CUDA already is, it falls back to ``accelerate launch -m
    realfake_utils.finetune`` in a subprocess. Returns the summary in train_config.json.
    """
    import torch

    from .rundir import read_json

    n_gpu = torch.cuda.device_count() if cfg.device != "cpu" else 0
    num_processes = num_processes or n_gpu
    if num_processes <= 1:
        return train_lora(cfg, train_set_path)
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
    return read_json(Path(cfg.output_dir) / "train_config.json")


# --------------------------------------------------------------------------------------------------
# Sampling with stock diffusers (prompt embeddings computed here)
# --------------------------------------------------------------------------------------------------
def sample_per_class(pipe, class_names: Sequence[str], n_per_class: int, class_embeds=None,
                     num_inference_steps: int = 25, guidance_scale: float = 2.0, seed: int = 0,
                     batch_size: int = 64, negative_prompt: str | None = None):
    """Generate ``n_per_class`` images per class with prompt ``photo of <class>``; with
    ``class_embeds`` [C, D] the class-mean CLIP embedding replaces the last prompt token (visual
    guidance at generation). Returns (uint8 [C*n, 3, H, W], labels int64 [C*n])."""
    import numpy as np
    import torch

    from . import features

    if negative_prompt is None:
        negative_prompt = features.NEGATIVE_PROMPT
    labels = [c for c in range(len(class_names)) for _ in range(n_per_class)]
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    out = []
    for start in range(0, len(labels), batch_size):
        lab = labels[start:start + batch_size]
        prompts = [features.build_prompt(class_names[c]) for c in lab]
        emb = None
        if class_embeds is not None:
            emb = torch.as_tensor(class_embeds)[lab].float()
        with torch.no_grad():
            pe = condition(pipe.text_encoder, pipe.tokenizer, prompts,
                           emb.to(device) if emb is not None else None).to(device, dtype)
            ne = features.encode_prompts(pipe.text_encoder, pipe.tokenizer,
                                         [negative_prompt] * len(lab)).to(device, dtype)
        g = torch.Generator().manual_seed(int(seed) * 100_003 + start)
        res = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=g, output_type="np")
        out.append(torch.from_numpy((np.clip(res.images, 0, 1) * 255).round().astype("uint8")).permute(0, 3, 1, 2))
    return torch.cat(out), torch.tensor(labels)


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
        description="LoRA fine-tuning with the DM loss and the visual guidance token. Multi-GPU: "
                    "accelerate launch -m realfake_utils.finetune --run-dir RUN [options].")
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
        print(json.dumps({k: summary[k] for k in ("variant", "steps", "final_loss", "steps_per_s",
                                                  "reused") if k in summary}))
    return summary


if __name__ == "__main__":
    main()
