"""LiRA: score, attacks against closed-form optimal ROCs, a planted-member attack, shadow bookkeeping."""
import numpy as np
import pytest
from scipy.stats import norm

from realfake_utils import lira


# ---------------------------------------------------------------- phi
def test_phi_matches_direct_formula_and_is_stable():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3, 7))
    labels = rng.integers(0, 7, size=50)
    phi = lira.logit_scaled_confidence(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    py = np.take_along_axis(p, np.broadcast_to(labels[:, None, None], (50, 3, 1)), -1)[..., 0]
    assert phi.shape == (50, 3)
    np.testing.assert_allclose(phi, np.log(py) - np.log(1 - py), rtol=1e-9, atol=1e-9)
    # huge logit gaps: naive softmax gives p=1 (phi=inf) or p=0 (phi=-inf); ours stays finite
    big = np.array([[2000.0, 0.0, -5.0], [0.0, 3000.0, 1.0]])
    phi_big = lira.logit_scaled_confidence(big, np.array([0, 0]))
    assert np.isfinite(phi_big).all()
    np.testing.assert_allclose(phi_big[0], 2000 - np.logaddexp(0.0, -5.0), rtol=1e-12)
    np.testing.assert_allclose(phi_big[1], -3000 + 0.0 - np.log1p(np.exp(1 - 3000)) + 0, atol=1e-9)


def test_phi_accepts_torch():
    import torch
    z = torch.randn(4, 2, 5)
    y = torch.tensor([0, 1, 2, 3])
    np.testing.assert_allclose(lira.logit_scaled_confidence(z, y), lira.logit_scaled_confidence(z.numpy(), y.numpy()))


def test_balanced_masks():
    m = lira.balanced_masks(16, 300, seed=1)
    assert m.shape == (16, 300) and (m.sum(0) == 8).all()
    assert not np.array_equal(m, lira.balanced_masks(16, 300, seed=2))
    small = lira.balanced_masks(2, 4, seed=0)     # its first draw gave one model all 4 examples, the other none
    assert (small.sum(0) == 1).all() and small.any(1).all() and (~small).any(1).all()
    with pytest.raises(ValueError, match="even"):
        lira.balanced_masks(5, 10)


# ---------------------------------------------------------------- closed form
def _gaussian_world(n_ex, n_models, d, sigma=1.0, sigma_in=None, seed=0, q=1):
    """Per-example out-mean mu_i, in-mean mu_i + d*sigma; shadow and target scores drawn from them."""
    rng = np.random.default_rng(seed)
    sigma_in = sigma if sigma_in is None else sigma_in
    mu = rng.normal(0, 3, size=n_ex)  # examples differ a lot: a global threshold is weak
    masks = lira.balanced_masks(n_models, n_ex, seed)
    noise = rng.normal(size=(n_models, n_ex, q))
    shadow = np.where(masks[..., None], mu[None, :, None] + d * sigma + sigma_in * noise,
                      mu[None, :, None] + sigma * noise)
    member = rng.uniform(size=n_ex) < 0.5
    tn = rng.normal(size=(n_ex, q))
    target = np.where(member[:, None], mu[:, None] + d * sigma + sigma_in * tn, mu[:, None] + sigma * tn)
    return shadow, masks, target, member


@pytest.mark.parametrize("attack", lira.ATTACKS)
def test_roc_matches_closed_form_optimum(attack):
    """Equal-variance Gaussians in/out with shift d: the optimal test's ROC is
    TPR = Phi(Phi^-1(FPR) + d); every LiRA variant must reach it (the global threshold must not)."""
    d = 1.5
    shadow, masks, target, member = _gaussian_world(10000, 256, d, seed=3)
    fprs = (0.01, 0.1)
    m = lira.attack_metrics(lira.lira_scores(shadow, masks, target, attack), member, fprs=fprs)
    # the oracle knows the true means: its empirical ROC is the closed form up to sampling error
    rng = np.random.default_rng(3)
    oracle = lira.attack_metrics(target[:, 0] - rng.normal(0, 3, size=10000), member, fprs=fprs)
    for f, key in ((0.01, "tpr_at_1pct_fpr"), (0.1, "tpr_at_10pct_fpr")):
        exact = norm.cdf(norm.ppf(f) + d)
        assert oracle[key] == pytest.approx(exact, abs=0.035), (f, oracle[key], exact)
        assert m[key] == pytest.approx(exact, abs=0.05), (attack, f, m[key], exact)
        assert m[key] == pytest.approx(oracle[key], abs=0.025), (attack, f, m[key], oracle[key])
    assert m["auc"] == pytest.approx(norm.cdf(d / np.sqrt(2)), abs=0.015)
    assert m["balanced_accuracy"] == pytest.approx(norm.cdf(d / 2), abs=0.015)
    base = lira.attack_metrics(lira.global_threshold_scores(target), member)
    assert base["auc"] < m["auc"] - 0.1


def test_online_beats_offline_when_in_variance_differs():
    """In-scores much tighter than out-scores: the likelihood ratio (online) uses it, the one-sided
    offline test cannot; the online TPR at low FPR matches the closed-form Neyman-Pearson optimum."""
    d, s_in = 1.0, 0.3
    shadow, masks, target, member = _gaussian_world(20000, 64, d, sigma_in=s_in, seed=4)
    on = lira.attack_metrics(lira.lira_scores(shadow, masks, target, "online"), member, fprs=(0.01, 0.1))
    off = lira.attack_metrics(lira.lira_scores(shadow, masks, target, "offline"), member, fprs=(0.01, 0.1))
    assert on["auc"] > off["auc"] + 0.03
    # closed form: LR is monotone in |z - c| around the in-mean; compute the optimal ROC exactly
    # on a fine grid of thresholds of the true likelihood ratio, with z = (phi - mu)/sigma.
    zz = np.linspace(-12, 12, 400001)
    llr = norm.logpdf(zz, d, s_in) - norm.logpdf(zz, 0, 1)
    order = np.argsort(-llr)
    dz = zz[1] - zz[0]
    tpr = np.cumsum(norm.pdf(zz[order], d, s_in)) * dz
    fpr = np.cumsum(norm.pdf(zz[order])) * dz
    opt = tpr[np.searchsorted(fpr, 0.01)]
    assert on["tpr_at_1pct_fpr"] == pytest.approx(opt, abs=0.04)
    assert on["tpr_at_10pct_fpr"] > off["tpr_at_10pct_fpr"] + 0.2


def test_two_queries_average_and_leave_one_out():
    shadow, masks, target, member = _gaussian_world(3000, 16, 1.0, seed=5, q=2)
    s = lira.lira_scores(shadow, masks, target, "online_fixed")
    assert s.shape == (3000,)
    preds, labels = lira.leave_one_out(shadow, masks, "offline_fixed", targets=[0, 1])
    assert preds.shape == labels.shape == (6000,)
    assert lira.attack_metrics(preds, labels)["auc"] > 0.7


def test_metric_edge_cases():
    m = lira.attack_metrics(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 1, 0, 0]))
    assert m["auc"] == 1 and m["balanced_accuracy"] == 1 and m["tpr_at_0.1pct_fpr"] == 1
    assert m["min_resolvable_fpr"] == 0.5
    with pytest.raises(ValueError, match="both"):
        lira.attack_metrics(np.zeros(3), np.ones(3))
    fig = lira.plot_roc({"x": m})
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_xlim()[0] == pytest.approx(1e-5)


# ---------------------------------------------------------------- planted members
def _digits_half(seed=0, n=400, noise=0.3):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))[:n]
    x, y = x[idx] / 16.0, y[idx].copy()
    flip = rng.uniform(size=n) < noise  # mislabelled examples: only memorisation fits them
    y[flip] = rng.integers(0, 10, size=flip.sum())
    return x.astype(np.float32), y


def _overfit_trainer(x, y, width=1024, ridge=1e-2, scale=10.0):
    """A fast, badly overfitted classifier: a two-layer network whose first layer is random (ReLU
    features of the 8x8 image) and whose second is fitted in closed form (kernel ridge, dual form) to
    interpolate the members' one-hot labels. Queries: the image and its horizontal flip."""
    xq = np.stack([x, x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)], 1)  # [n, 2, 64]
    onehot = np.eye(10)[y] * scale

    def train(members, k):
        rng = np.random.default_rng(1000 + k)
        w = rng.normal(size=(64, width)) / 4.0
        b = rng.normal(size=width)
        feats = np.maximum(xq @ w + b, 0) / np.sqrt(width)  # [n, 2, width]
        h = feats[members, 0]
        alpha = np.linalg.solve(h @ h.T + ridge * np.eye(len(members)), onehot[members])
        return feats @ (h.T @ alpha)  # logits [n, 2, 10]

    return train


def test_planted_members_overfitted_model_is_attacked(tmp_path):
    x, y = _digits_half()
    train = _overfit_trainer(x, y)
    calls = []

    def counted(members, k):
        calls.append(k)
        return train(members, k)

    # shadow models in two shards (as two processes would), then a resumed call trains nothing
    assert lira.run_shadow_models(counted, y, tmp_path, n_models=16, shard="0:8", log=None) == list(range(8))
    with pytest.raises(FileNotFoundError, match="not finished"):
        lira.load_shadow_scores(tmp_path)
    lira.run_shadow_models(counted, y, tmp_path, n_models=16, shard="8:16", log=None)
    assert lira.run_shadow_models(counted, y, tmp_path, n_models=16, log=None) == []
    assert sorted(calls) == list(range(16))
    shadow, masks = lira.load_shadow_scores(tmp_path)
    assert shadow.shape == (16, 400, 2) and (masks.sum(0) == 8).all()
    # a finished shadow model is sealed by rundir.mark_done: a replaced score file is not trusted
    np.savez(lira.shadow_dir(tmp_path, 3) / lira.SCORES_FILE, scores=shadow[3] * 0, mask=masks[3])
    with pytest.raises(FileNotFoundError, match=r"\[3\] of 16"):
        lira.load_shadow_scores(tmp_path)
    assert lira.run_shadow_models(counted, y, tmp_path, n_models=16, log=None) == [3]
    np.testing.assert_allclose(lira.load_shadow_scores(tmp_path)[0], shadow)

    # the target: trained on a planted half the shadows never saw as a unit
    member = np.random.default_rng(99).uniform(size=400) < 0.5
    target = lira.logit_scaled_confidence(train(np.flatnonzero(member), 1000), y[:, None])
    res = {a: lira.attack_metrics(lira.lira_scores(shadow, masks, target, a), member) for a in lira.ATTACKS}
    on = res["online"]
    assert on["auc"] > 0.8 and on["tpr_at_1pct_fpr"] > 0.2, lira.summary(on)
    base = lira.attack_metrics(lira.global_threshold_scores(target), member)
    assert on["tpr_at_1pct_fpr"] > base["tpr_at_1pct_fpr"] + 0.2  # shadow models are what makes it work
    assert res["online_fixed"]["tpr_at_1pct_fpr"] > 0.2 and res["offline_fixed"]["auc"] > 0.65
    # a model that never saw the data: the same attack is at chance
    fresh = lira.logit_scaled_confidence(train(np.flatnonzero(~member), 1001), y[:, None])
    ctrl = lira.attack_metrics(lira.lira_scores(shadow, masks, fresh, "online"), member)
    assert ctrl["auc"] < 0.5  # the non-members of the control are the members of the labelling


def test_shadow_dir_refuses_other_configuration(tmp_path):
    y = np.arange(10) % 3
    lira.prepare_shadow_dir(tmp_path, y, 4, seed=0, config={"epochs": 1})
    lira.prepare_shadow_dir(tmp_path, y, 4, seed=0, config={"epochs": 1})  # same: fine
    with pytest.raises(ValueError, match="another configuration"):
        lira.prepare_shadow_dir(tmp_path, y, 4, seed=0, config={"epochs": 2})
    assert lira.parse_shard("2:4", 8) == [2, 3] and lira.parse_shard("", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        lira.parse_shard("6:9", 8)


def test_few_shadow_models():
    shadow, masks, target, member = _gaussian_world(200, 2, 2.0, seed=6)
    with pytest.raises(ValueError, match="fewer than 2"):
        lira.lira_scores(shadow, masks, target, "online")
    with pytest.raises(ValueError, match="at least 2"):
        lira.lira_scores(shadow, masks, target, "online_fixed")
    preds, labels = lira.leave_one_out(*_gaussian_world(200, 4, 2.0, seed=7)[:2], "offline_fixed")
    assert np.isfinite(preds).all() and labels.sum() == 400


def test_shadow_models_with_the_kits_classifier_trainer(tmp_path):
    """The glue to classify.train_classifier: two tiny shadow models, resumable, queried with flips."""
    import torch
    from realfake_utils import classify
    from realfake_utils.data import digits_array

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a shared CPU: one thread is fastest
    images = digits_array(range(40), 16)
    labels = torch.from_numpy(np.arange(40) % 10)
    recipe = classify.load_recipe("miniature", image_size=16, epochs=1, batch_size=20)
    train = lira.classifier_trainer(images, labels, tmp_path / "models", 10, recipe, seed=0, device="cpu")
    assert lira.run_shadow_models(train, labels.numpy(), tmp_path / "scores", n_models=2, log=None) == [0, 1]
    scores, masks = lira.load_shadow_scores(tmp_path / "scores")
    assert scores.shape == (2, 40, 2) and np.isfinite(scores).all() and (masks.sum(0) == 1).all()
    assert (tmp_path / "models" / "shadow_000" / "model" / "metrics.json").exists()
    model = classify.load_classifier(tmp_path / "models" / "shadow_001" / "model")
    logits = lira.query_logits(model, images)
    np.testing.assert_allclose(lira.logit_scaled_confidence(logits, labels.numpy()[:, None]), scores[1], rtol=1e-5)
    img, y = lira.TensorImages(images, labels)[3]
    assert img.size == (16, 16) and y == 3
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- intervals, curves, record
def test_fast_metrics_equal_sklearn_and_bootstrap_intervals_cover():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    member = rng.uniform(size=3000) < 0.5
    scores = rng.normal(size=3000) + 0.8 * member
    scores[:50] = np.round(scores[:50])  # ties
    m = lira.attack_metrics(scores, member)
    assert lira.fast_auc(scores, member)[0] == pytest.approx(roc_auc_score(member, scores), abs=1e-12)
    for f, key in ((0.001, "tpr_at_0.1pct_fpr"), (0.01, "tpr_at_1pct_fpr"), (0.1, "tpr_at_10pct_fpr")):
        fast = lira.fast_tpr_at_fpr(scores[member], scores[~member], f)[0]
        assert fast == pytest.approx(lira.tpr_at_fpr(m["fpr"], m["tpr"], f), abs=1e-12), f
    ci = lira.bootstrap_intervals(scores, member, n_bootstrap=400, seed=1)
    assert ci["auc"].lo < m["auc"] < ci["auc"].hi and ci["auc"].hi - ci["auc"].lo < 0.05
    assert ci["tpr_at_1pct_fpr"].lo <= m["tpr_at_1pct_fpr"] <= ci["tpr_at_1pct_fpr"].hi
    # the truth (equal-variance Gaussians, shift 0.8): inside the intervals
    assert ci["auc"].lo < norm.cdf(0.8 / np.sqrt(2)) < ci["auc"].hi
    assert lira.bootstrap_intervals(scores, member, 400, seed=1) == ci  # seeded
    assert lira.bootstrap_intervals(scores, member, 400, seed=2) != ci


def test_paired_difference_between_targets():
    """Sec. 4.5's comparison on the same examples: the paired bootstrap of (synthetic - real) is 0 for
    identical targets, resolves a real leak reduction, and is narrower than two separate intervals."""
    rng = np.random.default_rng(5)
    member = rng.uniform(size=2000) < 0.5
    common = rng.normal(size=2000)                 # what both targets share (example difficulty)
    a_scores = common + 1.0 * member
    b_scores = common + 0.6 * member + 0.1 * rng.normal(size=2000)
    a = lira.evaluate_attack("real", "online", a_scores, member, 300, seed=0)
    b = lira.evaluate_attack("synthetic", "online", b_scores, member, 300, seed=0)
    same = lira.paired_difference("online", a, a, a_scores, a_scores, member, 300, seed=0)
    assert same.auc == 0 and same.auc_interval.lo == same.auc_interval.hi == 0
    d = lira.paired_difference("online", a, b, a_scores, b_scores, member, 300, seed=0)
    assert d.auc == pytest.approx(b.auc - a.auc) and d.auc_interval.hi < 0 and d.tpr_at_1pct_fpr_interval.hi < 0
    separate = (a.auc_interval.hi - a.auc_interval.lo) + (b.auc_interval.hi - b.auc_interval.lo)
    assert d.auc_interval.hi - d.auc_interval.lo < separate / 2


def test_subsampled_roc_keeps_the_low_fpr_envelope():
    rng = np.random.default_rng(3)
    member = rng.uniform(size=20000) < 0.5
    m = lira.attack_metrics(rng.normal(size=20000) + member, member)
    assert len(m["fpr"]) > 2000
    fpr, tpr = lira.subsample_roc(m["fpr"], m["tpr"], 500)
    assert len(fpr) <= 502 and fpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    for f in (1e-3, 1e-2, 0.1):  # TPR at a fixed FPR read off the stored curve: as on the full one
        assert lira.tpr_at_fpr(fpr, tpr, f) == pytest.approx(lira.tpr_at_fpr(m["fpr"], m["tpr"], f), abs=0.01)
    assert lira.subsample_roc([0, 0.5, 1], [0, 0.7, 1]) == ([0, 0.5, 1], [0, 0.7, 1])


def _record(tmp_path, n=300):
    shadow, masks, target, member = _gaussian_world(n, 8, 1.5, seed=8, q=2)
    private = lira.PrivateData(images=None, labels=np.zeros(n, dtype=int), rows=[{"id": str(i)} for i in range(n)],
                               member=member, class_names=["a"], image_size=8, seed=0)
    shadows = lira.ShadowModels(shadow, masks, "artifacts/lira/shadows_x")
    syn = lira.SyntheticTarget(target * 0.1, lira.SyntheticInfo(True, "ran", set_name="lora-dm-vg-lp",
                                                                 lora_variant="lora-dm-vg", n_synthetic=n // 2))
    return lira.build_record(private, shadows, target, syn, {"name": "miniature", "epochs": 3}, n_bootstrap=50)


def test_record_round_trips_with_curves_and_draws_fig3(tmp_path):
    rec = _record(tmp_path)
    assert {a.target for a in rec.attacks} == {"real", "synthetic"}
    assert {a.attack for a in rec.by_target("real")} == set(lira.ATTACKS) | {"global"}
    assert rec.leave_one_out is not None and rec.leave_one_out.n_members == 8 * 300 // 2
    assert rec.find("real").auc > rec.find("synthetic").auc  # scaled-down scores: a weaker attack
    assert {d.attack for d in rec.differences} == set(lira.ATTACKS) | {"global"}
    assert rec.difference("online").auc == pytest.approx(rec.find("synthetic").auc - rec.find("real").auc)
    assert rec.paper_tpr_at_0p1pct_fpr == {"real": pytest.approx(1e-4), "synthetic": pytest.approx(1e-5)}
    rec.save(tmp_path)
    back = lira.LiraRecord.load(tmp_path)
    assert back == rec
    a = back.find("real", "online")
    assert isinstance(a, lira.Attack) and isinstance(a.auc_interval, lira.Interval)
    assert isinstance(back.difference("online"), lira.Difference)
    assert a.auc_interval.lo <= a.auc <= a.auc_interval.hi and len(a.fpr) == len(a.tpr) <= 502
    fig = lira.plot_fig3(back)
    assert len(fig.axes) == 2 and all(ax.get_xscale() == "log" for ax in fig.axes)
    assert len(fig.axes[0].lines) == 1 + len(lira.ATTACKS)  # chance + the four LiRA attacks
    assert "TPR@1%FPR" in lira.format_attacks(back.attacks) and "paper" in lira.format_fig3_comparison(back)


def test_private_split_and_unit_tags(tmp_path):
    """Folder tags are content hashes of what defines the unit: n_shadow changes the shadow folder."""
    from realfake_utils import data as D

    rows = [{"id": f"d{i}", "path": "", "index": i, "label": i % 10, "class_name": str(i % 10),
             "split": "train" if i < 60 else "test"} for i in range(80)]
    D.write_manifest(rows, tmp_path / "artifacts" / "data" / "manifest.csv")
    p = lira.private_data(tmp_path, 8, max_examples=40, seed=0)
    assert len(p.rows) == 40 and p.n_members == p.n_nonmembers == 20
    assert p.images.shape == (40, 3, 8, 8)
    q = lira.private_data(tmp_path, 8, max_examples=40, seed=0)
    assert q.key() == p.key() and lira.private_data(tmp_path, 8, 40, seed=1).key() != p.key()
    # the shadow folder is named by the content hash of the unit: another n_shadow is a new folder
    # (not refused as "another configuration"), the same parameters reuse the finished models
    import torch
    from realfake_utils import classify

    torch.set_num_threads(1)
    recipe = classify.load_recipe("miniature", image_size=8, epochs=1, batch_size=20)
    a = lira.shadow_models(tmp_path, p, recipe, n_shadow=2, device="cpu", log=None)
    b = lira.shadow_models(tmp_path, p, recipe, n_shadow=4, device="cpu", log=None)
    assert a.folder != b.folder and a.folder.startswith("artifacts/lira/shadows_")
    assert a.scores.shape == (2, 40, 2) and b.scores.shape == (4, 40, 2)
    again = lira.shadow_models(tmp_path, p, recipe, n_shadow=2, device="cpu", log=print)
    np.testing.assert_array_equal(again.scores, a.scores)
    real = lira.real_target(tmp_path, p, recipe, device="cpu")
    assert real.shape == (40, 2) and np.isfinite(real).all()
    assert len(list((tmp_path / "artifacts" / "lira").glob("target_real_*/DONE.json"))) == 1


# ---------------------------------------------------------------- (b) is made exactly as 02 made its LoRA
@pytest.mark.parametrize("preset", ["imagenette", "eurosat", "digits"])
def test_member_lora_config_equals_02s_under_the_preset(tmp_path, preset):
    """Under a preset's parameters, 06's member LoRA configuration is 02's, field by field (Table 7:
    snr_gamma, mixed precision, flip, lr, global batch, epochs, DM form and weight, guidance token ...);
    only the output folder differs. 02's record is written as 02's train_variants writes it and read
    back from JSON, as 06 reads it."""
    from realfake_utils import finetune as ft
    from realfake_utils import params
    from realfake_utils.rundir import RunDir

    p02 = params.resolve(preset, notebooks=["02_finetune"])["02_finetune"]
    base = "runwayml/stable-diffusion-v1-5" if preset != "digits" else str(tmp_path / "artifacts/miniature/base")
    cfg02 = ft.FinetuneConfig.from_params(p02, base_model=base)
    main = ft.variant_name(True, p02["dm_loss"], p02["visual_guidance"], p02["dm_loss_form"])
    run = RunDir(preset, tmp_path)
    variant = ft.VariantResult(name=main, path=f"artifacts/lora/{main}", steps=1, samples_seen=1,
                               epochs_seen=1.0, passes_min=1, passes_max=1, final_loss=0.1, final_l_simple=0.1,
                               final_l_dm=0.0, reused=False, seconds=1.0, config_key="k", num_processes=1)
    ft.FinetuneRecord(config=cfg02.replace(output_dir="").to_dict(), main_variant=main,
                      variants={main: variant}, n_train=10).save(run)
    member = lira.member_finetune_config(run, main, tmp_path / "artifacts/lira/x/lora")
    want = cfg02.replace(output_dir=str(tmp_path / "artifacts/lira/x/lora")).to_dict()
    assert member.to_dict() == want
    if preset != "digits":   # the paper presets: Table 7 / Eq. 21 values reach the member LoRA
        assert (member.snr_gamma, member.mixed_precision, member.learning_rate) == (0.75, "fp16", 1e-4)
        assert member.global_batch_size == 64 and member.num_train_epochs == 300
        assert member.dm_loss and member.dm_loss_form == "paper" and member.guidance_token_position == "append"
    with pytest.raises(KeyError, match="02 trained no LoRA"):
        lira.member_finetune_config(run, "lora-nodm-novg", tmp_path / "y")


def test_synthetic_target_repeats_02_and_03_on_the_members(tmp_path):
    """Target (b) end to end at tiny size, through 02's and 03's own code (train_variants,
    synthesize_rows): the member LoRA has 02's configuration and trains on the members only, the set
    has 03's settings (the member LoRA swapped in), one image per member; rerunning reuses everything."""
    import torch
    from realfake_utils import classify, data, models
    from realfake_utils import finetune as ft
    from realfake_utils import synthesize as syn
    from realfake_utils.rundir import RunDir, read_json

    torch.set_num_threads(1)
    run = RunDir("t", tmp_path)
    art = run.artifacts
    data.prepare_data("digits", "", art / "data", {"pool": 0.9, "train": 0.05, "test": 0.05}, seed=0)
    names = data.class_names(data.read_manifest(art / "data" / "manifest.csv"))
    clip = models.build_tiny_clip(art / "miniature" / "clip", image_size=16, projection_dim=32, words=names)
    base = models.build_tiny_sd(art / "miniature" / "base", sample_size=16, words=names)
    cfg = ft.FinetuneConfig(base_model=str(base), max_train_steps=2, global_batch_size=8, lora_rank=2,
                            lora_alpha=2.0, learning_rate=1e-3, snr_gamma=0.75, random_flip=True, device="cpu")
    ft.train_variants(run, cfg, ["lora-dm-vg"], clip_model=str(clip), image_size=16,
                      sampling=ft.SampleSettings(n_per_class=0)).save(run)
    scfg = syn.SynthesisConfig(rows=["lora-dm-vg-lp"], default_row="lora-dm-vg-lp", scale_k=[1],
                               synthesis_seeds=[0], base_model=str(base), clip_model=str(clip), image_size=16,
                               lora_scale=0.5, num_inference_steps=2, guidance_scale=2.0,
                               latent_prior_strength=0.75, guidance_feature="class_mean",
                               negative_guidance_token=False, negative_prompt=syn.NEGATIVE_PROMPT, batch_size=16, dtype="float32",
                               device="cpu")
    syn.synthesize_rows(run, scfg, progress=False, mmd=False).save(run)

    private = lira.private_data(run, 16, seed=0)     # the whole train split (90), 45 members
    recipe = classify.load_recipe("miniature", image_size=16, epochs=1, batch_size=32,
                                  model_kwargs={"channels": [8, 8, 8, 8], "stem_width": 8})
    out = lira.synthetic_target(run, private, recipe, device="cpu")
    assert out.info.ran and out.scores.shape == (90, 2) and np.isfinite(out.scores).all()
    assert out.info.set_name == "lora-dm-vg-lp" and out.info.lora_variant == "lora-dm-vg"
    # 02's configuration, only the folder differs
    member_cfg = ft.FinetuneConfig.from_dict(out.info.finetune_config)
    rec02 = ft.FinetuneRecord.load(run)
    want = ft.FinetuneConfig.from_record(rec02.config_of("lora-dm-vg"))
    assert member_cfg.hashed_dict() == want.hashed_dict()
    # trained on the members only (02's train set restricted to them)
    folder = tmp_path / out.info.folder
    ts_m = ft.load_train_set(folder / "members_train_set.safetensors")
    assert ts_m.ids == [i for i, m in zip(private.ids, private.member) if m]
    # 03's settings of the set, with the member LoRA: one image per member
    spec03 = syn.load_spec(tmp_path / syn.SynthesisRecord.load(run).default().path)["settings"]
    spec06 = syn.load_spec(folder / "set")["settings"]
    assert {k: v for k, v in spec06.items() if k != "lora_dir"} == {k: v for k, v in spec03.items() if k != "lora_dir"}
    assert out.info.n_synthetic == private.n_members == 45
    # resumable: a second call trains and generates nothing new, same scores
    before = read_json(folder / "target" / "DONE.json")
    again = lira.synthetic_target(run, private, recipe, device="cpu")
    np.testing.assert_array_equal(again.scores, out.scores)
    assert read_json(folder / "target" / "DONE.json") == before


def test_eurosat_mini_resolves_0p1pct_fpr_and_paper_presets_use_10_shadow_models():
    """Issue "privacy claims measurable": eurosat-mini's private split has >= 1,000 non-members (the
    10,000-image subset, its train fraction, 06's max_examples), so TPR at 0.1 % FPR is resolved; the
    paper presets' shadow count is Sec. 4.5's "10 sampling iterations"."""
    from realfake_utils import params

    p = params.resolve("eurosat-mini", notebooks=["01_prepare", "06_lira"])
    n_train = round(10_000 * p["01_prepare"]["split_fractions"]["train"])
    n = p["06_lira"]["max_examples"] or n_train
    assert n - n // 2 >= 1000
    assert params.resolve("imagenette", notebooks=["06_lira"])["06_lira"]["n_shadow"] == 10
    smoke = params.resolve("smoke", notebooks=["06_lira"])["06_lira"]
    assert smoke["n_shadow"] % 2 == 0 and smoke["n_bootstrap"] > 0
