"""Prompts, captions, CLIP image features and the visual guidance token (paper Sec. 3.2).

What the official code does (BAAI-DCAI/Training-Data-Synthesis, read for reference, not copied):

- ``extract_feature.py``: image features are ``CLIPModel.get_image_features`` of
  ``openai/clip-vit-large-patch14`` (the projected image embedding, i.e. ``image_embeds`` of
  ``CLIPVisionModelWithProjection``), **not** L2-normalised, stored per image (as fp16 ``.pt`` files).
- ``finetune/train_text_to_image_lora.py`` (training loop, ``if args.guidance_token > 0``):
  ``encoder_hidden_states = text_encoder(input_ids)[0]`` then
  ``encoder_hidden_states[:, -1, :] = img_features.view(bsz, -1)``: the embedding **replaces the last
  position** (index 76 of SD's 77, normally an end/padding token) of the text encoder's last hidden
  states, per sample, with no normalisation or scaling. :func:`guidance_token` does exactly that;
  the paper's Sec. 3.2 instead *concatenates* the feature with the text embeddings
  (:func:`guidance_prompt_embeds` with ``position="append"``, ``[B, 77, D] -> [B, 78, D]``).
- ``generate.py``: negative prompt ``"distorted, unrealistic, blurry, out of frame, cropped,
  deformed"`` (:data:`NEGATIVE_PROMPT`); prompts ``"photo of {class}, {caption}, best quality"`` with
  BLIP-2 captions and ``"{class}, photo, best quality"`` without; the fine-tuning metadata uses
  ``"photo of {class}, {caption}"`` (the paper's template, :func:`build_prompt`). Its guidance tokens at
  generation (``get_guidance_tokens_v2``) are the stored features of the source images of the batch;
  the paper describes the intra-class mean (:func:`class_mean_features`); both fit :func:`guidance_token`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from .models import check_guidance_compat, load_blip2, load_clip_vision
from .rundir import atomic_path, read_json, write_json

# generate.py of BAAI-DCAI/Training-Data-Synthesis (StableDiffusionHandler.generate_ImageNet1k): the
# notebooks' default (the miniature CLIP's vocabulary holds it) and the -official presets' value.
NEGATIVE_PROMPT = "distorted, unrealistic, blurry, out of frame, cropped, deformed"
# The paper presets set Apx. E's shorter wording through 02 / 03's ``negative_prompt`` (params/_paper.yaml).
# How the visual guidance token enters the prompt embeddings: "append" = the paper's Sec. 3.2
# (concatenated), "replace_last" = the official code (last position overwritten).
GUIDANCE_TOKEN_POSITIONS = ("append", "replace_last")


# --------------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------------
def build_prompt(class_name: str, caption: str = "") -> str:
    """The paper's template ``"photo of [classname], [caption]"``; ``"photo of [classname]"`` when
    there is no caption (no trailing comma)."""
    class_name = str(class_name).strip()
    if not class_name:
        raise ValueError("build_prompt: empty class name")
    caption = (caption or "").strip()
    return f"photo of {class_name}, {caption}" if caption else f"photo of {class_name}"


def encode_prompts(text_encoder, tokenizer, prompts: str | Sequence[str],
                   grad: bool = False) -> torch.Tensor:
    """Last hidden states ``[B, L, D]`` of the text encoder for ``prompts``, padded/truncated to
    ``tokenizer.model_max_length`` (77 for SD), exactly as ``StableDiffusionPipeline.encode_prompt``
    computes ``prompt_embeds`` (attention mask only if the encoder's config asks for it, no clip skip).
    Runs under ``torch.no_grad()`` unless ``grad=True`` (the text encoder is frozen in the paper)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts: no prompts")
    inputs = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = inputs.attention_mask.to(device)
    with torch.set_grad_enabled(grad):
        out = text_encoder(inputs.input_ids.to(device), attention_mask=mask)
    return out[0]


def _guidance_inputs(where: str, prompt_embeds: torch.Tensor, feature: Any, name: str, plural: str
                     ) -> tuple[torch.Tensor | None, int, int]:
    """The checked inputs of the visual guidance token: ``prompt_embeds`` must be ``[B, L, D]``;
    ``feature`` (``None`` passes through) becomes ``[B, D]`` or ``[1, D]`` (a ``[D]`` vector broadcast),
    its width equal to the text width ``D`` (``models.check_guidance_compat``). Errors name ``where``
    and the argument (``name``, counted as ``plural``). Returns ``(feature, B, D)``."""
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
        raise ValueError(f"{where}: prompt_embeds must be [B, L, D], got "
                         f"{tuple(getattr(prompt_embeds, 'shape', ()))}")
    b, _, d = prompt_embeds.shape
    if feature is None:
        return None, b, d
    feature = torch.as_tensor(feature)
    if feature.dim() == 1:
        feature = feature[None]
    if feature.dim() != 2:
        raise ValueError(f"{where}: {name} must be [B, D] or [D], got {tuple(feature.shape)}")
    check_guidance_compat(feature.shape[1], d)
    if feature.shape[0] not in (1, b):
        raise ValueError(f"{where}: {feature.shape[0]} {plural} for a batch of {b} prompts (give one per "
                         "prompt, or one for all)")
    return feature, b, d


def guidance_token(prompt_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """The visual guidance token (Sec. 3.2): a copy of ``prompt_embeds`` ``[B, L, D]`` whose **last**
    position ``[:, -1, :]`` is replaced by the CLIP image embedding ``[B, D]`` (or ``[D]`` / ``[1, D]``,
    broadcast to the batch), unnormalised and unscaled, as in the official training code
    (``finetune/train_text_to_image_lora.py``: ``encoder_hidden_states[:, -1, :] = img_features``).
    Pure: the input is not modified; dtype and device follow ``prompt_embeds``."""
    image_embeds, b, d = _guidance_inputs("guidance_token", prompt_embeds, image_embeds, "image_embeds",
                                          "image embeddings")
    out = prompt_embeds.clone()
    out[:, -1, :] = image_embeds.to(device=out.device, dtype=out.dtype).expand(b, d)
    return out


def guidance_prompt_embeds(prompt_embeds: torch.Tensor, feature: torch.Tensor | None,
                           position: str = "append") -> torch.Tensor:
    """Prompt embeddings with the visual guidance token (Sec. 3.2), for training and generation.

    ``position="append"`` (the paper's text: the intra-class feature "is then concatenated with the
    text embeddings"): ``[B, L, D] -> [B, L + 1, D]``, the feature as one more token after the text's
    ``L`` positions (SD 1.5: 77 -> 78; the UNet's cross-attention takes any sequence length).
    ``position="replace_last"`` (the official code): :func:`guidance_token`, ``[B, L, D]`` with the last
    position overwritten.

    ``feature``: ``[B, D]``, ``[D]`` or ``[1, D]`` (broadcast), unnormalised and unscaled. ``None``
    gives embeddings of the same length without guidance: for ``append`` the last position repeated
    once (a copy of the end/padding token, so a negative prompt matches the guided prompt's length
    for classifier-free guidance), for ``replace_last`` the input unchanged. Pure; dtype and device
    follow ``prompt_embeds``.
    """
    if position not in GUIDANCE_TOKEN_POSITIONS:
        raise ValueError(f"guidance token position must be one of {GUIDANCE_TOKEN_POSITIONS}, got "
                         f"{position!r}")
    if position == "replace_last":
        _guidance_inputs("guidance_prompt_embeds", prompt_embeds, None, "feature", "features")
        return prompt_embeds.clone() if feature is None else guidance_token(prompt_embeds, feature)
    feature, b, d = _guidance_inputs("guidance_prompt_embeds", prompt_embeds, feature, "feature", "features")
    if feature is None:
        token = prompt_embeds[:, -1:, :]
    else:
        token = feature.to(device=prompt_embeds.device, dtype=prompt_embeds.dtype).expand(b, d)[:, None]
    return torch.cat([prompt_embeds, token], dim=1)


# --------------------------------------------------------------------------------------------------
# CLIP image features
# --------------------------------------------------------------------------------------------------
def _to_pil(item: Any):
    """PIL image from a PIL image, a uint8 tensor/array [3,H,W] or [H,W,3], or a (image, label) pair."""
    import numpy as np
    from PIL import Image

    if isinstance(item, (tuple, list)):
        item = item[0]
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    arr = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def _parts_dir(cache_path: str | os.PathLike) -> Path:
    path = Path(cache_path)
    return path.with_name(path.name + ".parts")


def _read_safetensors(path: Path) -> tuple[list[str], torch.Tensor, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        feats = f.get_tensor("features")
    ids = json.loads(meta.get("ids", "[]"))
    if len(ids) != feats.shape[0]:
        raise RuntimeError(f"{path}: corrupt feature cache ({len(ids)} ids, {feats.shape[0]} rows); "
                           "delete it to recompute")
    return ids, feats, meta


def load_feature_cache(cache_path: str | os.PathLike) -> tuple[list[str], torch.Tensor, dict[str, str]]:
    """``(ids, features [M, D], metadata)`` of a cache written by :func:`extract_clip_features`: the
    file itself plus the parts an interrupted run left in ``<cache>.parts/``; empty if neither exists."""
    path = Path(cache_path)
    files = ([path] if path.exists() else []) + sorted(_parts_dir(path).glob("part-*.safetensors"))
    ids: list[str] = []
    chunks: list[torch.Tensor] = []
    meta: dict[str, str] = {}
    for f in files:
        i, x, m = _read_safetensors(f)
        ids.extend(i)
        chunks.append(x)
        meta = meta or m
    meta.pop("ids", None)
    feats = torch.cat(chunks) if chunks else torch.empty(0, 0)
    return ids, feats, meta


def save_feature_cache(cache_path: str | os.PathLike, ids: list[str], feats: torch.Tensor,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write ``features`` [M, D] (float32) with the ids (JSON in the safetensors metadata), atomically."""
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    meta["ids"] = json.dumps(list(ids))
    with atomic_path(cache_path) as tmp:
        save_file({"features": feats.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    return Path(cache_path)


def model_fingerprint(model: Any) -> str:
    """Identity of a model for caches, from its content, never its location: a hub id as is; a local
    folder as ``local#<digest>`` of its config and weight files (names relative to the folder, sizes,
    first/last MiB), so a moved or copied run folder keeps its caches and a retrained model in the same
    place is another model."""
    import hashlib

    if isinstance(model, (str, os.PathLike)):
        name = str(model)
    else:
        net = model[0] if isinstance(model, tuple) else model
        name = str(getattr(net.config, "_name_or_path", "") or type(net).__name__)
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return name
    h = hashlib.sha256()
    for f in sorted(folder.glob("*")):
        if f.suffix not in (".json", ".safetensors", ".bin") or not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return f"local#{h.hexdigest()[:16]}"


def extract_clip_features(model: Any, images: Sequence[Any], ids: Sequence[str],
                          cache_path: str | os.PathLike, batch_size: int = 64,
                          device: str = "auto", save_every: int = 10,
                          progress: bool = True) -> torch.Tensor:
    """CLIP image embeddings ``[N, D]`` (``image_embeds`` of ``CLIPVisionModelWithProjection``, i.e.
    ``CLIPModel.get_image_features`` as in the official ``extract_feature.py``, not normalised), in the
    order of ``ids``.

    ``model``: an id or path (loaded with :func:`models.load_clip_vision`) or a
    ``(CLIPVisionModelWithProjection, CLIPImageProcessor)`` pair. ``images``: any indexable of PIL
    images, uint8 ``[3,H,W]`` tensors, or ``(image, label)`` pairs (e.g. ``data.ImageDataset``), read
    lazily batch by batch. Each id is computed once: every ``save_every`` batches the new rows go to a
    part file ``<cache>.parts/part-NNNNNN.safetensors`` (atomic, so a killed run loses at most
    ``save_every`` batches and the cost stays linear in N); at the end everything is consolidated into
    ``cache_path`` (safetensors: tensor ``features`` [M, D] float32, the ids as JSON in the metadata)
    and the parts are removed. A rerun computes only the ids it lacks. A cache made by another model
    (see :func:`model_fingerprint`: a retrained folder counts as another model) is recomputed.
    """
    from tqdm.auto import tqdm

    ids = [str(i) for i in ids]
    if len(ids) != len(images):
        raise ValueError(f"extract_clip_features: {len(images)} images but {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ValueError("extract_clip_features: ids are not unique")
    name = model_fingerprint(model)
    cached_ids, cached, meta = load_feature_cache(cache_path)
    if cached_ids and meta.get("model") != name:
        print(f"{cache_path}: cached features are of model '{meta.get('model')}', not '{name}': "
              "recomputing them all")
        Path(cache_path).unlink(missing_ok=True)
        shutil.rmtree(_parts_dir(cache_path), ignore_errors=True)
        cached_ids, cached = [], torch.empty(0, 0)
    have = set(cached_ids)
    todo = [i for i, k in enumerate(ids) if k not in have]
    if todo:
        if isinstance(model, (str, os.PathLike)):
            vision, processor = load_clip_vision(model, device=device)
        else:
            vision, processor = model
        dev = next(vision.parameters()).device
        dtype = next(vision.parameters()).dtype
        meta = {"model": name}
        parts = _parts_dir(cache_path)
        n_parts = len(list(parts.glob("part-*.safetensors"))) if parts.exists() else 0
        new_ids: list[str] = []
        new_rows: list[torch.Tensor] = []
        batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
        for n, batch in enumerate(tqdm(batches, desc="CLIP features", disable=not progress,
                                       unit="batch"), 1):
            pil = [_to_pil(images[i]) for i in batch]
            pixels = processor(images=pil, return_tensors="pt")["pixel_values"].to(dev, dtype)
            with torch.no_grad():
                emb = vision(pixel_values=pixels).image_embeds.float().cpu()
            new_rows.append(emb)
            new_ids.extend(ids[i] for i in batch)
            if n % max(1, save_every) == 0 and n < len(batches):  # checkpoint: a new part file
                save_feature_cache(parts / f"part-{n_parts:06d}.safetensors", new_ids,
                                   torch.cat(new_rows), meta)
                n_parts += 1
                cached_ids.extend(new_ids)
                cached = torch.cat([cached, torch.cat(new_rows)]) if len(cached) else torch.cat(new_rows)
                new_ids, new_rows = [], []
        if new_rows:
            cached_ids.extend(new_ids)
            cached = torch.cat([cached, torch.cat(new_rows)]) if len(cached) else torch.cat(new_rows)
        # consolidate: one file holding everything, then drop the parts
        save_feature_cache(cache_path, cached_ids, cached, dict(meta, dim=str(cached.shape[1])))
        shutil.rmtree(parts, ignore_errors=True)
    if not cached_ids:
        raise ValueError("extract_clip_features: no images")
    index = {k: j for j, k in enumerate(cached_ids)}
    return cached[torch.tensor([index[k] for k in ids], dtype=torch.long)]


def class_mean_features(feats: torch.Tensor, labels: Sequence[int] | torch.Tensor,
                        num_classes: int) -> torch.Tensor:
    """Intra-class mean features ``[C, D]`` (the guidance token at generation). A class with no sample
    is a clear error."""
    feats = torch.as_tensor(feats)
    labels = torch.as_tensor(labels, dtype=torch.long, device=feats.device)
    if feats.dim() != 2 or labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"class_mean_features: feats must be [N, D] and labels [N], got "
                         f"{tuple(feats.shape)} and {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class_mean_features: labels outside [0, {num_classes})")
    counts = torch.bincount(labels, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"class_mean_features: no sample for class(es) {empty}")
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, labels, feats.double())
    return (sums / counts[:, None].double()).to(feats.dtype)


# --------------------------------------------------------------------------------------------------
# captioners
# --------------------------------------------------------------------------------------------------
class Captioner(Protocol):
    """Anything with ``caption(images) -> list[str]`` (one caption per image)."""

    def caption(self, images: Sequence[Any]) -> list[str]: ...


class NoCaptioner:
    """No captions (fine-grained and EuroSAT presets, as in the paper): prompts are
    ``"photo of [classname]"``."""

    name = "none"

    def caption(self, images: Sequence[Any]) -> list[str]:
        return [""] * len(images)


class Blip2Captioner:
    """BLIP-2 captions through transformers (``Blip2Processor`` + ``generate``), for the ImageNet
    presets (the paper uses ``Salesforce/blip2-opt-2.7b``). ``model_path_or_id``: hub id or folder."""

    name = "blip2"

    def __init__(self, model_path_or_id: str, batch_size: int = 16, device: str = "auto",
                 max_new_tokens: int = 30, dtype: torch.dtype | None = None):
        self.model_id = str(model_path_or_id)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.model, self.processor = load_blip2(model_path_or_id, device=device, dtype=dtype)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype

    def caption(self, images: Sequence[Any]) -> list[str]:
        out: list[str] = []
        for s in range(0, len(images), self.batch_size):
            pil = [_to_pil(images[i]) for i in range(s, min(s + self.batch_size, len(images)))]
            inputs = self.processor(images=pil, return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.no_grad():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            texts = self.processor.batch_decode(ids, skip_special_tokens=True)
            out.extend(" ".join(t.split()) for t in texts)
        return out


def make_captioner(kind: str, model: str = "", batch_size: int = 16, device: str = "auto") -> Captioner:
    """``"none"`` -> :class:`NoCaptioner`; ``"blip2"`` -> :class:`Blip2Captioner` (``model`` = id/path)."""
    kind = (kind or "none").lower()
    if kind == "none":
        return NoCaptioner()
    if kind == "blip2":
        if not model:
            raise ValueError("captioner 'blip2' needs a model id or path (e.g. Salesforce/blip2-opt-2.7b)")
        return Blip2Captioner(model, batch_size=batch_size, device=device)
    raise ValueError(f"unknown captioner {kind!r}; use 'none' or 'blip2'")


def caption_images(captioner: Captioner, images: Sequence[Any], ids: Sequence[str],
                   path: str | os.PathLike, batch_size: int = 64, progress: bool = True,
                   on_batch: Callable[[int], None] | None = None) -> dict[str, str]:
    """Captions ``{id: caption}`` for all ids, kept in the JSON file ``path`` (``captions.json``),
    written atomically after each batch; ids already there are skipped (resumable)."""
    from tqdm.auto import tqdm

    ids = [str(i) for i in ids]
    if len(ids) != len(images):
        raise ValueError(f"caption_images: {len(images)} images but {len(ids)} ids")
    caps: dict[str, str] = read_json(path) if Path(path).exists() else {}
    todo = [i for i, k in enumerate(ids) if k not in caps]
    if todo or not Path(path).exists():
        batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
        for n, batch in enumerate(tqdm(batches, desc="captions", disable=not progress), 1):
            texts = captioner.caption([images[i] for i in batch])
            caps.update({ids[i]: t for i, t in zip(batch, texts)})
            write_json(path, caps)
            if on_batch is not None:
                on_batch(n)
        if not batches:
            write_json(path, caps)
    return {k: caps[k] for k in ids}
