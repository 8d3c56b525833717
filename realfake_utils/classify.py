"""Classifier training on real, synthetic, mixed and scaled data (the paper's Sec. 4, Tables 1-3, 8).

Everything is built from timm's factories: ``timm.create_model`` (ResNet-50 for the paper presets, a
tiny ``resnet10t`` for the miniature ones), ``timm.optim.create_optimizer_v2``,
``timm.scheduler.create_scheduler_v2``, ``timm.data.create_transform`` (RandAugment through
``auto_augment``), ``timm.data.Mixup`` and ``timm.loss``. Recipes are data: ``params/recipes/*.yaml``,
one per row of the paper's Table 8 plus ``miniature``.

A training run (:func:`train_classifier`) writes into one folder::

    <out_dir>/config.json     recipe, sources, seed (what the run is)
    <out_dir>/last.pt         checkpoint after the last finished epoch (atomic; resume point)
    <out_dir>/model.pt        final weights + what is needed to rebuild the model (load_classifier)
    <out_dir>/metrics.json    top-1 / top-5 / per-class accuracy / confusion matrix / time / history
    <out_dir>/DONE.json       completion marker (rundir.mark_done): key = recipe, seed, source content

Training is timm's split: :func:`train_one_epoch` and :func:`validate`. A killed run resumes from
``last.pt``; every epoch's randomness (shuffle, augmentation, mixup) is seeded from (seed, epoch), so a
resumed run ends with the same weights as an uninterrupted one. Several processes / GPUs go through
``accelerate`` (``accelerate launch -m realfake_utils.classify``): the per-process batch is the recipe's
global batch / processes, so an epoch has the same samples and optimizer steps as on one process.

04's whole step is :func:`train_tables`: the classifiers of Tables 1-3 for the sets in 03's record
(``synthesize.SynthesisRecord``), the same classifier seeds for every row (Table 2's effects are paired,
``stats.paired``), returned as a :class:`ClassifierRecord`; :func:`plot_scaling` is the one Fig. 2.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import yaml
from PIL import Image

from .data import (ImageDataset, class_names as manifest_class_names, read_image_set as _data_read_image_set,
                   read_manifest)
from .data import resize_center_crop
from .params import REPO_ROOT
from .records import Record
from .rundir import (DONE, atomic_path, content_hash, file_sha256, is_done, mark_done, read_json,
                     unit_finished, write_json)
from .stats import paired, seed_stats, verdict
from .synthesize import SynthesisRecord, is_complete

RECIPE_DIR = REPO_ROOT / "params" / "recipes"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------- recipes
def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if not p.name.startswith("_"))


def load_recipe(name_or_path: str = "miniature", image_size: int | None = None,
                **overrides: Any) -> dict[str, Any]:
    """A recipe as a dict: ``params/recipes/<name>.yaml`` (or a path), then ``overrides``.

    ``train_size`` / ``test_size`` left ``null`` take ``image_size`` (the preset's). Milestones given as
    fractions (< 1) are scaled by ``epochs``. Unknown override keys are refused.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no classifier recipe '{name_or_path}'; recipes: {list_recipes()}")
    recipe = yaml.safe_load(path.read_text())
    recipe["name"] = path.stem
    for key, default in (("model_kwargs", {}), ("small_input", False), ("vflip", 0.0), ("warmup_lr", 1e-5),
                         ("min_lr", 0.0), ("global_batch_size", None)):
        recipe.setdefault(key, default)
    for key, value in overrides.items():
        if key not in recipe:
            raise KeyError(f"recipe override '{key}' is not a key of recipe {path.stem} "
                           f"(keys: {sorted(k for k in recipe if k != 'sources')})")
        recipe[key] = value
    for key in ("train_size", "test_size"):
        if recipe.get(key) is None:
            if image_size is None:
                raise ValueError(f"recipe {path.stem} takes {key} from image_size; pass image_size")
            recipe[key] = int(image_size)
    recipe["decay_milestones"] = _milestones(recipe.get("decay_milestones") or [], recipe["epochs"])
    return recipe


def _milestones(ms: Sequence[float], epochs: int) -> list[int]:
    out = [int(round(m * epochs)) if 0 < m < 1 else int(m) for m in ms]
    return sorted({max(1, m) for m in out})


# --------------------------------------------------------------------------------------------- models
class Classifier(nn.Module):
    """A timm network behind its preprocessing: takes images as uint8 [N,3,H,W] (or float in [0,1]),
    resizes them to ``test_size`` when they differ, normalises, returns logits. Training calls it with
    ``resize=False`` (through the accelerate-prepared, possibly DDP-wrapped module)."""

    def __init__(self, net: nn.Module, test_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.net = net
        self.test_size = int(test_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if resize and (x.shape[-1] != self.test_size or x.shape[-2] != self.test_size):
            x = nn.functional.interpolate(x, size=(self.test_size, self.test_size), mode="bilinear",
                                          antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """``resize=False`` in training: the batch is already at the train size (timm transforms)."""
        return self.net(self.preprocess(images, resize))


def build_model(recipe: dict[str, Any], num_classes: int, pretrained_path: str = "") -> Classifier:
    """``timm.create_model(recipe['model'])`` with ``num_classes``; pretrained weights only from a local
    file (``pretrained_cfg_overlay=dict(file=path)``, the classifier head is re-initialised)."""
    import timm

    kwargs = dict(recipe.get("model_kwargs") or {})
    if recipe.get("drop_path_rate"):
        kwargs["drop_path_rate"] = recipe["drop_path_rate"]
    if recipe.get("pretrained"):
        if not pretrained_path:
            raise ValueError(f"recipe {recipe.get('name')} fine-tunes pretrained weights: set "
                             "pretrained_path to a local timm/torchvision ResNet-50 checkpoint")
        if not Path(pretrained_path).exists():
            raise FileNotFoundError(f"pretrained_path {pretrained_path} does not exist")
        net = timm.create_model(recipe["model"], pretrained=True, num_classes=num_classes,
                                pretrained_cfg_overlay=dict(file=str(pretrained_path)), **kwargs)
    else:
        net = timm.create_model(recipe["model"], pretrained=False, num_classes=num_classes, **kwargs)
    small = recipe.get("small_input")
    if small == "auto":   # the stride-1 CIFAR stem for tiny inputs only (a 16 px digit keeps 4x4 maps without it)
        small = recipe["train_size"] < 16
    if small:
        _small_input_stem(net)
    return Classifier(net, recipe["test_size"])


def _small_input_stem(net: nn.Module) -> None:
    """Stride-1 stem without max-pool (the CIFAR variant of a ResNet) for 16-64 px inputs."""
    conv = net.conv1[0] if isinstance(net.conv1, nn.Sequential) else net.conv1
    conv.stride = (1, 1)
    net.maxpool = nn.Identity()


# --------------------------------------------------------------------------------------------- data
read_image_set = _data_read_image_set   # the one image-set reader (data.read_image_set)


class FileImages(torch.utils.data.Dataset):
    """(PIL image, label) from manifest rows with a ``path`` (synthetic / retrieved sets)."""

    def __init__(self, rows: list[dict[str, Any]], image_size: int | None):
        self.rows, self.image_size = rows, image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        with Image.open(row["path"]) as im:
            img = im.convert("RGB")
        if self.image_size:
            img = resize_center_crop(img, self.image_size)
        return img, int(row["label"])


class Cached(torch.utils.data.Dataset):
    """Decode a (small) dataset once and keep the PIL images in memory (miniature presets)."""

    def __init__(self, base: torch.utils.data.Dataset):
        self.items = [base[i] for i in range(len(base))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class Transformed(torch.utils.data.Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        return self.transform(img), label


@dataclass
class Source:
    """One training-data source: ``kind`` is real | synthetic | retrieved; ``path`` is the manifest.csv
    (real) or the set folder (synthetic / retrieved)."""
    kind: str
    path: str
    k: int = 0
    name: str = ""

    def rows(self, split: str = "train") -> list[dict[str, Any]]:
        if self.kind == "real":
            return [r for r in read_manifest(self.path) if r["split"] == split]
        return read_image_set(self.path)


def real_dataset(manifest: str | os.PathLike, split: str, image_size: int | None):
    """The real ``split`` of the data manifest as (PIL, label) through ``data.ImageDataset``."""
    rows = [r for r in read_manifest(manifest) if r["split"] == split]
    if not rows:
        raise ValueError(f"{manifest} has no '{split}' rows")
    return ImageDataset(rows, image_size)


def source_dataset(src: Source, image_size: int | None):
    if src.kind == "real":
        return real_dataset(src.path, "train", image_size)
    if src.kind in ("synthetic", "retrieved"):
        return FileImages(read_image_set(src.path), image_size)
    raise ValueError(f"unknown source kind '{src.kind}' (real | synthetic | retrieved)")


def build_transforms(recipe: dict[str, Any]):
    """timm train / eval transforms (PIL -> float tensor in [0, 1]; normalisation is the model's)."""
    from timm.data import create_transform

    common = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bicubic")
    train = create_transform(recipe["train_size"], is_training=True, scale=tuple(recipe["scale"]),
                             ratio=tuple(recipe["ratio"]), hflip=recipe["hflip"], vflip=recipe["vflip"],
                             color_jitter=recipe["color_jitter"] or 0.0,
                             auto_augment=recipe.get("auto_augment"), **common)
    test = create_transform(recipe["test_size"], is_training=False, crop_pct=recipe["crop_pct"], **common)
    return train, test


def load_size(recipe: dict[str, Any]) -> int:
    """Size images are decoded at (the miniature ones are cached at this size)."""
    return int(math.ceil(max(recipe["train_size"], recipe["test_size"]) / float(recipe["crop_pct"])))


# --------------------------------------------------------------------------------------------- training
def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    s = (int(seed) * 100_003 + int(epoch) * 7919) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    g = torch.Generator()
    g.manual_seed(s)
    return g


def _loss_fn(recipe: dict[str, Any], mixup_on: bool):
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if recipe.get("bce_loss"):
        return BinaryCrossEntropy(smoothing=0.0 if mixup_on else recipe["label_smoothing"])
    if mixup_on:
        return SoftTargetCrossEntropy()
    if recipe["label_smoothing"] > 0:
        return LabelSmoothingCrossEntropy(smoothing=recipe["label_smoothing"])
    return nn.CrossEntropyLoss()


def _device_choice(device: str) -> str:
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def train_classifier(out_dir: str | os.PathLike, train_set: torch.utils.data.Dataset,
                     test_set: torch.utils.data.Dataset | None, num_classes: int,
                     recipe: dict[str, Any], seed: int = 0, device: str = "auto",
                     pretrained_path: str = "", info: dict[str, Any] | None = None,
                     class_names: Sequence[str] | None = None, stop_after_epoch: int | None = None,
                     cache: bool | None = None, verbose: bool = False) -> dict[str, Any]:
    """Train (or resume, or just return) one classifier; returns its metrics dict.

    ``train_set`` / ``test_set`` yield (PIL image, label). If ``metrics.json`` exists the run is finished
    and its metrics are returned without training. ``stop_after_epoch`` ends the process's work after that
    epoch (used by tests to simulate a kill). ``info`` (source, k, ...) is stored in config and metrics.
    """
    from accelerate import Accelerator
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        return read_json(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = dict(info or {})
    config = {"recipe": recipe, "seed": int(seed), "num_classes": int(num_classes), "info": info,
              "n_train": len(train_set), "class_names": list(class_names or [])}
    write_json(out_dir / "config.json", config)

    dev = _device_choice(device)
    accelerator = Accelerator(cpu=(dev == "cpu"),
                              mixed_precision="bf16" if (dev == "cuda" and recipe.get("amp")) else "no")
    torch.manual_seed(seed)
    model = build_model(recipe, num_classes, pretrained_path)
    if recipe.get("channels_last") and dev == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model.net, opt=recipe["opt"], lr=recipe["lr"],
                                    weight_decay=recipe["weight_decay"], momentum=recipe["momentum"])
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=recipe["sched"], num_epochs=recipe["epochs"],
        decay_milestones=recipe["decay_milestones"] or (recipe["epochs"] + 1,),
        decay_rate=recipe["decay_rate"], warmup_epochs=recipe["warmup_epochs"],
        warmup_lr=recipe["warmup_lr"], min_lr=recipe["min_lr"])

    mixup_on = recipe["mixup"] > 0 or recipe["cutmix"] > 0
    mixup = Mixup(mixup_alpha=recipe["mixup"], cutmix_alpha=recipe["cutmix"],
                  label_smoothing=recipe["label_smoothing"], num_classes=num_classes) if mixup_on else None
    loss_fn = _loss_fn(recipe, mixup_on)

    train_tf, test_tf = build_transforms(recipe)
    if cache is None:
        cache = recipe.get("num_workers", 0) == 0
    base = Cached(train_set) if cache else train_set
    data = Transformed(base, train_tf)
    batch_size = per_device_batch_size(recipe, accelerator.num_processes, len(data))
    drop_last = mixup_on or len(data) > batch_size * accelerator.num_processes
    if mixup_on and batch_size % 2:
        batch_size -= 1

    start_epoch, history, elapsed = 0, [], 0.0
    ckpt = out_dir / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed"]
        if verbose:
            print(f"resuming {out_dir.name} after epoch {start_epoch}")
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    for epoch in range(start_epoch, num_epochs):
        t0 = time.time()
        gen = _seed_epoch(seed, epoch)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen,
                                             drop_last=drop_last, num_workers=recipe.get("num_workers", 0),
                                             pin_memory=(dev == "cuda"),
                                             persistent_workers=False)
        loader = accelerator.prepare_data_loader(loader, device_placement=True)
        scheduler.step(epoch)
        stats = train_one_epoch(model, loader, optimizer, loss_fn, accelerator, mixup,
                                channels_last=bool(recipe.get("channels_last") and dev == "cuda"))
        elapsed += time.time() - t0
        history.append({"epoch": epoch + 1, "loss": stats["loss"], "samples": stats["samples"],
                        "steps": stats["steps"], "lr": optimizer.param_groups[0]["lr"]})
        if accelerator.is_main_process:
            with atomic_path(ckpt) as tmp:
                torch.save({"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch + 1, "history": history, "elapsed": elapsed}, tmp)
        accelerator.wait_for_everyone()
        unit_finished("epoch")  # tests: REALFAKE_KILL_AFTER_UNITS=epoch:<n> stops here
        if verbose:
            print(f"epoch {epoch + 1}/{num_epochs} loss {history[-1]['loss']:.4f}")
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < num_epochs:
            return {"stopped_after_epoch": epoch + 1}

    metrics = {"info": info, "seed": int(seed), "recipe": recipe["name"], "epochs": num_epochs,
               "n_train": len(train_set), "train_time_s": elapsed, "history": history,
               "processes": accelerator.num_processes, "per_device_batch_size": batch_size}
    if test_set is not None:
        metrics.update(validate(unwrapped, test_set, num_classes, recipe, device=str(accelerator.device)))
    if accelerator.is_main_process:
        with atomic_path(out_dir / "model.pt") as tmp:
            torch.save({"model": unwrapped.state_dict(), "recipe": recipe, "num_classes": num_classes,
                        "class_names": list(class_names or [])}, tmp)
        write_json(metrics_path, metrics)
    return metrics


def per_device_batch_size(recipe: dict[str, Any], num_processes: int = 1, n: int | None = None) -> int:
    """The per-process batch: ``global_batch_size / num_processes`` (Table 8's "128x8" is the global
    1024 over 8 devices), or ``batch_size`` as the global batch when the recipe names no global one;
    capped so one global batch fits in ``n`` images. A clear error when it does not divide."""
    glob = int(recipe.get("global_batch_size") or recipe["batch_size"])
    if n is not None:
        glob = min(glob, max(int(n), 1))
    if glob % int(num_processes) and recipe.get("global_batch_size"):
        raise ValueError(f"global_batch_size {glob} is not divisible by {num_processes} processes: choose "
                         f"a multiple of {num_processes}")
    return max(1, glob // int(num_processes))


def train_one_epoch(model: nn.Module, loader, optimizer, loss_fn, accelerator, mixup=None,
                    channels_last: bool = False) -> dict[str, float]:
    """One pass over ``loader`` (timm's ``train_one_epoch``): mean loss, and the samples and optimizer
    steps of this epoch summed over all processes (the same as one process's with the same global
    batch)."""
    model.train()
    total, count, steps = 0.0, 0, 0
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            x, y = mixup(x, y)  # mixing is linear: the same before or after normalisation
        with accelerator.autocast():
            loss = loss_fn(model(x, resize=False), y)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        total += float(loss.detach()) * len(x)
        count += len(x)
        steps += 1
    if accelerator.num_processes > 1:
        t = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device), "sum")
        total, count = float(t[0]), int(t[1])
    return {"loss": total / max(count, 1), "samples": int(count), "steps": steps}


def load_classifier(run_dir: str | os.PathLike, device: str = "cpu") -> Classifier:
    """Rebuild a finished classifier from ``model.pt`` (eval mode)."""
    state = torch.load(Path(run_dir) / "model.pt", map_location="cpu", weights_only=True)
    recipe = dict(state["recipe"], pretrained=False)
    model = build_model(recipe, state["num_classes"])
    model.load_state_dict(state["model"])
    model.recipe = state["recipe"]
    model.class_names = state.get("class_names", [])
    return model.to(_device_choice(device)).eval()


# --------------------------------------------------------------------------------------------- evaluation
def to_uint8(dataset, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(PIL, label) dataset -> uint8 [N,3,size,size] (resize + centre crop, aspect kept), labels [N]."""
    imgs, labels = [], []
    for i in range(len(dataset)):
        img, y = dataset[i]
        if img.size != (size, size):
            img = resize_center_crop(img, size)
        imgs.append(torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1))
        labels.append(int(y))
    return torch.stack(imgs), torch.tensor(labels)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Logits [N, C] (float32, CPU) for images as uint8 [N,3,H,W] (or floats in [0,1]), in eval mode.
    The :class:`Classifier` wrapper resizes and normalises; used by evaluation, OOD and LiRA."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=torch.device(device).type == "cuda"):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     allowed: Sequence[int] | None = None) -> dict[str, Any]:
    """top-1, top-5, per-class accuracy and the confusion matrix (rows: true, columns: predicted).
    ``allowed`` restricts the arg-max to those classes (labels stay in the full class space)."""
    logits = logits.float()
    if allowed is not None:
        allowed_t = torch.as_tensor(list(allowed), dtype=torch.long)
        sub = logits[:, allowed_t]
        topk = allowed_t[sub.topk(min(5, sub.shape[1]), dim=1).indices]
    else:
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
    pred = topk[:, 0]
    top1 = (pred == labels).float().mean().item() if len(labels) else float("nan")
    top5 = (topk == labels[:, None]).any(1).float().mean().item() if len(labels) else float("nan")
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    conf.index_put_((labels.long(), pred.long()), torch.ones_like(pred, dtype=torch.long), accumulate=True)
    support = conf.sum(1)
    per_class = [float(conf[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    return {"top1": top1, "top5": top5, "per_class": per_class, "confusion": conf.tolist(),
            "n_test": int(len(labels))}


def validate(model: Classifier, test_set, num_classes: int, recipe: dict[str, Any],
             device: str = "cpu", allowed: Sequence[int] | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on a (PIL, label) dataset with the recipe's eval transform (timm's
    ``validate``): top-1, top-5, per-class accuracy, confusion matrix."""
    _, test_tf = build_transforms(recipe)
    loader = torch.utils.data.DataLoader(Transformed(test_set, test_tf), batch_size=256, shuffle=False,
                                         num_workers=recipe.get("num_workers", 0))
    logits, ys = [], []
    for x, y in loader:  # streamed: an ImageNet-size test set never sits in memory at once
        logits.append(predict_logits(model, x, device=device))
        ys.append(y)
    return accuracy_metrics(torch.cat(logits), torch.cat(ys), num_classes, allowed)


evaluate = validate


def confusion_figure(confusion, class_names: Sequence[str] | None = None, title: str = ""):
    """Row-normalised confusion matrix as a matplotlib Figure."""
    import matplotlib.pyplot as plt

    conf = np.asarray(confusion, dtype=float)
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    n = len(conf)
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * n, 14), min(1.6 + 0.45 * n, 13)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = list(class_names) if class_names else [str(i) for i in range(n)]
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- experiments
@dataclass
class RunSpec:
    """One classifier of a sweep: ``row`` names the training source (``real``, a set name, or
    ``real+<set>``); ``sources`` are the training sets; ``k`` the synthetic scale (0 for real only);
    ``synthesis_seed`` the synthetic set's seed (-1 for real only)."""
    row: str
    sources: list[Source]
    seed: int = 0
    k: int = 0
    table: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    synthesis_seed: int = -1

    @property
    def name(self) -> str:
        tag = "".join(c if c.isalnum() or c in "-_+." else "_" for c in self.row)
        if self.synthesis_seed >= 0:
            tag += f".ss{self.synthesis_seed}"
        return f"{tag}__k{self.k}__s{self.seed}"


def _source_identity(src: Source) -> str:
    """Content identity of a training source (the cache key of a classifier folder): the manifest's
    bytes for real data, the completion marker's key (or the manifest's bytes) for an image set."""
    p = Path(src.path)
    if src.kind == "real":
        return file_sha256(p)
    marker = p / DONE
    if marker.exists():
        return str(read_json(marker).get("key", "")) + ":" + file_sha256(p / "manifest.jsonl")
    return file_sha256(p / "manifest.jsonl")


def run_key(spec: RunSpec, recipe: dict[str, Any]) -> str:
    """The cache key of one classifier: recipe, seed and the content of its sources (no paths)."""
    return content_hash({"recipe": recipe, "seed": spec.seed,
                         "sources": [[s.kind, _source_identity(s)] for s in spec.sources]})


def discover_sets(synthetic_root: str | os.PathLike) -> dict[str, dict[int, Path]]:
    """Complete sets under ``artifacts/synthetic/<name>/k<k>[-s<seed>]/`` -> {name: {k: folder}} (the
    lowest seed per k). Only sets whose completion marker verifies (``synthesize.is_complete``): a set
    still being written, or killed, is left out. 04 itself reads 03's record instead."""
    import re

    out: dict[str, dict[int, Path]] = {}
    for spec in sorted(Path(synthetic_root).glob("*/k*/synthesis.json")):
        m = re.fullmatch(r"k(\d+)(?:-s(\d+))?", spec.parent.name)
        if m and is_complete(spec.parent):
            out.setdefault(spec.parent.parent.name, {}).setdefault(int(m.group(1)), spec.parent)
    return out


def run_experiments(specs: Iterable[RunSpec], manifest: str | os.PathLike, out_root: str | os.PathLike,
                    recipe: dict[str, Any], device: str = "auto", pretrained_path: str = "",
                    verbose: bool = True) -> list[dict[str, Any]]:
    """Train every run of ``specs`` (resumable: a finished run whose marker ``rundir.is_done`` verifies
    for the same recipe / seed / source content is read back; a half-done one resumes; one made from
    other content is retrained) and return one flat dict per run: row, table, k, synthesis_seed, seed,
    source, top1, top5, n_train, time, path."""
    import shutil

    rows = read_manifest(manifest)
    names = manifest_class_names(rows)
    in_memory = recipe.get("num_workers", 0) == 0  # miniature: decode once; paper sets: stream with workers
    size = load_size(recipe) if in_memory else None  # paper sets: full-resolution files into the timm crops
    test_set = real_dataset(manifest, "test", size)
    test_set = Cached(test_set) if in_memory else test_set
    cache: dict[str, Any] = {}
    records = []
    specs = list(specs)
    for i, spec in enumerate(specs, 1):
        out_dir = Path(out_root) / spec.name
        key = run_key(spec, recipe)
        done = is_done(out_dir, key)
        if not done and (out_dir / "config.json").exists() and \
                read_json(out_dir / "config.json").get("info", {}).get("key") != key:
            shutil.rmtree(out_dir)   # made from other sources / recipe: not a resume point
        t0 = time.time()
        info = {"row": spec.row, "table": spec.table, "k": spec.k, "seed": spec.seed,
                "synthesis_seed": spec.synthesis_seed, "source": "+".join(s.kind for s in spec.sources),
                "key": key, **spec.extra}
        if done:
            m = read_json(out_dir / "metrics.json")
        else:
            parts = []
            for src in spec.sources:
                ck = f"{src.kind}:{src.path}"
                if ck not in cache:
                    ds = source_dataset(src, size)
                    _check_labels(ds, src, names)
                    cache[ck] = Cached(ds) if in_memory else ds
                parts.append(cache[ck])
            train_set = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
            m = train_classifier(out_dir, train_set, test_set, len(names), recipe, seed=spec.seed,
                                 device=device, pretrained_path=pretrained_path, info=info,
                                 class_names=names, cache=False)
            if (out_dir / "metrics.json").exists() and _is_main_process():
                mark_done(out_dir, key, ["metrics.json", "model.pt"], info={"top1": m["top1"]})
        if verbose:
            state = "cached" if done else f"{time.time() - t0:.1f}s"
            print(f"[{i}/{len(specs)}] {spec.name}: top-1 {m['top1']:.4f} top-5 {m['top5']:.4f} ({state})",
                  flush=True)
        records.append({"name": spec.name, "row": spec.row, "table": spec.table, "k": spec.k,
                        "synthesis_seed": spec.synthesis_seed, "seed": spec.seed, "source": info["source"],
                        "top1": m["top1"], "top5": m["top5"], "per_class": m["per_class"],
                        "n_train": m["n_train"], "train_time_s": m["train_time_s"], "path": str(out_dir)})
    return records


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _check_labels(ds, src: Source, names: Sequence[str]) -> None:
    rows = getattr(ds, "rows", None)
    if not rows or src.kind == "real":
        return
    for r in rows:
        lab = int(r["label"])
        if not 0 <= lab < len(names):
            raise ValueError(f"{src.path}: label {lab} outside the {len(names)} real classes")
        cn = r.get("class_name")
        if cn and cn != names[lab]:
            raise ValueError(f"{src.path}: label {lab} is '{cn}' but the real data calls it '{names[lab]}'")


# --------------------------------------------------------------------------------------------- the record
TABLES = ("table1", "table2", "table3")


@dataclass
class ClassifierRun:
    """One trained classifier (once, whatever the number of tables it appears in)."""

    source: str            # "real", a synthetic set name (e.g. lora-dm-vg-lp), "real+<set>", "retrieved-..."
    tables: list[str]      # of table1 | table2 | table3
    k: int                 # synthetic images per real train image (0: real only)
    synthesis_seed: Optional[int]   # the synthetic set's seed (None: real only)
    classifier_seed: int   # the same seeds for every row: paired comparisons
    top1: float            # fractions on the real test split
    top5: float
    n_train: int
    path: str              # the classifier folder, relative to the run folder
    table2_row: str = ""   # the Table 2 row of a synthetic source ("" for real)
    train_time_s: float = 0.0


@dataclass
class Effect:
    """A Table 2 component effect: ``b - a`` in top-1 points, paired over (synthesis seed, classifier
    seed), with its 95 % t interval (``stats.paired``)."""

    name: str
    a: str
    b: str
    diff: float
    lo: float
    hi: float
    p: Optional[float]
    n: int
    verdict: str


@dataclass
class ClassifierRecord(Record):
    """Results of 04 (``results/04_train_classifier.json``): every classifier of Tables 1-3."""

    STEP: ClassVar[str] = "04_train_classifier"

    runs: list[ClassifierRun]
    recipe: dict[str, Any]
    seeds: list[int]
    default_row: str
    scale_k: list[int]
    n_real_train: int
    effects: list[Effect] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def select(self, table: str, source: Optional[str] = None, k: Optional[int] = None) -> list[ClassifierRun]:
        """Runs of ``table`` (``source``: a source name or a Table 2 row name)."""
        return [r for r in self.runs if table in r.tables and (source is None or r.source == source
                                                                 or r.table2_row == source)
                and (k is None or r.k == int(k))]

    def values(self, table: str, source: str, k: Optional[int] = None, metric: str = "top1") -> list[float]:
        """Per-run values in % sorted by (synthesis seed, classifier seed): aligned across rows."""
        runs = sorted(self.select(table, source, k), key=_pair_key)
        return [100 * getattr(r, metric) for r in runs]

    def estimate(self, table: str, source: str, k: Optional[int] = None, metric: str = "top1"):
        return seed_stats(self.values(table, source, k, metric))


def _pair_key(r: ClassifierRun) -> tuple[int, int]:
    return (-1 if r.synthesis_seed is None else r.synthesis_seed, r.classifier_seed)


# Table 2's component effects (paper order of the rows: ROWS of synthesize). Each is (a, b): b adds
# one component to a, both sampled with the same synthesis seeds and trained with the same seeds.
TABLE2_EFFECTS = (
    ("LoRA fine-tuning", "base-novg-t2i", "lora-nodm-novg-t2i"),
    ("visual guidance", "lora-nodm-novg-t2i", "lora-nodm-vg-t2i"),
    ("DM loss", "lora-nodm-novg-t2i", "lora-dm-novg-t2i"),
    ("DM loss + visual guidance", "lora-nodm-novg-t2i", "lora-dm-vg-t2i"),
    ("latent prior (vanilla base)", "base-novg-t2i", "base-novg-lp"),
    ("latent prior (full method)", "lora-dm-vg-t2i", "lora-dm-vg-lp"),
    ("DM loss, with LP + VG", "lora-nodm-vg-lp", "lora-dm-vg-lp"),
    ("visual guidance, with LP + DM", "lora-dm-novg-lp", "lora-dm-vg-lp"),
    ("full method vs vanilla base", "base-novg-t2i", "lora-dm-vg-lp"),
)


def table2_effects(runs: Sequence[ClassifierRun]) -> list[Effect]:
    """Every :data:`TABLE2_EFFECTS` both of whose rows ran, as a paired comparison (``stats.paired``
    over the (synthesis seed, classifier seed) pairs both rows share)."""
    by: dict[str, dict[tuple[int, int], float]] = {}
    for r in runs:
        if "table2" in r.tables:
            by.setdefault(r.table2_row, {})[_pair_key(r)] = 100 * r.top1
    out = []
    for name, a, b in TABLE2_EFFECTS:
        if a not in by or b not in by:
            continue
        common = sorted(set(by[a]) & set(by[b]))
        c = paired([by[a][x] for x in common], [by[b][x] for x in common])
        out.append(Effect(name, a, b, c.diff, c.lo, c.hi, c.p, len(common), verdict(c, "greater")))
    return out


def plan_runs(synthesis: Any, run_root: str | os.PathLike, seeds: Sequence[int],
              retrieved_set: str = "") -> tuple[list[RunSpec], list[str]]:
    """The classifiers of Tables 1-3 from 03's record (``synthesize.SynthesisRecord``), never from 03's
    parameters. Returns (specs, missing). Every spec carries the same classifier ``seeds``:

    - Table 1: real only; synthetic only (the default row's k = 1 sets, every synthesis seed); real +
      synthetic = the real train split + that k = 1 set (twice the data, Apx. G.2);
    - Table 2: every row's k = 1 sets (every synthesis seed), synthetic only;
    - Table 3 / Fig. 2: the default row's sets at every k (first synthesis seed), synthetic only, against
      the real-only line.
    """
    root = Path(run_root)
    manifest = root / "artifacts" / "data" / "manifest.csv"
    specs: list[RunSpec] = []
    missing: list[str] = []

    def add(table: str, row: str, sources: list[Source], k: int, ss: int, table2_row: str = "") -> None:
        for seed in seeds:
            specs.append(RunSpec(row, sources, seed=int(seed), k=k, table=table, synthesis_seed=ss,
                                 extra={"table2_row": table2_row}))

    real = Source("real", str(manifest))
    add("table1", "real", [real], 0, -1)
    default_sets = synthesis.of_row(synthesis.default_row, 1)
    if not default_sets:
        missing.append(f"Table 1: no complete k=1 set of the default row {synthesis.default_row} in 03's record "
                       f"(skipped: {synthesis.skipped or 'none'})")
    for s in default_sets:
        src = Source("synthetic", str(root / s.path), k=1, name=s.name)
        add("table1", s.name, [src], 1, s.synthesis_seed, s.table2_row)
        add("table1", f"real+{s.name}", [real, src], 1, s.synthesis_seed, s.table2_row)
    if retrieved_set:
        add("table1", "retrieved-set", [Source("retrieved", retrieved_set, name="retrieved")], 0, -1)
    for row in synthesis.rows:
        sets = synthesis.of_row(row, 1)
        if not sets:
            missing.append(f"Table 2 row {row}: no complete set in 03's record")
        for s in sets:
            add("table2", s.name, [Source("synthetic", str(root / s.path), k=1, name=s.name)], 1,
                s.synthesis_seed, s.table2_row)
    for s in synthesis.scale_sets():
        add("table3", s.name, [Source("synthetic", str(root / s.path), k=s.k, name=s.name)], s.k,
            s.synthesis_seed, s.table2_row)
    have = {s.k for s in synthesis.scale_sets()}
    missing += [f"Table 3: no complete set of {synthesis.default_row} at k={k}" for k in synthesis.scale_k
                if k not in have]
    return specs, missing


def train_tables(run: Any, recipe: dict[str, Any], seeds: Sequence[int], device: str = "auto",
                 pretrained_path: str = "", retrieved_set: str = "", verbose: bool = True) -> ClassifierRecord:
    """04's whole work: the classifiers of Tables 1-3 for the sets in 03's record, resumable, as a
    :class:`ClassifierRecord` (with the paired Table 2 effects)."""
    if not seeds:
        raise ValueError("seeds is empty: give at least one classifier seed (digits: [0, 1, 2])")
    synthesis = SynthesisRecord.load(run)
    root = Path(run.root)
    specs, missing = plan_runs(synthesis, root, seeds, retrieved_set)
    for m in missing:
        print("CANNOT RUN", m)
    unique = list({s.name: s for s in specs}.values())
    tables: dict[str, list[str]] = {}
    for s in specs:
        tables.setdefault(s.name, [])
        if s.table not in tables[s.name]:
            tables[s.name].append(s.table)
    results = run_experiments(unique, root / "artifacts" / "data" / "manifest.csv",
                              root / "artifacts" / "classifiers", recipe, device=device,
                              pretrained_path=pretrained_path, verbose=verbose)
    runs = [ClassifierRun(source=s.row, tables=tables[s.name], k=s.k,
                          synthesis_seed=None if s.synthesis_seed < 0 else s.synthesis_seed,
                          classifier_seed=s.seed, top1=r["top1"], top5=r["top5"], n_train=r["n_train"],
                          path=Record.rel(run, r["path"]), table2_row=s.extra.get("table2_row", ""),
                          train_time_s=round(r["train_time_s"], 2)) for s, r in zip(unique, results)]
    return ClassifierRecord(runs=runs, recipe=recipe, seeds=[int(x) for x in seeds],
                            default_row=synthesis.default_row, scale_k=list(synthesis.scale_k),
                            n_real_train=synthesis.n_real_train, effects=table2_effects(runs), missing=missing)


# --------------------------------------------------------------------------------------------- tables
def table_lines(record: ClassifierRecord, table: str, metric: str = "top1") -> list[dict[str, Any]]:
    """One line per source of ``table`` (in run order): source, k, n_train, n runs and the
    ``stats.seed_stats`` estimate (%, over synthesis x classifier seeds)."""
    keys = list(dict.fromkeys((r.source, r.k) for r in record.runs if table in r.tables))
    out = []
    for source, k in keys:
        runs = [r for r in record.runs if table in r.tables and r.source == source and r.k == k]
        est = seed_stats([100 * getattr(r, metric) for r in runs])
        out.append({"source": source, "k": k, "n_train": runs[0].n_train, "table2_row": runs[0].table2_row,
                    "estimate": est})
    return out


def format_table(lines: Sequence[dict[str, Any]], title: str = "") -> str:
    """A text table: source, k, n_train, mean +- 95 % half-width, [min, max], runs."""
    out = [title] if title else []
    out.append(f"{'source':<34} {'k':>2} {'n_train':>7} {'top-1 % (95% CI)':>22} {'[min, max]':>14} runs")
    for ln in lines:
        e = ln["estimate"]
        out.append(f"{ln['source']:<34} {ln['k']:>2} {ln['n_train']:>7} {e.fmt(2):>22} "
                   f"[{e.min:5.1f}, {e.max:5.1f}] {e.n:>3}")
    return "\n".join(out)


def format_effects(effects: Sequence[Effect]) -> str:
    out = [f"{'Table 2 effect (paired)':<32} {'b - a (points)':>16} {'95% CI':>18} {'n':>3}  verdict"]
    for e in effects:
        out.append(f"{e.name:<32} {e.diff:>+16.2f} [{e.lo:+6.2f}, {e.hi:+6.2f}] {e.n:>3}  {e.verdict}")
    return "\n".join(out)


def plot_table(record: ClassifierRecord, table: str, title: str):
    """Bars of the mean, 95 % interval as error bars, every run as a dot."""
    import matplotlib.pyplot as plt

    lines = table_lines(record, table)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(lines) + 1.5), 3.6))
    for i, ln in enumerate(lines):
        e = ln["estimate"]
        half = e.half_width if e.n > 1 else 0.0
        ax.bar(i, e.mean, yerr=half, color="C1" if ln["source"].startswith("real") else "C0", alpha=0.75,
               capsize=4)
        vals = [100 * r.top1 for r in record.runs if table in r.tables and r.source == ln["source"]
                and r.k == ln["k"]]
        ax.scatter([i] * len(vals), vals, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(lines)), [ln["source"] + (f" k={ln['k']}" if table == "table3" else "")
                                      for ln in lines], rotation=30, ha="right", fontsize=7)
    lo = min([ln["estimate"].min for ln in lines] or [0])
    ax.set_ylim(max(0, lo - 10), 100)
    ax.set_ylabel("top-1 on the real test split (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- Fig. 2
def crossover_k(ks: Sequence[float], means: Sequence[float], real: float) -> Optional[float]:
    """The scale where synthetic-only accuracy first reaches the real-only line, interpolated linearly
    in log k between the two measured k around it (the paper's 2.5x on IN-10, 6.5x on IN-100, Sec. 4.3);
    the first k itself if it is already at or above; None if never."""
    pts = sorted(zip(ks, means))
    for i, (k, m) in enumerate(pts):
        if m >= real:
            if i == 0:
                return float(k)
            (k0, m0) = pts[i - 1]
            t = (real - m0) / (m - m0)
            return float(math.exp(math.log(k0) + t * (math.log(k) - math.log(k0))))
    return None


def scaling_points(record: ClassifierRecord) -> dict[str, Any]:
    """Fig. 2's data: per k the synthetic-only estimate (Table 3 runs), the real-only estimate (Table 1)
    and the crossover scale (on the means)."""
    ks = sorted({r.k for r in record.runs if "table3" in r.tables})
    syn = {k: seed_stats([100 * r.top1 for r in record.runs if "table3" in r.tables and r.k == k]) for k in ks}
    real = seed_stats([100 * r.top1 for r in record.runs if r.source == "real"])
    cross = crossover_k(ks, [syn[k].mean for k in ks], real.mean) if ks and real.n else None
    return {"k": ks, "synthetic": syn, "real": real, "crossover_k": cross}


def plot_scaling(record: ClassifierRecord, paper: Optional[dict[int, float]] = None,
                 paper_crossover: Optional[float] = None, title: str = ""):
    """Fig. 2 analog (the one scaling figure; 09 reuses it): synthetic-only top-1 against k with 95 %
    intervals, the real-only line with its interval band, and a mark where synthetic-only crosses the
    real line (if it does). ``paper``: published points {k: top-1} drawn in a second panel with the
    published crossover ``paper_crossover``."""
    import matplotlib.pyplot as plt

    pts = scaling_points(record)
    fig, axes = plt.subplots(1, 2 if paper else 1, figsize=(9.5 if paper else 5.2, 3.8), squeeze=False)
    ax = axes[0, 0]
    ks = pts["k"]
    if ks:
        m = np.array([pts["synthetic"][k].mean for k in ks])
        lo = np.array([pts["synthetic"][k].lo if pts["synthetic"][k].n > 1 else pts["synthetic"][k].mean for k in ks])
        hi = np.array([pts["synthetic"][k].hi if pts["synthetic"][k].n > 1 else pts["synthetic"][k].mean for k in ks])
        ax.errorbar(ks, m, yerr=[m - lo, hi - m], marker="o", capsize=4, color="C0", label="synthetic only")
    real = pts["real"]
    if real.n:
        ax.axhline(real.mean, color="C3", ls="--", label="real only")
        if real.n > 1:
            ax.axhspan(real.lo, real.hi, color="C3", alpha=0.12)
    if pts["crossover_k"] is not None:
        ax.axvline(pts["crossover_k"], color="k", ls=":", lw=1)
        ax.annotate(f"crosses real at {pts['crossover_k']:.1f}x", (pts["crossover_k"], real.mean),
                    textcoords="offset points", xytext=(5, -14), fontsize=8)
    elif ks:
        ax.text(0.02, 0.04, "synthetic only stays below real", transform=ax.transAxes, fontsize=8)
    _k_axis(ax, ks)
    ax.set_xlabel("k (synthetic images per real training image)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "this run (mean, 95 % interval)", fontsize=10)
    ax.legend(fontsize=8)
    if paper:
        ax2 = axes[0, 1]
        pk = sorted(paper)
        ax2.plot(pk, [paper[k] for k in pk], "o-", color="C0", label="synthetic only (paper)")
        if paper_crossover:
            ax2.axvline(paper_crossover, color="k", ls=":", lw=1)
            ax2.text(paper_crossover, min(paper.values()), f" {paper_crossover}x", fontsize=8)
        _k_axis(ax2, pk)
        ax2.set_xlabel("k")
        ax2.set_ylabel("top-1 (%)")
        ax2.set_title("paper", fontsize=10)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


plot_scaling_record = plot_scaling   # the name 09 (figures.step_figures) calls


def _k_axis(ax, ks: Sequence[int]) -> None:
    """Log x axis with a plain tick at every k."""
    ax.set_xscale("log")
    ax.minorticks_off()
    if ks:
        ax.set_xticks(list(ks), [str(k) for k in ks])


# --------------------------------------------------------------------------------------------- tensors
class TensorImages(torch.utils.data.Dataset):
    """uint8 ``[N,3,H,W]`` images with labels as a dataset of ``(PIL image, label)`` (what
    ``classify.train_classifier`` reads)."""

    def __init__(self, images: torch.Tensor, labels):
        self.images, self.labels = images, [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i].permute(1, 2, 0).numpy()), self.labels[i]


def synthetic_only_check(out_dir: str | os.PathLike, real: tuple, synthetic: tuple, test: tuple,
                         num_classes: int, recipe: str = "miniature", image_size: int | None = None,
                         seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Real vs synthetic-only top-1 on the real test set with the kit's classifier recipe (the one 04
    uses), one classifier each (``(images, labels)`` tuples). Returns ``{"real", "synthetic", "gap"}`` in
    %; the classifiers are kept under ``out_dir`` (a rerun reuses them)."""
    rec = load_recipe(recipe, image_size=image_size)
    test_set = TensorImages(*test)
    acc = {}
    for name, (x, y) in {"real": real, "synthetic": synthetic}.items():
        m = train_classifier(Path(out_dir) / name, TensorImages(x, y), test_set, num_classes, rec, seed=seed,
                             device=device, info={"source": name})
        acc[name] = 100.0 * float(m["top1"])  # top1 is a fraction
    return {**acc, "gap": acc["real"] - acc["synthetic"]}


# --------------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Train 04's classifiers of a run folder outside the notebook, e.g. on several GPUs / processes:

        accelerate launch --num_processes 2 -m realfake_utils.classify --run-dir runs/digits --seeds 0 1 2

    ``--sources all``: the Tables 1-3 runs of 03's record (same folders and resumption as
    04_train_classifier, which then reads them back); ``--sources real``: the real-only runs. Per-device
    batch = the recipe's global batch / processes (the same samples and steps per epoch as one process).
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m realfake_utils.classify", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--recipe", default="miniature")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--recipe-overrides", default="{}", help="JSON dict, e.g. '{\"epochs\": 2}'")
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--sources", choices=("all", "real"), default="all")
    p.add_argument("--pretrained-path", default="")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.run_dir)
    manifest = root / "artifacts" / "data" / "manifest.csv"
    recipe = load_recipe(args.recipe, image_size=args.image_size, **json.loads(args.recipe_overrides))
    if args.sources == "real":
        specs = [RunSpec("real", [Source("real", str(manifest))], seed=s, table="table1") for s in args.seeds]
    else:
        specs, missing = plan_runs(SynthesisRecord.load(root), root, args.seeds)
        for m in missing:
            print("CANNOT RUN", m)
        specs = list({s.name: s for s in specs}.values())
    return run_experiments(specs, manifest, root / "artifacts" / "classifiers", recipe, device=args.device,
                           pretrained_path=args.pretrained_path, verbose=_is_main_process())


if __name__ == "__main__":
    main()
