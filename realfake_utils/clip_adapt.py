"""Adapting a pretrained CLIP to a target task, as Geng et al. (2024, "The Unmet Promise of Synthetic
Training Images") do to compare retrieved real images with synthetic ones (their Sec. 3, Fig. 2).

- :func:`zero_shot_head` - the zero-shot classifier of CLIP (Radford et al. 2021, Sec. 3.1.4): for each
  class the text embeddings of ``template.format(class name)`` over several templates, each L2-normalised,
  averaged and normalised again (prompt ensembling), from the model's own text tower.
- :func:`adapt` - WiSE-FT-style end-to-end fine-tuning (Wortsman et al. 2022, the code Geng et al. build
  on): the image encoder (vision tower + projection) followed by the zero-shot head, trained with
  cross-entropy on the adaptation images, AdamW, linear warm-up then cosine decay, weight decay.
  Their recipe (:data:`PAPER`): lr 1e-5, batch 512, 30 epochs, weight decay 0.1, 500 warm-up steps
  (issue 13, from ``scottgeng00/unmet-promise``); :data:`MINIATURE` is sized for the miniature CLIP on a CPU.
  ``train_head=False`` (kit default) keeps the text-derived head fixed, so the adapted model *is* a
  zero-shot classifier; ``train_head=True`` trains the head initialised from it, as WiSE-FT does.
- :func:`zero_shot_accuracy` - the adapted image encoder with the zero-shot head (their "ZS").
- :func:`linear_probe` - multinomial logistic regression on frozen, L2-normalised features (their "LP";
  CLIP's linear-probe protocol), the objective of scikit-learn's ``LogisticRegression(C=C)``:
  ``0.5 ||W||^2 + C * sum_i CE_i`` (intercept not penalised), solved with L-BFGS in float64.
- :func:`adapt_unit` - one adapted model as a finished unit (``rundir.mark_done``): reused on resume.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .pretrain import clip_normalize
from .rundir import content_hash, done_info, is_done, mark_done, write_json

# Templates the miniature CLIP knows (the pool's caption templates, ``miniature.CAPTION_TEMPLATES``).
MINIATURE_TEMPLATES = ("photo of {}", "a photo of {}", "image of {}", "{} picture", "picture of the {}")
# A subset of OpenAI CLIP's ImageNet templates (Radford et al. 2021, ``notebooks/Prompt_Engineering``).
CLIP_TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
                  "a rendering of a {}.", "a cropped photo of the {}.", "a photo of the large {}.",
                  "a bright photo of a {}.", "a photo of the small {}.", "itap of a {}.")


@dataclass(frozen=True)
class AdaptConfig:
    """The fine-tuning recipe (Geng et al.'s values in :data:`PAPER`)."""

    lr: float = 1e-5
    batch_size: int = 512
    epochs: int = 30
    weight_decay: float = 0.1
    warmup_steps: int = 500
    train_head: bool = False
    lp_C: float = 1.0          # inverse L2 strength of the linear probe (scikit-learn's C)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "AdaptConfig":
        """The recipe from ``08_retrieval_baseline``'s parameters ``adapt_lr``, ``adapt_batch_size``,
        ``adapt_epochs``, ``adapt_weight_decay``, ``adapt_warmup_steps``, ``adapt_train_head`` and ``lp_C``."""
        return cls(lr=float(params["adapt_lr"]), batch_size=int(params["adapt_batch_size"]),
                   epochs=int(params["adapt_epochs"]), weight_decay=float(params["adapt_weight_decay"]),
                   warmup_steps=int(params["adapt_warmup_steps"]), train_head=bool(params["adapt_train_head"]),
                   lp_C=float(params["lp_C"]))


PAPER = AdaptConfig()  # lr 1e-5, batch 512, 30 epochs, wd 0.1, 500 warm-up steps (Geng et al.'s code)
MINIATURE = AdaptConfig(lr=3e-4, batch_size=64, epochs=4, weight_decay=0.1, warmup_steps=5)


def load_clip(clip_model: str | Path):
    """``(CLIPModel, CLIPTokenizer)`` from a CLIPModel folder (the miniature CLIP) or id."""
    from transformers import CLIPModel, CLIPTokenizer

    return CLIPModel.from_pretrained(str(clip_model)).eval(), CLIPTokenizer.from_pretrained(str(clip_model))


def _features(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def pixel_values(model, images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N,3,H,W]`` -> CLIP pixel values at the model's input size (``miniature.clip_normalize``,
    bicubic resize when the sizes differ)."""
    size = int(model.config.vision_config.image_size)
    px = clip_normalize(images)
    if px.shape[-2:] != (size, size):
        px = F.interpolate(px, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return px


def encode_images(model, images: torch.Tensor, batch_size: int = 256, grad: bool = False) -> torch.Tensor:
    """L2-normalised image embeddings ``[N, D]`` (``get_image_features``)."""
    dev = next(model.parameters()).device
    out = []
    with torch.set_grad_enabled(grad):
        for s in range(0, len(images), batch_size):
            px = pixel_values(model, images[s:s + batch_size]).to(dev)
            out.append(F.normalize(_features(model.get_image_features(pixel_values=px)).float(), dim=-1))
    return torch.cat(out).cpu() if out else torch.zeros(0)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Text embeddings ``[B, D]`` (``get_text_features``, not normalised), tokenized padded to the model
    length as in the miniature CLIP's training."""
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[s:s + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        out.append(_features(model.get_text_features(input_ids=enc.input_ids.to(dev),
                                                     attention_mask=enc.attention_mask.to(dev))).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def zero_shot_head(model, tokenizer, class_names: Sequence[str],
                   templates: Sequence[str] = MINIATURE_TEMPLATES) -> torch.Tensor:
    """``[C, D]`` zero-shot weights: per class the normalised mean of the normalised text embeddings of
    every template (CLIP's prompt ensembling)."""
    if not templates or not class_names:
        raise ValueError("zero_shot_head needs at least one class name and one template ('... {} ...')")
    e = encode_texts(model, tokenizer, [t.format(c) for c in class_names for t in templates])
    e = F.normalize(e, dim=-1).reshape(len(class_names), len(templates), -1)
    return F.normalize(e.mean(1), dim=-1)


def accuracy(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    labels = torch.as_tensor(labels).long()
    return float((logits.argmax(1).cpu() == labels).float().mean()) if len(labels) else float("nan")


@torch.no_grad()
def zero_shot_accuracy(model, head: torch.Tensor, images: torch.Tensor, labels) -> float:
    """Top-1 of the image encoder with the zero-shot head (cosine to each class's text weights)."""
    return accuracy(encode_images(model.eval(), images) @ head.T.to(torch.float32), labels)


def linear_probe(train_feats: torch.Tensor, train_labels, test_feats: torch.Tensor, test_labels=None,
                 C: float = 1.0, num_classes: int | None = None, max_iter: int = 500
                 ) -> dict[str, Any]:
    """Multinomial logistic regression with scikit-learn's objective ``0.5 ||W||^2 + C sum_i CE_i``
    (bias unpenalised), L-BFGS in float64. Returns ``weight [K, D]``, ``bias [K]``, test ``probs``
    and, with ``test_labels``, ``accuracy``. Classes absent from the train labels get no row
    (as scikit-learn's ``classes_``); ``classes`` lists the rows."""
    x = torch.as_tensor(train_feats, dtype=torch.float64)
    y_raw = torch.as_tensor(train_labels).long()
    classes = torch.unique(y_raw)
    y = torch.searchsorted(classes, y_raw)
    K, D = len(classes), x.shape[1]
    if K < 2:
        raise ValueError("linear_probe needs at least two classes in the training features")
    w = torch.zeros(K, D, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w * w).sum() + C * F.cross_entropy(x @ w.T + b, y, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    xt = torch.as_tensor(test_feats, dtype=torch.float64)
    with torch.no_grad():
        probs = torch.softmax(xt @ w.T + b, dim=1)
    out: dict[str, Any] = {"weight": w.detach(), "bias": b.detach(), "probs": probs, "classes": classes}
    if test_labels is not None:
        pred = classes[probs.argmax(1)]
        out["accuracy"] = float((pred == torch.as_tensor(test_labels).long()).double().mean())
    return out


def lr_at(step: int, total: int, config: AdaptConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 (WiSE-FT's ``cosine_lr``)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    e, es = step - config.warmup_steps, max(1, total - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * config.lr


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        return device
    return torch.device("cuda" if (device or "auto") == "auto" and torch.cuda.is_available()
                        else "cpu" if (device or "auto") == "auto" else device)


def adapt(model, head: torch.Tensor, images: torch.Tensor, labels, config: AdaptConfig = MINIATURE,
          seed: int = 0, device: str | torch.device = "cpu") -> tuple[Any, list[float]]:
    """End-to-end cross-entropy fine-tuning of a copy of ``model``'s image encoder (vision tower and
    projection) with the zero-shot ``head`` on top (logits = logit_scale * cos); returns the adapted
    CLIPModel (text tower untouched) and the per-step losses."""
    labels = torch.as_tensor(labels).long()
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"adapt needs images and labels of one non-zero length, got {len(images)} / {len(labels)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = resolve_device(device)
    m = copy.deepcopy(model).to(device).train()
    params = list(m.vision_model.parameters()) + list(m.visual_projection.parameters())
    for p in m.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    w = torch.nn.Parameter(head.clone().float().to(device), requires_grad=config.train_head)
    if config.train_head:
        params.append(w)
    scale = float(m.logit_scale.exp().clamp(max=100))
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    bs = min(config.batch_size, len(images))
    steps_per_epoch = math.ceil(len(images) / bs)
    total = steps_per_epoch * config.epochs
    losses, step = [], 0
    for _ in range(config.epochs):
        order = torch.randperm(len(images), generator=gen)
        for s in range(0, len(images), bs):
            idx = order[s:s + bs]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, config)
            px = pixel_values(m, images[idx]).to(device)   # per batch: a paper-size set does not fit at 224 px
            feats = F.normalize(_features(m.get_image_features(pixel_values=px)), dim=-1)
            loss = F.cross_entropy(scale * feats @ F.normalize(w, dim=-1).T, labels[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
    return m.eval(), losses  # "ZS" keeps using the text-derived head, also with train_head


def evaluate(model, head: torch.Tensor, probe_train: tuple[torch.Tensor, Any],
             test: tuple[torch.Tensor, Any], C: float = 1.0) -> dict[str, float]:
    """``{"zero_shot", "linear_probe"}`` top-1 (%) on ``test``: ZS with ``head``; LP trained on the
    frozen features of ``probe_train`` (the target train split, as in Geng et al.)."""
    zs = zero_shot_accuracy(model, head, *test)
    with torch.no_grad():
        f_tr, f_te = encode_images(model.eval(), probe_train[0]), encode_images(model, test[0])
    lp = linear_probe(f_tr, probe_train[1], f_te, test[1], C=C)["accuracy"]
    return {"zero_shot": 100 * zs, "linear_probe": 100 * lp}


def adapt_unit(out_dir: str | Path, model, head: torch.Tensor, images: torch.Tensor, labels,
               probe_train: tuple[torch.Tensor, Any], test: tuple[torch.Tensor, Any],
               config: AdaptConfig, seed: int, key_extra: dict[str, Any],
               device: str | torch.device = "cpu") -> dict[str, Any]:
    """One adapted model as a finished unit: reuse ``out_dir`` if its marker holds this key (content of
    the adaptation set via ``key_extra``, config, seed), else adapt, evaluate, write ``metrics.json``
    and mark it done. Returns the metrics (``zero_shot``, ``linear_probe``, ``n``, ``final_loss``)."""
    key = content_hash({"config": config.to_dict(), "seed": seed, **key_extra})
    if is_done(out_dir, key):
        return done_info(out_dir)
    adapted, losses = adapt(model, head, images, labels, config, seed, device)
    metrics = {**evaluate(adapted, head, probe_train, test, config.lp_C), "n": int(len(images)),
               "seed": int(seed), "final_loss": float(np.mean(losses[-5:])) if losses else None}
    write_json(Path(out_dir) / "metrics.json", metrics)
    mark_done(out_dir, key, ["metrics.json"], metrics)
    return metrics


__all__ = ["AdaptConfig", "CLIP_TEMPLATES", "MINIATURE", "MINIATURE_TEMPLATES", "PAPER", "accuracy", "adapt",
           "adapt_unit", "encode_images", "encode_texts", "resolve_device", "evaluate", "linear_probe", "load_clip", "lr_at", "pixel_values",
           "zero_shot_accuracy", "zero_shot_head"]
