"""Training-data synthesis (Real-Fake Sec. 3.2-3.3, Tables 2-3, Fig. 2): resumable, sharded, batched.

A synthetic set is a folder ``artifacts/synthetic/<name>/k<k>/``::

    synthesis.json            the spec: settings (everything that decides the pixels), k, batch size,
                              the source manifest, captions; written once by :func:`prepare_set`
    guidance.safetensors      the CLIP features used as visual guidance tokens (class means [C, D],
                              or per-source-image features)
    <class_name>/<file>.png   the images (ImageFolder layout)
    manifest.jsonl            one JSON row per finished image (see :data:`MANIFEST_KEYS`)

Sampling follows the official code (BAAI-DCAI/Training-Data-Synthesis, ``generate.py``): UniPC, 30 steps,
guidance scale 2.0, LoRA scale 0.5, prompts ``photo of <class>, <caption>`` with the official negative
prompt, img2img from a real training image of the same class at strength 0.75 (the *latent prior*,
Sec. 3.3; txt2img when it is off) and the CLIP image feature written into the last token of the prompt
embedding (*visual guidance*, Sec. 3.2).

Determinism. Every image is one *item* ``(source image, round)``; its seed is
``stable_seed(seed, source_id, round)`` (SHA-256, not Python's salted ``hash``), and each item gets its
own CPU ``torch.Generator``. Items are grouped into *batches* that never cross a round and are fixed by
the spec alone (source order, ``batch_size``). A batch is the unit of work: shards take whole batches, a
resumed run regenerates a batch that still misses a file (writing only the missing files), so an image
is computed from exactly the same batch whatever the sharding or the interruption. Each PNG is written
to a temporary name and renamed; the manifest is *derived* from the spec and the finished files
(:func:`merge_set`) and rewritten atomically, so a run killed at any point resumes and skips exactly
the finished images.

Negative prompt embedding. The official generation code passes the guidance tokens to a modified
diffusers pipeline that was never released (README: "TODO: Release Modified diffusers"), so what the
negative branch of classifier-free guidance receives is not documented. Default here: the negative
prompt embedding gets **no** guidance token (it is the plain encoded negative prompt, what stock
diffusers builds from ``negative_prompt``); then the CFG difference ``eps(c, token) - eps(neg)`` carries
the visual guidance. ``negative_guidance_token=True`` writes the same token into the negative too (the
guidance then only steers the text direction). Both are recorded in the settings hash.

Guidance feature. The official code uses each source image's own CLIP feature (``get_guidance_tokens_v2``
loads ``<image>.pt``); the kit's default is the class-mean feature (``guidance_feature="class_mean"``),
``"source"`` reproduces the official choice.

Command line (independent processes or nodes; ``accelerate launch`` splits each shard further)::

    python -m realfake_utils.synthesize --set-dir runs/digits/artifacts/synthetic/<name>/k1 \
        --num-shards 4 --shard-index 0
    python -m realfake_utils.synthesize --set-dir ... --merge-only      # after all shards finished
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .rundir import atomic_path, confine, read_json, unit_finished, write_json

SPEC = "synthesis.json"
MANIFEST = "manifest.jsonl"
GUIDANCE = "guidance.safetensors"
MANIFEST_KEYS = ("file", "label", "class_name", "source_id", "round", "seed", "prompt", "lora",
                 "settings_hash")
SCALE_K = (1, 2, 5, 10)  # Table 3 / Fig. 2

# Table 2 of the paper: each row a dict of switches (finetune = LoRA on, dm_loss = the LoRA variant
# trained with the distribution-matching loss, visual_guidance = guidance token in training and sampling,
# latent_prior = img2img from a real image).
TABLE2_ROWS = (
    {"finetune": False, "dm_loss": False, "visual_guidance": False, "latent_prior": False},
    {"finetune": True, "dm_loss": False, "visual_guidance": False, "latent_prior": False},
    {"finetune": True, "dm_loss": True, "visual_guidance": False, "latent_prior": False},
    {"finetune": True, "dm_loss": True, "visual_guidance": True, "latent_prior": False},
    {"finetune": True, "dm_loss": True, "visual_guidance": True, "latent_prior": True},
)
SWITCHES = ("finetune", "dm_loss", "visual_guidance", "latent_prior")


# --------------------------------------------------------------------------------------------- settings
@dataclass
class SynthesisSettings:
    """Everything that decides the pixels of a synthetic set (hashed into ``settings_hash``)."""

    base_model: str
    lora_dir: str = ""              # folder with pytorch_lora_weights.safetensors; "" = no LoRA
    lora_name: str = "none"         # variant name written into the manifest's "lora"
    lora_scale: float = 0.5
    fuse_lora: bool = True          # fuse W + s*BA once (faster; scale 0 == no LoRA exactly)
    latent_prior: bool = True       # img2img from a real train image of the same class
    strength: float = 0.75
    visual_guidance: bool = True
    guidance_feature: str = "class_mean"   # "class_mean" | "source" (official code)
    negative_guidance_token: bool = False
    num_inference_steps: int = 30
    guidance_scale: float = 2.0
    image_size: int = 512
    scheduler: str = "unipc"
    use_captions: bool = True
    seed: int = 0
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sha256_file(path: Path, limit: int = 256 << 20) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))  # weights of a tiny model are read whole; huge files: the first 256 MiB
    return h.hexdigest()


def _model_digest(model: str) -> str:
    """The id string for a hub id; for a local folder a digest of its UNet/VAE/text-encoder weights."""
    p = Path(model)
    if not p.exists():
        return model
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".txt"):
            h.update(str(f.relative_to(p)).encode())
            h.update(_sha256_file(f, limit=64 << 20).encode())
    return h.hexdigest()


def lora_file(lora_dir: str | os.PathLike) -> Path:
    return Path(lora_dir) / "pytorch_lora_weights.safetensors"


def settings_hash(settings: SynthesisSettings, guidance_digest: str = "") -> str:
    """A 12-hex digest of the settings, the base model's and LoRA's weights and the guidance features."""
    d = settings.to_dict()
    d["base_model"] = _model_digest(settings.base_model)
    d.pop("lora_name")
    d["lora_dir"] = _sha256_file(lora_file(settings.lora_dir)) if settings.lora_dir else ""
    d["guidance"] = guidance_digest if settings.visual_guidance else ""
    if not settings.latent_prior:
        d.pop("strength")
    if not settings.lora_dir:
        d.pop("lora_scale"), d.pop("fuse_lora")
    if not settings.visual_guidance:
        d.pop("guidance_feature"), d.pop("negative_guidance_token")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def stable_seed(seed: int, source_id: str, round_: int) -> int:
    """Seed of the image made from ``source_id`` in round ``round_``: stable across runs and machines."""
    digest = hashlib.sha256(f"{int(seed)}|{source_id}|{int(round_)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63 - 1)


def lora_variant(row: dict[str, bool], dm_loss_form: str = "paper") -> str:
    """The LoRA variant a Table 2 row samples from (``finetune.variant_name``): ``lora-dm-vg``, ...,
    ``base-novg`` / ``base-vg`` for the vanilla base model."""
    from .finetune import variant_name

    unknown = set(row) - set(SWITCHES)
    if unknown:
        raise ValueError(f"unknown switches {sorted(unknown)} in a Table 2 row; switches: {SWITCHES}")
    return variant_name(bool(row.get("finetune")), bool(row.get("dm_loss")),
                        bool(row.get("visual_guidance")), dm_loss_form)


def set_name(row: dict[str, bool], dm_loss_form: str = "paper") -> str:
    """Folder name of a Table 2 row: its LoRA variant plus ``-lp`` (latent prior) or ``-t2i``,
    e.g. ``lora-dm-vg-lp`` (the full method) or ``base-novg-t2i`` (vanilla base model)."""
    return f"{lora_variant(row, dm_loss_form)}-{'lp' if row.get('latent_prior') else 't2i'}"


def row_settings(row: dict[str, bool], base_model: str, lora_root: str | os.PathLike = "",
                 dm_loss_form: str = "paper", **common: Any) -> SynthesisSettings:
    """Settings of one Table 2 row: LoRA folder ``<lora_root>/<variant>`` when ``finetune``."""
    variant = lora_variant(row, dm_loss_form)
    lora_dir = str(Path(lora_root) / variant) if row.get("finetune") else ""
    return SynthesisSettings(base_model=str(base_model), lora_dir=lora_dir,
                             lora_name=variant if row.get("finetune") else "none",
                             latent_prior=bool(row.get("latent_prior")),
                             visual_guidance=bool(row.get("visual_guidance")), **common)


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Item:
    """One synthetic image: made from ``source_id`` (a real train image) in round ``round``."""

    source_id: str
    source_pos: int      # position in the spec's source list
    label: int
    class_name: str
    round: int
    seed: int
    prompt: str
    file: str            # relative to the set folder

    def manifest_row(self, lora: str, shash: str) -> dict[str, Any]:
        return {"file": self.file, "label": self.label, "class_name": self.class_name,
                "source_id": self.source_id, "round": self.round, "seed": self.seed,
                "prompt": self.prompt, "lora": lora, "settings_hash": shash}


def _safe_stem(source_id: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source_id).strip("._") or "img"
    if stem != source_id:  # keep names unique when sanitising changed the id
        stem += "-" + hashlib.sha1(source_id.encode()).hexdigest()[:6]
    return stem


def _safe_dir(class_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", class_name).strip(".") or "class"


def select_sources(rows: Sequence[dict], per_class: int = 0) -> list[dict]:
    """Train rows in manifest order; ``per_class > 0`` keeps the first ``per_class`` of each class."""
    out, seen = [], {}
    for r in rows:
        if r.get("split", "train") != "train":
            continue
        n = seen.get(r["label"], 0)
        if per_class and n >= per_class:
            continue
        seen[r["label"]] = n + 1
        out.append(r)
    return out


def plan_items(sources: Sequence[dict], k: int, seed: int, captions: dict[str, str] | None = None,
               use_captions: bool = True) -> list[Item]:
    """All items of a set: ``k`` rounds over the source images (round-major order)."""
    from .features import build_prompt

    items = []
    for r in range(int(k)):
        for pos, row in enumerate(sources):
            sid = str(row["id"])
            cap = (captions or {}).get(sid, "") if use_captions else ""
            items.append(Item(
                source_id=sid, source_pos=pos, label=int(row["label"]), class_name=row["class_name"],
                round=r, seed=stable_seed(seed, sid, r), prompt=build_prompt(row["class_name"], cap),
                file=f"{_safe_dir(row['class_name'])}/{_safe_stem(sid)}_r{r}.png"))
    return items


def plan_batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Fixed batches: consecutive items of one round, at most ``batch_size`` each."""
    batches: list[list[Item]] = []
    for it in items:
        if not batches or len(batches[-1]) >= batch_size or batches[-1][-1].round != it.round:
            batches.append([])
        batches[-1].append(it)
    return batches


def shard_batches(batches: Sequence[list[Item]], num_shards: int, shard_index: int) -> list[list[Item]]:
    """Round-robin split of whole batches (every shard gets a similar mix of rounds and classes)."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    return list(batches[shard_index::num_shards])


# ------------------------------------------------------------------------------------------------ spec
def prepare_set(set_dir: str | os.PathLike, settings: SynthesisSettings, k: int, *,
                source_manifest: str | os.PathLike, guidance_features: "Any" = None,
                guidance_ids: Sequence[str] | None = None, captions: str | os.PathLike = "",
                batch_size: int = 16, per_class: int = 0) -> dict[str, Any]:
    """Write (or check) the spec of a set; returns it.

    ``guidance_features``: [C, D] class means (``guidance_feature="class_mean"``) or [N, D] features of
    the images ``guidance_ids`` (``"source"``); needed when ``settings.visual_guidance``. An existing set
    folder with other settings is refused (delete it or pick another folder), so files of two settings
    never mix.
    """
    import torch
    from safetensors.torch import save_file

    set_dir = Path(set_dir)
    set_dir.mkdir(parents=True, exist_ok=True)
    gdigest = ""
    if settings.visual_guidance:
        if guidance_features is None:
            raise ValueError("visual_guidance=True needs guidance_features (CLIP image features)")
        feats = torch.as_tensor(guidance_features).float().contiguous()
        if settings.guidance_feature == "source" and (guidance_ids is None or len(guidance_ids) != len(feats)):
            raise ValueError("guidance_feature='source' needs guidance_ids, one per feature row")
        if settings.guidance_feature not in ("class_mean", "source"):
            raise ValueError(f"guidance_feature must be 'class_mean' or 'source', got {settings.guidance_feature!r}")
        gdigest = hashlib.sha256(feats.numpy().tobytes()).hexdigest()
        meta = {"ids": json.dumps(list(map(str, guidance_ids or [])))}
        with atomic_path(set_dir / GUIDANCE) as tmp:
            save_file({"features": feats}, str(tmp), metadata=meta)
    shash = settings_hash(settings, gdigest)
    spec = {"settings": settings.to_dict(), "settings_hash": shash, "k": int(k),
            "batch_size": int(batch_size), "per_class": int(per_class),
            "source_manifest": str(Path(source_manifest).resolve()),
            "captions": str(Path(captions).resolve()) if captions else ""}
    path = set_dir / SPEC
    if path.exists():
        old = read_json(path)
        if old.get("settings_hash") != shash:
            raise ValueError(
                f"{set_dir} holds a set made with other settings (hash {old.get('settings_hash')} != {shash}); "
                "delete the folder or choose another name")
        if (old.get("k"), old.get("batch_size"), old.get("per_class")) != (spec["k"], spec["batch_size"], spec["per_class"]):
            raise ValueError(f"{set_dir}: k / batch_size / per_class differ from the existing spec {path}; "
                             "delete the folder to change them")
    write_json(path, spec)
    return spec


def load_spec(set_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(set_dir) / SPEC
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: prepare the set first (prepare_set / notebook 03)")
    return read_json(path)


def _plan_from_spec(spec: dict[str, Any]) -> tuple[list[dict], list[Item]]:
    from .data import read_manifest

    st = spec["settings"]
    sources = select_sources(read_manifest(spec["source_manifest"]), spec.get("per_class", 0))
    captions = read_json(spec["captions"]) if spec.get("captions") and Path(spec["captions"]).exists() else {}
    return sources, plan_items(sources, spec["k"], st["seed"], captions, st.get("use_captions", True))


def plan_set(set_dir: str | os.PathLike) -> list[Item]:
    """Every item of a set, in order."""
    return _plan_from_spec(load_spec(set_dir))[1]


# ------------------------------------------------------------------------------------------- manifest
def read_synthetic_manifest(set_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``manifest.jsonl`` (a truncated last line, which an atomic writer never leaves, is skipped)."""
    path = Path(set_dir) / MANIFEST
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def merge_set(set_dir: str | os.PathLike, items: Sequence[Item] | None = None) -> list[dict[str, Any]]:
    """(Re)write ``manifest.jsonl`` from the spec and the finished files: one row per existing PNG,
    in plan order, no duplicates (file names are unique per item). Returns the rows."""
    set_dir = Path(set_dir)
    spec = load_spec(set_dir)
    items = plan_set(set_dir) if items is None else items
    lora, shash = spec["settings"]["lora_name"], spec["settings_hash"]
    rows = [it.manifest_row(lora, shash) for it in items if (set_dir / it.file).exists()]
    with atomic_path(set_dir / MANIFEST) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        os.chmod(tmp, 0o644)
    return rows


def set_status(set_dir: str | os.PathLike) -> dict[str, Any]:
    """``planned`` items, ``finished`` files and ``complete`` of a set (from the spec and the files, not
    from the manifest, which a running job rewrites only every ``merge_every_s``)."""
    items = plan_set(set_dir)
    finished = sum((Path(set_dir) / it.file).exists() for it in items)
    return {"planned": len(items), "finished": finished, "complete": finished == len(items)}


def synthetic_rows(set_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Manifest rows in the data manifest's format (id, path, index, label, class_name, split="train"),
    for ``data.ImageDataset`` / ``data.load_images``."""
    set_dir = Path(set_dir).resolve()
    what = f"{set_dir / MANIFEST}: file"   # entries stay inside the set (no ../, no absolute paths)
    return [{"id": f"syn/{r['file']}", "path": str(confine(set_dir, str(r["file"]), what)), "index": -1,
             "label": int(r["label"]), "class_name": r["class_name"], "split": "train"}
            for r in read_synthetic_manifest(set_dir)]


def _clean_tmp(set_dir: Path, names: set[str]) -> int:
    """Remove leftovers of killed writes (``.<name>.XXXX.tmp.png``) for files this process owns."""
    n = 0
    for tmp in set_dir.glob("*/.*.tmp.png"):
        target = tmp.name[1:].split(".png.", 1)[0] + ".png"
        if f"{tmp.parent.name}/{target}" in names:
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def _sibling_sources(set_dir: Path, spec: dict[str, Any]) -> list[Path]:
    """Other sets of the same settings (e.g. ``k1`` beside ``k5``): same items, same batches, same bytes."""
    out = []
    for other in sorted(set_dir.parent.glob("*/" + SPEC)):
        if other.parent == set_dir:
            continue
        try:
            o = read_json(other)
        except (OSError, json.JSONDecodeError):
            continue
        if all(o.get(key) == spec.get(key) for key in ("settings_hash", "batch_size", "per_class",
                                                        "source_manifest", "captions")):
            out.append(other.parent)
    return out


# ---------------------------------------------------------------------------------------------- model
def load_synthesis_pipeline(settings: SynthesisSettings | dict, device: str = "auto"):
    """Base model (id or path) through ``models.load_pipeline`` (img2img for the latent prior, else
    txt2img), UniPC scheduler, the LoRA with stock ``load_lora_weights`` at ``lora_scale``."""
    import torch
    from diffusers import UniPCMultistepScheduler

    from . import models

    st = settings if isinstance(settings, SynthesisSettings) else SynthesisSettings(**settings)
    kind = "img2img" if st.latent_prior else "txt2img"
    dtype = getattr(torch, st.dtype)
    pipe = models.load_pipeline(st.base_model, kind=kind, device=device, dtype=dtype)
    if st.scheduler != "unipc":
        raise ValueError(f"scheduler {st.scheduler!r}: only 'unipc' (the official code's) is wired")
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe._realfake_lora_scale = None  # scale to pass per call (None: fused or no LoRA)
    if st.lora_dir:
        if not lora_file(st.lora_dir).exists():
            raise FileNotFoundError(f"no LoRA weights {lora_file(st.lora_dir)}")
        pipe.load_lora_weights(str(st.lora_dir), adapter_name="realfake")
        if st.fuse_lora:
            pipe.fuse_lora(lora_scale=float(st.lora_scale), adapter_names=["realfake"])
            pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
        else:
            pipe._realfake_lora_scale = float(st.lora_scale)
    return pipe


def _encode(pipe, prompts: list[str], lora_scale: float | None):
    """Prompt embeddings with the pipeline's own text encoder (LoRA-scaled if it carries LoRA layers)."""
    import torch

    from .features import encode_prompts

    te = pipe.text_encoder
    if lora_scale is not None:
        from diffusers.utils import scale_lora_layers, unscale_lora_layers
        scale_lora_layers(te, lora_scale)
    try:
        with torch.no_grad():
            return encode_prompts(te, pipe.tokenizer, prompts)
    finally:
        if lora_scale is not None:
            unscale_lora_layers(te, lora_scale)


def generate_batch(pipe, batch: Sequence[Item], settings: SynthesisSettings | dict,
                   init_images=None, guidance=None):
    """PIL images for one batch. ``init_images``: uint8 [B, 3, H, W] (latent prior); ``guidance``:
    [B, D] CLIP features for the guidance tokens."""
    import torch

    from .features import NEGATIVE_PROMPT, guidance_token

    st = settings if isinstance(settings, SynthesisSettings) else SynthesisSettings(**settings)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    scale = getattr(pipe, "_realfake_lora_scale", None)
    pe = _encode(pipe, [it.prompt for it in batch], scale)
    ne = _encode(pipe, [NEGATIVE_PROMPT] * len(batch), scale)
    if st.visual_guidance:
        g = torch.as_tensor(guidance).to(device=pe.device, dtype=pe.dtype)
        pe = guidance_token(pe, g)
        if st.negative_guidance_token:
            ne = guidance_token(ne, g)
    gens = [torch.Generator("cpu").manual_seed(it.seed) for it in batch]
    kw = dict(prompt_embeds=pe.to(device, dtype), negative_prompt_embeds=ne.to(device, dtype),
              num_inference_steps=st.num_inference_steps, guidance_scale=st.guidance_scale,
              generator=gens, output_type="pil")
    if scale is not None:
        kw["cross_attention_kwargs"] = {"scale": scale}
    with torch.no_grad():
        if st.latent_prior:
            img = torch.as_tensor(init_images).float().div(255.0).to(device, dtype)
            return pipe(image=img, strength=st.strength, **kw).images
        return pipe(height=st.image_size, width=st.image_size, **kw).images


def _guidance_lookup(set_dir: Path, st: SynthesisSettings):
    from safetensors import safe_open

    with safe_open(str(set_dir / GUIDANCE), framework="pt") as f:
        feats = f.get_tensor("features")
        ids = json.loads((f.metadata() or {}).get("ids", "[]"))
    if st.guidance_feature == "source":
        pos = {i: n for n, i in enumerate(ids)}

        def lookup(batch):
            missing = [it.source_id for it in batch if it.source_id not in pos]
            if missing:
                raise KeyError(f"no guidance feature for source images {missing[:3]}")
            return feats[[pos[it.source_id] for it in batch]]
    else:
        def lookup(batch):
            return feats[[it.label for it in batch]]
    return lookup


# ------------------------------------------------------------------------------------------------ run
def _accelerate_split(batches: list, device: str = "auto"):
    """Further split a shard's batches between ``accelerate launch`` processes (contiguous blocks,
    ``PartialState.split_between_processes``). Returns (my batches, state or None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return batches, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())  # CPU: gloo processes
    if state.num_processes <= 1:
        return batches, None
    with state.split_between_processes(batches) as mine:
        return list(mine), state


def run_set(set_dir: str | os.PathLike, *, num_shards: int = 1, shard_index: int = 0,
            device: str = "auto", pipe=None, progress: bool = True, merge_every_s: float = 30.0,
            reuse_siblings: bool = True) -> dict[str, Any]:
    """Generate this shard's missing images of a prepared set, then rewrite the manifest.

    Returns counts, time and throughput: ``planned`` (items of the whole set), ``shard_items``,
    ``already_done`` (skipped), ``generated``, ``linked`` (taken from a sibling set with the same
    settings), ``finished`` (files of the whole set present at the end), ``seconds``, ``images_per_s``.
    """
    import torch
    from tqdm.auto import tqdm

    set_dir = Path(set_dir)
    spec = load_spec(set_dir)
    st = SynthesisSettings(**spec["settings"])
    sources, items = _plan_from_spec(spec)
    batches = shard_batches(plan_batches(items, spec["batch_size"]), num_shards, shard_index)
    batches, state = _accelerate_split(batches, device)
    proc, nproc = (state.process_index, state.num_processes) if state is not None else (0, 1)
    if state is not None and device == "auto":
        device = str(state.device)  # one accelerator per process
    mine = [it for b in batches for it in b]
    _clean_tmp(set_dir, {it.file for it in mine})
    done_before = sum((set_dir / it.file).exists() for it in mine)
    linked = 0
    if reuse_siblings:
        for sib in _sibling_sources(set_dir, spec):
            for it in mine:
                dst, src = set_dir / it.file, sib / it.file
                if not dst.exists() and src.exists():
                    with atomic_path(dst) as tmp:
                        tmp.unlink()
                        try:
                            os.link(src, tmp)
                        except OSError:
                            tmp.write_bytes(src.read_bytes())
                    linked += 1
    todo = [b for b in batches if any(not (set_dir / it.file).exists() for it in b)]
    n_todo = sum(not (set_dir / it.file).exists() for b in todo for it in b)
    generated, t0, t_merge = 0, time.time(), time.time()
    if todo:
        if pipe is None:
            pipe = load_synthesis_pipeline(st, device)
        guidance = _guidance_lookup(set_dir, st) if st.visual_guidance else None
        load_images = None
        if st.latent_prior:
            from .data import load_images
        bar = tqdm(total=n_todo, unit="img", desc=f"{set_dir.parent.name}/{set_dir.name}"
                   + (f" shard {shard_index}/{num_shards}" if num_shards > 1 else ""),
                   disable=not progress, smoothing=0.1)
        t0 = time.time()
        delay = float(os.environ.get("REALFAKE_SYNTH_BATCH_DELAY_S", "0") or 0)  # tests: widen the kill window
        for batch in todo:
            init = load_images([sources[it.source_pos] for it in batch], st.image_size) if load_images else None
            g = guidance(batch) if guidance else None
            images = generate_batch(pipe, batch, st, init_images=init, guidance=g)
            for it, im in zip(batch, images):
                dst = set_dir / it.file
                if dst.exists():  # finished before the interruption: keep the file
                    continue
                with atomic_path(dst) as tmp:
                    im.save(tmp, format="PNG")
                    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a set is shared data
                generated += 1
                bar.update(1)
                unit_finished("image")  # tests: REALFAKE_KILL_AFTER_UNITS=image:<n> stops here
            if delay:
                time.sleep(delay)
            if time.time() - t_merge > merge_every_s:
                merge_set(set_dir, items)
                t_merge = time.time()
        bar.close()
    seconds = time.time() - t0
    if state is not None:
        state.wait_for_everyone()  # then one process writes the manifest of all of them
    rows = merge_set(set_dir, items) if state is None or state.is_main_process else read_synthetic_manifest(set_dir)
    res = {"set": str(set_dir), "settings_hash": spec["settings_hash"], "k": spec["k"],
           "planned": len(items), "shard_items": len(mine), "already_done": done_before,
           "linked": linked, "generated": generated, "finished": len(rows),
           "complete": len(rows) == len(items), "seconds": round(seconds, 3),
           "images_per_s": round(generated / seconds, 3) if generated and seconds > 0 else 0.0,
           "num_shards": num_shards, "shard_index": shard_index, "processes": nproc,
           "process_index": proc, "device": str(pipe.unet.device) if pipe is not None else device}
    if torch.cuda.is_available():
        res["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return res


def synthesize(set_dir: str | os.PathLike, settings: SynthesisSettings, k: int, *,
               source_manifest: str | os.PathLike, guidance_features=None, guidance_ids=None,
               captions: str | os.PathLike = "", batch_size: int = 16, per_class: int = 0,
               num_shards: int = 1, shard_index: int = 0, device: str = "auto", pipe=None,
               progress: bool = True) -> dict[str, Any]:
    """:func:`prepare_set` then :func:`run_set` (the notebook's one call per set)."""
    prepare_set(set_dir, settings, k, source_manifest=source_manifest, guidance_features=guidance_features,
                guidance_ids=guidance_ids, captions=captions, batch_size=batch_size, per_class=per_class)
    return run_set(set_dir, num_shards=num_shards, shard_index=shard_index, device=device, pipe=pipe,
                   progress=progress)


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m realfake_utils.synthesize",
                                description="Generate (a shard of) a prepared synthetic set.")
    p.add_argument("--set-dir", required=True, help="set folder holding synthesis.json")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--merge-only", action="store_true", help="only rewrite manifest.jsonl from the files")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.merge_only:
        rows = merge_set(a.set_dir)
        res = {"set": a.set_dir, "finished": len(rows), "planned": len(plan_set(a.set_dir))}
    else:
        res = run_set(a.set_dir, num_shards=a.num_shards, shard_index=a.shard_index, device=a.device,
                      progress=not a.no_progress)
    print(json.dumps(res, sort_keys=True), flush=True)
    return res


if __name__ == "__main__":
    main()
