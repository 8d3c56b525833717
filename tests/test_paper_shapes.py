"""The paper preset's code path at the paper's model shapes, on CPU, without weights (issue 11).

Stable Diffusion 1.5's UNet / VAE / CLIP ViT-L/14 text tower and a ViT-L/14 vision tower are built
from their published configs (``models.sd15_config``) with random weights and saved in the diffusers /
transformers formats; ``realfake run --preset imagenette`` then runs on a few 64 px images of a
class-folder tree with the tiny overrides of docs/paper-shapes.md. It proves that a GPU user's first
run does not die at a shape or dtype mismatch: prompt embeddings [B, 77, 768] (+1 appended guidance
token: 78), 768-d image embeddings, LoRA targets found in SD 1.5's UNet, the VAE's scaling factor.

Slow (minutes: a 1.07 B-parameter generator on CPU); `make test` runs it. Which steps it runs:
``REALFAKE_PAPER_SHAPES_STEPS`` (default ``01,02,03``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["tench", "springer"]          # ImageNette's first two classes, as class folders
N_TRAIN, N_TEST = 2, 2                   # images per class
STEPS = os.environ.get("REALFAKE_PAPER_SHAPES_STEPS", "01,02,03")
pytestmark = pytest.mark.slow            # building the 1.07 B-parameter generator alone takes ~1-2 min

# Everything a CPU needs to get through at the paper's shapes (docs/paper-shapes.md); no other value
# of the preset is touched. Model / data paths are what every user passes.
TINY_OVERRIDES = [
    "image_size=64",                     # 512 in the paper (Table 6 / 7)
    "num_train_epochs=1",                # Table 7: 300
    "global_batch_size=4",               # Table 7: 64 (8 x 8 GPUs); per device = global / processes
    "num_inference_steps=2",             # Table 6: 30 UniPC steps
    "synthesis_seeds=[0]",
    "scale_k=[1]",                       # Table 3: 1, 2, 5, 10 (k > 1 is same code path, k times longer)
]


def _images(root: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(root / c / f"{c}_{i}.JPEG")


@pytest.fixture(scope="module")
def paper_world(tmp_path_factory):
    from realfake_utils import models

    root = tmp_path_factory.mktemp("paper_shapes")
    _images(root / "train", N_TRAIN, 0)
    _images(root / "val", N_TEST, 1)
    words = CLASSES + ["photo", "of"]
    sd15 = models.build_sd15_shapes(root / "sd15", words=words)
    clip = models.build_clip_l14_shapes(root / "clip-vit-large-patch14", words=words)
    blip2 = models.build_tiny_blip2(root / "blip2", image_size=16)
    return {"root": root, "sd15": sd15, "clip": clip, "blip2": blip2}


def test_sd15_shapes_are_the_published_ones(paper_world):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPVisionConfig

    unet = UNet2DConditionModel.load_config(paper_world["sd15"], subfolder="unet")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert AutoencoderKL.load_config(paper_world["sd15"], subfolder="vae")["scaling_factor"] == 0.18215
    text = CLIPTextConfig.from_pretrained(paper_world["sd15"], subfolder="text_encoder")
    assert (text.hidden_size, text.num_hidden_layers, text.max_position_embeddings) == (768, 12, 77)
    vision = CLIPVisionConfig.from_pretrained(paper_world["clip"])
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.projection_dim) == \
        (1024, 24, 14, 768)
    from realfake_utils import models

    assert models.check_guidance_compatible(paper_world["clip"], paper_world["sd15"])["text_hidden_size"] == 768


def test_imagenette_preset_runs_at_paper_shapes(paper_world):
    w = paper_world
    run_dir = w["root"] / "run"
    overrides = [f"base_model={w['sd15']}", f"clip_model={w['clip']}", f"data_root={w['root'] / 'train'}",
                 f"test_root={w['root'] / 'val'}", f"captioner_model={w['blip2']}", *TINY_OVERRIDES]
    cmd = [sys.executable, "-m", "realfake_utils.runner", "run", "--preset", "imagenette",
           "--run-dir", str(run_dir), "--only", STEPS]
    for o in overrides:
        cmd += ["-p", o]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = (run_dir / "run.log").read_text() if (run_dir / "run.log").exists() else ""
    assert proc.returncode == 0, proc.stdout.decode()[-4000:] + "\n" + log
    if "02" in STEPS:
        from realfake_utils import finetune as ft

        rec = ft.FinetuneRecord.load(run_dir)
        assert rec.config["guidance_token_position"] == "append" and rec.config["global_batch_size"] == 4
        for name, v in rec.variants.items():                     # Table 2's four LoRAs, one epoch each
            assert v.samples_seen >= len(CLASSES) * N_TRAIN and v.final_loss is not None, name
        summary = json.loads((run_dir / rec.variants["lora-dm-vg"].path / ft.SUMMARY_NAME).read_text())
        assert summary["trainable_params"] > 0 and summary["train_set"]["resolution"] == 64
