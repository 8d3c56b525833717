"""Fine-tuning throughput and peak memory (realfake_utils.finetune).

    .venv/bin/python benchmarks/finetune.py                 # every case this machine can run
    .venv/bin/python benchmarks/finetune.py --case smoke    # one case (prints one JSON line)
    .venv/bin/python benchmarks/finetune.py --steps 20 --compile

CPU cases (always): the whole fine-tuning loop of ``finetune.train_lora`` (VAE encode, text encoder,
visual guidance token, UNet forward/backward with LoRA, L_simple + L_DM, AdamW through accelerate) on

- ``smoke``: the tiny test model (``models.build_tiny_sd``, 16 px),
- ``miniature``: the miniature base model's architecture (``miniature.build_unet`` / ``build_vae`` on a
  64-wide text encoder, 16 px; random weights - speed does not depend on them),

each in a fresh subprocess so that peak memory (``resource.getrusage`` max RSS) is the case's own.

GPU cases (only where ``torch.cuda.is_available()``): a UNet built from Stable Diffusion 1.5's published
``unet/config.json`` (written below, random weights, no download) at 512 px (64x64 latents), batch 8,
77x768 text states, LoRA on to_q/to_k/to_v/to_out.0, L_simple (Min-SNR 5) + official DM loss:

- ``sd15-official``: the official code's settings - fp16 autocast, frozen weights fp16, LoRA rank 4 in
  fp32, GradScaler, SDPA attention (diffusers' default with torch 2, as in its torch 2.0.1 env);
- ``sd15-kit``: the kit's best settings - bf16 autocast (no GradScaler), TF32 matmuls, channels_last,
  fused AdamW, SDPA, plus ``torch.compile`` with ``--compile``; same rank 4.

Prints steps/s, samples/s and peak memory (``torch.cuda.max_memory_allocated``) and the kit/official
ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Stable Diffusion 1.5 unet/config.json (runwayml/stable-diffusion-v1-5), as published.
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# scheduler/scheduler_config.json of SD 1.5 (training noise schedule)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / (1024 if sys.platform == "darwin" else 1)


# ------------------------------------------------------------------------------------------------
# CPU cases: the real training loop on small models
# ------------------------------------------------------------------------------------------------
def _build_model(case: str, root: Path) -> tuple[str, int, int]:
    """A pipeline folder for the case; returns (path, image size, text hidden size)."""
    from realfake_utils import models

    words = [f"c{i}" for i in range(10)]
    if case == "smoke":
        return str(models.build_tiny_sd(root / "base", sample_size=16, words=words)), 16, 32
    if case == "miniature":
        from realfake_utils import miniature
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = miniature.MiniatureConfig()
        tok = models.build_tokenizer(miniature.vocabulary(words), None, cfg.model_max_length)
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=cfg.clip_width, intermediate_size=4 * cfg.clip_width,
            num_hidden_layers=cfg.clip_layers, num_attention_heads=cfg.clip_heads,
            max_position_embeddings=cfg.model_max_length, projection_dim=cfg.clip_width,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        vae = miniature.build_vae(cfg.image_size, cfg.vae_channels)
        latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
        unet = miniature.build_unet(latent, cfg.clip_width, cfg.unet_channels,
                                    layers_per_block=cfg.unet_layers_per_block)
        path = models.save_sd_pipeline(root / "base", vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=miniature.sampling_scheduler())
        return str(path), cfg.image_size, cfg.clip_width
    raise ValueError(case)


def run_cpu_case(case: str, steps: int, batch: int, rank: int, threads: int) -> dict:
    import torch

    from realfake_utils import finetune as ft

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base, size, hidden = _build_model(case, root)
        g = torch.Generator().manual_seed(0)
        n = max(64, batch * 4)
        labels = torch.arange(n) % 10
        ts = ft.TrainSet(images=torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                         prompts=[f"photo of c{int(c)}" for c in labels], labels=labels,
                         image_embeds=torch.randn(n, hidden, generator=g), ids=[str(i) for i in range(n)],
                         class_names=[f"c{i}" for i in range(10)])
        rss0 = _maxrss_mb()
        cfg = ft.FinetuneConfig(base_model=base, output_dir=str(root / "lora"), max_train_steps=steps,
                                train_batch_size=batch, lora_rank=rank, lora_alpha=float(rank),
                                checkpoint_every=10**9, device="cpu", dm_loss=True, dm_loss_form="official",
                                visual_guidance=True, snr_gamma=5.0)
        s = ft.train_lora(cfg, ts)
    return {"case": case, "device": "cpu", "threads": threads, "batch": batch, "rank": rank,
            "image_size": size, "steps": steps, "steps_per_s": s["steps_per_s"],
            "samples_per_s": s["samples_per_s"], "trainable_params": s["trainable_params"],
            "peak_rss_mb": round(_maxrss_mb(), 1), "rss_before_training_mb": round(rss0, 1)}


# ------------------------------------------------------------------------------------------------
# GPU cases: SD 1.5's UNet at 512 px
# ------------------------------------------------------------------------------------------------
def run_gpu_case(case: str, steps: int, batch: int, rank: int, compile_unet: bool, warmup: int = 3) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from realfake_utils import finetune as ft

    kit = case == "sd15-kit"
    dev = torch.device("cuda")
    amp = torch.bfloat16 if kit else torch.float16
    torch.backends.cuda.matmul.allow_tf32 = kit
    torch.backends.cudnn.allow_tf32 = kit
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in SD15_UNET_CONFIG.items() if k != "_class_name"})
    unet.set_attn_processor(AttnProcessor2_0())
    params = ft.add_lora(unet, rank, float(rank))
    unet.to(dev, dtype=amp)
    for p in params:
        p.data = p.data.float()
    if kit:
        unet.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=kit)
    scaler = None if kit else torch.amp.GradScaler("cuda")
    model = torch.compile(unet) if (kit and compile_unet) else unet
    sched = DDPMScheduler(**SD15_SCHEDULER)
    sched.alphas_cumprod = sched.alphas_cumprod.to(dev)
    cfg = ft.FinetuneConfig(base_model="-", dm_loss=True, dm_loss_form="official", snr_gamma=5.0)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(batch, 4, 64, 64, generator=g).to(dev, amp)
    if kit:
        lat = lat.contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(batch, 77, 768, generator=g).to(dev, amp)

    def step(i):
        with torch.autocast("cuda", dtype=amp):
            loss, _, _ = ft.diffusion_loss(model, lat, ctx, sched, cfg, ft.step_generator(0, i))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"case": case, "device": torch.cuda.get_device_name(0), "batch": batch, "rank": rank,
            "resolution": 512, "dtype": str(amp).replace("torch.", ""), "compile": bool(kit and compile_unet),
            "channels_last": kit, "steps": steps, "steps_per_s": round(steps / dt, 3),
            "samples_per_s": round(steps * batch / dt, 2),
            "peak_cuda_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "trainable_params": int(sum(p.numel() for p in params))}


# ------------------------------------------------------------------------------------------------
def _one(args) -> dict:
    if args.case in ("smoke", "miniature"):
        return run_cpu_case(args.case, args.steps, args.batch or 32, args.rank or 8, args.threads)
    return run_gpu_case(args.case, args.steps, args.batch or 8, args.rank or 4, args.compile)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["smoke", "miniature", "sd15-official", "sd15-kit"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=0, help="default: 32 on CPU cases, 8 on SD 1.5")
    p.add_argument("--rank", type=int, default=0, help="LoRA rank; default: 8 on CPU cases, 4 on SD 1.5")
    p.add_argument("--threads", type=int, default=1, help="torch threads for CPU cases")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet in sd15-kit")
    args = p.parse_args(argv)
    if args.case:
        res = _one(args)
        print(json.dumps(res))
        return [res]
    import torch

    cases = ["smoke", "miniature"] + (["sd15-official", "sd15-kit"] if torch.cuda.is_available() else [])
    results = []
    for case in cases:
        cmd = [sys.executable, __file__, "--case", case, "--steps", str(args.steps),
               "--threads", str(args.threads)]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--rank", str(args.rank)] if args.rank else []
        cmd += ["--compile"] if args.compile else []
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"{case}: FAILED\n{out.stderr[-2000:]}")
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(res)
        mem = (f"peak RSS {res['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in res
               else f"peak CUDA memory {res['peak_cuda_mem_mb']:.0f} MB")
        print(f"{case:14s} {res['device']:24s} batch {res['batch']:3d} rank {res['rank']}: "
              f"{res['steps_per_s']:.2f} steps/s, {res['samples_per_s']:.1f} samples/s, {mem}")
    by = {r["case"]: r for r in results}
    if "sd15-official" in by and "sd15-kit" in by:
        ratio = by["sd15-kit"]["steps_per_s"] / by["sd15-official"]["steps_per_s"]
        mem = by["sd15-kit"]["peak_cuda_mem_mb"] / by["sd15-official"]["peak_cuda_mem_mb"]
        print(f"SD 1.5 UNet, 512 px, batch 8: kit / official = {ratio:.2f}x steps/s, {mem:.2f}x peak memory")
    elif not torch.cuda.is_available():
        print("no GPU: the SD 1.5 cases (sd15-official, sd15-kit) run where torch.cuda.is_available()")
    return results


if __name__ == "__main__":
    main()
