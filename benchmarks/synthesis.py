"""Synthesis throughput: images/s and peak memory, the kit's pipeline vs a naive / the official setup.

    python benchmarks/synthesis.py                 # CPU: miniature (or tiny) model, kit vs naive loop
    python benchmarks/synthesis.py --gpu           # + GPU (when CUDA is available): SD 1.5-sized
                                                   #   random-weight pipeline, kit vs official settings

CPU (always). The miniature base model of ``runs/digits`` when it exists (else a tiny random-weight SD
from ``models.build_tiny_sd``) with a random LoRA, latent prior (img2img, strength 0.75), guidance
token, UniPC 30 steps, guidance 2.0:

- **kit**: ``synthesize.generate_batch`` on batches of ``--batch-size`` (LoRA fused once, prompt
  embeddings with the guidance token, one generator per image);
- **naive**: one pipeline call per image with string prompts and the LoRA scaled per call through
  ``cross_attention_kwargs`` (what a straightforward loop over the official ``generate.py`` does at
  batch size 1).

Each mode runs in its own subprocess so that its peak RSS is its own; the ratio kit/naive is printed.

GPU (``--gpu``, guarded by ``torch.cuda.is_available()``). A pipeline assembled from Stable Diffusion
1.5's published configs (UNet 860M, VAE, CLIP ViT-L/14 text tower; random weights, nothing downloaded),
512x512 img2img at strength 0.75, 30 UniPC steps, guidance 2.0, random rank-4 LoRA at scale 0.5:

- **official**: fp16, batch 24, ``enable_model_cpu_offload()``, LoRA unfused (scale per call);
- **kit**: fp16, whole pipeline resident on the GPU, LoRA fused, channels-last UNet, batch
  ``--gpu-batch`` (default 24, same as official; larger batches are tried with ``--gpu-batch 48``).

It also measures the dense fp16 matmul rate and the UNet FLOPs per image (``torch.utils.flop_counter``,
one CFG forward at batch 2 = one image), and prints the FLOP floor = UNet FLOPs per image x denoising
steps / matmul rate, and how far each setting is from it.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------------ CPU
def _cpu_model(tmp: Path) -> tuple[str, str, int]:
    """(base model folder, LoRA folder, image size): the digits miniature base if present, else tiny."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from realfake_utils import models

    mini = REPO / "runs" / "digits" / "artifacts" / "miniature" / "base"
    if (mini / "model_index.json").exists():
        base, size = str(mini), int(json.loads((mini / "vae" / "config.json").read_text()).get("sample_size", 16))
    else:
        base, size = str(models.build_tiny_sd(tmp / "base", sample_size=16, words=[f"c{i}" for i in range(10)])), 16
    pipe = models.load_pipeline(base, "txt2img", "cpu")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    StableDiffusionPipeline.save_lora_weights(
        tmp / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        safe_serialization=True)
    return base, str(tmp / "lora"), size


def _cpu_worker(mode: str, base: str, lora: str, size: int, n: int, batch_size: int, steps: int) -> dict:
    import torch

    from realfake_utils import features
    from realfake_utils import synthesize as syn

    st = syn.SynthesisSettings(base_model=base, lora_dir=lora, lora_name="bench", image_size=size,
                               num_inference_steps=steps, fuse_lora=(mode == "kit"))
    pipe = syn.load_synthesis_pipeline(st, "cpu")
    d = pipe.text_encoder.config.hidden_size
    sources = [{"id": f"s{i}", "label": i % 10, "class_name": f"c{i % 10}", "split": "train"} for i in range(n)]
    items = syn.plan_items(sources, 1, 0)
    g = torch.Generator().manual_seed(0)
    init = (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)
    feats = torch.randn(10, d, generator=g)
    def naive(i, it):
        pipe(prompt=it.prompt, negative_prompt=features.NEGATIVE_PROMPT, image=init[i:i + 1].float() / 255,
             strength=st.strength, num_inference_steps=steps, guidance_scale=st.guidance_scale,
             generator=torch.Generator().manual_seed(it.seed), cross_attention_kwargs={"scale": st.lora_scale})

    # warm-up (oneDNN primitives, allocator), not timed
    if mode == "kit":
        syn.generate_batch(pipe, items[:2], st, init_images=init[:2], guidance=feats[[it.label for it in items[:2]]])
    else:
        naive(0, items[0])
    t0 = time.perf_counter()
    if mode == "kit":
        for s in range(0, n, batch_size):
            b = items[s:s + batch_size]
            syn.generate_batch(pipe, b, st, init_images=init[s:s + batch_size], guidance=feats[[it.label for it in b]])
    else:  # naive: one call per image, string prompts, LoRA scaled per call
        for i, it in enumerate(items):
            naive(i, it)
    dt = time.perf_counter() - t0
    return {"mode": mode, "images": n, "seconds": dt, "images_per_s": n / dt,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cpu_benchmark(n: int, batch_size: int, steps: int, threads: int, naive_n: int = 0) -> dict:
    naive_n = naive_n or max(1, n // 4)
    with tempfile.TemporaryDirectory() as tmp:
        base, lora, size = _cpu_model(Path(tmp))
        out = {"model": base if "runs" in base else "tiny (models.build_tiny_sd)", "image_size": size,
               "steps": steps, "batch_size": batch_size, "threads": threads}
        for mode in ("kit", "naive"):
            cmd = [sys.executable, __file__, "--worker", mode, "--base", base, "--lora", lora, "--size", str(size),
                   "-n", str(n if mode == "kit" else naive_n), "--batch-size", str(batch_size), "--steps", str(steps), "--threads", str(threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if res.returncode:
                raise RuntimeError(res.stderr[-3000:])
            out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        out["speedup_kit_over_naive"] = out["kit"]["images_per_s"] / out["naive"]["images_per_s"]
    return out


# ------------------------------------------------------------------------------------------------ GPU
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def _sd15_random_folder(out: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from realfake_utils import models

    torch.manual_seed(0)
    tok = models.build_tokenizer([f"c{i}" for i in range(10)] + ["photo", "of"], None, 77)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tok), 49408), bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SD15_TEXT))
    return models.save_sd_pipeline(out, AutoencoderKL(**SD15_VAE), te, tok, UNet2DConditionModel(**SD15_UNET),
                                   DDPMScheduler(**models.SD_SCHEDULER_CONFIG))


def _matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _unet_flops_per_image(unet) -> float:
    """FLOPs of one denoising step for one image with CFG (UNet forward at batch 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=unet.dtype)
    c = torch.randn(2, 77, 768, device="cuda", dtype=unet.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor([500, 500], device="cuda"), c)
    return float(fc.get_total_flops())


def _gpu_run(folder: str, lora: str, mode: str, batch: int, n_batches: int, steps: int) -> dict:
    import torch

    from realfake_utils import features
    from realfake_utils import synthesize as syn

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    st = syn.SynthesisSettings(base_model=folder, lora_dir=lora, lora_name="bench", image_size=512,
                               num_inference_steps=steps, dtype="float16", fuse_lora=(mode == "kit"))
    if mode == "official":
        from diffusers import StableDiffusionImg2ImgPipeline, UniPCMultistepScheduler

        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, torch_dtype=torch.float16, safety_checker=None,
                                                              requires_safety_checker=False)
        pipe.load_lora_weights(lora)
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to("cuda")
        pipe.enable_model_cpu_offload()
    else:
        pipe = syn.load_synthesis_pipeline(st, "cuda")
        pipe.unet.to(memory_format=torch.channels_last)
    d = pipe.text_encoder.config.hidden_size
    sources = [{"id": f"s{i}", "label": i % 10, "class_name": f"c{i % 10}", "split": "train"}
               for i in range(batch * (n_batches + 1))]
    items = syn.plan_items(sources, 1, 0)
    init = (torch.rand(batch, 3, 512, 512) * 255).to(torch.uint8)
    feats = torch.randn(10, d)

    def one(b):
        if mode == "official":
            pipe([it.prompt for it in b], image=init.float() / 255, negative_prompt=[features.NEGATIVE_PROMPT] * len(b),
                 strength=0.75, num_inference_steps=steps, guidance_scale=2.0,
                 cross_attention_kwargs={"scale": 0.5})
        else:
            syn.generate_batch(pipe, b, st, init_images=init, guidance=feats[[it.label for it in b]])

    one(items[:batch])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for j in range(1, n_batches + 1):
        one(items[j * batch:(j + 1) * batch])
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {"mode": mode, "batch": batch, "images": batch * n_batches, "seconds": dt,
           "images_per_s": batch * n_batches / dt, "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    return out


def gpu_benchmark(steps: int, kit_batch: int, n_batches: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    torch.backends.cuda.matmul.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(_sd15_random_folder(Path(tmp) / "sd15"))
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        StableDiffusionPipeline.save_lora_weights(
            Path(tmp) / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            safe_serialization=True)
        unet = unet.to("cuda", torch.float16)
        flops = _unet_flops_per_image(unet)
        del unet
        rate = _matmul_tflops()
        denoise_steps = int(steps * 0.75)
        floor = rate * 1e12 / (flops * denoise_steps)
        out = {"unet_gflops_per_image_step_cfg": flops / 1e9, "matmul_tflops_fp16": rate,
               "denoising_steps": denoise_steps, "flop_floor_images_per_s": floor}
        out["official"] = _gpu_run(folder, str(Path(tmp) / "lora"), "official", 24, n_batches, steps)
        out["kit"] = _gpu_run(folder, str(Path(tmp) / "lora"), "kit", kit_batch, n_batches, steps)
        out["speedup_kit_over_official"] = out["kit"]["images_per_s"] / out["official"]["images_per_s"]
        for m in ("official", "kit"):
            out[m]["fraction_of_flop_floor"] = out[m]["images_per_s"] / floor
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=48, help="CPU: images per mode")
    p.add_argument("--naive-n", type=int, default=0, help="CPU: images of the naive loop (default n/4)")
    p.add_argument("--batch-size", type=int, default=16, help="CPU: the kit's batch size")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="also run the GPU benchmark when CUDA is available")
    p.add_argument("--gpu-batch", type=int, default=24)
    p.add_argument("--gpu-batches", type=int, default=2, help="timed batches per GPU setting")
    p.add_argument("--no-cpu", action="store_true")
    p.add_argument("--json", default="", help="also write the results here")
    # internal: one CPU mode in a subprocess
    p.add_argument("--worker", choices=("kit", "naive"))
    p.add_argument("--base")
    p.add_argument("--lora")
    p.add_argument("--size", type=int)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(_cpu_worker(a.worker, a.base, a.lora, a.size, a.n, a.batch_size, a.steps)))
        return
    res = {}
    if not a.no_cpu:
        c = res["cpu"] = cpu_benchmark(a.n, a.batch_size, a.steps, a.threads, a.naive_n)
        print(f"CPU ({c['model']}, {c['image_size']}px, {c['steps']} steps, {c['threads']} threads)")
        for m in ("kit", "naive"):
            r = c[m]
            print(f"  {m:6s} {r['images_per_s']:8.2f} img/s  ({r['images']} images in {r['seconds']:.1f}s)  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")
        print(f"  kit / naive: {c['speedup_kit_over_naive']:.2f}x")
    if a.gpu:
        g = res["gpu"] = gpu_benchmark(a.steps, a.gpu_batch, a.gpu_batches)
        if "skipped" in g:
            print(f"GPU: skipped ({g['skipped']})")
        else:
            print(f"GPU: UNet {g['unet_gflops_per_image_step_cfg']:.0f} GFLOP/image/step (CFG), matmul "
                  f"{g['matmul_tflops_fp16']:.0f} TFLOP/s fp16, floor {g['flop_floor_images_per_s']:.2f} img/s")
            for m in ("official", "kit"):
                r = g[m]
                print(f"  {m:8s} batch {r['batch']:3d} {r['images_per_s']:7.2f} img/s  peak {r['peak_gpu_mem_gb']:.1f} GB  "
                      f"{100 * r['fraction_of_flop_floor']:.0f}% of the FLOP floor")
            print(f"  kit / official: {g['speedup_kit_over_official']:.2f}x (goal >= 3x)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
