"""Tiny models in the real on-disk formats, loaded through the real from_pretrained code (no network)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from realfake_utils import features as F
from realfake_utils import models as M

torch.set_num_threads(2)
WORDS = ["zero", "one", "two", "annual crop", "golden retriever", "cat", "at", "cats", "photo", "of"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return M.build_tiny_sd(tmp_path_factory.mktemp("m") / "sd", sample_size=16, words=WORDS)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return M.build_tiny_clip(tmp_path_factory.mktemp("m") / "clip", image_size=16, projection_dim=24,
                             hidden=32, text_hidden=32, words=WORDS)


def _images(n, size=16, seed=0, square=False):
    rng = np.random.default_rng(seed)
    shape = (size, size if square else size + 4, 3)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for _ in range(n)]


def test_resolve_device():
    assert M.resolve_device("cpu") == torch.device("cpu")
    assert M.resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            M.resolve_device("cuda")


def test_tokenizer_round_trip(tmp_path):
    from transformers import CLIPTokenizer

    tok = M.build_tokenizer(WORDS, tmp_path / "tok", model_max_length=16)
    files = {p.name for p in (tmp_path / "tok").iterdir()}
    assert {"vocab.json", "merges.txt"} <= files and "tokenizer.json" not in files  # SD 1.5 layout
    assert json.loads((tmp_path / "tok" / "vocab.json").read_text())["<|endoftext|>"] == tok.eos_token_id
    for w in ["zero", "annual", "crop", "golden", "retriever", "cat", "at", "cats"]:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    text = "A photo of Golden Retriever, xyz!"
    ids = tok(text).input_ids
    assert again(text).input_ids == ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # unseen words fall back to byte tokens
    assert again.decode(ids, skip_special_tokens=True) == "a photo of golden retriever , xyz !"
    batch = again(["photo of cat", "one"], padding="max_length", max_length=again.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
    assert batch.shape == (2, 16) and again.model_max_length == 16


def test_tiny_sd_loads_with_stock_pipelines(tiny_sd):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    index = json.loads((tiny_sd / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    # encode_prompts == the pipeline's own prompt encoding
    ref, _ = pipe.encode_prompt(["photo of zero", "photo of one"], "cpu", 1, False)
    mine = F.encode_prompts(pipe.text_encoder, pipe.tokenizer, ["photo of zero", "photo of one"])
    assert mine.shape == (2, 16, 32) and torch.allclose(mine, ref)
    cond = F.guidance_token(mine, torch.randn(2, 32))
    neg = F.encode_prompts(pipe.text_encoder, pipe.tokenizer, [F.NEGATIVE_PROMPT] * 2)
    g = torch.Generator().manual_seed(0)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, num_inference_steps=2,
               guidance_scale=2.0, generator=g, output_type="np").images
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()

    i2i = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd)
    i2i.set_progress_bar_config(disable=True)
    out = i2i(prompt_embeds=cond, negative_prompt_embeds=neg, image=_images(2, square=True), strength=0.75,
              num_inference_steps=4, guidance_scale=2.0, output_type="pil").images
    assert [im.size for im in out] == [(16, 16), (16, 16)]


def test_load_pipeline_kinds_and_scheduler(tiny_sd):
    from diffusers import StableDiffusionImg2ImgPipeline, UniPCMultistepScheduler

    pipe = M.load_pipeline(str(tiny_sd), kind="img2img", device="cpu")
    assert isinstance(pipe, StableDiffusionImg2ImgPipeline)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.safety_checker is None
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="kind"):
        M.load_pipeline(str(tiny_sd), kind="inpaint")


def test_load_pipeline_offline_hub_id_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError) as err:
        M.load_pipeline(M.SD15_ID, device="cpu")
    msg = str(err.value)
    assert M.SD15_ID in msg and "local path" in msg
    with pytest.raises(FileNotFoundError, match="no such folder"):
        M.load_pipeline(str(tmp_path / "nope" / "model"))


def test_tiny_clip_loads_as_vision_model_with_projection(tiny_clip):
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_clip)
    assert vision.config.projection_dim == 24
    vision2, proc = M.load_clip_vision(str(tiny_clip), device="cpu")
    x = proc(images=_images(3), return_tensors="pt")
    assert x.pixel_values.shape == (3, 3, 16, 16)
    with torch.no_grad():
        emb = vision2(**x).image_embeds
        ref = CLIPModel.from_pretrained(tiny_clip).get_image_features(**x)
    ref = getattr(ref, "pooler_output", ref)
    assert emb.shape == (3, 24) and torch.allclose(emb, ref, atol=1e-5)


def test_guidance_compat_mismatch_is_a_clear_error():
    M.check_guidance_compat(768, 768)
    with pytest.raises(ValueError) as err:
        M.check_guidance_compat(24, 32)
    assert "24" in str(err.value) and "32" in str(err.value) and "768" in str(err.value)
    assert "ViT-L/14" in str(err.value)
    with pytest.raises(ValueError, match="projection_dim"):
        F.guidance_token(torch.zeros(1, 4, 32), torch.zeros(1, 24))


def test_check_guidance_compatible_reads_configs_of_folders(tiny_sd, tiny_clip, tmp_path):
    """From config files only: a 32-d CLIP fits the 32-wide tiny SD; the 24-d one does not, and the
    error names both models; a folder that is no model is a clear error."""
    ok = M.build_tiny_clip(tmp_path / "clip32", image_size=16, projection_dim=32, words=WORDS)
    sizes = M.check_guidance_compatible(ok, tiny_sd)
    assert sizes == {"clip_projection_dim": 32, "text_hidden_size": 32, "unet_cross_attention_dim": 32}
    with pytest.raises(ValueError) as err:
        M.check_guidance_compatible(tiny_clip, tiny_sd)
    assert str(tiny_clip) in str(err.value) and "24" in str(err.value) and "ViT-L/14" in str(err.value)
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.check_guidance_compatible(tmp_path, tiny_sd)


def test_tiny_blip2_captions(tmp_path):
    path = M.build_tiny_blip2(tmp_path / "blip2", image_size=16)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    cap = F.Blip2Captioner(str(path), batch_size=2, device="cpu", max_new_tokens=5)
    out = cap.caption(_images(3))
    assert len(out) == 3 and all(isinstance(t, str) and t for t in out)
    assert set(" ".join(out).split()) <= set(M.CAPTION_WORDS)  # real BPE decoding of word tokens
    assert F.make_captioner("none").caption(_images(2)) == ["", ""]
    with pytest.raises(RuntimeError, match="Salesforce/blip2-opt-2.7b"):
        M.load_blip2(M.BLIP2_ID, device="cpu")
