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
from tests.test_finetune import random_train_set

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["zero", "one", "two", "three"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_launch(num_processes: int, module_args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` with the multi-process launcher (torchrun) on CPU: the script's
    ``Accelerator(cpu=True)`` then runs distributed over gloo."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HOME": str(cwd / "hf")}   # no user accelerate config file is read
    for _ in range(5):
        # the free port can be taken by another process between picking and binding it: only that
        # failure (EADDRINUSE at the rendezvous) is retried, on a new port; any other result is returned
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *module_args]
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=1800)   # a hang guard only: each launch takes seconds
        if proc.returncode == 0 or b"address already in use" not in proc.stdout.lower():
            return proc
    return proc


def test_finetune_two_processes_sees_each_sample_once_per_epoch(tmp_path):
    """2 processes x per-device batch 4 = the global batch 8; 2 epochs over 16 images = 4 optimizer
    steps and 32 samples, each image drawn exactly twice; steps.jsonl records the samples per step."""
    from realfake_utils import models

    base = models.build_tiny_sd(tmp_path / "base", sample_size=16, words=CLASSES,
                                unet_channels=(16, 32), vae_channels=(8, 16))
    n, epochs, global_batch = 16, 2, 8
    ts = random_train_set(n, CLASSES)
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


# --------------------------------------------------------------------------- synthesis and classifiers
def _digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def test_synthesis_two_processes_writes_the_same_bytes_as_one(tmp_path):
    """``accelerate launch --num_processes 2 -m realfake_utils.synthesize``: the processes split the
    set's fixed batches; every image has its own seed and is computed in the same batch as in one
    process, so the two-process set is byte-identical to the one-process set (and marked complete)."""
    from realfake_utils import data, models
    from realfake_utils import synthesize as syn

    base = models.build_tiny_sd(tmp_path / "base", sample_size=16, words=CLASSES,
                                unet_channels=(16, 32), vae_channels=(8, 16))
    rows = [{"id": f"digits/{i}", "path": "", "index": i, "label": i % 4, "class_name": CLASSES[i % 4],
             "split": "train"} for i in range(10)]
    manifest = data.write_manifest(rows, tmp_path / "data" / "manifest.csv")
    st = syn.SynthesisSettings(base_model=str(base), num_inference_steps=3, image_size=16, latent_prior=True,
                               visual_guidance=True, guidance_token_position="append")
    feats = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    dirs = {}
    for name in ("one", "two"):
        dirs[name] = tmp_path / "synthetic" / name / "k2-s0"
        syn.prepare_set(dirs[name], st, 2, source_manifest=manifest, guidance_features=feats, batch_size=3)
    one = syn.run_set(dirs["one"], device="cpu", progress=False, reuse_siblings=False)
    assert one["generated"] == 20 and one["complete"]
    proc = _accelerate_launch(2, ["-m", "realfake_utils.synthesize", "--set-dir", str(dirs["two"]),
                                  "--device", "cpu", "--threads", "1", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]
    import re   # the two processes print one flat JSON object each, possibly on one line

    results = [json.loads(x) for x in re.findall(r"\{[^{}]*\}", proc.stdout.decode()) if '"process_index"' in x]
    assert sorted(r["process_index"] for r in results) == [0, 1] and all(r["processes"] == 2 for r in results)
    assert sum(r["generated"] for r in results) == 20 and all(0 < r["generated"] < 20 for r in results)
    assert _digests(dirs["two"]) == _digests(dirs["one"]) and len(_digests(dirs["one"])) == 20
    assert syn.merge_set(dirs["two"]) == syn.merge_set(dirs["one"])
    assert syn.is_complete(dirs["two"])            # the completion marker, written by process 0


def test_classifier_two_processes_trains_the_same_epochs_and_records_them(tmp_path):
    """``accelerate launch --num_processes 2 -m realfake_utils.classify``: DDP over gloo with the
    recipe's global batch split over the processes. What is equal to one process: the data, the
    per-epoch samples and optimizer steps (global batch 32 = 2 x 16), the schedule; what is not: the
    weights bit for bit (batch-norm statistics are per process, gradients are averaged over two
    half-batches). Both reach a sensible accuracy and are recorded with their completion markers."""
    import shutil

    from realfake_utils import classify as C
    from realfake_utils import data
    from realfake_utils.rundir import RunDir, is_done, read_json

    runs = {n: RunDir("mp", tmp_path / n) for n in ("one", "two")}
    data.prepare_data("digits", "", runs["one"].artifacts / "data", {"pool": 0.5, "train": 0.3, "test": 0.2}, seed=0)
    shutil.copytree(runs["one"].artifacts / "data", runs["two"].artifacts / "data", dirs_exist_ok=True)
    over = json.dumps({"epochs": 5, "batch_size": 32, "model_kwargs": {"channels": [16, 16, 32, 32], "stem_width": 8}})
    args = ["--recipe", "miniature", "--image-size", "8", "--recipe-overrides", over, "--seeds", "0",
            "--sources", "real", "--device", "cpu", "--threads", "1"]
    C.main(["--run-dir", str(runs["one"].root), *args])
    proc = _accelerate_launch(2, ["-m", "realfake_utils.classify", "--run-dir", str(runs["two"].root), *args],
                              tmp_path)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]
    m = {n: read_json(r.artifacts / "classifiers" / "real__k0__s0" / "metrics.json") for n, r in runs.items()}
    assert (m["one"]["processes"], m["two"]["processes"]) == (1, 2)
    assert (m["one"]["per_device_batch_size"], m["two"]["per_device_batch_size"]) == (32, 16)
    n_train = m["one"]["n_train"]
    assert m["two"]["n_train"] == n_train == 539
    for key in ("samples", "steps"):   # the same passes over the data: 16 steps x 32 samples per epoch
        assert [h[key] for h in m["two"]["history"]] == [h[key] for h in m["one"]["history"]]
    assert [h["samples"] for h in m["one"]["history"]] == [n_train // 32 * 32] * 5
    assert [h["lr"] for h in m["two"]["history"]] == [h["lr"] for h in m["one"]["history"]]
    for n in ("one", "two"):
        assert m[n]["top1"] > 0.5, (n, m[n]["top1"])   # 10 classes: chance is 0.1
        assert is_done(runs[n].artifacts / "classifiers" / "real__k0__s0", m[n]["info"]["key"])
    assert m["two"]["info"]["key"] == m["one"]["info"]["key"]   # same recipe, seed and data: same cache key
