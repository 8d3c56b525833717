"""Synthesis: seeds, plan, LoRA scale, ImageFolder + manifest, kill-and-resume, shards, siblings."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from realfake_utils import synthesize as syn

torch.set_num_threads(1)
STEPS = 6
REPO = Path(__file__).resolve().parent.parent


def _rows(n_per_class: int = 3, classes=("zero", "one", "two")):
    rows, i = [], 0
    for c, name in enumerate(classes):
        for j in range(n_per_class):
            rows.append({"id": f"digits/{i}", "path": "", "index": i, "label": c, "class_name": name,
                         "split": "train"})
            i += 1
    rows.append({"id": "digits/99", "path": "", "index": 99, "label": 0, "class_name": "zero",
                 "split": "test"})
    return rows


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    from realfake_utils import data, models

    root = tmp_path_factory.mktemp("syn")
    base = models.build_tiny_sd(root / "base", sample_size=16, words=["zero", "one", "two"])
    # a LoRA in the stock diffusers format, with non-zero B so that it changes the output
    pipe = models.load_pipeline(str(base), "txt2img", "cpu")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    StableDiffusionPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        safe_serialization=True)
    manifest = data.write_manifest(_rows(), root / "data" / "manifest.csv")
    d = pipe.text_encoder.config.hidden_size
    feats = torch.randn(3, d, generator=torch.Generator().manual_seed(1))
    settings = syn.SynthesisSettings(base_model=str(base), lora_dir=str(root / "lora"), lora_name="lora-dm-vg",
                                     num_inference_steps=STEPS, image_size=16)
    shared_pipe = syn.load_synthesis_pipeline(settings, "cpu")
    return dict(root=root, base=str(base), lora=str(root / "lora"), manifest=manifest, feats=feats,
                settings=settings, pipe=shared_pipe)


def _prepare(env, name, k=2, batch_size=2, **over):
    import dataclasses

    st = dataclasses.replace(env["settings"], **over)
    set_dir = env["root"] / "synthetic" / name / f"k{k}"
    syn.prepare_set(set_dir, st, k, source_manifest=env["manifest"], guidance_features=env["feats"],
                    batch_size=batch_size)
    return set_dir


def _digests(set_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(set_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(set_dir.rglob("*.png"))}


# ----------------------------------------------------------------------------------------- pure logic
def test_stable_seed_is_a_fixed_function_of_id_and_round():
    s = syn.stable_seed(0, "digits/3", 1)
    ref = int.from_bytes(hashlib.sha256(b"0|digits/3|1").digest()[:8], "big") % (2**63 - 1)
    assert s == ref
    assert len({syn.stable_seed(0, f"digits/{i}", r) for i in range(50) for r in range(5)}) == 250
    assert syn.stable_seed(1, "digits/3", 1) != s
    # independent of PYTHONHASHSEED (a fresh interpreter with another hash seed)
    out = subprocess.run([sys.executable, "-c", "import hashlib;print(int.from_bytes(hashlib.sha256("
                          "b'0|digits/3|1').digest()[:8],'big')%(2**63-1))"],
                         env={**os.environ, "PYTHONHASHSEED": "123"}, capture_output=True, text=True)
    assert int(out.stdout) == s


def test_plan_batches_and_shards_cover_every_item_once():
    sources = syn.select_sources(_rows(4))
    assert len(sources) == 12 and all(r["split"] == "train" for r in sources)
    items = syn.plan_items(sources, k=3, seed=0)
    assert len(items) == 36 and len({it.file for it in items}) == 36
    assert items[0].prompt.startswith("photo of zero")
    batches = syn.plan_batches(items, 5)
    assert all(len({it.round for it in b}) == 1 for b in batches)  # never crosses a round
    assert [it for b in batches for it in b] == items
    shards = [syn.shard_batches(batches, 3, i) for i in range(3)]
    flat = sorted(it.file for s in shards for b in s for it in b)
    assert flat == sorted(it.file for it in items)
    with pytest.raises(ValueError):
        syn.shard_batches(batches, 2, 2)


def test_nine_table2_rows_in_the_papers_order_and_their_switches():
    assert syn.ROWS == ("base-novg-t2i", "lora-nodm-novg-t2i", "lora-nodm-vg-t2i", "lora-dm-novg-t2i",
                        "lora-dm-vg-t2i", "base-novg-lp", "lora-nodm-vg-lp", "lora-dm-novg-lp", "lora-dm-vg-lp")
    on = {r: tuple(k for k in syn.SWITCHES if syn.TABLE2_ROWS[r][k]) for r in syn.ROWS}
    # Table 2 of the paper, row by row (LP, VG, DM, FT check marks)
    assert on == {"base-novg-t2i": (), "lora-nodm-novg-t2i": ("finetune",),
                  "lora-nodm-vg-t2i": ("finetune", "visual_guidance"), "lora-dm-novg-t2i": ("finetune", "dm_loss"),
                  "lora-dm-vg-t2i": ("finetune", "dm_loss", "visual_guidance"), "base-novg-lp": ("latent_prior",),
                  "lora-nodm-vg-lp": ("finetune", "visual_guidance", "latent_prior"),
                  "lora-dm-novg-lp": ("finetune", "dm_loss", "latent_prior"),
                  "lora-dm-vg-lp": ("finetune", "dm_loss", "visual_guidance", "latent_prior")}
    assert syn.DEFAULT_ROW == "lora-dm-vg-lp"
    assert [syn.set_name(r) for r in syn.ROWS] == list(syn.ROWS)
    assert syn.set_name("lora-dm-vg-lp", "official") == "lora-dmofficial-vg-lp"
    assert syn.lora_variant("lora-nodm-vg-lp") == "lora-nodm-vg" and syn.lora_variant("base-novg-lp") == "base-novg"
    assert {syn.lora_variant(r) for r in syn.ROWS if syn.TABLE2_ROWS[r]["finetune"]} == \
        {"lora-nodm-novg", "lora-nodm-vg", "lora-dm-novg", "lora-dm-vg"}   # the four variants 02 trains
    st = syn.row_settings("lora-dm-vg-lp", "base", "/x/lora/lora-dm-vg", lora_scale=0.5)
    assert st.lora_dir == "/x/lora/lora-dm-vg" and st.latent_prior and st.visual_guidance
    assert syn.row_settings("base-novg-t2i", "base").lora_dir == ""
    with pytest.raises(ValueError, match="unknown switches"):
        syn.set_name({"finetune": True, "latentprior": True})
    with pytest.raises(ValueError, match="not a Table 2 row"):
        syn.row_switches("lora-dm-vg")


# ------------------------------------------------------------------------------------------ the model
def test_lora_scale_zero_equals_no_lora_and_scale_changes_output(env):
    import dataclasses

    items = syn.plan_items(syn.select_sources(_rows(1)), 1, 0)
    g = env["feats"][[it.label for it in items]]

    def run(**over):
        st = dataclasses.replace(env["settings"], latent_prior=False, **over)
        pipe = syn.load_synthesis_pipeline(st, "cpu")
        return torch.stack([torch.from_numpy(__import__("numpy").asarray(im)).float()
                            for im in syn.generate_batch(pipe, items, st, guidance=g)])

    none = run(lora_dir="")
    assert torch.equal(run(lora_scale=0.0), none)
    assert torch.equal(run(lora_scale=0.0, fuse_lora=False), none)
    half, full = run(lora_scale=0.5), run(lora_scale=1.0)
    assert (half - none).abs().max() > 0 and (full - half).abs().max() > 0
    # fused and per-call (cross_attention_kwargs) scaling agree up to rounding
    assert (run(lora_scale=0.5, fuse_lora=False) - half).abs().max() <= 1
    # the guidance token and the negative's token change the output
    assert (run(visual_guidance=False) - half).abs().max() > 0
    assert (run(negative_guidance_token=True) - half).abs().max() > 0
    # the negative prompt's wording reaches the negative branch (the tiny test tokenizer knows few of
    # its words, so the test drops it; Apx. E vs generate.py differ in two words)
    assert (run(negative_prompt="") - half).abs().max() > 0


def test_settings_hash_covers_the_pixels_and_refuses_mixing(env, tmp_path):
    st = env["settings"]
    h = syn.settings_hash(st, "g")
    import dataclasses
    assert syn.settings_hash(dataclasses.replace(st, lora_scale=0.6), "g") != h
    assert syn.settings_hash(dataclasses.replace(st, strength=0.5), "g") != h
    assert syn.settings_hash(st, "other-features") != h
    assert syn.settings_hash(dataclasses.replace(st, lora_name="x"), "g") == h  # a label only
    assert syn.settings_hash(dataclasses.replace(st, negative_prompt="distorted"), "g") != h
    set_dir = tmp_path / "s"
    syn.prepare_set(set_dir, st, 1, source_manifest=env["manifest"], guidance_features=env["feats"])
    with pytest.raises(ValueError, match="other settings"):
        syn.prepare_set(set_dir, dataclasses.replace(st, lora_scale=0.7), 1,
                        source_manifest=env["manifest"], guidance_features=env["feats"])


# ------------------------------------------------------------------------------------------- the sets
def test_imagefolder_manifest_and_resume_skips_everything(env):
    set_dir = _prepare(env, "full", k=2, batch_size=4)
    res = syn.run_set(set_dir, pipe=env["pipe"], progress=False)
    assert res["planned"] == 18 and res["generated"] == 18 and res["complete"]
    assert res["images_per_s"] > 0
    rows = syn.read_synthetic_manifest(set_dir)
    assert len(rows) == 18 and set(rows[0]) - {"path"} == set(syn.MANIFEST_KEYS)
    assert len({r["file"] for r in rows}) == 18
    from PIL import Image
    for r in rows:
        p = set_dir / r["file"]
        assert p.parent.name == r["class_name"] and p.suffix == ".png"
        assert Image.open(p).size == (16, 16)
        assert r["lora"] == "lora-dm-vg" and r["settings_hash"] == res["settings_hash"]
    assert {r["round"] for r in rows} == {0, 1}
    assert not list(set_dir.rglob("*.tmp*"))
    again = syn.run_set(set_dir, pipe=env["pipe"], progress=False)
    assert again["generated"] == 0 and again["already_done"] == 18
    srows = syn.synthetic_rows(set_dir)
    assert len(srows) == 18 and Path(srows[0]["path"]).exists()


def test_two_shards_merge_to_the_single_process_set(env):
    single = _prepare(env, "single", k=2, batch_size=2, latent_prior=False)
    syn.run_set(single, pipe=None if False else syn.load_synthesis_pipeline(
        syn.load_spec(single)["settings"], "cpu"), progress=False)
    sharded = _prepare(env, "sharded", k=2, batch_size=2, latent_prior=False)
    pipe = syn.load_synthesis_pipeline(syn.load_spec(sharded)["settings"], "cpu")
    r0 = syn.run_set(sharded, num_shards=2, shard_index=0, pipe=pipe, progress=False)
    assert 0 < r0["finished"] < r0["planned"]  # the manifest shows what exists so far
    assert syn.set_status(sharded) == {"planned": 18, "finished": r0["finished"], "complete": False}
    syn.run_set(sharded, num_shards=2, shard_index=1, pipe=pipe, progress=False)
    rows_sharded = syn.merge_set(sharded)
    assert rows_sharded == syn.merge_set(single)
    assert len({r["file"] for r in rows_sharded}) == len(rows_sharded) == 18
    assert _digests(sharded) == _digests(single)


def test_sibling_set_with_larger_k_reuses_identical_images(env):
    k1 = _prepare(env, "sib", k=1, batch_size=2)
    syn.run_set(k1, pipe=env["pipe"], progress=False)
    k2 = _prepare(env, "sib", k=2, batch_size=2)
    res = syn.run_set(k2, pipe=env["pipe"], progress=False)
    assert res["linked"] == 9 and res["generated"] == 9
    ref = _prepare(env, "sib-ref", k=2, batch_size=2)  # other folder, same settings: would link too
    res = syn.run_set(ref, pipe=env["pipe"], progress=False, reuse_siblings=False)
    assert res["generated"] == 18
    assert _digests(k2) == _digests(ref)


def test_kill_mid_run_then_resume_gives_the_uninterrupted_set(env):
    ref = _prepare(env, "ref", k=2, batch_size=1)
    syn.run_set(ref, pipe=env["pipe"], progress=False)
    killed = _prepare(env, "killed", k=2, batch_size=1)
    cmd = [sys.executable, "-m", "realfake_utils.synthesize", "--set-dir", str(killed), "--device", "cpu",
           "--threads", "1", "--no-progress"]
    # the child SIGKILLs itself right after its 5th image is renamed into place (rundir.unit_finished)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env={**os.environ, "REALFAKE_KILL_AFTER_UNITS": "image:5"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    n_killed = len([p for p in killed.rglob("*.png") if not p.name.startswith(".")])
    assert n_killed == 5
    syn.merge_set(killed)  # a partial manifest, as a running job writes one every 30 s
    from realfake_utils.classify import discover_sets

    assert "killed" not in discover_sets(env["root"] / "synthetic")  # classifiers never train on it
    res = syn.run_set(killed, pipe=env["pipe"], progress=False)
    assert res["already_done"] == n_killed and res["generated"] == 18 - n_killed
    rows = syn.read_synthetic_manifest(killed)
    assert len(rows) == 18 and len({r["file"] for r in rows}) == 18
    assert [{k: v for k, v in r.items() if k != "path"} for r in rows] == syn.merge_set(ref)
    assert not [p for p in killed.rglob(".*") if p.is_file() and p.suffix == ".png"]
    assert _digests(killed) == _digests(ref)  # identical bytes, before and after the kill
    assert discover_sets(env["root"] / "synthetic")["killed"] == {2: killed}


# ------------------------------------------------------------------------------- 03's whole step
@pytest.fixture(scope="module")
def run_folder(env, tmp_path_factory):
    """A run folder as 01 / 02 leave it: manifest, miniature base + CLIP, one trained LoRA variant."""
    import shutil

    from realfake_utils import data, models
    from realfake_utils.rundir import RunDir, write_json

    root = tmp_path_factory.mktemp("run")
    art = root / "artifacts"
    data.write_manifest(_rows(), art / "data" / "manifest.csv")
    shutil.copytree(env["base"], art / "miniature" / "base")
    models.build_tiny_clip(art / "miniature" / "clip", image_size=16, projection_dim=32, hidden=32)
    shutil.copytree(env["lora"], art / "lora" / "lora-dm-vg")
    write_json(art / "lora" / "lora-dm-vg" / "train_config.json",
               {"variant": "lora-dm-vg", "config": {"guidance_token_position": "append"}})
    return RunDir("test", root)


def _cfg(**over):
    p = dict(rows=["base-novg-t2i", "lora-nodm-vg-lp", "lora-dm-vg-lp"], default_row="lora-dm-vg-lp",
             scale_k=[1, 2], synthesis_seeds=[0, 1], base_model="", clip_model="", image_size=16,
             lora_scale=0.5, num_inference_steps=2, guidance_scale=2.0, latent_prior_strength=0.75,
             guidance_feature="class_mean", negative_guidance_token=False, batch_size=4, dtype="auto",
             negative_prompt="distorted, unrealistic, blurry, out of frame",
             device="cpu")
    p.update(over)
    return syn.SynthesisConfig.from_params(p)


def test_config_from_params_one_builder_and_its_jobs():
    cfg = _cfg()
    assert cfg.jobs() == [("base-novg-t2i", 1, 0), ("base-novg-t2i", 1, 1), ("lora-nodm-vg-lp", 1, 0),
                          ("lora-nodm-vg-lp", 1, 1), ("lora-dm-vg-lp", 1, 0), ("lora-dm-vg-lp", 1, 1),
                          ("lora-dm-vg-lp", 2, 0)]
    with pytest.raises(KeyError, match="synthesis_seeds"):
        syn.SynthesisConfig.from_params({k: v for k, v in dataclasses_asdict(cfg).items() if k != "synthesis_seeds"})
    with pytest.raises(ValueError, match="scale_k"):
        _cfg(scale_k=[0])
    with pytest.raises(ValueError, match="not a Table 2 row"):
        _cfg(rows=["lora-dm-vg"])


def dataclasses_asdict(x):
    import dataclasses

    return dataclasses.asdict(x)


def test_synthesize_rows_makes_1x_sets_marks_them_and_records_them(run_folder):
    from realfake_utils import data

    rec = syn.synthesize_rows(run_folder, _cfg(), progress=False)
    n_train = sum(r["split"] == "train" for r in data.read_manifest(run_folder.artifacts / "data" / "manifest.csv"))
    assert rec.n_real_train == n_train == 9
    # the default set at k = 1 has exactly the train split's size, per class as in the split
    d = rec.default()
    assert d.size == n_train and d.name == "lora-dm-vg-lp" and d.k == 1 and d.synthesis_seed == 0
    per_class = {}
    for r in syn.read_synthetic_manifest(run_folder.root / d.path):
        per_class[r["class_name"]] = per_class.get(r["class_name"], 0) + 1
    assert per_class == {"zero": 3, "one": 3, "two": 3}
    assert {r["source_id"] for r in syn.read_synthetic_manifest(run_folder.root / d.path)} == \
        {r["id"] for r in _rows() if r["split"] == "train"}          # each real train image is a source once
    assert [s.id for s in rec.sets] == ["base-novg-t2i/k1-s0", "base-novg-t2i/k1-s1", "lora-dm-vg-lp/k1-s0",
                                        "lora-dm-vg-lp/k1-s1", "lora-dm-vg-lp/k2-s0"]
    assert all(s.complete and s.size == s.k * n_train for s in rec.sets)
    k2 = rec.find("lora-dm-vg-lp", 2)
    assert k2.linked == n_train and k2.generated == n_train          # round 0 reused from the k = 1 set
    assert len(rec.skipped) == 1 and "lora-nodm-vg" in rec.skipped[0] and "variants" in rec.skipped[0]
    assert rec.find("base-novg-t2i").row == {"finetune": False, "dm_loss": False, "visual_guidance": False,
                                             "latent_prior": False, "dm_loss_form": "paper"}
    # the guidance token position comes from 02's record / train_config.json
    assert syn.load_spec(run_folder.root / d.path)["settings"]["guidance_token_position"] == "append"
    assert set(rec.mmd2_to_real_train) == {s.id for s in rec.sets}
    # two synthesis seeds give two different sets; the record round-trips
    a, b = rec.of_row("lora-dm-vg-lp")
    assert _digests(run_folder.root / a.path) != _digests(run_folder.root / b.path)
    rec.save(run_folder)
    assert syn.SynthesisRecord.load(run_folder) == rec
    # completion is a marker written by synthesis: a replaced image is caught; a rerun generates nothing
    again = syn.synthesize_rows(run_folder, _cfg(), progress=False, mmd=False)
    assert sum(s.generated for s in again.sets) == 0
    png = next((run_folder.root / d.path).rglob("*.png"))
    png.write_bytes(png.read_bytes() + b"x")
    assert not syn.is_complete(run_folder.root / d.path)
    # a moved run folder keeps its sets (spec paths are relative)
    import shutil

    from realfake_utils.rundir import RunDir
    moved = RunDir("test", run_folder.root.parent / "moved")
    shutil.copytree(run_folder.root, moved.root, dirs_exist_ok=True, symlinks=True)
    png.write_bytes(png.read_bytes()[:-1])
    assert syn.is_complete(run_folder.root / d.path)
    assert syn.load_spec(moved.root / d.path)["source_manifest_path"] == \
        str((moved.root / "artifacts" / "data" / "manifest.csv").resolve())


def test_image_set_manifest_one_reader_confines_paths(tmp_path):
    from realfake_utils import data
    from realfake_utils.rundir import UnsafePathError

    d = tmp_path / "set"
    data.write_image_set(d, [{"file": "a/0.png", "label": 1, "class_name": "one", "path": "/abs/ignored"}])
    (row,) = data.read_image_set(d)
    assert row["path"] == str((d / "a" / "0.png").resolve()) and "path" not in (d / "manifest.jsonl").read_text()
    assert data.image_set_rows(d)[0]["id"] == f"{tmp_path.name}/set/a/0.png"
    for bad in ("../../etc/hostname", "/etc/shadow"):
        data.write_image_set(d, [{"file": bad, "label": 0}])
        with pytest.raises(UnsafePathError):
            data.read_image_set(d)
    (d / "manifest.jsonl").write_text('{"file": "a.png", "label": 0}\n{"file": "b.p')
    with pytest.raises(data.DataError, match="line 2"):
        data.read_image_set(d)
    assert syn.read_synthetic_manifest(tmp_path / "nothing") == []
