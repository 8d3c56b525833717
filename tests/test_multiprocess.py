"""Real multi-process runs with accelerate's CPU backend (gloo): no mocks, two processes launched.

Fine-tuning (``test_finetune_two_processes_*``): ``accelerate launch --num_processes 2 -m
realfake_utils.finetune`` trains with the paper's global batch split over the processes, and
``num_train_epochs`` stays passes over the data (issue 11 item 5, issue 14 item 11).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from realfake_utils import finetune as ft

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["zero", "one", "two", "three"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_launch(num_processes: int, module_args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` with the multi-process launcher (torchrun) on CPU: the script's
    ``Accelerator(cpu=True)`` then runs distributed over gloo."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *module_args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HOME": str(cwd / "hf")}   # no user accelerate config file is read
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)


def test_finetune_two_processes_sees_each_sample_once_per_epoch(tmp_path):
    """2 processes x per-device batch 4 = the global batch 8; 2 epochs over 16 images = 4 optimizer
    steps and 32 samples, each image drawn exactly twice; steps.jsonl records the samples per step."""
    from realfake_utils import models

    base = models.build_tiny_sd(tmp_path / "base", sample_size=16, words=CLASSES,
                                unet_channels=(16, 32), vae_channels=(8, 16))
    g = torch.Generator().manual_seed(0)
    n, epochs, global_batch = 16, 2, 8
    labels = torch.arange(n) % len(CLASSES)
    ts = ft.TrainSet(images=torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8),
                     prompts=[f"photo of {CLASSES[int(c)]}" for c in labels], labels=labels,
                     image_embeds=torch.randn(n, 32, generator=g), ids=[f"i{i}" for i in range(n)],
                     class_names=CLASSES)
    ts_path = ft.save_train_set(tmp_path / "train_set.safetensors", ts)
    out = tmp_path / "lora"
    args = ["-m", "realfake_utils.finetune", "--train-set", str(ts_path), "--base-model", str(base),
            "--output-dir", str(out), "--num-train-epochs", str(epochs), "--global-batch-size",
            str(global_batch), "--lora-rank", "2", "--lora-alpha", "2", "--checkpoint-every", "100",
            "--device", "cpu"]
    proc = _accelerate_launch(2, args, tmp_path)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]
    summary = json.loads((out / ft.SUMMARY_NAME).read_text())
    assert summary["num_processes"] == 2 and summary["per_device_batch_size"] == global_batch // 2
    assert summary["steps"] == epochs * n // global_batch
    assert summary["samples_seen"] == epochs * n
    assert summary["passes_min"] == summary["passes_max"] == epochs        # every image exactly `epochs` times
    hist = ft.read_history(out)
    assert [h["samples"] for h in hist] == [global_batch] * summary["steps"]  # gathered over both ranks
    assert hist[-1]["samples_seen"] == epochs * n
    key = summary["config_hash"]
    assert ft.is_trained(out, key)
    # the same configuration on one process is the same cache key: a finished LoRA is reused
    cfg = ft.FinetuneConfig(base_model=str(base), output_dir=str(out), num_train_epochs=epochs,
                            global_batch_size=global_batch, lora_rank=2, lora_alpha=2.0,
                            checkpoint_every=100, device="cpu")
    assert ft.train_lora(cfg, ts_path)["reused"]
