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
    <out_dir>/metrics.json    top-1 / top-5 / per-class accuracy / confusion matrix / time (done marker)

A killed run resumes from ``last.pt``; every epoch's randomness (shuffle, augmentation, mixup) is
seeded from (seed, epoch), so a resumed run ends with the same weights as an uninterrupted one.
Multi-GPU goes through ``accelerate`` (``Accelerator.prepare``), which is a no-op single process on CPU.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import yaml
from PIL import Image

from .data import resize_center_crop
from .params import REPO_ROOT
from .rundir import atomic_path, confine, read_json, unit_finished, write_json

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
                         ("min_lr", 0.0)):
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
    if small == "auto":
        small = recipe["train_size"] <= 24
    if small:
        _small_input_stem(net)
    return Classifier(net, recipe["test_size"])


def _small_input_stem(net: nn.Module) -> None:
    """Stride-1 stem without max-pool (the CIFAR variant of a ResNet) for 16-64 px inputs."""
    conv = net.conv1[0] if isinstance(net.conv1, nn.Sequential) else net.conv1
    conv.stride = (1, 1)
    net.maxpool = nn.Identity()


# --------------------------------------------------------------------------------------------- data
def read_image_set(set_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a synthetic or retrieved set (``manifest.jsonl``: file, label, class_name, ...), with
    ``path`` made absolute. Same format as ``synthesize.read_synthetic_manifest``."""
    set_dir = Path(set_dir)
    manifest = set_dir / "manifest.jsonl"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} does not exist (an image set is a folder with manifest.jsonl)")
    rows = []
    for line in manifest.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            row["path"] = str(confine(set_dir, str(row["file"]), what=f"{manifest}: file"))  # no ../ or /abs
            rows.append(row)
    return rows


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
            from .data import read_manifest
            return [r for r in read_manifest(self.path) if r["split"] == split]
        return read_image_set(self.path)


def real_dataset(manifest: str | os.PathLike, split: str, image_size: int | None):
    """The real ``split`` of the data manifest as (PIL, label) through ``data.ImageDataset``."""
    from .data import ImageDataset, read_manifest

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
    batch_size = min(int(recipe["batch_size"]), len(data))
    drop_last = mixup_on or len(data) > batch_size
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
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            if recipe.get("channels_last") and dev == "cuda":
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
        elapsed += time.time() - t0
        history.append({"epoch": epoch + 1, "loss": total / max(count, 1),
                        "lr": optimizer.param_groups[0]["lr"]})
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
               "n_train": len(train_set), "train_time_s": elapsed, "history": history}
    if test_set is not None:
        metrics.update(evaluate(unwrapped, test_set, num_classes, recipe, device=dev))
    if accelerator.is_main_process:
        with atomic_path(out_dir / "model.pt") as tmp:
            torch.save({"model": unwrapped.state_dict(), "recipe": recipe, "num_classes": num_classes,
                        "class_names": list(class_names or [])}, tmp)
        write_json(metrics_path, metrics)
    return metrics


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


def evaluate(model: Classifier, test_set, num_classes: int, recipe: dict[str, Any],
             device: str = "cpu", allowed: Sequence[int] | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on a (PIL, label) dataset, with the recipe's eval transform."""
    _, test_tf = build_transforms(recipe)
    loader = torch.utils.data.DataLoader(Transformed(test_set, test_tf), batch_size=256, shuffle=False,
                                         num_workers=recipe.get("num_workers", 0))
    logits, ys = [], []
    for x, y in loader:  # streamed: an ImageNet-size test set never sits in memory at once
        logits.append(predict_logits(model, x, device=device))
        ys.append(y)
    return accuracy_metrics(torch.cat(logits), torch.cat(ys), num_classes, allowed)


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
    """One classifier of a sweep: ``row`` names the table row (e.g. 'real', 'synthetic',
    'real+synthetic'); ``sources`` are the training sets; ``k`` the synthetic scale (0 for real only)."""
    row: str
    sources: list[Source]
    seed: int = 0
    k: int = 0
    table: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        tag = "".join(c if c.isalnum() or c in "-_+." else "_" for c in self.row)
        return f"{tag}__k{self.k}__s{self.seed}"


def _set_complete(set_dir: Path) -> bool:
    if not (set_dir / "synthesis.json").exists():  # a hand-made set (tests, retrieval): manifest only
        return True
    from .synthesize import set_status

    return set_status(set_dir)["complete"]


def discover_sets(synthetic_root: str | os.PathLike) -> dict[str, dict[int, Path]]:
    """``artifacts/synthetic/<variant>/k<k>/manifest.jsonl`` -> {variant: {k: folder}} (only finished
    sets: every planned image on disk, see ``synthesize.set_status``; a set still being written by a
    running or killed synthesis is left out)."""
    root = Path(synthetic_root)
    out: dict[str, dict[int, Path]] = {}
    if not root.exists():
        return out
    for manifest in sorted(root.glob("*/k*/manifest.jsonl")):
        kdir = manifest.parent
        try:
            k = int(kdir.name[1:])
        except ValueError:
            continue
        if manifest.stat().st_size > 0 and _set_complete(kdir):
            out.setdefault(kdir.parent.name, {})[k] = kdir
    return out


def run_experiments(specs: Iterable[RunSpec], manifest: str | os.PathLike, out_root: str | os.PathLike,
                    recipe: dict[str, Any], device: str = "auto", pretrained_path: str = "",
                    verbose: bool = True) -> list[dict[str, Any]]:
    """Train every run of ``specs`` (resumable: finished runs are read back, half-done ones resume) and
    return one flat record per run: row, table, k, seed, source, top1, top5, time, path."""
    from .data import class_names as manifest_class_names
    from .data import read_manifest

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
        done = (out_dir / "metrics.json").exists()
        t0 = time.time()
        if not done:
            parts = []
            for src in spec.sources:
                key = f"{src.kind}:{src.path}"
                if key not in cache:
                    ds = source_dataset(src, size)
                    _check_labels(ds, src, names)
                    cache[key] = Cached(ds) if in_memory else ds
                parts.append(cache[key])
            train_set = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
        else:
            train_set = None
        info = {"row": spec.row, "table": spec.table, "k": spec.k, "seed": spec.seed,
                "source": "+".join(s.kind for s in spec.sources),
                "sets": [str(s.path) for s in spec.sources], **spec.extra}
        m = train_classifier(out_dir, train_set, test_set, len(names), recipe, seed=spec.seed,
                             device=device, pretrained_path=pretrained_path, info=info,
                             class_names=names, cache=False) if not done else read_json(out_dir / "metrics.json")
        if verbose:
            state = "cached" if done else f"{time.time() - t0:.1f}s"
            print(f"[{i}/{len(specs)}] {spec.name}: top-1 {m['top1']:.4f} top-5 {m['top5']:.4f} ({state})",
                  flush=True)
        records.append({"name": spec.name, "row": spec.row, "table": spec.table, "k": spec.k,
                        "seed": spec.seed, "source": info["source"], "top1": m["top1"], "top5": m["top5"],
                        "per_class": m["per_class"], "n_train": m["n_train"],
                        "train_time_s": m["train_time_s"], "path": str(out_dir)})
    return records


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


def summarise(records: Sequence[dict[str, Any]], keys: Sequence[str] = ("table", "row", "k"),
              metric: str = "top1") -> list[dict[str, Any]]:
    """Mean, sample std, min, max and n over seeds for each group of ``keys``."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(float(r[metric]))
    out = []
    for key, vals in groups.items():
        a = np.asarray(vals)
        out.append({**dict(zip(keys, key)), "mean": float(a.mean()),
                    "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                    "min": float(a.min()), "max": float(a.max()), "n": int(len(a)), "metric": metric})
    return out


# --------------------------------------------------------------------------------------------- paper tables
# Numbers of the paper this module could verify (abstract of arXiv:2310.10402): ImageNet-1K, ResNet-50,
# synthetic data only, top-1 % at scale k. Other table values are left out rather than guessed.
PAPER_SYNTHETIC_ONLY_IN1K = {1: 70.9, 10: 76.0}


def run_tag(kind: str, set_name: str = "") -> str:
    return {"real": "real", "synthetic": set_name, "real+synthetic": f"real+{set_name}",
            "retrieved": f"retrieved-{set_name or 'set'}"}[kind]


def plan_runs(manifest: str | os.PathLike, synthetic_root: str | os.PathLike, default_set: str,
              ablation_sets: Sequence[str], ablation_k: int, scale_k: Sequence[int], seeds: Sequence[int],
              retrieved_set: str = "") -> tuple[list[RunSpec], dict[str, list[dict]], list[str]]:
    """The runs of Tables 1-3 that the synthetic sets on disk allow.

    Returns (specs without duplicates, tables {table: [{label, row, k}]}, missing: one message per row
    that cannot run because its synthetic set is absent). Table 1: real, synthetic (default set at
    ``ablation_k``), real + synthetic. Table 2: every ablation set at ``ablation_k``, synthetic only.
    Table 3 / Fig. 2: the default set at each k of ``scale_k``, synthetic only and real + synthetic.
    """
    sets = discover_sets(synthetic_root)
    specs: dict[str, RunSpec] = {}
    tables: dict[str, list[dict]] = {"table1": [], "table2": [], "table3": []}
    missing: list[str] = []

    def add(table: str, label: str, kind: str, set_name: str = "", k: int = 0, hint: str = "") -> None:
        sources = []
        if kind in ("real", "real+synthetic"):
            sources.append(Source("real", str(manifest)))
        if kind in ("synthetic", "real+synthetic"):
            folder = sets.get(set_name, {}).get(k)
            if folder is None:
                missing.append(f"{table} row '{label}': no synthetic set {Path(synthetic_root) / set_name / f'k{k}'}"
                               f" - {hint}")
                return
            sources.append(Source("synthetic", str(folder), k=k, name=set_name))
        if kind == "retrieved":
            sources.append(Source("retrieved", retrieved_set, k=k, name="retrieved"))
        row = run_tag(kind, set_name)
        tables[table].append({"label": label, "row": row, "k": k})
        for seed in seeds:
            spec = RunSpec(row, sources, seed=seed, k=k)
            specs.setdefault(spec.name, spec)

    k1 = int(ablation_k)
    hint_default = "run 03_synthesize with default_row (and ablation_k / scale_k) to write it"
    add("table1", "real only", "real")
    add("table1", "synthetic only", "synthetic", default_set, k1, hint_default)
    add("table1", "real + synthetic", "real+synthetic", default_set, k1, hint_default)
    if retrieved_set:
        add("table1", "retrieved real", "retrieved", "", 0)
    for name in ablation_sets:
        add("table2", name, "synthetic", name, k1, "03_synthesize parameter ablation_rows")
    for k in scale_k:
        add("table3", f"synthetic k={k}", "synthetic", default_set, int(k), "03_synthesize parameter scale_k")
        add("table3", f"real + synthetic k={k}", "real+synthetic", default_set, int(k),
            "03_synthesize parameter scale_k")
    return list(specs.values()), tables, missing


def table_summary(records: Sequence[dict[str, Any]], tables: dict[str, list[dict]],
                  metric: str = "top1") -> dict[str, list[dict[str, Any]]]:
    """Per table, one line per row: label, n_train, mean / std / min / max over seeds (in %)."""
    summ = {(s["row"], s["k"]): s for s in summarise(records, keys=("row", "k"), metric=metric)}
    n_train = {(r["row"], r["k"]): r["n_train"] for r in records}
    out = {}
    for table, rows in tables.items():
        lines = []
        for r in rows:
            s = summ.get((r["row"], r["k"]))
            if s is None:
                continue
            lines.append({"label": r["label"], "row": r["row"], "k": r["k"], "n": s["n"],
                          "n_train": n_train[(r["row"], r["k"])], "mean": 100 * s["mean"],
                          "std": 100 * s["std"], "min": 100 * s["min"], "max": 100 * s["max"]})
        out[table] = lines
    return out


def format_table(lines: Sequence[dict[str, Any]], title: str = "") -> str:
    out = [title] if title else []
    out.append(f"{'row':<34} {'n_train':>7} {'top-1 % mean':>12} {'+-std':>6} {'[min, max]':>14} seeds")
    for ln in lines:
        out.append(f"{ln['label']:<34} {ln['n_train']:>7} {ln['mean']:>12.2f} {ln['std']:>6.2f} "
                   f"[{ln['min']:5.1f}, {ln['max']:5.1f}] {ln['n']:>3}")
    return "\n".join(out)


def plot_table(lines: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], title: str):
    """Bars of the mean over seeds, error bars of the std, every seed as a dot."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(lines) + 1.5), 3.6))
    for i, ln in enumerate(lines):
        ax.bar(i, ln["mean"], yerr=ln["std"], color="C0" if "real" not in ln["row"] else "C1",
               alpha=0.75, capsize=4)
        vals = [100 * r["top1"] for r in records if r["row"] == ln["row"] and r["k"] == ln["k"]]
        ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(lines)), [ln["label"] for ln in lines], rotation=25, ha="right", fontsize=8)
    lo = min([ln["min"] for ln in lines] or [0])
    ax.set_ylim(max(0, lo - 10), 100)
    ax.set_ylabel("top-1 on the real test split (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_scaling(lines: Sequence[dict[str, Any]], real_line: dict[str, Any] | None, title: str = "",
                 paper: dict[int, float] | None = None):
    """Fig. 2: accuracy against k (synthetic only, real + synthetic) with the real-data line; the paper's
    verified ImageNet-1K points in a second panel."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if paper else 1, figsize=(9 if paper else 5, 3.6), squeeze=False)
    ax = axes[0, 0]
    for prefix, color in (("synthetic k=", "C0"), ("real + synthetic k=", "C2")):
        pts = sorted((ln["k"], ln["mean"], ln["std"]) for ln in lines if ln["label"].startswith(prefix))
        if pts:
            k, m, s = map(np.asarray, zip(*pts))
            ax.errorbar(k, m, yerr=s, marker="o", capsize=4, color=color, label=prefix.rstrip(" k="))
    if real_line:
        ax.axhline(real_line["mean"], color="C1", ls="--", label="real only")
        ax.axhspan(real_line["mean"] - real_line["std"], real_line["mean"] + real_line["std"], color="C1",
                   alpha=0.15)
    _k_axis(ax, sorted({ln["k"] for ln in lines}))
    ax.set_xlabel("k (synthetic images per real training image)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "this run (mean +- std over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    if paper:
        ax2 = axes[0, 1]
        ks = sorted(paper)
        ax2.plot(ks, [paper[k] for k in ks], "o-", color="C0", label="synthetic only")
        _k_axis(ax2, ks)
        ax2.set_xlabel("k")
        ax2.set_ylabel("top-1 (%)")
        ax2.set_title("paper: ImageNet-1K, ResNet-50 (abstract)", fontsize=10)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _k_axis(ax, ks: Sequence[int]) -> None:
    """Log x axis with a plain tick at every k."""
    ax.set_xscale("log")
    ax.minorticks_off()
    if ks:
        ax.set_xticks(list(ks), [str(k) for k in ks])


# --------------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the Tables 1-3 sweep of a run folder outside the notebook, e.g. on several GPUs:

        accelerate launch -m realfake_utils.classify --run-dir runs/imagenette --recipe imagenette \\
            --default-set lora-dm-vg-lp --seeds 0

    Same runs, folders and resumption as ``04_train_classifier`` (which then only reads them back).
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m realfake_utils.classify", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--recipe", default="miniature")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--default-set", default="lora-dm-vg-lp")
    p.add_argument("--ablation-sets", nargs="*", default=[])
    p.add_argument("--ablation-k", type=int, default=1)
    p.add_argument("--scale-k", type=int, nargs="*", default=[1])
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--pretrained-path", default="")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    root = Path(args.run_dir)
    manifest = root / "artifacts" / "data" / "manifest.csv"
    recipe = load_recipe(args.recipe, image_size=args.image_size)
    specs, _, missing = plan_runs(manifest, root / "artifacts" / "synthetic", args.default_set,
                                  args.ablation_sets, args.ablation_k, args.scale_k, args.seeds)
    for m in missing:
        print("CANNOT RUN", m)
    return run_experiments(specs, manifest, root / "artifacts" / "classifiers", recipe, device=args.device,
                           pretrained_path=args.pretrained_path)


if __name__ == "__main__":
    main()
