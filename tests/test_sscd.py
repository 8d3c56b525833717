"""SSCD copy retrieval: SHA-checked TorchScript loading, preprocessing, chunked top-k, score
normalisation, and planted copies found by a miniature descriptor trained self-supervised here."""
import numpy as np
import pytest
import torch

from realfake_utils import sscd



class _Flat(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_load_descriptor_checks_sha256_before_loading(tmp_path):
    path = tmp_path / "d.torchscript.pt"
    torch.jit.script(_Flat()).save(str(path))
    good = sscd.sha256_file(path)
    model = sscd.load_descriptor(path, good.upper())
    assert model(torch.ones(2, 3, 2, 2)).shape == (2, 12)
    with pytest.raises(sscd.ChecksumError) as err:
        sscd.load_descriptor(path, "0" * 64)
    assert good in str(err.value) and "0" * 64 in str(err.value)
    with pytest.raises(sscd.ChecksumError, match=good):
        sscd.load_descriptor(path, "")
    with pytest.raises(FileNotFoundError):
        sscd.load_descriptor(tmp_path / "missing.pt", good)


def test_preprocess_sizes_and_normalisation():
    img = torch.full((2, 3, 48, 64), 255, dtype=torch.uint8)
    x = sscd.preprocess(img, 288, "short_side")
    assert x.shape == (2, 3, 288, 384)
    expect = (1 - torch.tensor(sscd.IMAGENET_MEAN)) / torch.tensor(sscd.IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 5, 5], expect)
    assert sscd.preprocess(img, 320, "square").shape == (2, 3, 320, 320)
    with pytest.raises(ValueError, match="short_side"):
        sscd.preprocess(img, 10, "long_side")


def test_topk_chunked_matches_brute_force_and_background_norm():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(37, 8, generator=g), torch.randn(50, 8, generator=g)
    sims, idx = sscd.topk_similar(q, r, k=5, chunk_size=4, device="cpu")
    full = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T
    v, j = full.topk(5, dim=1)
    torch.testing.assert_close(sims, v)
    assert torch.equal(idx, j)
    s_self, i_self = sscd.topk_similar(r, r, k=3, chunk_size=7, exclude_self=True)
    assert not (i_self == torch.arange(50)[:, None]).any()
    bg = torch.randn(20, 8, generator=g)
    norm = sscd.background_normalize(sims, q, bg, beta=0.5, first=0, last=2)
    b, _ = sscd.topk_similar(q, bg, k=3)
    torch.testing.assert_close(norm, sims - 0.5 * b.mean(1, keepdim=True))
    st = sscd.copy_stats(np.array([0.2, 0.6, 0.8, 0.9]))
    assert st["share_above_0.5"] == 0.75 and st["share_above_0.75"] == 0.5 and st["count_above_0.75"] == 2


def _tinted_digits(indices, seed):
    """Digits drawn in a random colour on a random background: small "photos" that differ in more
    than the stroke shape (plain grey digits of one class are near-duplicates of each other)."""
    from realfake_utils.data import digits_array

    x = digits_array(indices, 16).float() / 255.0
    g = torch.Generator().manual_seed(seed)
    fg, bg = torch.rand(len(x), 3, 1, 1, generator=g), torch.rand(len(x), 3, 1, 1, generator=g)
    return ((x * fg + (1 - x) * bg) * 255).round().to(torch.uint8)


@pytest.fixture
def one_thread():
    """Small convolutions on a shared CPU: one thread is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_planted_copies_are_found_by_the_miniature_descriptor(tmp_path, one_thread):
    real = _tinted_digits(range(200), seed=0)  # the "training images"
    others = _tinted_digits(range(1000, 1060), seed=1)  # unrelated images among the synthetic ones
    path, sha = sscd.train_miniature_descriptor(real, tmp_path / "mini.pt", size=16, steps=80,
                                                batch_size=64, width=8, log_every=0)
    assert sscd.recorded_sha256(path) == sha == sscd.sha256_file(path)
    mtime = path.stat().st_mtime_ns
    assert sscd.train_miniature_descriptor(real, path, size=16, steps=80, batch_size=64, width=8,
                                           log_every=0) == (path, sha)  # cached: not retrained
    assert path.stat().st_mtime_ns == mtime
    model = sscd.load_descriptor(path, sha)  # the TorchScript file, through the checked loader

    sources = [3, 42, 77, 150, 199]
    planted, kinds = [], []
    for s in sources:
        for kind, img in sscd.near_copies(real[s], crop=0.9, jitter=1.15, saturation=0.8, quality=50).items():
            planted.append(img)
            kinds.append((s, kind))
    synthetic = torch.cat([others[:30], torch.stack(planted), others[30:]])
    offset = 30
    d_syn = sscd.compute_descriptors(model, synthetic, size=16, mode="square", batch_size=32)
    d_real = sscd.compute_descriptors(model, real, size=16, mode="square")
    assert torch.allclose(d_syn.norm(dim=1), torch.ones(len(d_syn)), atol=1e-5)
    sims, idx = sscd.topk_similar(d_syn, d_real, k=5, chunk_size=16)
    for j, (s, kind) in enumerate(kinds):
        assert int(idx[offset + j, 0]) == s, (kind, s, idx[offset + j].tolist())
        assert float(sims[offset + j, 0]) > sscd.COPY_THRESHOLD, (kind, float(sims[offset + j, 0]))
        if kind == "exact":
            assert float(sims[offset + j, 0]) == pytest.approx(1.0, abs=1e-4)
    # exact copies are the most similar synthetic images of all
    strong = [offset + j for j, (_, k) in enumerate(kinds) if k == "exact"]
    top = torch.argsort(sims[:, 0], descending=True)[:len(strong)].tolist()
    assert sorted(top) == sorted(strong)
    fig = sscd.plot_top_matches(synthetic, real, sims, idx, n=3, k=3)
    assert len(fig.axes) == 12
    sscd.plot_similarity_histogram({"synthetic": sims[:, 0]})


def test_calibrate_threshold_reaches_the_target_precision_on_planted_scores():
    # copies score 0.9 / 0.8 / 0.7 / 0.6 (the last one retrieved the wrong source); non-copies 0.75, 0.5, 0.4
    copies = [0.9, 0.8, 0.7, 0.6]
    correct = [True, True, True, False]
    noncopies = [0.75, 0.5, 0.4]
    cal = sscd.calibrate_threshold(copies, correct, noncopies, target_precision=0.9, kinds=["a", "a", "b", "b"])
    assert (cal.threshold, cal.precision, cal.recall, cal.achieved) == (0.8, 1.0, 0.5, True)
    assert cal.recall_by_kind == {"a": 1.0, "b": 0.0}
    rates = sscd.set_copies(torch.tensor([0.85, 0.81, 0.2, 0.79]), cal)
    assert (rates.copies, rates.copy_rate, rates.n) == (2, 0.5, 4)
    cal = sscd.calibrate_threshold(copies, correct, noncopies, target_precision=0.7)
    assert (cal.threshold, cal.recall) == (0.7, 0.75) and cal.precision == pytest.approx(0.75)
    none = sscd.calibrate_threshold([0.5], [True], [0.9], target_precision=0.9)
    assert not none.achieved and none.threshold > 0.9 and none.recall == 0.0
    assert sscd.set_copies(torch.tensor([0.95]), none).copies == 0   # not calibrated: nothing is called a copy


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_miniature_descriptor_calibrated_on_planted_copies_and_byte_stable(tmp_path, one_thread):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(96, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    p1, sha1 = sscd.train_miniature_descriptor(images[:64], tmp_path / "a" / "d.pt", size=16, dim=16, width=8,
                                               steps=30, batch_size=32, device="cpu", log_every=0)
    p2, sha2 = sscd.train_miniature_descriptor(images[:64], tmp_path / "b" / "other.pt", size=16, dim=16, width=8,
                                               steps=30, batch_size=32, device="cpu", log_every=0)
    assert sha1 == sha2 == sscd.sha256_file(p2)   # identical runs: identical bytes, whatever the file name
    assert b"/" + str(sscd.__file__).split("/")[1].encode() not in p1.read_bytes()  # no source paths inside
    model = sscd.load_descriptor(p1, sha1)
    embed = lambda x: sscd.compute_descriptors(model, x, size=16, mode="square", device="cpu")  # noqa: E731
    ref, held = images[:64], images[64:]
    cal, info = sscd.calibrate(embed, ref, embed(ref), embed(held), n_sources=20, seed=0, target_precision=0.9,
                               device="cpu")
    assert info["top1_is_source"]["exact"] == 1.0 and info["exact_top1_min"] > 0.999
    assert cal.n_copies == 60 and cal.n_noncopies == 32 and cal.kinds == ["crop", "jitter", "jpeg"]
    assert not cal.achieved or cal.precision >= 0.9
    # at the calibrated threshold, the planted copies themselves (as a "set") are flagged at the recall
    copies, src, kinds = sscd.planted_copies(ref, 20, 0)
    rate = sscd.set_copies(sscd.topk_similar(embed(copies), embed(ref), k=1, device="cpu")[0][:, 0], cal)
    assert rate.copy_rate >= cal.recall - 1e-9


def test_lazy_images_read_rows_only_when_indexed_and_give_the_same_descriptors(tmp_path):
    """07 streams splits and sets (sscd.LazyImages): the same images and descriptors as one tensor."""
    from PIL import Image

    from realfake_utils import data

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 255, (7, 3, 8, 8), generator=g, dtype=torch.uint8)
    rows = []
    for i, im in enumerate(imgs):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
        rows.append({"id": str(i), "path": str(tmp_path / f"{i}.png"), "label": i % 2, "split": "train"})
    lazy = sscd.LazyImages(rows, 8)
    full = data.load_images(rows, 8)
    assert len(lazy) == 7 and torch.equal(lazy[2], full[2]) and torch.equal(lazy[1:5], full[1:5])
    assert torch.equal(lazy.all(), full)
    model = sscd.TinyDescriptor(dim=8, width=4).eval()
    assert torch.allclose(sscd.compute_descriptors(model, lazy, size=8, batch_size=3, device="cpu"),
                          sscd.compute_descriptors(model, full, size=8, batch_size=3, device="cpu"), atol=1e-6)
    (tmp_path / "3.png").unlink()                 # nothing was read ahead: a file is opened when indexed
    assert torch.equal(lazy[0], full[0])
    with pytest.raises(Exception):
        lazy[3]
