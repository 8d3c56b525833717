"""The paper preset's code path at the paper's model shapes, on CPU, without weights (issue 11).

Stable Diffusion 1.5's UNet / VAE / CLIP ViT-L/14 text tower and a ViT-L/14 vision tower are built
from their published configs (``models.sd15_config``) with random weights and saved in the diffusers /
transformers formats; so is SSCD's ResNeXt101 DISC descriptor (``sscd.build_sscd_shapes``: TorchScript,
loaded through the SHA-256 check) and a LAION-style pool index (img2dataset's ``files`` layout: images
with their alt text beside them). ``realfake run --preset imagenette`` then runs every notebook, 01-09,
in one run folder, on a few 64 px images of a class-folder tree with the tiny overrides of
docs/paper-shapes.md. It proves that a GPU user's first run does not die at a shape, dtype or
bookkeeping mismatch: prompt embeddings [B, 77, 768] (+1 appended guidance token: 78), 768-d image
embeddings, LoRA targets found in SD 1.5's UNet, the VAE's scaling factor, ResNet-50 at 224 px, the
1024-d SSCD descriptor at 288 px, CLIP ViT-L/14 adapted at 224 px.

Slow (about 14 min on a shared 2-core CPU, see docs/paper-shapes.md); `make test` runs it. Which steps it runs:
``REALFAKE_PAPER_SHAPES_STEPS`` (default all, ``01,02,03,04,05,06,07,08,09``).
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
STEPS = os.environ.get("REALFAKE_PAPER_SHAPES_STEPS", "01,02,03,04,05,06,07,08,09")
pytestmark = pytest.mark.slow            # building the 1.07 B-parameter generator alone takes ~1-2 min
POOL_CAPTIONS = ["a photo of a tench", "tench caught in the lake", "springer spaniel photo",
                 "my springer on the beach", "photo of a red car", "a tench and a springer"]

# Everything a CPU needs to get through at the paper's shapes (docs/paper-shapes.md): sizes, steps,
# epochs and counts, never a model shape or a switch of the method. Model / data paths are what every
# user passes.
TINY_OVERRIDES = [
    "image_size=64",                     # 512 in the paper (Table 6 / 7)
    "num_train_epochs=1",                # Table 7: 300
    "global_batch_size=4",               # Table 7: 64 (8 x 8 GPUs); per device = global / processes
    "num_inference_steps=2",             # Table 6: 30 UniPC steps
    "synthesis_seeds=[0]",
    "scale_k=[1]",                       # Table 3: 1, 2, 5, 10 (k > 1 is same code path, k times longer)
    "recipe_overrides={epochs: 1}",      # Table 8: 200 epochs (04's classifiers, 06's targets / shadows)
    "n_shadow=4",                        # Sec. 4.5: 10 (the online attack needs >= 2 in and 2 out)
    "adapt_epochs=1",                    # Geng et al.: 30 epochs of CLIP adaptation
    "seeds=[0]",                         # 08's adaptation seeds (Geng et al.: 3); 04's are [0] already
    "scratch_seeds=[0]",                 # 08's from-scratch table (3 seeds)
    "size_fractions=[1.0]",              # 08's sweep: 0.1, 0.25, 0.5, 1 of the retrieved maximum
    "synthetic_multipliers=[]",          # 08's synthetic-only points beyond it: 2x, 4x (same code, more images)
    "synthesis_steps=2",                 # 08's pool-style synthetic set: 30 steps
]
# Random weights rate every pair of images alike (SSCD cosines 0.96-0.999, CLIP likewise): the thresholds
# set for trained descriptors would flag or merge everything. Only these checks / filters are moved.
RANDOM_WEIGHT_OVERRIDES = [
    "dedup_threshold=0.9999",            # 08's test-duplicate threshold (Somepalli et al.: 0.5 for SSCD)
    "min_near_copy_recall=0.25",         # 08's check that planted near copies are caught (exact copies are)
    "dedup_within=1.0",                  # 08's within-set CLIP duplicate merge (0.98): off
    "clip_score_threshold=0.0",          # Geng et al.'s CLIP-score filter at 0.2 -> the percentile form
    "clip_score_percentile=10.0",        # (the lowest 10 % per class dropped: the filter still runs)
]


def _images(root: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(root / c / f"{c}_{i}.JPEG")


def _laion_pool(root: Path) -> Path:
    """A LAION-style index as img2dataset's ``files`` output writes it: ``<shard>/<key>.jpg`` with the
    alt text in ``<shard>/<key>.txt`` (one of ``pool.read_pool_index``'s formats)."""
    shard = root / "00000"
    shard.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for i, caption in enumerate(POOL_CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (72, 90, 3), dtype=np.uint8)).save(shard / f"{i:09d}.jpg")
        (shard / f"{i:09d}.txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def paper_world(tmp_path_factory):
    from realfake_utils import models, sscd

    root = tmp_path_factory.mktemp("paper_shapes")
    _images(root / "train", N_TRAIN, 0)
    _images(root / "val", N_TEST, 1)
    words = CLASSES + ["photo", "of"]
    sd15 = models.build_sd15_shapes(root / "sd15", words=words)
    clip = models.build_clip_l14_shapes(root / "clip-vit-large-patch14", words=words)
    blip2 = models.build_tiny_blip2(root / "blip2", image_size=16)
    sscd_path, sscd_sha = sscd.build_sscd_shapes(root / "sscd_disc_large.torchscript.pt", "disc_large")
    return {"root": root, "sd15": sd15, "clip": clip, "blip2": blip2, "sscd": sscd_path, "sscd_sha256": sscd_sha,
            "pool": _laion_pool(root / "laion-subset")}


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


def test_sscd_descriptor_is_the_released_format(paper_world):
    """ResNeXt101 32x4d + GeM + 1024-d projection as TorchScript: loaded only through the SHA-256 check."""
    import torch

    from realfake_utils import sscd

    with pytest.raises(sscd.ChecksumError, match="SHA-256"):
        sscd.load_descriptor(paper_world["sscd"], "0" * 64)
    model = sscd.load_descriptor(paper_world["sscd"], paper_world["sscd_sha256"])
    assert sum(p.numel() for p in model.parameters()) > 40_000_000          # ResNeXt101 32x4d: 44 M
    d = sscd.compute_descriptors(model, torch.zeros(1, 3, 64, 80, dtype=torch.uint8), size=288, device="cpu")
    assert d.shape == (1, 1024) and abs(float(d.norm()) - 1.0) < 1e-5
    again, sha = sscd.build_sscd_shapes(paper_world["sscd"], "disc_large")   # cached, same bytes
    assert sha == paper_world["sscd_sha256"] == sscd.sha256_file(again)


def test_imagenette_preset_runs_at_paper_shapes(paper_world):
    w = paper_world
    run_dir = w["root"] / "run"
    overrides = [f"base_model={w['sd15']}", f"clip_model={w['clip']}", f"data_root={w['root'] / 'train'}",
                 f"test_root={w['root'] / 'val'}", f"captioner_model={w['blip2']}", f"sscd_model={w['sscd']}",
                 f"sscd_sha256={w['sscd_sha256']}", f"pool_index={w['pool']}", *TINY_OVERRIDES, *RANDOM_WEIGHT_OVERRIDES]
    cmd = [sys.executable, "-m", "realfake_utils.runner", "run", "--preset", "imagenette",
           "--run-dir", str(run_dir), "--only", STEPS]
    for o in overrides:
        cmd += ["-p", o]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = (run_dir / "run.log").read_text() if (run_dir / "run.log").exists() else ""
    assert proc.returncode == 0, proc.stdout.decode()[-4000:] + "\n" + log
    steps = {s.strip().zfill(2) for s in STEPS.split(",")}
    n_train = len(CLASSES) * N_TRAIN
    if "02" in steps:
        from realfake_utils import finetune as ft

        rec = ft.FinetuneRecord.load(run_dir)
        assert rec.config["guidance_token_position"] == "append" and rec.config["global_batch_size"] == 4
        for name, v in rec.variants.items():                     # Table 2's four LoRAs, one epoch each
            assert v.samples_seen >= n_train and v.final_loss is not None, name
        summary = json.loads((run_dir / rec.variants["lora-dm-vg"].path / ft.SUMMARY_NAME).read_text())
        assert summary["trainable_params"] > 0 and summary["train_set"]["resolution"] == 64
    if "03" in steps:
        from realfake_utils import synthesize as syn

        sets = syn.SynthesisRecord.load(run_dir).sets
        assert len({s.table2_row for s in sets}) == 9 and all(s.complete and s.size == n_train for s in sets)
    if "04" in steps:
        from realfake_utils import classify as C

        rec04 = C.ClassifierRecord.load(run_dir)
        assert {r.source for r in rec04.runs} >= {"real", "lora-dm-vg-lp"} and rec04.recipe["train_size"] == 224
    if "05" in steps:
        from realfake_utils import classify as C
        from realfake_utils import ood

        rec05 = ood.OODRecord.load(run_dir)                         # no OOD folder: the clean split only
        assert {r.ood_set for r in rec05.results} == {"clean"}
        assert {r.classifier for r in rec05.results} == {str(r.path) for r in C.ClassifierRecord.load(run_dir).runs}
    if "06" in steps:
        from realfake_utils import lira

        rec06 = lira.LiraRecord.load(run_dir)
        assert rec06.n_shadow == 4 and rec06.n_examples == n_train and rec06.synthetic.ran
    if "07" in steps:
        from realfake_utils import sscd

        rec07 = sscd.SSCDRecord.load(run_dir)
        assert rec07.descriptor_sha256 == w["sscd_sha256"] and not rec07.miniature_descriptor
        assert (rec07.size, rec07.preprocess, rec07.stand_in_synthetic) == (288, "short_side", False)
    if "08" in steps:
        from realfake_utils import retrieval

        rec08 = retrieval.RetrievalRecord.load(run_dir)
        assert rec08.pool["n"] == len(POOL_CAPTIONS) and rec08.retrieved_max > 0 and rec08.sweep
    if "09" in steps:
        assert (run_dir / "REPORT.md").exists()
