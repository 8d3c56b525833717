"""Classifier training throughput and peak memory.

    python benchmarks/classifier.py [--steps 20] [--threads 1] [--gpu-steps 30] [--json out.json]

CPU (always): the miniature model (params/recipes/miniature.yaml: timm resnet10t, widths 16-128;
stride-1 stem at 16 px for digits, the standard stem at 32 px for eurosat-mini and at 64 px): optimiser steps alone, and the whole
``train_classifier`` loop (timm transforms, DataLoader, checkpoint each epoch) on an in-memory set.
Peak memory: the process's peak resident set size (``ru_maxrss``) after each case.

GPU (only where ``torch.cuda.is_available()``): ResNet-50 at 224 px, batch 128, SGD: plain fp32 against
channels-last + AMP (bf16 autocast) and against channels-last + AMP + ``torch.compile``; images/s,
peak ``torch.cuda.max_memory_allocated``, and the speed-up ratios over plain.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from realfake_utils import classify as C  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_steps(model: torch.nn.Module, size: int, batch: int, steps: int, device: str = "cpu",
                channels_last: bool = False, amp: bool = False, warmup: int = 3) -> float:
    """Images/s of forward + backward + SGD step on random data."""
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


class RandomPIL(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int, classes: int = 10):
        rng = np.random.default_rng(0)
        from PIL import Image
        self.items = [(Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
                       int(i % classes)) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def cpu_cases(steps: int) -> list[dict]:
    out = []
    for size in (16, 32, 64):
        recipe = C.load_recipe("miniature", image_size=size)
        model = C.build_model(recipe, 10).net
        ips = bench_steps(model, size, recipe["batch_size"], steps)
        out.append({"case": f"miniature steps {size}px", "images_per_s": ips, "peak_rss_mib": peak_rss_mib()})
        print(f"CPU miniature {size:>2} px, optimiser steps only : {ips:8.0f} images/s, "
              f"peak RSS {peak_rss_mib():.0f} MiB", flush=True)
        n = 512 if size == 16 else 256
        ds = RandomPIL(n, size)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            C.train_classifier(Path(tmp) / "r", ds, None, 10, dict(recipe, epochs=2), seed=0, device="cpu")
            ips_full = 2 * n / (time.perf_counter() - t0)
        out.append({"case": f"miniature train_classifier {size}px", "images_per_s": ips_full,
                    "peak_rss_mib": peak_rss_mib()})
        print(f"CPU miniature {size:>2} px, whole train_classifier: {ips_full:8.0f} images/s "
              f"(transforms, loader, checkpoints; includes model build), peak RSS {peak_rss_mib():.0f} MiB",
              flush=True)
    return out


def gpu_cases(steps: int) -> list[dict]:
    import timm

    out = []
    base = None
    for name, cl, amp, comp in (("plain fp32", False, False, False),
                                ("channels-last + AMP bf16", True, True, False),
                                ("channels-last + AMP bf16 + torch.compile", True, True, True)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = timm.create_model("resnet50", num_classes=1000)
        if comp:
            model = torch.compile(model)
        ips = bench_steps(model, 224, 128, steps, device="cuda", channels_last=cl, amp=amp,
                          warmup=10 if comp else 3)
        peak = torch.cuda.max_memory_allocated() / 2**30
        base = base or ips
        out.append({"case": f"resnet50 224px {name}", "images_per_s": ips, "peak_gib": peak,
                    "speedup_vs_plain": ips / base})
        print(f"GPU ResNet-50 224 px bs 128, {name:<42}: {ips:7.0f} images/s, peak {peak:5.1f} GiB, "
              f"x{ips / base:.2f} vs plain", flush=True)
        del model
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--gpu-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared CPU)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"torch": torch.__version__, "threads": args.threads, "cpu": cpu_cases(args.steps)}
    if torch.cuda.is_available():
        res["gpu_name"] = torch.cuda.get_device_name()
        res["gpu"] = gpu_cases(args.gpu_steps)
    else:
        print("no CUDA device: GPU cases (ResNet-50 224 px, channels-last / AMP / torch.compile) skipped")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
