"""Models in their real on-disk formats: tiny ones built from configs, real ones by id or path.

Everything downstream takes a model id (``runwayml/stable-diffusion-v1-5``,
``openai/clip-vit-large-patch14``, ``Salesforce/blip2-opt-2.7b``) or a local folder and loads it through
the same ``from_pretrained`` code. The tiny builders below write folders in exactly the format those
ids resolve to, so the unit tests and the smoke/digits presets exercise the real loading paths:

- :func:`build_tiny_sd` / :func:`save_sd_pipeline`: a ``StableDiffusionPipeline`` folder
  (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``),
  loadable by ``StableDiffusionPipeline`` and ``StableDiffusionImg2ImgPipeline``; no safety checker.
- :func:`build_tokenizer`: a real byte-level BPE ``CLIPTokenizer`` (``vocab.json`` + ``merges.txt``) in
  which every given word is one token.
- :func:`build_tiny_clip`: a ``CLIPModel`` folder + ``CLIPImageProcessor`` (+ tokenizer) whose vision
  tower loads with ``CLIPVisionModelWithProjection.from_pretrained`` (as ViT-L/14 does).
- :func:`build_tiny_blip2`: a ``Blip2ForConditionalGeneration`` (tiny ViT, Q-Former, tiny OPT) with a
  ``Blip2Processor``.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from .rundir import make_temp_dir  # atomic_dir: mkdtemp's 0700 would end up as the model folder's mode

SD15_ID = "runwayml/stable-diffusion-v1-5"
SD15_MIRROR_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_L14_ID = "openai/clip-vit-large-patch14"
BLIP2_ID = "Salesforce/blip2-opt-2.7b"

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Stable Diffusion 1.x training noise schedule (scheduler/scheduler_config.json of SD 1.5).
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, steps_offset=1,
)


# --------------------------------------------------------------------------------------------------
# devices and atomic folders
# --------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else MPS if available, else CPU; anything else as given.

    Asking for ``cuda`` on a machine without one is a clear error rather than a late crash."""
    if isinstance(device, torch.device):
        return device
    device = (device or "auto").strip().lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was requested but CUDA is not available; "
                           "use device='auto' or 'cpu'")
    return dev


@contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir``.

    A killed build never leaves a half-written model under the final name."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp = make_temp_dir(f".{out_dir.name}.", out_dir.parent)
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (the ByteLevel pre-tokenizer's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_encode(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the adjacent pair with the lowest rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [p for p in pairs if p[0] is not None]
        if not pairs:
            break
        _, i = min(pairs)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _chain_merges(pieces: list[str], to_symbols, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) that make every piece a single token; new tokens go into ``vocab``.

    For each piece not yet one token under the merges so far, chain merges over its current
    segmentation are appended (so earlier pieces are unaffected); repeat until stable."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(10):
        changed = False
        for piece in pieces:
            seg = _bpe_encode(to_symbols(piece), ranks)
            while len(seg) > 1:
                pair = (seg[0], seg[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                    vocab.setdefault(pair[0] + pair[1], len(vocab))
                seg = [seg[0] + seg[1]] + seg[2:]
                changed = True
        if not changed:
            break
    return merges


def build_tokenizer(words: Iterable[str], out_dir: str | os.PathLike | None = None,
                    model_max_length: int = 77):
    """A real CLIP byte-level BPE tokenizer in which every given word is a single token.

    The vocabulary holds the 256 byte symbols (alone and as word ends ``x</w>``), so any text
    tokenizes, plus one token per word piece of ``words`` (multi-word entries such as
    ``"golden retriever"`` give one token per word), ``<|startoftext|>`` and ``<|endoftext|>``. Merges
    are chained per word and checked against the real encoder. Saved when ``out_dir`` is given, in the
    layout of SD 1.5's ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``, see
    :func:`save_clip_tokenizer`), and returned as reloaded from there.
    SD uses ``model_max_length=77``; tiny models can use 16 or so.
    """
    from transformers import CLIPTokenizer

    b2u = _bytes_to_unicode()
    base = [b2u[b] for b in range(256)]
    vocab: dict[str, int] = {}
    for tok in base + [c + "</w>" for c in base]:
        vocab.setdefault(tok, len(vocab))

    # Split words exactly as the real tokenizer will (normalizer + pre-tokenizer).
    probe = CLIPTokenizer(vocab=dict(vocab, **{BOS: len(vocab), EOS: len(vocab) + 1}), merges=[])
    backend = probe.backend_tokenizer
    pieces: dict[str, None] = {}  # ordered set
    for w in words:
        norm = backend.normalizer.normalize_str(str(w))
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(norm):
            if piece not in (BOS, EOS):
                pieces[piece] = None

    merges = _chain_merges(list(pieces), lambda p: list(p[:-1]) + [p[-1] + "</w>"], vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)

    tok = CLIPTokenizer(vocab=vocab, merges=list(merges),
                        model_max_length=model_max_length)
    u2b = {c: b for b, c in b2u.items()}
    texts = [bytes(u2b[c] for c in p).decode("utf-8", errors="replace") for p in pieces]
    bad = [t for t in texts if len(tok(t, add_special_tokens=False)["input_ids"]) != 1]
    if bad:
        raise RuntimeError(f"build_tokenizer: could not make these words single tokens: {bad[:10]}")
    if out_dir is not None:
        save_clip_tokenizer(tok, out_dir)
        tok = CLIPTokenizer.from_pretrained(out_dir)
    return tok


def save_clip_tokenizer(tok, out_dir: str | os.PathLike) -> Path:
    """Save a CLIP BPE tokenizer the way SD 1.5's ``tokenizer/`` folder is laid out:
    ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``), and no
    ``tokenizer.json``, so loading goes through the vocab/merges path. Atomic."""
    import json

    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)
        (tmp / "tokenizer.json").unlink(missing_ok=True)
        (tmp / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------------
# Stable Diffusion folders
# --------------------------------------------------------------------------------------------------
def save_sd_pipeline(out_dir: str | os.PathLike, vae, text_encoder, tokenizer, unet, scheduler) -> Path:
    """Save the parts as a ``StableDiffusionPipeline`` folder (no safety checker), atomically."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if type(tokenizer).__name__ == "CLIPTokenizer":  # SD 1.5 layout: vocab.json + merges.txt
            save_clip_tokenizer(tokenizer, tmp / "tokenizer")
    return out_dir


def tiny_sd_components(sample_size: int = 16, unet_channels: tuple[int, ...] = (32, 64),
                       vae_channels: tuple[int, ...] = (32, 64), latent_channels: int = 4,
                       text_hidden: int = 32, text_layers: int = 2, text_heads: int = 4,
                       layers_per_block: int = 1, attention_head_dim: int = 8,
                       norm_num_groups: int = 32, words: Iterable[str] = (),
                       model_max_length: int = 16, tokenizer=None, text_encoder=None, seed: int = 0):
    """The parts of a tiny SD model with random weights: ``dict(vae, text_encoder, tokenizer, unet,
    scheduler)``. ``sample_size`` is the image size in pixels; the latent is
    ``sample_size / 2**(len(vae_channels)-1)``. Pass ``tokenizer``/``text_encoder`` to reuse existing
    ones (e.g. the text tower of a miniature CLIP); the UNet's cross-attention dim follows the encoder.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae_scale = 2 ** (len(vae_channels) - 1)
    if sample_size % vae_scale:
        raise ValueError(f"sample_size={sample_size} is not divisible by the VAE scale {vae_scale}")
    latent = sample_size // vae_scale
    if latent % (2 ** (len(unet_channels) - 1)):
        raise ValueError(f"latent size {latent} is not divisible by the UNet's down factor "
                         f"{2 ** (len(unet_channels) - 1)}")
    if tokenizer is None:
        tokenizer = build_tokenizer(list(words) + ["photo", "of"], None, model_max_length)
    if text_encoder is None:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers, num_attention_heads=text_heads,
            max_position_embeddings=tokenizer.model_max_length, projection_dim=text_hidden,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    cross = text_encoder.config.hidden_size
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(unet_channels), layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross, attention_head_dim=attention_head_dim,
        norm_num_groups=min(norm_num_groups, min(unet_channels)))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        block_out_channels=tuple(vae_channels), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        norm_num_groups=min(norm_num_groups, min(vae_channels)), sample_size=sample_size)
    scheduler = DDPMScheduler(**SD_SCHEDULER_CONFIG)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def build_tiny_sd(out_dir: str | os.PathLike, sample_size: int = 16, seed: int = 0, **kwargs) -> Path:
    """Build a tiny random-weight SD model (see :func:`tiny_sd_components`) and save it as a
    ``StableDiffusionPipeline`` folder (~1M-parameter UNet at the defaults): a few denoising steps at
    ``sample_size`` take about a second on a 2-core CPU."""
    parts = tiny_sd_components(sample_size=sample_size, seed=seed, **kwargs)
    return save_sd_pipeline(out_dir, **parts)


def _is_local(model: str | os.PathLike) -> bool:
    return Path(str(model)).expanduser().exists()


def _looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a path."""
    s = str(model)
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s


def _offline_error(model: str, what: str, err: Exception, suggestion: str) -> RuntimeError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    return RuntimeError(
        f"could not load {what} '{model}': it is not a local folder and it is not in the Hugging Face "
        f"cache{' (HF_HUB_OFFLINE is set)' if offline else ' and could not be downloaded'}. "
        f"Download it once on a machine with internet (e.g. `huggingface-cli download {model}`) "
        f"or pass a local path instead, e.g. {suggestion}. Original error: "
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def _check_model_arg(model: str | os.PathLike, what: str) -> str:
    model = str(model)
    if not model:
        raise ValueError(f"{what}: empty model id/path")
    if not _is_local(model) and _looks_like_path(model):
        raise FileNotFoundError(f"{what}: no such folder '{model}'")
    return str(Path(model).expanduser()) if _is_local(model) else model


def load_pipeline(model: str | os.PathLike, kind: str = "txt2img", device: str = "auto",
                  dtype: torch.dtype | str | None = None, scheduler: str | None = "unipc"):
    """Load a Stable Diffusion pipeline from a local folder or a hub id (same code for both).

    ``kind``: ``"txt2img"`` (StableDiffusionPipeline) or ``"img2img"``
    (StableDiffusionImg2ImgPipeline). ``scheduler="unipc"`` swaps in ``UniPCMultistepScheduler``
    built from the folder's scheduler config (as the official synthesis code does); ``None`` keeps the
    saved one. The safety checker is off. ``dtype`` defaults to fp16 on CUDA, fp32 elsewhere.
    """
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                           UniPCMultistepScheduler)

    classes = {"txt2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline}
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    model = _check_model_arg(model, "load_pipeline")
    dev = resolve_device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    try:
        pipe = classes[kind].from_pretrained(model, dtype=dtype, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError) as err:
        if _is_local(model):
            raise
        hint = ("base_model='runs/digits/artifacts/miniature/base' or a folder "
                f"made with `huggingface-cli download {SD15_MIRROR_ID} --local-dir ...`")
        if model == SD15_ID:
            hint += (f" (the original {SD15_ID} repository was withdrawn from the Hub in 2024; "
                     f"{SD15_MIRROR_ID} holds the same files)")
        raise _offline_error(model, "the diffusion model", err, hint) from err
    if scheduler == "unipc":
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    elif scheduler is not None:
        raise ValueError(f"scheduler must be 'unipc' or None, got {scheduler!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


# --------------------------------------------------------------------------------------------------
# CLIP (image features for the visual guidance token and for MMD)
# --------------------------------------------------------------------------------------------------
def build_tiny_clip(out_dir: str | os.PathLike, image_size: int = 16, patch_size: int = 4,
                    hidden: int = 32, projection_dim: int = 32, text_hidden: int = 32,
                    layers: int = 2, heads: int = 4, text_layers: int = 2,
                    words: Iterable[str] | None = None, model_max_length: int = 16,
                    seed: int = 0) -> Path:
    """Save a tiny random-weight ``CLIPModel`` folder (+ ``CLIPImageProcessor`` + CLIP tokenizer), the
    layout of ``openai/clip-vit-large-patch14``: ``CLIPModel.from_pretrained(dir)`` loads all of it,
    ``CLIPVisionModelWithProjection.from_pretrained(dir)`` the vision tower with its projection."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tok = build_tokenizer(list(words or []) + ["photo", "of"], None, model_max_length)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                         num_hidden_layers=text_layers, num_attention_heads=heads,
                         max_position_embeddings=model_max_length, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         projection_dim=projection_dim),
        # projection_dim inside vision_config too (as in ViT-L/14's config.json): that is what
        # CLIPVisionModelWithProjection.from_pretrained reads from a CLIPModel folder.
        vision_config=dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                           intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, projection_dim=projection_dim),
        projection_dim=projection_dim)
    model = CLIPModel(config).eval()
    processor = clip_image_processor(image_size)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        save_clip_tokenizer(tok, tmp / "_tok")
        for f in (tmp / "_tok").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "_tok").rmdir()
    return out_dir


def clip_image_processor(image_size: int):
    """``CLIPImageProcessor`` with CLIP's normalisation at ``image_size`` (resize shortest side, then
    center crop), the preprocessing of ViT-L/14 at 224."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size},
                              do_resize=True, do_center_crop=True, do_normalize=True,
                              do_convert_rgb=True)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as tlog

    old = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(old)


def load_clip_vision(model: str | os.PathLike, device: str = "auto", dtype: torch.dtype | None = None):
    """``(CLIPVisionModelWithProjection, CLIPImageProcessor)`` from an id or path (e.g.
    ``openai/clip-vit-large-patch14`` or a folder from :func:`build_tiny_clip`), in eval mode."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = _check_model_arg(model, "load_clip_vision")
    dev = resolve_device(device)
    try:
        with _quiet_transformers():  # the text tower's weights are "unexpected" here, as for ViT-L/14
            vision = CLIPVisionModelWithProjection.from_pretrained(model, dtype=dtype or torch.float32)
        processor = CLIPImageProcessor.from_pretrained(model)
    except OSError as err:
        if _is_local(model):
            raise
        raise _offline_error(model, "the CLIP model", err,
                             "clip_model='' (the miniature CLIP of the run folder) or a folder made "
                             f"with `huggingface-cli download {CLIP_L14_ID} --local-dir ...`") from err
    return vision.to(dev).eval(), processor


def check_guidance_compat(clip_projection_dim: int, text_hidden_size: int) -> None:
    """The visual guidance token puts a CLIP image embedding (``projection_dim``) in place of a token of
    the text encoder's hidden states (``hidden_size``): the two sizes must be equal."""
    if int(clip_projection_dim) != int(text_hidden_size):
        raise ValueError(
            f"visual guidance needs the CLIP image embedding size ({clip_projection_dim}, the vision "
            f"model's projection_dim) to equal the text encoder's hidden size ({text_hidden_size}), since "
            "the embedding replaces a token of the text hidden states. Pair the models as in the paper: "
            f"CLIP ViT-L/14 ({CLIP_L14_ID}, projection_dim 768) with Stable Diffusion 1.5 "
            f"({SD15_ID}, CLIPTextModel hidden_size 768); in the miniature presets the miniature CLIP's "
            "projection and the base model's text encoder come from the same CLIP. Or turn "
            "visual_guidance off.")


# --------------------------------------------------------------------------------------------------
# BLIP-2 (captions for the ImageNet presets)
# --------------------------------------------------------------------------------------------------
def _build_opt_tokenizer(words: Iterable[str]):
    """A real GPT-2 byte-level BPE tokenizer with OPT's special tokens (as BLIP-2 OPT ships)."""
    from transformers import GPT2Tokenizer

    b2u = _bytes_to_unicode()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for b in range(256):
        vocab.setdefault(b2u[b], len(vocab))
    probe = GPT2Tokenizer(vocab=dict(vocab), merges=[])
    pieces: dict[str, None] = {}
    for w in words:
        for piece, _ in probe.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" " + str(w)):
            pieces[piece] = None
    merges = _chain_merges(list(pieces), list, vocab)
    return GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>",
                         unk_token="<unk>", pad_token="<pad>", model_max_length=64)


CAPTION_WORDS = ("a photo of the an with on in and satellite image field river forest road "
                 "highway house building green blue red white black small large dog cat bird "
                 "car water tree grass sky").split()


def build_tiny_blip2(out_dir: str | os.PathLike, image_size: int = 16, num_query_tokens: int = 4,
                     seed: int = 0) -> Path:
    """Save a tiny random-weight ``Blip2ForConditionalGeneration`` (tiny ViT, Q-Former, tiny OPT) with
    a ``Blip2Processor`` (``BlipImageProcessor`` + GPT-2 BPE tokenizer), the layout of
    ``Salesforce/blip2-opt-2.7b``. It generates (random) caption text."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              BlipImageProcessor)

    torch.manual_seed(seed)
    tok = _build_opt_tokenizer(CAPTION_WORDS)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size},
                                         do_convert_rgb=True)
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tok,
                               num_query_tokens=num_query_tokens)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config=dict(image_size=image_size, patch_size=4, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4),
        qformer_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=32),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=32, ffn_dim=64,
                         num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                         max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        num_query_tokens=num_query_tokens, image_token_index=image_token_id)
    model = Blip2ForConditionalGeneration(config).eval()
    # Random weights, but readable output: zero the (tied) embedding rows of everything except whole
    # caption words, so the greedy decoder emits words such as "forest river green" rather than bytes
    # or an immediate </s>.
    emb = model.get_input_embeddings().weight
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[[tok.convert_tokens_to_ids("\u0120" + w) for w in CAPTION_WORDS]] = True
    with torch.no_grad():
        emb[~keep] = 0.0
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.data_ptr():
            head.weight[~keep] = 0.0
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return out_dir


def load_blip2(model: str | os.PathLike, device: str = "auto", dtype: torch.dtype | None = None):
    """``(Blip2ForConditionalGeneration, Blip2Processor)`` from an id (``Salesforce/blip2-opt-2.7b``) or
    a folder (:func:`build_tiny_blip2`), in eval mode. fp16 on CUDA by default."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = _check_model_arg(model, "load_blip2")
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    try:
        processor = Blip2Processor.from_pretrained(model)
        net = Blip2ForConditionalGeneration.from_pretrained(model, dtype=dtype)
    except OSError as err:
        if _is_local(model):
            raise
        raise _offline_error(model, "the BLIP-2 captioner", err,
                             f"a folder made with `huggingface-cli download {BLIP2_ID} --local-dir ...` "
                             "(or captioner='none')") from err
    return net.to(dev).eval(), processor


def _read_model_config(model: str, subfolder: str = "") -> dict:
    """``config.json`` of a local folder (or a cached hub id), as a dict, without loading weights."""
    import json

    from huggingface_hub import hf_hub_download

    local = Path(str(model)).expanduser()
    if local.is_dir():
        path = local / subfolder / "config.json" if subfolder else local / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: '{model}' is not a "
                                    f"{'diffusers pipeline' if subfolder else 'transformers model'} folder")
        return json.loads(path.read_text())
    try:
        return json.loads(Path(hf_hub_download(str(model), "config.json", subfolder=subfolder or None))
                          .read_text())
    except Exception as err:  # noqa: BLE001 - offline / unknown id: one clear message
        raise _offline_error(str(model), "the model config", err, "a local folder") from err


def check_guidance_compatible(clip_model: str | os.PathLike, base_model: str | os.PathLike) -> dict:
    """Check, from the config files alone (no weights loaded), that the visual guidance token fits:
    the CLIP image embedding size (``projection_dim`` of ``clip_model``) must equal the width of the
    base model's text encoder (``text_encoder/config.json`` ``hidden_size``), which must equal its
    UNet's ``cross_attention_dim``. Works for the miniature folders, real ids in the HF cache and
    local copies of them (CLIP ViT-L/14: 768, SD 1.5: 768). Returns the three sizes; a clear error
    naming both models otherwise (01 calls it, so a mismatch stops before any compute)."""
    ccfg = _read_model_config(str(clip_model))
    proj = ccfg.get("projection_dim", (ccfg.get("vision_config") or {}).get("projection_dim"))
    if proj is None:
        raise ValueError(f"{clip_model}: no projection_dim in its config.json; is it a CLIP model "
                         "(CLIPModel / CLIPVisionModelWithProjection)?")
    text = _read_model_config(str(base_model), "text_encoder")["hidden_size"]
    cross = _read_model_config(str(base_model), "unet").get("cross_attention_dim")
    try:
        check_guidance_compat(int(proj), int(text))
    except ValueError as err:
        raise ValueError(f"clip_model '{clip_model}' and base_model '{base_model}': {err}") from None
    if cross is not None and int(cross) != int(text):
        raise ValueError(f"base_model '{base_model}': its UNet's cross_attention_dim ({cross}) differs "
                         f"from its text encoder's hidden size ({text}): not a Stable Diffusion folder")
    return {"clip_projection_dim": int(proj), "text_hidden_size": int(text),
            "unet_cross_attention_dim": int(cross) if cross is not None else None}


# --------------------------------------------------------------------------------------------------
# The paper's model shapes (no weights): Stable Diffusion 1.5 and CLIP ViT-L/14 from their configs
# --------------------------------------------------------------------------------------------------
def sd15_config() -> dict[str, dict]:
    """The published configs of the paper's models, written out (no download): Stable Diffusion 1.5
    (``runwayml/stable-diffusion-v1-5``: ``unet/``, ``vae/``, ``text_encoder/`` = CLIP ViT-L/14's text
    tower, ``scheduler/`` = PNDM with the SD 1.x training betas) and the CLIP ViT-L/14 vision tower
    (``openai/clip-vit-large-patch14``, 224 px, patch 14, projection 768). Keys: ``unet``, ``vae``,
    ``text_encoder``, ``scheduler``, ``clip_vision``, ``clip_text``."""
    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, projection_dim=768)
    return {
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
                     flip_sin_to_cos=True, freq_shift=0,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D"),
                     block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
                     mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
                     cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, act_fn="silu",
                    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                    sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215),
        "text_encoder": dict(text),
        "scheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False,
                          steps_offset=1, prediction_type="epsilon"),
        "clip_text": dict(text),
        "clip_vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=224, patch_size=14,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768),
    }


def build_sd15_shapes(out_dir: str | os.PathLike, words: Iterable[str] = (), seed: int = 0) -> Path:
    """A ``StableDiffusionPipeline`` folder with SD 1.5's exact architecture (:func:`sd15_config`)
    and random weights, saved like the real one (safetensors, vocab.json + merges.txt tokenizer with
    77 positions; the vocabulary holds ``words`` plus the byte symbols, the embedding table has SD's
    49,408 rows). About 1.07 B parameters (4 GB in fp32)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = sd15_config()
    torch.manual_seed(seed)
    tok = build_tokenizer(list(words) + ["photo", "of"], None, model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], bos_token_id=tok.bos_token_id,
                                                eos_token_id=tok.eos_token_id,
                                                pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    return save_sd_pipeline(out_dir, vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                            scheduler=PNDMScheduler(**cfg["scheduler"]))


def build_clip_l14_shapes(out_dir: str | os.PathLike, words: Iterable[str] = (), seed: int = 0) -> Path:
    """A ``CLIPModel`` folder with ViT-L/14's architecture (vision 24 x 1024, patch 14 at 224 px; text
    12 x 768; projection 768; :func:`sd15_config`) and random weights, with its ``CLIPImageProcessor``
    (224) and a CLIP tokenizer, the layout of ``openai/clip-vit-large-patch14``."""
    from transformers import CLIPConfig, CLIPModel

    cfg = sd15_config()
    torch.manual_seed(seed)
    tok = build_tokenizer(list(words) + ["photo", "of"], None, model_max_length=77)
    config = CLIPConfig(text_config=dict(cfg["clip_text"], bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                        vision_config=cfg["clip_vision"], projection_dim=768)
    model = CLIPModel(config).eval()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        clip_image_processor(cfg["clip_vision"]["image_size"]).save_pretrained(tmp)
        save_clip_tokenizer(tok, tmp / "_tok")
        for f in (tmp / "_tok").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "_tok").rmdir()
    return out_dir
