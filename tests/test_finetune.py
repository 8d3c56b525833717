"""LoRA fine-tuning: variant names, deterministic data order, the loss switches, stock LoRA loading,
the command line, and kill-and-resume (no step lost or repeated, same weights as an uninterrupted run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from realfake_utils import finetune as ft

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
CLASSES = ["zero", "one", "two"]


def random_train_set(n: int, class_names: list[str], seed: int = 0) -> ft.TrainSet:
    """``n`` random uint8 16x16 images, labels cycling over ``class_names``, prompts ``photo of [class]``
    and random 32-d 'CLIP' image embeddings (the training set of the tiny fine-tuning tests)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(class_names)
    return ft.TrainSet(images=torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8),
                       prompts=[f"photo of {class_names[int(c)]}" for c in labels], labels=labels,
                       image_embeds=torch.randn(n, 32, generator=g), ids=[f"i{i}" for i in range(n)],
                       class_names=list(class_names))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD pipeline folder and a 12-image training set with 32-d 'CLIP' embeddings."""
    from realfake_utils import models

    root = tmp_path_factory.mktemp("ft")
    base = models.build_tiny_sd(root / "base", sample_size=16, words=CLASSES)
    ts = random_train_set(12, CLASSES)
    ts_path = ft.save_train_set(root / "train_set.safetensors", ts)
    return {"root": root, "base": str(base), "ts": ts, "ts_path": str(ts_path)}


def _cfg(tiny, out, **kw):
    d = dict(base_model=tiny["base"], output_dir=str(out), max_train_steps=4, global_batch_size=4,
             learning_rate=1e-2, lora_rank=2, lora_alpha=2.0, checkpoint_every=2, device="cpu")
    d.update(kw)
    return ft.FinetuneConfig(**d)


def test_variant_names_round_trip():
    assert ft.variant_name(True, True, True) == "lora-dm-vg"
    assert ft.variant_name(True, False, False) == "lora-nodm-novg"
    assert ft.variant_name(True, True, True, "official") == "lora-dmofficial-vg"
    assert ft.variant_name(False, True, True) == "base-vg"
    for name in ("lora-dm-vg", "lora-nodm-vg", "lora-dm-novg", "lora-nodm-novg", "lora-dmofficial-vg",
                 "base-vg", "base-novg"):
        v = ft.parse_variant(name)
        assert ft.variant_name(v["finetune"], v["dm_loss"], v["visual_guidance"], v["dm_loss_form"]) == name
    with pytest.raises(ValueError):
        ft.parse_variant("lora-xx-vg")


def test_batch_order_is_seeded_per_epoch_and_sharded():
    n, bs = 10, 4
    stream = [i for m in range(5) for i in ft.batch_indices(m, bs, n, seed=3)]   # 20 items = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]                                               # reshuffled
    assert ft.batch_indices(7, bs, n, seed=3) == ft.batch_indices(7, bs, n, seed=3)  # pure function
    a, b = ft.batch_indices(2, 2, n, 3, rank=0, world=2), ft.batch_indices(2, 2, n, 3, rank=1, world=2)
    assert a + b == ft.batch_indices(2, 4, n, 3)                                    # ranks split a batch


def test_loss_switches_and_guidance_token(tiny):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(tiny["base"], subfolder="unet")
    sched = DDPMScheduler.from_pretrained(tiny["base"], subfolder="scheduler")
    tok = CLIPTokenizer.from_pretrained(tiny["base"], subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(tiny["base"], subfolder="text_encoder")
    emb = tiny["ts"].image_embeds[:2]
    with torch.no_grad():
        plain = ft.condition(te, tok, ["photo of one", "photo of two"])
        guided = ft.condition(te, tok, ["photo of one", "photo of two"], emb)
    assert torch.equal(guided[:, :-1], plain[:, :-1]) and torch.allclose(guided[:, -1], emb)
    with pytest.raises(ValueError, match="hidden size"):
        ft.condition(te, tok, ["photo of one"], torch.zeros(1, 7))
    lat = torch.randn(2, 4, 8, 8)
    out = {}
    for dm in (False, True):
        for form in ("paper", "official"):
            cfg = ft.FinetuneConfig(base_model="x", dm_loss=dm, dm_loss_form=form, snr_gamma=5.0)
            with torch.no_grad():
                out[dm, form] = ft.diffusion_loss(unet, lat, guided, sched, cfg, ft.step_generator(0, 0))
    assert out[False, "paper"][2] == 0 and out[True, "paper"][2] > 0
    assert torch.equal(out[True, "paper"][1], out[False, "paper"][1])   # same noise/timesteps
    assert not torch.equal(out[True, "paper"][2], out[True, "official"][2])
    assert torch.allclose(out[True, "official"][0], out[True, "official"][1] + out[True, "official"][2])


def test_train_save_and_stock_load(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora-dm-vg"
    s = ft.train_lora(_cfg(tiny, out), tiny["ts"])
    assert s["steps"] == 4 and not s["reused"] and (out / ft.LORA_WEIGHT_NAME).exists()
    assert [h["step"] for h in ft.read_history(out)] == [0, 1, 2, 3]
    assert all(h["l_dm"] > 0 for h in ft.read_history(out))
    assert not (out / "checkpoints").exists()                   # removed once the weights are final
    assert ft.train_lora(_cfg(tiny, out), tiny["ts"])["reused"]  # same config: cached

    pipe = StableDiffusionPipeline.from_pretrained(tiny["base"], safety_checker=None,
                                                   requires_safety_checker=False)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = torch.randn(1, pipe.tokenizer.model_max_length, 32)
    with torch.no_grad():
        before = pipe.unet(x, t, ctx).sample
        pipe.load_lora_weights(str(out))                         # stock diffusers loading
        after = pipe.unet(x, t, ctx).sample
    assert not torch.allclose(before, after)
    from safetensors.torch import load_file

    saved = load_file(str(out / ft.LORA_WEIGHT_NAME))
    n_proj = sum(1 for k in saved if k.endswith("lora.down.weight") or k.endswith("lora_A.weight"))
    assert n_proj == sum(1 for n, _ in pipe.unet.named_modules()
                         if n.endswith(("attn1.to_q", "attn2.to_q"))) * 4       # q, k, v, out.0
    # samples per class with the visual guidance token through the stock pipeline
    imgs, labels = ft.sample_per_class(pipe, CLASSES, 2, class_embeds=torch.randn(3, 32),
                                       num_inference_steps=2)
    assert imgs.shape == (6, 3, 16, 16) and imgs.dtype == torch.uint8 and labels.tolist() == [0, 0, 1, 1, 2, 2]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / ft.LORA_WEIGHT_NAME))


def test_kill_and_resume(tiny, tmp_path):
    """A `python -m realfake_utils.finetune` run SIGKILLs itself right after its 2nd checkpoint (rundir.unit_finished), then resumes:
    the step log is exactly 0..N-1 once, and the weights equal those of an uninterrupted run."""
    n_steps = 8
    ref = tmp_path / "ref"
    ft.train_lora(_cfg(tiny, ref, max_train_steps=n_steps, gradient_accumulation_steps=2, global_batch_size=8),
                  tiny["ts"])
    out = tmp_path / "killed"
    argv = ["--train-set", tiny["ts_path"], "--base-model", tiny["base"], "--output-dir", str(out),
            "--max-train-steps", str(n_steps), "--global-batch-size", "8", "--learning-rate", "1e-2",
            "--lora-rank", "2", "--lora-alpha", "2", "--checkpoint-every", "2",
            "--gradient-accumulation-steps", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "REALFAKE_KILL_AFTER_UNITS": "checkpoint:2"}   # SIGKILLed right after checkpoint 2 (step 4)
    proc = subprocess.run([sys.executable, "-m", "realfake_utils.finetune", *argv], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.decode()[-2000:]
    killed_at = len(ft.read_history(out))
    assert killed_at == 4 and not (out / ft.LORA_WEIGHT_NAME).exists()
    summary = ft.main(argv)                                   # resume: the same command again
    assert summary["resumed_from_step"] == 4 and summary["steps"] == n_steps
    assert [h["step"] for h in ft.read_history(out)] == list(range(n_steps))
    ref_w, got_w = _weights(ref), _weights(out)
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=0, atol=1e-6)
    assert ft.read_history(out) == ft.read_history(ref)


def test_cli_rejects_base_variant(tiny, tmp_path):
    with pytest.raises(SystemExit):
        ft.main(["--variant", "base-vg", "--train-set", tiny["ts_path"], "--base-model", tiny["base"],
                 "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        ft.build_parser().parse_args(["--dm-loss", "maybe"])


def test_build_train_set_from_run_folder(tmp_path):
    """The notebook's glue: target train split of a run folder -> images, prompts, CLIP embeddings."""
    from realfake_utils import data, models

    art = tmp_path / "artifacts"
    data.prepare_data("digits", "", art / "data", {"pool": 0.9, "train": 0.05, "test": 0.05}, seed=0)
    clip = models.build_tiny_clip(tmp_path / "clip", image_size=16, projection_dim=32)
    (art / "captions.json").write_text(json.dumps({}))
    path = ft.build_train_set(tmp_path, 16, clip_model=str(clip), device="cpu")
    ts = ft.load_train_set(path)
    rows = data.read_manifest(art / "data" / "manifest.csv", split="train")
    assert len(ts) == len(rows) and ts.images.shape[1:] == (3, 16, 16) and ts.images.dtype == torch.uint8
    assert ts.image_embeds.shape == (len(rows), 32) and ts.ids == [r["id"] for r in rows]
    assert ts.prompts[0] == f"photo of {rows[0]['class_name']}" and ts.labels.tolist() == [r["label"] for r in rows]
    mtime = path.stat().st_mtime_ns
    assert ft.build_train_set(tmp_path, 16, clip_model=str(clip), device="cpu") == path
    assert path.stat().st_mtime_ns == mtime                       # unchanged content: not rewritten


def test_config_from_params_batch_math_and_record_round_trip():
    from realfake_utils.params import notebook_defaults

    nb = notebook_defaults("02_finetune")
    cfg = ft.FinetuneConfig.from_params({"not_a_02_parameter": 1})      # one default: 02's parameters cell
    assert cfg.global_batch_size == nb["global_batch_size"] and cfg.snr_gamma == nb["snr_gamma"]
    assert cfg.guidance_token_position == nb["guidance_token_position"] == "append"
    paper = ft.FinetuneConfig.from_params({"global_batch_size": 64, "num_train_epochs": 300,
                                           "gradient_accumulation_steps": 2}, variant="lora-nodm-novg")
    assert (paper.dm_loss, paper.visual_guidance) == (False, False)
    assert paper.per_device_batch_size(8) == 4 and paper.per_device_batch_size(1) == 32
    with pytest.raises(ValueError, match="not divisible"):
        paper.per_device_batch_size(3)
    assert paper.total_steps(100) == -(-300 * 100 // 64)              # passes over the data, any world size
    assert ft.FinetuneConfig(max_train_steps=7).total_steps(100) == 7
    with pytest.raises(ValueError, match="guidance_token_position"):
        ft.FinetuneConfig.from_params({"guidance_token_position": "prepend"})
    assert ft.FinetuneConfig.from_dict(paper.to_dict()) == paper
    again = ft.FinetuneConfig.from_record(paper.to_dict(), variant="lora-dm-vg",
                                          output_dir="/x")
    assert again.replace(dm_loss=False, visual_guidance=False, output_dir="") == paper
    assert ft.resolve_variants(ft.TABLE2_VARIANTS, "official") == [
        "lora-nodm-novg", "lora-nodm-vg", "lora-dmofficial-novg", "lora-dmofficial-vg"]
    assert ft.resolve_variants(["base-vg", "lora-dm-vg", "lora-dm-vg"]) == ["lora-dm-vg"]


def test_guidance_token_position_and_training_feature(tiny):
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny["base"], subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(tiny["base"], subfolder="text_encoder")
    emb = tiny["ts"].image_embeds[:2]
    with torch.no_grad():
        plain = ft.condition(te, tok, ["photo of one", "photo of two"])
        appended = ft.condition(te, tok, ["photo of one", "photo of two"], emb, "append")
    assert appended.shape == (2, plain.shape[1] + 1, 32)                 # Sec. 3.2: concatenated
    assert torch.equal(appended[:, :-1], plain) and torch.allclose(appended[:, -1], emb)
    ts = tiny["ts"]
    means = ft.training_guidance_features(ts, "class_mean")
    for c in range(len(CLASSES)):
        sel = ts.labels == c
        torch.testing.assert_close(means[sel], ts.image_embeds[sel].mean(0).expand(int(sel.sum()), -1))
    assert torch.equal(ft.training_guidance_features(ts, "sample"), ts.image_embeds)


def test_lora_reuse_is_keyed_on_content_and_partial_folders_are_redone(tiny, tmp_path):
    """A copied folder (base model + LoRA, other absolute paths) reuses the LoRA; a folder whose
    steps.jsonl was cut short after the fact, or one with weights + train_config.json but no DONE.json
    (what a killed concurrent run leaves), is trained again."""
    import shutil

    a = tmp_path / "a"
    shutil.copytree(tiny["base"], a / "base")
    first = ft.train_lora(_cfg(tiny, a / "lora", base_model=str(a / "base")), tiny["ts"])
    assert not first["reused"] and (a / "lora" / "DONE.json").exists()
    b = tmp_path / "b"
    shutil.copytree(a, b)
    copied = ft.train_lora(_cfg(tiny, b / "lora", base_model=str(b / "base")), tiny["ts"])
    assert copied["reused"] and copied["config_hash"] == first["config_hash"]
    log = b / "lora" / ft.LOG_NAME
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))   # half-written log
    assert not ft.is_trained(b / "lora", first["config_hash"])
    redone = ft.train_lora(_cfg(tiny, b / "lora", base_model=str(b / "base")), tiny["ts"])
    assert not redone["reused"] and [h["step"] for h in ft.read_history(b / "lora")] == [0, 1, 2, 3]
    (b / "lora" / "DONE.json").unlink()                                      # weights + train_config.json only
    assert not ft.train_lora(_cfg(tiny, b / "lora", base_model=str(b / "base")), tiny["ts"])["reused"]
    other = ft.train_lora(_cfg(tiny, b / "lora", base_model=str(b / "base"), lora_rank=3), tiny["ts"])
    assert not other["reused"] and other["config_hash"] != first["config_hash"]


def test_sampling_with_zero_per_class_and_image_size(tiny):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny["base"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    imgs, labels = ft.sample_per_class(pipe, CLASSES, 0, class_embeds=torch.randn(3, 32))
    assert imgs.shape == (0, 3, 16, 16) and labels.shape == (0,)             # no torch.cat([]) crash
    imgs, _ = ft.sample_per_class(pipe, CLASSES[:1], 1, class_embeds=torch.randn(1, 32), num_inference_steps=2,
                                  height=32, width=32, guidance_token_position="replace_last")
    assert imgs.shape == (1, 3, 32, 32)


def test_train_variants_record_round_trip(tiny, tmp_path):
    """02 in one call on a run folder: a LoRA per variant, no samples (n_per_class 0, the paper
    presets' setting), the record with the run-relative base model, and 06's rebuild of the config."""
    import shutil

    from realfake_utils import data

    root = tmp_path / "run"
    art = root / "artifacts"
    ts = tiny["ts"]
    data.write_manifest([{"id": i, "path": "x.png", "index": j, "label": int(ts.labels[j]),
                          "class_name": CLASSES[int(ts.labels[j])], "split": "train"}
                         for j, i in enumerate(ts.ids)], art / "data" / "manifest.csv")
    shutil.copytree(tiny["base"], art / "miniature" / "base")
    ft.save_train_set(art / "lora" / ft.TRAIN_SET_NAME, ts)
    cfg = _cfg(tiny, "", base_model=str(art / "miniature" / "base"), max_train_steps=2)
    rec = ft.train_variants(root, cfg, ["base-vg", "lora-nodm-novg", "lora-dm-vg"], image_size=16,
                            sampling=ft.SampleSettings(n_per_class=0), train_set=art / "lora" / ft.TRAIN_SET_NAME)
    assert list(rec.variants) == ["lora-nodm-novg", "lora-dm-vg"] and not rec.base_samples
    loaded = ft.FinetuneRecord.load(root)
    assert loaded.variants["lora-dm-vg"].samples_seen == 2 * cfg.global_batch_size
    assert loaded.variants["lora-dm-vg"].path == "artifacts/lora/lora-dm-vg"
    assert loaded.config["base_model"] == "artifacts/miniature/base"          # relative to the run folder
    again = ft.FinetuneConfig.from_record(loaded, variant="lora-nodm-novg", output_dir=str(tmp_path / "m"))
    assert again.base_model == str(art / "miniature" / "base") and not again.dm_loss
    assert again.replace(output_dir="", dm_loss=True, visual_guidance=True) == cfg.replace(output_dir="")
    assert [h["step"] for h in loaded.history(root, "lora-dm-vg")] == [0, 1]


def test_sample_probe_fits_on_real_train_and_reads_the_prompted_class():
    """02's sample probe: fitted on the real train split, it labels faithful samples by their prompted
    class and samples under a wrong label as wrong (pixels and CLIP features alike)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    images = torch.zeros(40, 3, 8, 8, dtype=torch.uint8)
    images[labels == 0, :, :, :4] = 255           # class 0: bright left half; class 1: bright right half
    images[labels == 1, :, :, 4:] = 255
    images = (images.int() - torch.randint(0, 40, images.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    embeds = torch.nn.functional.one_hot(labels, 2).float() + 0.1 * torch.randn(40, 2, generator=g)
    ts = ft.TrainSet(images=images, prompts=["p"] * 40, labels=labels, image_embeds=embeds)
    right = ft._sample_probe(ts, images, labels, embeds, seed=0)
    wrong = ft._sample_probe(ts, images, 1 - labels, embeds, seed=0)
    assert right == {"pixels": 1.0, "clip": 1.0} and wrong == {"pixels": 0.0, "clip": 0.0}
