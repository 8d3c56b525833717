"""The miniature world, one import: the upstream pool (:mod:`realfake_utils.pool`), the pretraining of
the miniature CLIP / VAE / base model and the capacity oracle (:mod:`realfake_utils.pretrain`), the
sample probe and MMD checks (:mod:`realfake_utils.probe`) and 01's results record (:class:`PrepareRecord`).

New code imports from those modules directly; this module keeps ``from realfake_utils import miniature``
working.
"""
from __future__ import annotations

from .pool import (CAPTION_TEMPLATES, DEFAULT_SHIFT, GENERIC_CAPTIONS, NOISE_WORDS, PoolConfig, caption_stats,
                   make_pool, pool_fingerprint, shift_images, vocabulary, web_captions)
from .prepare import PrepareRecord, reset_stale_features
from .pretrain import (MiniatureConfig, PartSummary, build_clip, build_miniature, build_part, build_unet,
                       build_vae, clip_image_embeds, clip_normalize, encode_latents, key_path, noise_scheduler,
                       part_hash, remove_work, sampling_scheduler, save_clip, tokenize, train_clip, train_loop,
                       train_oracle, train_unet, train_vae)
from .classify import synthetic_only_check
from .probe import (feature_probe_accuracy, mmd2, mmd_report, probe_accuracy, probe_features,
                    sample_prompts)

sample_base = sample_prompts      # the name 01 used before the split
artifact_hash = part_hash

__all__ = [
    "CAPTION_TEMPLATES", "DEFAULT_SHIFT", "GENERIC_CAPTIONS", "MiniatureConfig", "NOISE_WORDS", "PartSummary",
    "PoolConfig", "PrepareRecord", "artifact_hash", "build_clip", "build_miniature", "build_part", "build_unet",
    "build_vae", "caption_stats", "clip_image_embeds", "clip_normalize", "encode_latents", "feature_probe_accuracy",
    "key_path", "make_pool", "mmd2", "mmd_report", "noise_scheduler", "part_hash", "pool_fingerprint",
    "probe_accuracy", "probe_features", "remove_work", "reset_stale_features", "sample_base", "sample_prompts",
    "sampling_scheduler", "save_clip", "shift_images", "synthetic_only_check", "tokenize", "train_clip",
    "train_loop", "train_oracle", "train_unet", "train_vae", "vocabulary", "web_captions",
]
