"""Training-data synthesis (Real-Fake Sec. 3.2-3.3, Tables 1-3, Fig. 2): resumable, sharded, batched.

**Protocol** (Sec. 4.1, Apx. E): a set at scale ``k`` holds exactly ``k`` synthetic images per real
**train** image (so k = 1 has the train split's size, per class as in the split; Sec. 4.1 "we synthesize
training samples with the same number as the real training set"). With the latent prior (Sec. 3.3) each
real train image is the img2img source of its ``k`` copies (rounds ``r < k``, one seed per round).

**Table 2** has nine rows (:data:`ROWS`, the paper's order); a row name is the LoRA variant the row
samples from plus ``-lp`` (latent prior, img2img) or ``-t2i`` (text-to-image), e.g. ``lora-dm-vg-lp`` =
fine-tuned with the DM loss and visual guidance, latent prior on: the full method (the default row). The
DM form a set uses is the one 02 trained (``lora-dmofficial-...`` for the official form): 03 reads which
LoRA variants exist from 02's record, it has no ``dm_loss_form`` of its own. :func:`synthesize_rows` is
03's whole work: every row at k = 1 for every synthesis seed, the default row at every ``k`` of
``scale_k`` (first synthesis seed), each set marked complete (``rundir.mark_done``) when finished, and
a :class:`SynthesisRecord` for the consumers (04, 05, 06, 07, 08, 09).

A synthetic set is a folder ``artifacts/synthetic/<set name>/k<k>-s<synthesis seed>/``::

    synthesis.json            the spec: settings (everything that decides the pixels), k, batch size,
                              the source manifest, captions (paths relative to the set folder)
    guidance.safetensors      the CLIP features used as visual guidance tokens (class means [C, D],
                              or per-source-image features)
    <class_name>/<file>.png   the images (ImageFolder layout)
    manifest.jsonl            one JSON row per finished image (``data.write_image_set``)
    DONE.json                 the completion marker (``rundir.mark_done``: every file's SHA-256)

Sampling follows the official code (BAAI-DCAI/Training-Data-Synthesis, ``generate.py``; Table 6): UniPC,
30 steps, guidance scale 2.0, LoRA scale 0.5, prompts ``photo of <class>, <caption>`` with the official
negative prompt, img2img from the real train image at strength 0.75 (latent prior; txt2img when off) and
the CLIP image feature as the visual guidance token (``features.guidance_prompt_embeds``: appended, the
paper's Sec. 3.2, or written into the last position, the official code; the position is the one 02
trained with, read from 02's record). The miniature presets take fewer sampler steps (a CPU shortcut
documented in 03's parameters cell), never fewer images.

Determinism. Every image is one *item* ``(source image, round)``; its seed is
``stable_seed(synthesis_seed, source_id, round)`` (SHA-256, not Python's salted ``hash``), and each item
gets its own CPU ``torch.Generator``. Items are grouped into *batches* that never cross a round and are
fixed by the spec alone (source order, ``batch_size``). A batch is the unit of work: shards take whole
batches, a resumed run regenerates a batch that still misses a file (writing only the missing files), so
an image is computed from exactly the same batch whatever the sharding or the interruption (a set at k = 5
reuses the files of the same seed's k = 1 and k = 2 sets: same items, same batches, same bytes).

Negative prompt embedding. The official generation code's modified diffusers pipeline was never released,
so what the negative branch of classifier-free guidance receives is not documented. Default: the negative
gets **no** guidance token (``guidance_prompt_embeds(neg, None, position)``: same length, no feature);
``negative_guidance_token=True`` gives it the same token. Both are in the settings hash.

Guidance feature at generation: ``class_mean`` (the paper's Sec. 3.2) or ``source`` (the official
``get_guidance_tokens_v2``: each source image's own feature).

Command line (independent processes or nodes; ``accelerate launch`` splits each shard further)::

    python -m realfake_utils.synthesize --set-dir runs/digits/artifacts/synthetic/<name>/k1-s0 \\
        --num-shards 4 --shard-index 0
    accelerate launch --num_processes 2 -m realfake_utils.synthesize --set-dir ...   # 2 processes
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence

from . import data, features, losses, models, plots
from .data import image_set_rows, read_image_set, read_manifest, write_image_set
from .features import (NEGATIVE_PROMPT, build_prompt, class_mean_features, encode_prompts,
                       guidance_prompt_embeds)
from .finetune import FinetuneRecord
from .finetune_config import parse_variant, variant_name
from .models import resolve_device
from .records import Record, RecordError, run_root
from .rundir import (atomic_path, content_hash, file_sha256, is_done, mark_done, read_json, tree_sha256,
                     unit_finished, write_json)

SPEC = "synthesis.json"
MANIFEST = "manifest.jsonl"
GUIDANCE = "guidance.safetensors"
MANIFEST_KEYS = ("file", "label", "class_name", "source_id", "round", "seed", "prompt", "lora",
                 "settings_hash")
SCALE_K = (1, 2, 5, 10)  # Table 3 / Fig. 2
SWITCHES = ("finetune", "dm_loss", "visual_guidance", "latent_prior")
# Table 2, rows 1-9 in the paper's order (ImageNette 79.8 ... 90.5): the vanilla base model; + fine-tune;
# + VG; + DM; + VG + DM; latent prior alone; LP + VG + FT; LP + DM + FT; all three.
ROWS = ("base-novg-t2i", "lora-nodm-novg-t2i", "lora-nodm-vg-t2i", "lora-dm-novg-t2i", "lora-dm-vg-t2i",
        "base-novg-lp", "lora-nodm-vg-lp", "lora-dm-novg-lp", "lora-dm-vg-lp")
DEFAULT_ROW = "lora-dm-vg-lp"   # "OURS" of Tables 1, 3, 4


# --------------------------------------------------------------------------------------------- rows
def row_switches(row: str | Mapping[str, Any]) -> dict[str, Any]:
    """The Table 2 switches of a row name (``lora-dm-vg-lp`` -> finetune, dm_loss, visual_guidance,
    latent_prior all on; ``dm_loss_form`` from the name, ``paper`` unless ``dmofficial``). A dict of
    switches is checked and returned with its defaults filled in."""
    if isinstance(row, Mapping):
        unknown = set(row) - set(SWITCHES) - {"dm_loss_form"}
        if unknown:
            raise ValueError(f"unknown switches {sorted(unknown)} in a Table 2 row; switches: {SWITCHES}")
        out = {k: bool(row.get(k, False)) for k in SWITCHES}
        out["dm_loss_form"] = str(row.get("dm_loss_form", "paper"))
        return out
    variant, _, tail = str(row).rpartition("-")
    if tail not in ("lp", "t2i") or not variant:
        raise ValueError(f"not a Table 2 row name: {row!r} (expected <variant>-lp or <variant>-t2i, "
                         f"e.g. one of {list(ROWS)})")
    try:
        v = parse_variant(variant)
    except ValueError as err:
        raise ValueError(f"not a Table 2 row name: {row!r} ({err})") from None
    return {"finetune": v["finetune"], "dm_loss": v["dm_loss"], "visual_guidance": v["visual_guidance"],
            "latent_prior": tail == "lp", "dm_loss_form": v["dm_loss_form"]}


TABLE2_ROWS = {name: row_switches(name) for name in ROWS}


def lora_variant(row: str | Mapping[str, Any], dm_loss_form: str | None = None) -> str:
    """The LoRA variant a row samples from (``finetune.variant_name``): ``lora-dm-vg``, ...,
    ``base-novg`` / ``base-vg`` for the vanilla base model. ``dm_loss_form`` overrides the row's."""
    sw = row_switches(row)
    return variant_name(sw["finetune"], sw["dm_loss"], sw["visual_guidance"],
                        dm_loss_form or sw["dm_loss_form"])


def set_name(row: str | Mapping[str, Any], dm_loss_form: str | None = None) -> str:
    """Folder name of a row's sets: its LoRA variant plus ``-lp`` / ``-t2i`` (``lora-dmofficial-vg-lp``
    when the DM variant was trained in the official form)."""
    return f"{lora_variant(row, dm_loss_form)}-{'lp' if row_switches(row)['latent_prior'] else 't2i'}"


def set_folder(synthetic_root: str | os.PathLike, name: str, k: int, synthesis_seed: int) -> Path:
    return Path(synthetic_root) / name / f"k{int(k)}-s{int(synthesis_seed)}"


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
    guidance_token_position: str = "replace_last"   # as 02 trained: "append" (paper) | "replace_last"
    negative_guidance_token: bool = False
    negative_prompt: str = NEGATIVE_PROMPT   # the official wording; the paper presets: Apx. E's
    num_inference_steps: int = 30
    guidance_scale: float = 2.0
    image_size: int = 512
    scheduler: str = "unipc"
    use_captions: bool = True
    seed: int = 0                   # the synthesis seed
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _model_digest(model: str) -> str:
    """The id string for a hub id; for a local folder the content hash of its files."""
    p = Path(model)
    return tree_sha256(p) if p.is_dir() else model


def lora_file(lora_dir: str | os.PathLike) -> Path:
    return Path(lora_dir) / "pytorch_lora_weights.safetensors"


def settings_hash(settings: SynthesisSettings, guidance_digest: str = "") -> str:
    """A 12-hex digest of the settings, the base model's and LoRA's bytes and the guidance features
    (content, never paths: a moved run folder keeps its sets)."""
    d = settings.to_dict()
    d["base_model"] = _model_digest(settings.base_model)
    d.pop("lora_name")
    d["lora_dir"] = file_sha256(lora_file(settings.lora_dir)) if settings.lora_dir else ""
    d["guidance"] = guidance_digest if settings.visual_guidance else ""
    if not settings.latent_prior:
        d.pop("strength")
    if not settings.lora_dir:
        d.pop("lora_scale"), d.pop("fuse_lora")
    if not settings.visual_guidance:
        d.pop("guidance_feature"), d.pop("negative_guidance_token"), d.pop("guidance_token_position")
    if settings.negative_prompt == NEGATIVE_PROMPT:
        d.pop("negative_prompt")   # the wording before it was a parameter: sets made then keep their hash
    return content_hash(d, 12)


def stable_seed(seed: int, source_id: str, round_: int) -> int:
    """Seed of the image made from ``source_id`` in round ``round_``: stable across runs and machines."""
    digest = hashlib.sha256(f"{int(seed)}|{source_id}|{int(round_)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63 - 1)


def row_settings(row: str | Mapping[str, Any], base_model: str, lora_dir: str | os.PathLike = "",
                 **common: Any) -> SynthesisSettings:
    """Settings of one Table 2 row; ``lora_dir``: the trained variant's folder when the row fine-tunes."""
    sw = row_switches(row)
    if sw["finetune"] and not lora_dir:
        raise ValueError(f"row {row!r} fine-tunes: give lora_dir (the folder of variant {lora_variant(sw)})")
    return SynthesisSettings(base_model=str(base_model), lora_dir=str(lora_dir) if sw["finetune"] else "",
                             lora_name=Path(lora_dir).name if sw["finetune"] else "none",
                             latent_prior=sw["latent_prior"], visual_guidance=sw["visual_guidance"], **common)


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


def select_sources(rows: Sequence[dict]) -> list[dict]:
    """Every train row, in manifest order: the sources of a set (one synthetic image per real train
    image and round, so k = 1 has the train split's size, per class as in the split; Sec. 4.1)."""
    return [r for r in rows if r.get("split", "train") == "train"]


def plan_items(sources: Sequence[dict], k: int, seed: int, captions: dict[str, str] | None = None,
               use_captions: bool = True) -> list[Item]:
    """All items of a set: ``k`` rounds over the source images (round-major order)."""
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
                batch_size: int = 16) -> dict[str, Any]:
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
    if int(k) < 1:
        raise ValueError(f"k must be >= 1 (synthetic images per real train image), got {k}")
    stored = settings.to_dict()
    stored.update(base_model=_portable(set_dir, settings.base_model), lora_dir=_portable(set_dir, settings.lora_dir))
    spec = {"settings": stored, "settings_hash": shash, "k": int(k), "batch_size": int(batch_size),
            "source_manifest": _portable(set_dir, source_manifest),
            "captions": _portable(set_dir, captions) if captions else ""}
    path = set_dir / SPEC
    if path.exists():
        old = read_json(path)
        if old.get("settings_hash") != shash:
            raise ValueError(
                f"{set_dir} holds a set made with other settings (hash {old.get('settings_hash')} != {shash}); "
                "delete the folder or choose another name")
        if (old.get("k"), old.get("batch_size")) != (spec["k"], spec["batch_size"]):
            raise ValueError(f"{set_dir}: k / batch_size differ from the existing spec {path}; "
                             "delete the folder to change them")
    write_json(path, spec)
    return spec


def _portable(set_dir: Path, path: str | os.PathLike) -> str:
    """A local path as stored in a spec: relative to the set folder (a moved or copied run folder keeps
    working); hub ids and "" unchanged."""
    p = str(path)
    if not p or not Path(p).exists():
        return p
    return os.path.relpath(Path(p).resolve(), Path(set_dir).resolve())


def _resolve(set_dir: Path, stored: str) -> str:
    """Inverse of :func:`_portable`."""
    if not stored or os.path.isabs(stored):
        return stored
    p = (Path(set_dir) / stored)
    return str(p.resolve()) if p.exists() else stored


def load_spec(set_dir: str | os.PathLike) -> dict[str, Any]:
    """The spec of a set with its paths resolved (absolute on this machine)."""
    set_dir = Path(set_dir)
    path = set_dir / SPEC
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: prepare the set first (prepare_set / notebook 03)")
    spec = read_json(path)
    spec["settings"].update(base_model=_resolve(set_dir, spec["settings"]["base_model"]),
                            lora_dir=_resolve(set_dir, spec["settings"]["lora_dir"]))
    spec["source_manifest_path"] = _resolve(set_dir, spec["source_manifest"])
    spec["captions_path"] = _resolve(set_dir, spec.get("captions", ""))
    return spec


def _plan_from_spec(spec: dict[str, Any]) -> tuple[list[dict], list[Item]]:
    st = spec["settings"]
    sources = select_sources(read_manifest(spec["source_manifest_path"]))
    cap = spec.get("captions_path", "")
    captions = read_json(cap) if cap and Path(cap).exists() else {}
    return sources, plan_items(sources, spec["k"], st["seed"], captions, st.get("use_captions", True))


def plan_set(set_dir: str | os.PathLike) -> list[Item]:
    """Every item of a set, in order."""
    return _plan_from_spec(load_spec(set_dir))[1]


# ------------------------------------------------------------------------------------------- manifest
def read_synthetic_manifest(set_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a set's ``manifest.jsonl`` (``data.read_image_set``: ``path`` confined to the set);
    ``[]`` before the first merge."""
    return read_image_set(set_dir, missing_ok=True)


def merge_set(set_dir: str | os.PathLike, items: Sequence[Item] | None = None) -> list[dict[str, Any]]:
    """(Re)write ``manifest.jsonl`` from the spec and the finished files: one row per existing PNG,
    in plan order, no duplicates (file names are unique per item). Returns the rows."""
    set_dir = Path(set_dir)
    spec = load_spec(set_dir)
    items = plan_set(set_dir) if items is None else items
    lora, shash = spec["settings"]["lora_name"], spec["settings_hash"]
    rows = [it.manifest_row(lora, shash) for it in items if (set_dir / it.file).exists()]
    write_image_set(set_dir, rows)
    return rows


def set_status(set_dir: str | os.PathLike) -> dict[str, Any]:
    """``planned`` items, ``finished`` files and ``complete`` of a set (from the spec and the files, not
    from the manifest, which a running job rewrites only every ``merge_every_s``)."""
    items = plan_set(set_dir)
    finished = sum((Path(set_dir) / it.file).exists() for it in items)
    return {"planned": len(items), "finished": finished, "complete": finished == len(items)}


synthetic_rows = image_set_rows   # a set's rows in the data manifest's format (data.image_set_rows)


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
        if all(o.get(key) == spec.get(key) for key in ("settings_hash", "batch_size", "source_manifest",
                                                        "captions")):
            out.append(other.parent)
    return out


# ---------------------------------------------------------------------------------------------- model
def load_synthesis_pipeline(settings: SynthesisSettings | dict, device: str = "auto"):
    """Base model (id or path) through ``models.load_pipeline`` (img2img for the latent prior, else
    txt2img), UniPC scheduler, the LoRA with stock ``load_lora_weights`` at ``lora_scale``."""
    import torch
    from diffusers import UniPCMultistepScheduler

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

    st = settings if isinstance(settings, SynthesisSettings) else SynthesisSettings(**settings)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    scale = getattr(pipe, "_realfake_lora_scale", None)
    pe = _encode(pipe, [it.prompt for it in batch], scale)
    ne = _encode(pipe, [st.negative_prompt] * len(batch), scale)
    if st.visual_guidance:  # Sec. 3.2: the token enters as 02 trained it (append | replace_last)
        g = torch.as_tensor(guidance).to(device=pe.device, dtype=pe.dtype)
        pos = st.guidance_token_position
        pe = guidance_prompt_embeds(pe, g, pos)
        ne = guidance_prompt_embeds(ne, g if st.negative_guidance_token else None, pos)
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
        load_images = data.load_images if st.latent_prior else None
        bar = tqdm(total=n_todo, unit="img", desc=f"{set_dir.parent.name}/{set_dir.name}"
                   + (f" shard {shard_index}/{num_shards}" if num_shards > 1 else ""),
                   disable=not progress, smoothing=0.1)
        t0 = time.time()
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
            if time.time() - t_merge > merge_every_s:
                merge_set(set_dir, items)
                t_merge = time.time()
        bar.close()
    seconds = time.time() - t0
    if state is not None:
        state.wait_for_everyone()  # then one process writes the manifest of all of them
    main_proc = state is None or state.is_main_process
    rows = merge_set(set_dir, items) if main_proc else read_synthetic_manifest(set_dir)
    if main_proc and len(rows) == len(items) and not is_done(set_dir, _set_key(spec)):
        mark_done(set_dir, _set_key(spec), [MANIFEST] + [r["file"] for r in rows],
                  info={"size": len(rows), "k": spec["k"], "n_real_train": len(sources),
                        "settings_hash": spec["settings_hash"]})   # the completion marker 04 trusts
    if state is not None:
        state.wait_for_everyone()
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
               captions: str | os.PathLike = "", batch_size: int = 16,
               num_shards: int = 1, shard_index: int = 0, device: str = "auto", pipe=None,
               progress: bool = True) -> dict[str, Any]:
    """:func:`prepare_set` then :func:`run_set` (the notebook's one call per set)."""
    prepare_set(set_dir, settings, k, source_manifest=source_manifest, guidance_features=guidance_features,
                guidance_ids=guidance_ids, captions=captions, batch_size=batch_size)
    return run_set(set_dir, num_shards=num_shards, shard_index=shard_index, device=device, pipe=pipe,
                   progress=progress)


# ------------------------------------------------------------------------------------------ the record
@dataclass
class SyntheticSet:
    """One finished (or skipped-incomplete) synthetic set of 03."""

    name: str                  # set name: LoRA variant + -lp / -t2i (e.g. lora-dm-vg-lp, lora-dmofficial-vg-lp)
    table2_row: str            # the Table 2 row it realises (ROWS), e.g. lora-dm-vg-lp
    row: dict[str, Any]        # the row's switches: finetune, dm_loss, visual_guidance, latent_prior, dm_loss_form
    variant: str               # the LoRA variant sampled from (base-novg: the vanilla base model)
    k: int                     # synthetic images per real train image
    synthesis_seed: int
    size: int                  # images in the set (= k x n_real_train when complete)
    n_real_train: int
    path: str                  # the set folder, relative to the run folder
    complete: bool             # rundir.mark_done written by synthesis (is_done verifies every file)
    settings_hash: str = ""
    generated: int = 0         # images generated by this run (0 when read back)
    linked: int = 0            # images taken from a sibling set of the same seed (smaller k)
    seconds: float = 0.0

    @property
    def id(self) -> str:
        """``<name>/k<k>-s<seed>``: unique within a run."""
        return f"{self.name}/k{self.k}-s{self.synthesis_seed}"


@dataclass
class SynthesisRecord(Record):
    """Results of 03 (``results/03_synthesize.json``): which sets exist, for 04-09."""

    STEP: ClassVar[str] = "03_synthesize"

    sets: list[SyntheticSet]
    default_row: str
    rows: list[str]
    scale_k: list[int]
    synthesis_seeds: list[int]
    n_real_train: int
    skipped: list[str] = field(default_factory=list)     # rows that could not run, with the reason
    mmd2_to_real_train: dict[str, float] = field(default_factory=dict)   # set id -> MMD^2 (CLIP space)
    mmd_bandwidth: float = 0.0
    images_generated: int = 0
    images_per_s: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def find(self, row: str, k: int = 1, synthesis_seed: Optional[int] = None) -> Optional[SyntheticSet]:
        """The complete set of Table 2 row (or set name) ``row`` at ``k`` (first synthesis seed unless
        given), or None."""
        for s in self.sets:
            if (row in (s.table2_row, s.name) and s.k == int(k) and s.complete
                    and (synthesis_seed is None or s.synthesis_seed == int(synthesis_seed))):
                return s
        return None

    def of_row(self, row: str, k: int = 1) -> list[SyntheticSet]:
        """Every complete set of ``row`` at ``k``, one per synthesis seed (in seed order)."""
        return sorted((s for s in self.sets if row in (s.table2_row, s.name) and s.k == int(k) and s.complete),
                      key=lambda s: s.synthesis_seed)

    def default(self, k: int = 1) -> SyntheticSet:
        """The default row's set at ``k`` (first synthesis seed); a clear error when it was not made."""
        s = self.find(self.default_row, k)
        if s is None:
            raise LookupError(f"03_synthesize made no complete set of the default row {self.default_row} at "
                              f"k={k}; skipped: {self.skipped or 'none'}")
        return s

    def set_named(self, name: str, k: int = 1) -> SyntheticSet:
        s = self.find(name, k)
        if s is None:
            raise LookupError(f"no complete synthetic set {name!r} at k={k} in 03's record; sets: "
                              f"{sorted({x.name for x in self.sets})}")
        return s

    def scale_sets(self) -> list[SyntheticSet]:
        """The default row's sets of the first synthesis seed at every k (Table 3 / Fig. 2)."""
        seed0 = self.synthesis_seeds[0] if self.synthesis_seeds else 0
        return sorted((s for s in self.sets if s.table2_row == self.default_row and s.complete
                       and s.synthesis_seed == seed0), key=lambda s: s.k)


# ------------------------------------------------------------------------------------------ the config
@dataclass
class SynthesisConfig:
    """03's configuration, built from its parameters by :meth:`from_params` (every field is a parameter
    of 03's parameters cell, which holds the one default; presets override it)."""

    rows: list[str]
    default_row: str
    scale_k: list[int]
    synthesis_seeds: list[int]
    base_model: str
    clip_model: str
    image_size: int
    lora_scale: float
    num_inference_steps: int
    guidance_scale: float
    latent_prior_strength: float
    guidance_feature: str
    negative_guidance_token: bool
    negative_prompt: str
    batch_size: int
    dtype: str
    device: str

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "SynthesisConfig":
        """From 03's parameters (e.g. the notebook's ``globals()``); a missing key names itself."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"SynthesisConfig.from_params: parameters {missing} missing (03_synthesize's "
                           "parameters cell defines them all)")
        cfg = cls(**{n: params[n] for n in names})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for r in list(self.rows) + [self.default_row]:
            row_switches(r)
        if not self.synthesis_seeds:
            raise ValueError("synthesis_seeds is empty: give at least one seed (digits: [0, 1])")
        if any(int(k) < 1 for k in self.scale_k):
            raise ValueError(f"scale_k {self.scale_k}: every k must be >= 1")
        if self.guidance_feature not in ("class_mean", "source"):
            raise ValueError(f"guidance_feature must be 'class_mean' or 'source', got {self.guidance_feature!r}")

    def jobs(self) -> list[tuple[str, int, int]]:
        """(row, k, synthesis seed) of every set, in order: each row at k = 1 for every synthesis seed,
        then the default row at each other k of ``scale_k`` with the first seed (Table 3 / Fig. 2)."""
        out = [(r, 1, int(s)) for r in dict.fromkeys(list(self.rows) + [self.default_row])
               for s in self.synthesis_seeds]
        out += [(self.default_row, int(k), int(self.synthesis_seeds[0])) for k in self.scale_k if int(k) != 1]
        return list(dict.fromkeys(out))


def trained_variants(run: Any) -> dict[str, dict[str, Any]]:
    """The LoRA variants 02 trained: ``{variant: {"dir": Path, "guidance_token_position": str}}``, from
    02's record (``finetune.FinetuneRecord``: ``variants`` and ``config_of``) or, when there is none (or
    one of an older kit), the finished folders ``artifacts/lora/<variant>/`` (weights +
    ``train_config.json``)."""
    root = run_root(run)
    out: dict[str, dict[str, Any]] = {}
    rec = None
    if FinetuneRecord.exists(root):
        try:
            rec = FinetuneRecord.load(root)
        except RecordError as err:   # an older 02 result: the folders below still say what was trained
            print(f"note: {err}; reading the trained LoRA variants from {root / 'artifacts' / 'lora'}")
    if rec is not None:
        for name, v in rec.variants.items():
            folder = root / v.path
            if lora_file(folder).exists():
                pos = rec.config_of(name, root).get("guidance_token_position", "replace_last")
                out[name] = {"dir": folder, "guidance_token_position": pos}
        return out
    for tc in sorted((root / "artifacts" / "lora").glob("*/train_config.json")):
        if lora_file(tc.parent).exists():
            cfg = read_json(tc).get("config", {})
            out[tc.parent.name] = {"dir": tc.parent,
                                   "guidance_token_position": cfg.get("guidance_token_position", "replace_last")}
    return out


def _pick_variant(row: str, variants: Mapping[str, Any]) -> Optional[str]:
    """The trained variant a row samples from: its paper-form name, else the official-form one."""
    sw = row_switches(row)
    if not sw["finetune"]:
        return lora_variant(sw)
    for form in ("paper", "official"):
        v = lora_variant(sw, form)
        if v in variants:
            return v
    return None


def _model_paths(run: Any, base_model: str = "", clip_model: str = "") -> tuple[str, str]:
    """``base_model`` / ``clip_model`` or the run folder's miniature models (checked to exist)."""
    art = Path(run.root) / "artifacts"
    base = base_model or str(art / "miniature" / "base")
    clip = clip_model or str(art / "miniature" / "clip")
    for what, path, param in (("base model", base, "base_model"), ("CLIP model", clip, "clip_model")):
        local = path.startswith(("/", ".")) or not (path.count("/") == 1)
        if local and not Path(path).exists():
            raise FileNotFoundError(f"no {what} at {path}: run 01_prepare first (it builds the miniature models "
                                    f"of this run folder) or set the parameter {param}")
    return base, clip


def _dtype(cfg: SynthesisConfig) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "float16" if resolve_device(cfg.device).type == "cuda" else "float32"


def _train_features(run: Any, clip: str, image_size: int, device: str):
    """(train rows, CLIP features [N, D], class means [C, D]) from the feature cache shared with 02."""
    art = Path(run.root) / "artifacts"
    rows = data.read_manifest(art / "data" / "manifest.csv")
    train = [r for r in rows if r["split"] == "train"]
    if not train:
        raise ValueError(f"{art / 'data' / 'manifest.csv'} has no train rows: rerun 01_prepare")
    feats = features.extract_clip_features(clip, data.load_images(train, image_size), [r["id"] for r in train],
                                           art / "features" / "clip_image.safetensors", device=device,
                                           progress=False).float()
    means = features.class_mean_features(feats, [r["label"] for r in train], len(data.class_names(rows)))
    return train, feats, means


def _set_key(spec: Mapping[str, Any]) -> str:
    return content_hash({"settings_hash": spec["settings_hash"], "k": spec["k"],
                         "batch_size": spec["batch_size"]})


def is_complete(set_dir: str | os.PathLike) -> bool:
    """Whether a set's completion marker (written by :func:`run_set` when its last image landed) is
    there and every file it lists still has its bytes (``rundir.is_done``)."""
    set_dir = Path(set_dir)
    if not (set_dir / SPEC).exists():
        return False
    return is_done(set_dir, _set_key(load_spec(set_dir)))


def synthesize_rows(run: Any, cfg: SynthesisConfig, progress: bool = True, mmd: bool = True) -> SynthesisRecord:
    """03's whole work (Tables 1-3, Fig. 2): every set of :meth:`SynthesisConfig.jobs`, resumable.

    For each (row, k, synthesis seed): the row's LoRA variant as 02 trained it (from 02's record; a row
    whose variant was not trained is *skipped* with the reason, e.g. smoke trains one variant), the
    guidance token position 02 trained with, the real train split as sources (k images per real train
    image), the set prepared, generated (finished images skipped; k > 1 reuses the same seed's smaller
    sets) and marked complete. Then, with ``mmd``, each set's MMD^2 to the real train set in CLIP space
    (Gaussian kernel, median-heuristic bandwidth on the real features). Returns the record (not saved:
    the notebook saves it).
    """
    art = Path(run.root) / "artifacts"
    base, clip = _model_paths(run, cfg.base_model, cfg.clip_model)
    train, feats, means = _train_features(run, clip, cfg.image_size, cfg.device)
    variants = trained_variants(run)
    captions = art / "captions.json"
    common = dict(lora_scale=cfg.lora_scale, strength=cfg.latent_prior_strength,
                  guidance_feature=cfg.guidance_feature, negative_guidance_token=cfg.negative_guidance_token,
                  negative_prompt=cfg.negative_prompt,
                  num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                  image_size=cfg.image_size, dtype=_dtype(cfg))
    sets, skipped, pipes = [], [], {}
    t_all = time.time()
    for row, k, seed in cfg.jobs():
        variant = _pick_variant(row, variants)
        if variant is None:
            msg = (f"{row}: its LoRA variant {lora_variant(row)} was not trained by 02_finetune (trained: "
                   f"{sorted(variants) or 'none'}); add it to 02's parameter variants and rerun 02")
            if msg not in skipped:
                print("SKIPPED", msg)
                skipped.append(msg)
            continue
        sw = row_switches(row)
        sw["dm_loss_form"] = parse_variant(variant)["dm_loss_form"] if sw["finetune"] else "paper"
        vinfo = variants.get(variant, {})
        st = SynthesisSettings(base_model=base, lora_dir=str(vinfo.get("dir", "")) if sw["finetune"] else "",
                               lora_name=variant if sw["finetune"] else "none",
                               latent_prior=sw["latent_prior"], visual_guidance=sw["visual_guidance"],
                               guidance_token_position=vinfo.get("guidance_token_position", "replace_last"),
                               seed=seed, **common)
        name = set_name(sw)
        set_dir = set_folder(art / "synthetic", name, k, seed)
        spec = prepare_set(set_dir, st, k, source_manifest=art / "data" / "manifest.csv",
                           guidance_features=feats if cfg.guidance_feature == "source" else means,
                           guidance_ids=[r["id"] for r in train] if cfg.guidance_feature == "source" else None,
                           captions=captions if captions.exists() else "", batch_size=cfg.batch_size)
        res = {"generated": 0, "linked": 0, "seconds": 0.0}
        if not is_done(set_dir, _set_key(spec)):
            pkey = (st.lora_dir, st.latent_prior, st.lora_scale, st.dtype)
            if pkey not in pipes:
                pipes.clear()   # one pipeline in memory at a time
                pipes[pkey] = load_synthesis_pipeline(st, cfg.device)
            res = run_set(set_dir, device=cfg.device, pipe=pipes[pkey], progress=progress)
        complete = is_done(set_dir, _set_key(spec))
        size = len(read_synthetic_manifest(set_dir))
        sets.append(SyntheticSet(name=name, table2_row=row, row=sw, variant=variant, k=k, synthesis_seed=seed,
                                 size=size, n_real_train=len(train), path=Record.rel(run, set_dir),
                                 complete=complete, settings_hash=spec["settings_hash"],
                                 generated=res["generated"], linked=res["linked"], seconds=res["seconds"]))
        if progress:
            print(f"{sets[-1].id}: {size} images ({k} x {len(train)} train), {res['generated']} generated, "
                  f"{res['linked']} reused, complete={complete}", flush=True)
    gen = sum(s.generated for s in sets)
    secs = sum(s.seconds for s in sets if s.generated)
    rec = SynthesisRecord(sets=sets, default_row=cfg.default_row, rows=list(cfg.rows), scale_k=list(cfg.scale_k),
                          synthesis_seeds=list(cfg.synthesis_seeds), n_real_train=len(train), skipped=skipped,
                          images_generated=gen, images_per_s=round(gen / secs, 2) if secs else 0.0,
                          settings={**common, "base_model": Record.rel(run, base), "batch_size": cfg.batch_size,
                                    "seconds": round(time.time() - t_all, 1)})
    if mmd:
        bw = losses.median_bandwidth(feats)
        rec.mmd_bandwidth = float(bw)
        for s in sets:
            if s.complete:
                rec.mmd2_to_real_train[s.id] = float(losses.mmd2(feats, set_features(run, s, clip, cfg.device),
                                                                 bandwidth=bw))
    return rec


def set_features(run: Any, s: SyntheticSet, clip: str = "", device: str = "auto"):
    """CLIP image features [N, D] of a set's images (cached in the set folder)."""
    d = Path(run.root) / s.path
    rows = image_set_rows(d)
    spec = load_spec(d)
    clip = clip or str(Path(run.root) / "artifacts" / "miniature" / "clip")
    return features.extract_clip_features(clip, data.load_images(rows, spec["settings"]["image_size"]),
                                          [r["id"] for r in rows], d / "clip_features.safetensors",
                                          device=device, progress=False).float()


# ------------------------------------------------------------------------ 06: a set made like 03's
def member_settings(run: Any, name: str, lora_dir: str = "") -> SynthesisSettings:
    """The settings 03 made set ``name`` (k = 1, first synthesis seed) with, ``lora_dir`` swapped in
    (06 synthesises from its member LoRA exactly as 03 did from 02's)."""
    s = SynthesisRecord.load(run).set_named(name)
    st = SynthesisSettings(**load_spec(Path(run.root) / s.path)["settings"])
    if lora_dir or st.lora_dir:
        st = dataclasses.replace(st, lora_dir=str(lora_dir))
    return st


def synthesize_members(run: Any, set_dir: str | os.PathLike, settings: SynthesisSettings,
                       source_manifest: str | os.PathLike, train_set: Any, device: str = "auto",
                       batch_size: int = 0) -> dict[str, Any]:
    """One synthetic image per row of ``source_manifest``'s train split (k = 1) with ``settings``;
    guidance features from ``train_set`` (``finetune.TrainSet``: ``image_embeds``, ``labels``, ``ids``)
    as 03 takes them from the whole train split (class means, or per-source features)."""
    feats = train_set.image_embeds.float()
    if settings.guidance_feature == "source":
        gfeat, gids = feats, list(train_set.ids)
    else:
        gfeat = class_mean_features(feats, train_set.labels, len(train_set.class_names))
        gids = None
    spec_bs = batch_size or int(SynthesisRecord.load(run).settings.get("batch_size", 16))
    return synthesize(set_dir, settings, 1, source_manifest=source_manifest, guidance_features=gfeat,
                      guidance_ids=gids, batch_size=spec_bs, device=device, progress=False)


# ------------------------------------------------------------------------------------------- figures
def figure_real_vs_synthetic(run: Any, s: SyntheticSet, per_class: int = 6):
    """Each row a class: ``per_class`` real train images, then ``per_class`` images of set ``s``."""
    import torch

    rows = data.read_manifest(Path(run.root) / "artifacts" / "data" / "manifest.csv")
    names = data.class_names(rows)
    size = load_spec(Path(run.root) / s.path)["settings"]["image_size"]
    srows = image_set_rows(Path(run.root) / s.path)
    real = [r for r in rows if r["split"] == "train"]
    pick_r = [r for c in range(len(names)) for r in [x for x in real if x["label"] == c][:per_class]]
    pick_s = [r for c in range(len(names)) for r in [x for x in srows if x["label"] == c][:per_class]]
    imgs = torch.cat([data.load_images(pick_r, size), data.load_images(pick_s, size)])
    labels = [r["label"] for r in pick_r + pick_s]
    order = sorted(range(len(labels)), key=lambda i: (labels[i], i))
    return plots.per_class_grid(imgs[order], [labels[i] for i in order], names, per_class=2 * per_class,
                                suptitle=f"real (left {per_class}) vs synthetic {s.id} (right)")


def figure_clip_pca(run: Any, rec: SynthesisRecord, clip: str = "", device: str = "auto"):
    """CLIP-feature PCA of real train, vanilla-base synthetic and the default row's synthetic data
    (the paper's Fig. 1, left)."""
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    clip = clip or str(Path(run.root) / "artifacts" / "miniature" / "clip")   # only CLIP is needed here
    first = rec.sets[0] if rec.sets else None
    size = load_spec(Path(run.root) / first.path)["settings"]["image_size"] if first else 16
    train, feats, _ = _train_features(run, clip, size, device)
    groups = [("real train", feats)]
    vanilla = rec.find(ROWS[0])
    if vanilla is not None:
        groups.append((f"vanilla base ({vanilla.name})", set_features(run, vanilla, clip, device)))
    default = rec.find(rec.default_row)
    if default is not None:
        groups.append((f"fine-tuned ({default.name})", set_features(run, default, clip, device)))
    pca = PCA(n_components=2, random_state=0).fit(feats.numpy())
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for (label, f), color in zip(groups, ["tab:blue", "tab:orange", "tab:green"]):
        z = pca.transform(f.numpy())
        ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.5, color=color, label=label)
    ax.set_xlabel("PC 1 (real CLIP features)")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8)
    ax.set_title("CLIP image features (Fig. 1, left)")
    return fig


def figure_mmd(rec: SynthesisRecord):
    """MMD^2 of every set to the real train set (CLIP space), rows in Table 2 order."""
    import matplotlib.pyplot as plt

    keys = list(rec.mmd2_to_real_train)
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(keys) + 1))
    ax.barh(keys, [rec.mmd2_to_real_train[k] for k in keys], color="tab:green")
    ax.invert_yaxis()
    ax.set_xlabel("MMD$^2$ to the real train set (CLIP space)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig



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
