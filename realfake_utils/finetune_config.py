"""Configuration of the LoRA fine-tuning (02): Table 2 variant names and :class:`FinetuneConfig`.

One builder per source: :meth:`FinetuneConfig.from_params` (02's parameters; every key it is not given
takes the default of 02's parameters cell, the one default per parameter), :meth:`from_dict` /
:meth:`from_record` (the resolved configuration 02 stored in its record, so 06 trains its member LoRA
exactly as 02 did).

Batch and epochs (Table 7: "8x8" = 8 per device x 8 devices):

- ``global_batch_size`` is the paper's global batch (64 in Table 7); the per-device batch is
  ``global_batch_size / (num_processes x gradient_accumulation_steps)`` (an error if not divisible);
- ``num_train_epochs`` (> 0) means passes over the data whatever the number of processes:
  ``total steps = ceil(epochs x N / global_batch_size)``; 0 uses ``max_train_steps``.

Visual guidance token (Sec. 3.2 vs the official code):

- ``guidance_token_position``: ``append`` (the paper's text: the feature is *concatenated* with the
  text embeddings, ``[B, 77, D] -> [B, 78, D]``) | ``replace_last`` (the official code:
  ``encoder_hidden_states[:, -1, :] = img_features``);
- ``guidance_feature_train``: ``class_mean`` (the paper: "the mean of image embeddings ... of a
  class") | ``sample`` (the official code: each training image's own feature).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable
from .params import notebook_defaults

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
DM_LOSS_FORMS = ("paper", "official")
GUIDANCE_TOKEN_POSITIONS = ("append", "replace_last")
GUIDANCE_FEATURES_TRAIN = ("class_mean", "sample")
# The LoRA variants behind the nine Table 2 rows (L_simple only, VG, DM, DM + VG).
TABLE2_VARIANTS = ("lora-nodm-novg", "lora-nodm-vg", "lora-dm-novg", "lora-dm-vg")
NOTEBOOK = "02_finetune"


# --------------------------------------------------------------------------------------------------
# Variant names (Table 2 rows)
# --------------------------------------------------------------------------------------------------
def variant_name(finetune: bool, dm_loss: bool, visual_guidance: bool, dm_loss_form: str = "paper") -> str:
    """Folder / set name of one Table 2 row.

    ``lora-dm-vg``, ``lora-nodm-novg``, ... for fine-tuned rows (``lora-dmofficial-vg`` when the DM loss
    takes the official code's form); ``base-vg`` / ``base-novg`` for the vanilla base model (no LoRA; the
    DM switch is meaningless without fine-tuning and is ignored).
    """
    vg = "vg" if visual_guidance else "novg"
    if not finetune:
        return f"base-{vg}"
    if dm_loss_form not in DM_LOSS_FORMS:
        raise ValueError(f"dm_loss_form must be one of {DM_LOSS_FORMS}, got {dm_loss_form!r}")
    dm = ("dm" if dm_loss_form == "paper" else "dmofficial") if dm_loss else "nodm"
    return f"lora-{dm}-{vg}"


def parse_variant(name: str) -> dict[str, Any]:
    """Inverse of :func:`variant_name`: ``"lora-dm-vg"`` -> {finetune, dm_loss, dm_loss_form,
    visual_guidance}."""
    parts = name.split("-")
    err = ValueError(f"not a variant name: {name!r} (expected lora-<dm|dmofficial|nodm>-<vg|novg> "
                     "or base-<vg|novg>)")
    if len(parts) == 2 and parts[0] == "base" and parts[1] in ("vg", "novg"):
        return dict(finetune=False, dm_loss=False, dm_loss_form="paper", visual_guidance=parts[1] == "vg")
    if len(parts) != 3 or parts[0] != "lora" or parts[1] not in ("dm", "dmofficial", "nodm") \
            or parts[2] not in ("vg", "novg"):
        raise err
    return dict(finetune=True, dm_loss=parts[1] != "nodm",
                dm_loss_form="official" if parts[1] == "dmofficial" else "paper",
                visual_guidance=parts[2] == "vg")


def resolve_variants(variants: Iterable[str], dm_loss_form: str = "paper") -> list[str]:
    """The LoRA folders to train: ``lora-dm-*`` become ``lora-dmofficial-*`` when ``dm_loss_form`` is
    ``official`` (explicit ``lora-dmofficial-*`` names stay); ``base-*`` names are dropped (no LoRA);
    order kept, duplicates removed."""
    if dm_loss_form not in DM_LOSS_FORMS:
        raise ValueError(f"dm_loss_form must be one of {DM_LOSS_FORMS}, got {dm_loss_form!r}")
    out: list[str] = []
    for name in variants:
        sw = parse_variant(str(name))
        if not sw["finetune"]:
            continue
        form = sw["dm_loss_form"] if name.startswith("lora-dmofficial") else dm_loss_form
        out.append(variant_name(True, sw["dm_loss"], sw["visual_guidance"], form))
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """All settings of one fine-tuning run (names = 02's parameters where 02 has them).

    The dataclass defaults serve direct library use and tests; notebooks and presets build the config
    with :meth:`from_params`, whose defaults are 02's parameters cell. Paper values: Table 7 (lr 1e-4,
    batch 8x8 = 64, SNR-gamma 0.75, 300 epochs, 512 px), Eq. 21 (gamma = 0.05).
    """
    base_model: str = ""
    output_dir: str = ""
    lora_rank: int = 4
    lora_alpha: float = 4.0
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int = 100          # used when num_train_epochs == 0
    num_train_epochs: int = 0           # > 0: passes over the train split (Table 7: 300)
    global_batch_size: int = 64         # Table 7: 8 x 8
    gradient_accumulation_steps: int = 1
    snr_gamma: float = 0.75             # Table 7; <= 0: plain L_simple
    dm_loss: bool = True
    dm_loss_form: str = "paper"         # "paper" | "official"
    dm_loss_weight: float = -1.0        # < 0: the form's published weight (paper 0.05, official 0.003)
    visual_guidance: bool = True
    guidance_token_position: str = "append"       # "append" (Sec. 3.2) | "replace_last" (official)
    guidance_feature_train: str = "class_mean"    # "class_mean" (Sec. 3.2) | "sample" (official)
    random_flip: bool = False
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 1e-2
    mixed_precision: str = "no"         # "no" | "fp16" | "bf16"
    seed: int = 0
    device: str = "auto"                # "auto" | "cpu" | "cuda"
    checkpoint_every: int = 50
    checkpoints_total_limit: int = 2
    channels_last: bool = False
    compile_unet: bool = False
    log_every: int = 0                  # print a line every N steps (0: only a summary)

    # keys that do not change the trained weights (left out of the cache key)
    _NOT_HASHED = ("output_dir", "device", "checkpoint_every", "checkpoints_total_limit", "log_every",
                   "compile_unet", "channels_last")

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_params(cls, params: dict[str, Any], variant: str = "", output_dir: str = "",
                    base_model: str = "") -> "FinetuneConfig":
        """The config of 02's parameters ``params`` (a notebook's ``globals()`` or any dict; keys that
        are not 02 parameters are ignored, missing ones take 02's parameters-cell default).

        ``variant`` (``lora-dm-vg`` ...) sets ``dm_loss`` / ``dm_loss_form`` / ``visual_guidance``
        (default: 02's main-variant switches); ``base_model`` overrides the parameter (02 resolves
        ``""`` to the run folder's miniature base).
        """
        p = dict(notebook_defaults(NOTEBOOK))
        p.update({k: v for k, v in params.items() if k in p})
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in p.items() if k in names}
        kw["base_model"] = base_model or p.get("base_model", "")
        kw["output_dir"] = output_dir
        if variant:
            sw = parse_variant(variant)
            if not sw["finetune"]:
                raise ValueError(f"variant {variant} is the base model: there is nothing to fine-tune")
            kw.update(dm_loss=sw["dm_loss"], dm_loss_form=sw["dm_loss_form"],
                      visual_guidance=sw["visual_guidance"])
        cfg = cls(**kw)
        cfg.validate(need_base=False)
        return cfg

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown fine-tuning settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_record(cls, record: Any, variant: str = "", output_dir: str = "",
                    base_model: str = "") -> "FinetuneConfig":
        """02's resolved configuration from its :class:`finetune.FinetuneRecord` (or the record's
        ``config`` dict), optionally for another ``variant`` / ``output_dir`` / ``base_model``:
        the way 06 trains its member LoRA exactly as 02 trained the Table 2 ones."""
        if hasattr(record, "config_of"):          # a FinetuneRecord: run-relative base resolved
            d = record.config_of(variant or record.main_variant)
        else:
            d = {k: v for k, v in dict(record).items() if k != "base_model_in_run"}
        cfg = cls.from_dict(d)
        if variant:
            sw = parse_variant(variant)
            cfg.dm_loss, cfg.dm_loss_form, cfg.visual_guidance = (sw["dm_loss"], sw["dm_loss_form"],
                                                                  sw["visual_guidance"])
        if output_dir:
            cfg.output_dir = output_dir
        if base_model:
            cfg.base_model = base_model
        return cfg

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- checks and derived values
    def validate(self, need_base: bool = True) -> None:
        if self.dm_loss_form not in DM_LOSS_FORMS:
            raise ValueError(f"dm_loss_form must be one of {DM_LOSS_FORMS}, got {self.dm_loss_form!r}")
        if self.guidance_token_position not in GUIDANCE_TOKEN_POSITIONS:
            raise ValueError(f"guidance_token_position must be one of {GUIDANCE_TOKEN_POSITIONS}, got "
                             f"{self.guidance_token_position!r}")
        if self.guidance_feature_train not in GUIDANCE_FEATURES_TRAIN:
            raise ValueError(f"guidance_feature_train must be one of {GUIDANCE_FEATURES_TRAIN}, got "
                             f"{self.guidance_feature_train!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no|fp16|bf16, got {self.mixed_precision!r}")
        for key in ("lora_rank", "max_train_steps", "global_batch_size", "gradient_accumulation_steps",
                    "checkpoint_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if int(self.num_train_epochs) < 0:
            raise ValueError(f"num_train_epochs must be >= 0 (0: use max_train_steps), got "
                             f"{self.num_train_epochs}")
        if need_base and not self.base_model:
            raise ValueError("base_model is empty: give a diffusers id or a pipeline folder")

    def per_device_batch_size(self, num_processes: int = 1) -> int:
        """``global_batch_size / (num_processes x gradient_accumulation_steps)``; a clear error when
        that is not a whole number."""
        div = int(num_processes) * int(self.gradient_accumulation_steps)
        if self.global_batch_size % div:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by num_processes "
                f"({num_processes}) x gradient_accumulation_steps ({self.gradient_accumulation_steps}) = "
                f"{div}: choose a global batch that is a multiple of {div} (the paper's Table 7: 64 = "
                "8 per device x 8 devices), or change the process count / accumulation")
        return self.global_batch_size // div

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps: ``ceil(num_train_epochs x N / global_batch_size)`` when epochs are given
        (passes over the data, whatever the number of processes), else ``max_train_steps``."""
        if self.num_train_epochs > 0:
            if n_train < 1:
                raise ValueError("num_train_epochs needs a non-empty train set")
            return max(1, math.ceil(self.num_train_epochs * int(n_train) / self.global_batch_size))
        return int(self.max_train_steps)

    def steps_per_epoch(self, n_train: int) -> int:
        return max(1, math.ceil(int(n_train) / self.global_batch_size))

    @property
    def variant(self) -> str:
        return variant_name(True, self.dm_loss, self.visual_guidance, self.dm_loss_form)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def hashed_dict(self) -> dict[str, Any]:
        """The settings that determine the trained weights (the base model's path left out: the
        cache key uses its content, see :func:`finetune.base_model_identity`)."""
        return {k: v for k, v in self.to_dict().items() if k not in self._NOT_HASHED and k != "base_model"}


__all__ = ["DM_LOSS_FORMS", "FinetuneConfig", "GUIDANCE_FEATURES_TRAIN", "GUIDANCE_TOKEN_POSITIONS",
           "LORA_TARGET_MODULES", "TABLE2_VARIANTS", "parse_variant", "resolve_variants", "variant_name"]
