"""SSCD copy retrieval (Pizzi et al. 2022, "A Self-Supervised Descriptor for Image Copy Detection"),
as used in Real-Fake Fig. 4: for every synthetic image, the most similar real training images.

- :func:`load_descriptor` - a TorchScript descriptor (``sscd_disc_mixup.torchscript.pt``,
  ``sscd_disc_large.torchscript.pt``, or the miniature trained here) from a path, after checking its
  SHA-256 against the value in the preset: TorchScript runs code, so an unexpected file is refused.
- :func:`preprocess` / :func:`compute_descriptors` - SSCD's preprocessing (ImageNet normalisation,
  short side resized to 288 keeping the aspect ratio, or a 320x320 square) and L2-normalised descriptors.
- :func:`topk_similar` - top-k cosine similarities, computed in chunks on the available device;
  :func:`background_normalize` - SSCD's score normalisation (Eq. 8 of the SSCD paper: subtract beta
  times the query's mean similarity to its nearest neighbours, ranks ``first..last``, in a background
  set of unrelated images; SSCD's reported setting is beta = 1, ranks 0..2, "1.00[0,2]");
  :func:`copy_stats`, :func:`plot_similarity_histogram`, :func:`plot_top_matches` (Fig. 4 analog).
- Miniature: :class:`TinyDescriptor` trained self-supervised (:func:`train_miniature_descriptor`:
  two augmented views, InfoNCE as SimCLR / SSCD, optional KoLeo entropy term as SSCD), exported
  with ``torch.jit.script`` and loaded back through :func:`load_descriptor`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data, synthesize as syn
from .records import Record
from .rundir import atomic_path, read_json, write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REPLICATION_THRESHOLD = 0.5  # Somepalli et al. 2023: "replication" above 0.5 SSCD similarity
COPY_THRESHOLD = 0.75  # SSCD: a copy above 0.75 (about 90% precision on DISC2021)
THRESHOLDS = (REPLICATION_THRESHOLD, COPY_THRESHOLD)


def run_root(run: Any) -> Path:
    """The run folder of a ``RunDir`` or of a path (a ``pathlib.Path``'s own ``.root`` is ``/``)."""
    return Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.root)


class ChecksumError(ValueError):
    """A descriptor file whose SHA-256 is not the expected one (or no expected value was given)."""


def _device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if (device or "auto") == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------------------------
# Loading a descriptor
# --------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_descriptor(path: str | os.PathLike, sha256: str, device: str | torch.device = "cpu"):
    """``torch.jit.load`` a TorchScript descriptor, only if the file's SHA-256 equals ``sha256``.

    The check happens before loading: TorchScript archives carry code. A mismatch (or an empty
    expected value) raises :class:`ChecksumError` naming both hashes and the preset key to set.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SSCD descriptor {path} does not exist (download sscd_disc_mixup."
                                "torchscript.pt from the SSCD repository, or leave sscd_model empty "
                                "for the miniature descriptor)")
    actual = sha256_file(path)
    expected = (sha256 or "").strip().lower()
    if not expected:
        raise ChecksumError(f"no SHA-256 given for {path}; its SHA-256 is {actual}. Set sscd_sha256: "
                            f"{actual} in the preset if you trust this file (TorchScript runs code)")
    if actual != expected:
        raise ChecksumError(f"SHA-256 mismatch for {path}: expected {expected}, file has {actual}. "
                            "Refusing to load it (TorchScript runs code)")
    with warnings.catch_warnings():  # "torch.jit is deprecated": SSCD ships TorchScript files
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path), map_location=_device(device))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Descriptors
# --------------------------------------------------------------------------------------------------
def preprocess(images: torch.Tensor, size: int = 288, mode: str = "short_side") -> torch.Tensor:
    """SSCD preprocessing of a batch: uint8 ``[N,3,H,W]`` (or float in [0,1]) -> ImageNet-normalised
    float. ``mode="short_side"``: short side resized to ``size`` keeping the aspect ratio (SSCD's
    default, 288); ``"square"``: resized to ``size x size`` (SSCD's alternative, 320)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    h, w = x.shape[-2:]
    if mode == "short_side":
        scale = size / min(h, w)
        out = (max(1, round(h * scale)), max(1, round(w * scale)))
    elif mode == "square":
        out = (size, size)
    else:
        raise ValueError(f"unknown SSCD preprocessing mode '{mode}': use 'short_side' or 'square'")
    if out != (h, w):
        x = F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=out[0] < h)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def compute_descriptors(model, images: torch.Tensor, size: int = 288, mode: str = "short_side",
                        batch_size: int = 64, device: str | torch.device = "auto") -> torch.Tensor:
    """L2-normalised descriptors ``[N, D]`` (float32, CPU) of uint8 images ``[N,3,H,W]``."""
    dev = _device(device)
    model = model.to(dev)
    out = []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size].to(dev), size, mode)
        out.append(F.normalize(model(x).float(), dim=1).cpu())
    if not out:
        return torch.zeros((0, 0))
    return torch.cat(out)


def center(descriptors: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """SSCD's "PCA,L2norm" codec without the rotation: subtract a mean descriptor (of the reference
    set), then L2-normalise again. Cosines then measure similarity beyond what all images share."""
    return F.normalize(descriptors.float() - mean.float().view(1, -1), dim=1)


@torch.no_grad()
def topk_similar(query: torch.Tensor, ref: torch.Tensor, k: int = 5, chunk_size: int = 1024,
                 device: str | torch.device = "auto", exclude_self: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities of each query among ``ref`` (both ``[N, D]``, normalised here),
    in chunks of ``chunk_size`` queries on ``device``. Returns (sims ``[Q, k]``, indices ``[Q, k]``),
    best first, on CPU. ``exclude_self``: query i is ref i (a set against itself)."""
    dev = _device(device)
    k = min(k, len(ref) - int(exclude_self))
    r = F.normalize(ref.float(), dim=1).to(dev)
    sims, idx = [], []
    for i in range(0, len(query), chunk_size):
        q = F.normalize(query[i:i + chunk_size].float(), dim=1).to(dev)
        s = q @ r.T
        if exclude_self:
            rows = torch.arange(len(q), device=dev)
            s[rows, rows + i] = -float("inf")
        v, j = s.topk(k, dim=1)
        sims.append(v.cpu())
        idx.append(j.cpu())
    return torch.cat(sims), torch.cat(idx)


def background_normalize(sims: torch.Tensor, query: torch.Tensor, background: torch.Tensor,
                         beta: float = 1.0, first: int = 0, last: int = 2,
                         chunk_size: int = 1024, device: str | torch.device = "auto") -> torch.Tensor:
    """SSCD score normalisation: ``s(q, r) - beta * mean_{n=first..last} s(q, b_n(q))`` where
    ``b_n(q)`` is the query's n-th nearest neighbour in a ``background`` set of images known not to
    be copies (here the held-out real test split). A query similar to everything (a plain,
    generic image) gets its scores lowered; a real copy stands out."""
    bg, _ = topk_similar(query, background, k=last + 1, chunk_size=chunk_size, device=device)
    return sims - beta * bg[:, first:last + 1].mean(1, keepdim=True)


def copy_stats(top1: torch.Tensor | np.ndarray, thresholds: Sequence[float] = THRESHOLDS
               ) -> dict[str, Any]:
    """Share (and count) of synthetic images whose top-1 similarity exceeds each threshold."""
    t = np.asarray(top1, dtype=np.float64)
    out: dict[str, Any] = {"n": int(len(t)), "mean_top1": float(t.mean()) if len(t) else float("nan"),
                           "median_top1": float(np.median(t)) if len(t) else float("nan"),
                           "max_top1": float(t.max()) if len(t) else float("nan")}
    for th in thresholds:
        out[f"share_above_{th:g}"] = float((t > th).mean()) if len(t) else 0.0
        out[f"count_above_{th:g}"] = int((t > th).sum())
    return out


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def plot_similarity_histogram(top1: dict[str, Any], thresholds: Sequence[float] = THRESHOLDS,
                              title: str = "Top-1 similarity of synthetic images to real training images"):
    """Histogram(s) of top-1 similarities (``{label: values}``) with the thresholds marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bins = np.linspace(-0.2, 1.0, 49)
    for label, vals in top1.items():
        ax.hist(np.clip(np.asarray(vals, dtype=float), -0.2, 1.0), bins=bins, alpha=0.55, label=label)
    for th, ls in zip(thresholds, ("--", ":")):
        ax.axvline(th, color="k", ls=ls, lw=1, label=f"threshold {th:g}")
    ax.set_xlabel("SSCD cosine similarity of the top-1 match")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return fig


def _hwc(img) -> np.ndarray:
    a = img.detach().cpu() if hasattr(img, "detach") else torch.as_tensor(np.asarray(img))
    if a.dtype != torch.uint8:
        a = (a.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return a.permute(1, 2, 0).numpy()


def plot_top_matches(query_images: torch.Tensor, ref_images: torch.Tensor, sims: torch.Tensor,
                     idx: torch.Tensor, n: int = 3, k: int = 3, query_label: str = "synthetic"):
    """Fig. 4 analog: the ``n`` queries with the highest top-1 similarity (rows), each followed by
    its ``k`` most similar reference images with their similarities."""
    import matplotlib.pyplot as plt

    order = torch.argsort(sims[:, 0], descending=True)[:n].tolist()
    k = min(k, sims.shape[1])
    fig, axes = plt.subplots(len(order), k + 1, figsize=(1.6 * (k + 1), 1.75 * len(order)), squeeze=False)
    for r, qi in enumerate(order):
        axes[r, 0].imshow(_hwc(query_images[qi]))
        axes[r, 0].set_title(f"{query_label} #{qi}", fontsize=7)
        for c in range(k):
            axes[r, c + 1].imshow(_hwc(ref_images[int(idx[qi, c])]))
            axes[r, c + 1].set_title(f"real #{int(idx[qi, c])}: {float(sims[qi, c]):.2f}", fontsize=7)
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Miniature descriptor, trained here self-supervised
# --------------------------------------------------------------------------------------------------
class TinyDescriptor(nn.Module):
    """A small CNN with GeM pooling (as SSCD's ResNet-50 + GeM) and a linear projection; input: an
    ImageNet-normalised batch; output: L2-normalised descriptors ``[N, dim]``."""

    def __init__(self, dim: int = 64, width: int = 32, gem_p: float = 3.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        self.gem_p = gem_p
        self.proj = nn.Linear(4 * w, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).clamp(min=1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)
        return F.normalize(self.proj(h), dim=1)


def augment(x: torch.Tensor, generator: torch.Generator | None = None,
            min_scale: float = 0.55) -> torch.Tensor:
    """Batched random augmentations of float images in [0,1] ``[N,3,S,S]`` (per-sample parameters):
    random resized crop (area ``min_scale``..1) with horizontal flip, brightness / contrast /
    saturation jitter, and pixel noise (a stand-in for SSCD's blur / JPEG)."""
    n, dev = len(x), x.device

    def u(lo, hi, *shape):
        return torch.rand((n, *shape), generator=generator).to(dev) * (hi - lo) + lo

    s = u(min_scale, 1.0).sqrt()  # side ratio of the crop
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(dev)
    tx, ty = (u(-1, 1) * (1 - s)), (u(-1, 1) * (1 - s))
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = s * flip, s
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    y = y * u(0.7, 1.3, 1, 1, 1)  # brightness
    m = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - m) * u(0.7, 1.3, 1, 1, 1) + m  # contrast
    g = y.mean(dim=1, keepdim=True)
    y = (y - g) * u(0.5, 1.5, 1, 1, 1) + g  # saturation
    y = y + 0.03 * torch.randn(y.shape, generator=generator).to(dev)
    return y.clamp(0, 1)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent loss for two views ``[N, D]`` (L2-normalised)."""
    z = torch.cat([z1, z2])
    s = z @ z.T / temperature
    s.fill_diagonal_(-float("inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(s, target)


def koleo(z: torch.Tensor) -> torch.Tensor:
    """KoLeo differential-entropy regulariser used by SSCD: -mean log(distance to nearest neighbour)."""
    d = torch.cdist(z, z)
    d.fill_diagonal_(float("inf"))
    return -torch.log(d.min(dim=1).values + 1e-8).mean()


def train_miniature_descriptor(images: torch.Tensor, out_path: str | os.PathLike, size: int = 32,
                               dim: int = 64, width: int = 32, steps: int = 200, batch_size: int = 128,
                               lr: float = 5e-3, temperature: float = 0.1, entropy_weight: float = 0.0,
                               seed: int = 0, device: str | torch.device = "auto",
                               log_every: int = 50) -> tuple[Path, str]:
    """Train :class:`TinyDescriptor` on ``images`` (uint8 ``[N,3,H,W]``) to map two augmentations of
    an image together and apart from the other images (InfoNCE; plus ``entropy_weight`` x KoLeo),
    export it with ``torch.jit.script`` to ``out_path`` (atomically) and return (path, SHA-256).

    Cached: if ``out_path`` and its ``.json`` (configuration, SHA-256, number of images, a hash of the
    images) match, nothing is trained. The SHA-256 is recorded in the ``.json`` at training time; a
    preset that ships a real SSCD model gives it in ``sscd_sha256`` instead.
    """
    out_path = Path(out_path)
    meta_path = out_path.with_suffix(".json")
    data_hash = hashlib.sha1(images.contiguous().numpy().tobytes()).hexdigest()
    cfg = {"size": size, "dim": dim, "width": width, "steps": steps, "batch_size": batch_size, "lr": lr,
           "temperature": temperature, "entropy_weight": entropy_weight, "seed": seed,
           "n_images": int(len(images)), "images_sha1": data_hash}
    if out_path.exists() and meta_path.exists():
        meta = read_json(meta_path)
        if meta.get("config") == cfg and meta.get("sha256") == sha256_file(out_path):
            return out_path, meta["sha256"]
    dev = _device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyDescriptor(dim, width).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    x_all = F.interpolate(images.float() / 255.0, size=(size, size), mode="bilinear",
                          align_corners=False, antialias=images.shape[-1] > size).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    bs = min(batch_size, len(images))
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randperm(len(images), generator=gen)[:bs]
        x = x_all[idx].to(dev)
        v1 = (augment(x, gen) - mean) / std
        v2 = (augment(x, gen) - mean) / std
        z1, z2 = model(v1), model(v2)
        loss = info_nce(z1, z2, temperature)
        if entropy_weight:
            loss = loss + entropy_weight * koleo(torch.cat([z1, z2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"descriptor step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.3f}")
    model = model.eval().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(stable_torchscript_bytes(scripted))
    sha = sha256_file(out_path)
    write_json(meta_path, {"config": cfg, "sha256": sha, "final_loss": float(np.mean(losses[-10:]))
                           if losses else None})
    return out_path, sha


# --------------------------------------------------------------------------------------------------
# SSCD's published architectures with random weights (the paper-shape run: no download, no hub)
# --------------------------------------------------------------------------------------------------
SSCD_ARCHS = {  # SSCD model zoo (Pizzi et al. 2022, facebookresearch/sscd-copy-detection README): trunk, dim
    "disc_large": ("resnext101_32x4d", 1024),   # sscd_disc_large: ResNeXt101 32x4d, GeM, 1024-d (Sec. 4.5, Apx. G.4)
    "disc_mixup": ("resnet50", 512),            # sscd_disc_mixup: ResNet-50, GeM, 512-d (an option)
}


class SSCDShaped(nn.Module):
    """SSCD's model layout: a ResNet / ResNeXt trunk (timm, no classifier head), GeM pooling (p = 3),
    a linear projection to the descriptor size, L2 normalisation. Input: an ImageNet-normalised batch
    (:func:`preprocess`), output ``[N, dim]``, as the released TorchScript files."""

    def __init__(self, trunk: str = "resnext101_32x4d", dim: int = 1024, gem_p: float = 3.0):
        super().__init__()
        import timm

        self.backbone = timm.create_model(trunk, pretrained=False, num_classes=0, global_pool="")
        self.gem_p = gem_p
        self.embeddings = nn.Linear(self.backbone.num_features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone.forward_features(x)
        h = h.clamp(min=1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)
        return F.normalize(self.embeddings(h), dim=1)


def build_sscd_shapes(out_path: str | os.PathLike, arch: str = "disc_large", seed: int = 0) -> tuple[Path, str]:
    """An SSCD descriptor of the published architecture ``arch`` (:data:`SSCD_ARCHS`; ``disc_large`` is
    the paper's, Sec. 4.5) with random weights, exported with ``torch.jit.script`` to ``out_path`` as the
    released ``sscd_*.torchscript.pt`` files are, so :func:`load_descriptor` (with the SHA-256 check)
    reads it. Returns (path, SHA-256). Byte-identical for the same ``arch`` and ``seed``; kept when the
    file and its ``.json`` already match."""
    if arch not in SSCD_ARCHS:
        raise ValueError(f"unknown SSCD architecture '{arch}': one of {sorted(SSCD_ARCHS)}")
    out_path, (trunk, dim) = Path(out_path), SSCD_ARCHS[arch]
    meta_path = out_path.with_suffix(".json")
    cfg = {"arch": arch, "trunk": trunk, "dim": dim, "seed": seed, "weights": "random"}
    if out_path.exists() and meta_path.exists():
        meta = read_json(meta_path)
        if meta.get("config") == cfg and meta.get("sha256") == sha256_file(out_path):
            return out_path, meta["sha256"]
    torch.manual_seed(seed)
    model = SSCDShaped(trunk, dim).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(stable_torchscript_bytes(scripted))
    sha = sha256_file(out_path)
    write_json(meta_path, {"config": cfg, "sha256": sha})
    return out_path, sha


def stable_torchscript_bytes(scripted) -> bytes:
    """A TorchScript archive whose bytes depend only on the model: saved through memory (an archive
    written to a path records the file's name, here a temp name), rewritten without the ``.debug_pkl``
    entries (they hold the absolute paths of the source files, so two checkouts would differ) and with
    fixed zip timestamps. ``torch.jit.load`` reads it as usual (debug info only serves error messages)."""
    import zipfile

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            if not info.filename.endswith(".debug_pkl"):
                z.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), src.read(info.filename))
    return out.getvalue()


def recorded_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 recorded beside a miniature descriptor when it was trained (``<path>.json``)."""
    meta = Path(path).with_suffix(".json")
    if not meta.exists():
        raise FileNotFoundError(f"{meta} does not exist: train the miniature descriptor first")
    return json.loads(meta.read_text())["sha256"]


# --------------------------------------------------------------------------------------------------
# Planted copies (tests, and the notebook's sanity check)
# --------------------------------------------------------------------------------------------------
def jpeg(img: torch.Tensor, quality: int = 50) -> torch.Tensor:
    """JPEG round trip of one uint8 image ``[3,H,W]`` through PIL."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1).contiguous()


def near_copies(img: torch.Tensor, crop: float = 0.9, jitter: float = 1.15, saturation: float = 0.8,
                quality: int = 50) -> dict[str, torch.Tensor]:
    """An exact copy and near copies of one uint8 image ``[3,H,W]``: centre crop (``crop`` of each
    side) resized back, colour jitter (brightness x ``jitter``, saturation x ``saturation``), JPEG
    at ``quality``."""
    h, w = img.shape[-2:]
    ch, cw = max(1, round(h * crop)), max(1, round(w * crop))
    top, left = (h - ch) // 2, (w - cw) // 2
    cropped = F.interpolate(img[None, :, top:top + ch, left:left + cw].float(), size=(h, w),
                            mode="bilinear", align_corners=False)[0]
    x = img.float()
    grey = x.mean(0, keepdim=True)
    jit = ((x - grey) * saturation + grey) * jitter
    to8 = lambda t: t.round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    return {"exact": img.clone(), "crop": to8(cropped), "jitter": to8(jit), "jpeg": jpeg(img, quality)}


# --------------------------------------------------------------------------------------------------
# Calibration on planted copies, and the step's record
# --------------------------------------------------------------------------------------------------
CALIBRATION_KINDS = ("crop", "jitter", "jpeg")   # the transformed copies; exact copies are trivially 1.0


def planted_copies(images: torch.Tensor, n_sources: int, seed: int = 0,
                   kinds: Sequence[str] = CALIBRATION_KINDS) -> tuple[torch.Tensor, list[int], list[str]]:
    """Near copies (:func:`near_copies` of ``kinds``) of ``n_sources`` random reference images:
    (images, source index of each, kind of each)."""
    rng = np.random.default_rng(seed)
    sources = rng.choice(len(images), size=min(n_sources, len(images)), replace=False).tolist()
    out, src, kind = [], [], []
    for s in sources:
        for k, img in near_copies(images[s]).items():
            if k in kinds:
                out.append(img)
                src.append(int(s))
                kind.append(k)
    return torch.stack(out), src, kind


@dataclass
class Calibration:
    """The copy threshold where planted copies are told from held-out non-copies at ``target_precision``
    (as SSCD's 0.75 gives about 90 % precision on DISC2021)."""

    threshold: float
    precision: float
    recall: float
    target_precision: float
    achieved: bool
    n_copies: int
    n_noncopies: int
    kinds: list[str]
    recall_by_kind: dict[str, float] = field(default_factory=dict)


def calibrate_threshold(copy_scores, copy_correct, noncopy_scores, target_precision: float = 0.9,
                        kinds: Sequence[str] | None = None) -> Calibration:
    """The lowest threshold whose detections (top-1 score above it) reach ``target_precision``: a
    detection of a planted copy is a true positive when its top-1 match is its own source, a detection
    of a held-out non-copy is a false positive. Recall: share of planted copies detected correctly. If
    no threshold reaches the target, the highest score is used (nothing is flagged; ``achieved`` False)."""
    pos = np.asarray(copy_scores, dtype=float)
    ok = np.asarray(copy_correct, dtype=bool)
    neg = np.asarray(noncopy_scores, dtype=float)
    cands = np.unique(np.concatenate([pos, neg]))
    best = None
    for t in cands[::-1]:  # high to low: recall grows
        tp = int(((pos >= t) & ok).sum())
        fp = int(((pos >= t) & ~ok).sum() + (neg >= t).sum())
        if tp + fp and tp / (tp + fp) >= target_precision:
            best = (float(t), tp / (tp + fp), tp / max(len(pos), 1))
    achieved = best is not None
    if best is None:
        t = float(np.nextafter(cands.max(), np.inf)) if len(cands) else 1.0
        best = (t, float("nan"), 0.0)
    by_kind = {}
    if kinds is not None:
        kinds = list(kinds)
        for k in dict.fromkeys(kinds):
            m = np.array([x == k for x in kinds])
            by_kind[k] = float(((pos[m] >= best[0]) & ok[m]).mean())
    return Calibration(best[0], best[1], best[2], float(target_precision), achieved, int(len(pos)),
                       int(len(neg)), sorted(set(kinds or [])), by_kind)


@dataclass
class SetCopies:
    """One synthetic set against the real training images."""

    n: int
    copy_rate: float          # share above the calibrated threshold
    copies: int
    raw: dict[str, Any]       # copy_stats at the fixed thresholds 0.5 / 0.75
    background_normalized: Optional[dict[str, Any]] = None


@dataclass
class SSCDRecord(Record):
    """Results of ``07_sscd``: the descriptor, its calibration, and each set's copy rate."""

    STEP: ClassVar[str] = "07_sscd"
    descriptor: str
    descriptor_sha256: str
    miniature_descriptor: bool
    preprocess: str
    size: int
    n_reference: int
    n_background: int
    top_k: int
    calibration: Calibration
    planted_top1_recall: dict[str, float]
    heldout_real_top1_median: float
    sets: dict[str, SetCopies]
    stand_in_synthetic: bool
    thresholds: list[float] = field(default_factory=lambda: list(THRESHOLDS))
    score_norm: dict[str, Any] = field(default_factory=dict)

    def descriptor_file(self, run: Any) -> Path:
        """The descriptor's path (stored relative to the run folder when it lies inside it)."""
        p = Path(self.descriptor)
        return p if p.is_absolute() else run_root(run) / p


def set_copies(top1: torch.Tensor, calibration: Calibration, normalized: torch.Tensor | None = None) -> SetCopies:
    """:class:`SetCopies` of a set's top-1 similarities at the calibrated threshold."""
    t = np.asarray(top1, dtype=float)
    n_above = int((t >= calibration.threshold).sum()) if calibration.achieved else 0
    return SetCopies(int(len(t)), n_above / len(t) if len(t) else 0.0, n_above, copy_stats(t),
                     copy_stats(normalized) if normalized is not None else None)


def calibrate(embed, reference: torch.Tensor, d_reference: torch.Tensor, d_noncopies: torch.Tensor,
              n_sources: int = 50, seed: int = 0, target_precision: float = 0.9,
              device: str | torch.device = "auto") -> tuple[Calibration, dict[str, Any]]:
    """Plant near copies (crop, jitter, JPEG) of ``n_sources`` reference images, score each by its
    top-1 similarity among the reference descriptors (correct when that is its own source), score
    the held-out non-copies ``d_noncopies`` likewise, and :func:`calibrate_threshold` at
    ``target_precision``. ``embed`` maps uint8 images to descriptors. Returns the calibration and
    ``{"exact_top1": min similarity of exact copies, "top1_is_source": {kind: share}}``."""
    copies, src, kinds = planted_copies(reference, n_sources, seed, kinds=("exact",) + CALIBRATION_KINDS)
    sims, idx = topk_similar(embed(copies), d_reference, k=1, device=device)
    correct = idx[:, 0].numpy() == np.asarray(src)
    neg = topk_similar(d_noncopies, d_reference, k=1, device=device)[0][:, 0]
    m = np.array([k != "exact" for k in kinds])
    cal = calibrate_threshold(sims[m, 0].numpy(), correct[m], neg.numpy(), target_precision,
                              [k for k in kinds if k != "exact"])
    info = {"exact_top1_min": float(sims[~m, 0].min()),
            "top1_is_source": {k: float(np.mean([c for c, kk in zip(correct, kinds) if kk == k]))
                               for k in dict.fromkeys(kinds)},
            "noncopy_top1": neg}
    return cal, info


class LazyImages:
    """Manifest rows read as uint8 images ``[N,3,H,W]`` only when indexed (an int or a slice), so 07
    never holds a whole split or synthetic set in memory: a paper preset's sets reach ~10^5 images at
    512 px (imagenette: 9 rows x 1x + the full method at 2x, 5x, 10x), tens of GB as one tensor.
    :func:`compute_descriptors` reads it batch by batch."""

    def __init__(self, rows: Sequence[dict], image_size: int):
        self.rows, self.image_size = list(rows), int(image_size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return data.load_images(self.rows[i], self.image_size)
        return data.load_images([self.rows[int(i)]], self.image_size)[0]

    def all(self) -> torch.Tensor:
        """Every image as one tensor (the miniature descriptor's training set)."""
        return data.load_images(self.rows, self.image_size)


def split_images(data_dir: str | os.PathLike, split: str | Sequence[str], image_size: int) -> LazyImages:
    """One split (or several) of the run's manifest as :class:`LazyImages`."""
    return LazyImages(data.read_manifest(data_dir, split=split), image_size)


def synthetic_sets(run, image_size: int, max_per_set: int = 0, only: Sequence[str] = ()
                   ) -> tuple[dict[str, LazyImages], str]:
    """``{set id: images}`` (:class:`LazyImages`) of 03's complete sets (``SynthesisRecord``; set id ``<name>/k<k>`` plus
    ``/s<seed>`` for synthesis seeds > 0), or, without a record, every ``manifest.jsonl`` under
    ``artifacts/synthetic``; ``only`` restricts to those ids. Also returns the full method's set id
    (03's ``default_row``) or "" when absent."""
    root = run_root(run)
    rec = syn.SynthesisRecord.load_or_none(root) if hasattr(syn, "SynthesisRecord") else None
    found: dict[str, Path] = {}
    default = ""
    if rec is not None:
        for st in rec.sets:
            if st.complete:
                sid = f"{st.name}/k{st.k}" + (f"/s{st.synthesis_seed}" if st.synthesis_seed else "")
                found[sid] = root / st.path
                if st.table2_row == rec.default_row and not default:
                    default = sid
    else:
        base = root / "artifacts" / "synthetic"
        for m in sorted(base.glob("**/manifest.jsonl")) if base.exists() else []:
            found[str(m.parent.relative_to(base))] = m.parent
        default = next((k for k in found if "-dm" in k and k.split("/")[0].endswith("-vg-lp")), "")
    out = {}
    for sid, d in found.items():
        if only and sid not in only:
            continue
        rows = syn.synthetic_rows(d)
        if rows:
            out[sid] = LazyImages(rows[:max_per_set] if max_per_set else rows, image_size)
    return out, default if default in out else ""


def stand_in_set(real: torch.Tensor, n: int = 200, seed: int = 0) -> torch.Tensor:
    """Perturbed real images (crop / jitter / JPEG in turn): a clearly-labelled stand-in when no
    synthetic set exists yet, so the step runs; its numbers say nothing about synthetic data."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(real), size=min(n, len(real)), replace=False)
    views = CALIBRATION_KINDS
    return torch.stack([near_copies(real[int(i)])[views[j % 3]] for j, i in enumerate(pick)])


__all__ = [
    "COPY_THRESHOLD", "ChecksumError", "IMAGENET_MEAN", "IMAGENET_STD", "REPLICATION_THRESHOLD",
    "THRESHOLDS", "CALIBRATION_KINDS", "Calibration", "SSCDRecord", "SetCopies", "TinyDescriptor",
    "LazyImages", "calibrate", "calibrate_threshold", "planted_copies", "set_copies", "split_images", "stand_in_set", "synthetic_sets", "augment", "background_normalize", "compute_descriptors",
    "center", "copy_stats", "info_nce", "jpeg", "koleo", "load_descriptor", "near_copies",
    "plot_similarity_histogram", "build_sscd_shapes", "SSCDShaped", "SSCD_ARCHS", "plot_top_matches", "preprocess", "recorded_sha256", "sha256_file",
    "topk_similar", "train_miniature_descriptor",
]
