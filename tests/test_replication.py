"""Replication search: descriptors (through a stand-in TorchScript file), preprocessing, chunked search, cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from memfilter.evaluation.descriptors import Descriptor, load_descriptor, preprocess
from memfilter.evaluation.replication import (background_similarity, embed, match_grid, nearest_neighbours,
                                    replication_stats, similarity_histogram)


class StandIn(torch.nn.Module):
    """A fixed random conv + pooling + linear, shaped like SSCD's TorchScript files: [B,3,H,W] -> [B,D]."""

    def __init__(self, dim: int = 128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2, bias=False)
        self.fc = torch.nn.Linear(8 * 8 * 8, dim, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=(2, 3), keepdim=True)                          # structure, not overall colour
        return self.fc(F.adaptive_avg_pool2d(self.conv(x), 8).flatten(1))


@pytest.fixture(scope="module")
def standin_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "standin.torchscript.pt"
    torch.jit.script(StandIn().eval()).save(str(path))
    return str(path)


def blocky(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A random 16x12 colour grid blown up to `size`: survives any resize, unlike pixel noise."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.NEAREST)


@pytest.mark.parametrize("preprocessing", ["sscd_square320", "sscd_resize288", "wen224"])
def test_planted_copies_are_found_through_a_torchscript_descriptor(standin_path, preprocessing):
    d = load_descriptor("sscd", standin_path, preprocessing, batch_size=8)
    assert d.describe() == {"name": "standin", "preprocessing": preprocessing, "dim": 128, "path": standin_path}
    sizes = [(64, 48), (48, 64), (80, 80)]                                 # mixed sizes: resize288 groups them
    train = [(f"t{i}", blocky(i, sizes[i % 3])) for i in range(30)]
    keys, db = embed(d, train, progress=False)                             # [30, 128]
    planted = [2, 7, 11]
    gens = [train[i][1].copy() for i in planted] + [blocky(1000 + j, sizes[j % 3]) for j in range(6)]
    q = d(gens)                                                            # [9, 128]
    assert torch.allclose(q.norm(dim=1), torch.ones(9), atol=1e-5)
    assert torch.allclose(db.norm(dim=1), torch.ones(30), atol=1e-5)
    sims, idx = nearest_neighbours(q, db, k=1)
    assert [keys[i] for i in idx[:3, 0].tolist()] == [f"t{i}" for i in planted]
    assert torch.all((sims[:3, 0] - 1).abs() < 1e-5)
    assert torch.all(sims[3:, 0] < 0.5), sims[3:, 0]                       # different images stay below the bar
    stats = replication_stats(sims[:, 0], threshold=0.5)
    assert stats["n"] == 9 and stats["frac_above"] == pytest.approx(3 / 9)
    # batching does not change descriptors: one image at a time gives the same rows
    assert torch.allclose(torch.cat([d([g]) for g in gens[:4]]), q[:4], atol=1e-5)


def _rand_unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_chunked_search_equals_brute_force():
    q, db = _rand_unit(37, 16, 0), _rand_unit(1000, 16, 1)                 # random floats: no ties
    full = q @ db.T                                                        # [37, 1000]
    ref_s, ref_i = full.topk(3, dim=1)
    sims, idx = nearest_neighbours(q, db, k=3, chunk_size=97, query_chunk_size=10)
    assert torch.equal(idx, ref_i) and torch.allclose(sims, ref_s, atol=1e-6)
    s1, i1 = nearest_neighbours(q, db.half(), k=1, chunk_size=64)         # float16 storage, float32 products
    assert torch.equal(i1[:, 0], (q @ db.half().float().T).argmax(dim=1))
    s_all, _ = nearest_neighbours(q, db[:2], k=5)                          # k clamped to N
    assert s_all.shape == (37, 2)


def test_exclusions_and_background():
    db = _rand_unit(300, 8, 2)
    full = db @ db.T
    sims, idx = nearest_neighbours(db, db, k=2, chunk_size=41, exclude_self=True)
    assert not torch.any(idx == torch.arange(300)[:, None])
    ref = full.clone().fill_diagonal_(float("-inf")).topk(2, dim=1)
    assert torch.equal(idx, ref.indices) and torch.allclose(sims, ref.values, atol=1e-6)
    plain, _ = nearest_neighbours(db, db, k=1)
    assert torch.allclose(plain[:, 0], torch.ones(300), atol=1e-5)         # without exclusion: itself
    # ragged per-query exclusions
    ban = [[0, int(ref.indices[0, 0])], [], [int(ref.indices[2, 0]), 2]]     # query 1 may match itself
    _, i3 = nearest_neighbours(db[:3], db, k=1, exclude=ban)
    assert i3[0, 0] == ref.indices[0, 1] and i3[1, 0] == 1 and i3[2, 0] == ref.indices[2, 1]
    bg = background_similarity(db, sample=50, seed=0, chunk_size=64)
    pick = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:50]
    assert torch.allclose(bg, ref.values[pick, 0], atol=1e-6)
    assert background_similarity(db[:1]).numel() == 0


def test_preprocessing_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))   # W=400, H=300
    # wen224: short side 256 -> 341x256, centre crop 224 (left round(58.5)=58, top 16), (x - 0.5) / 0.5
    a = np.asarray(img.resize((341, 256), Image.BILINEAR), dtype=np.float32) / 255.0
    ref = ((a[16:240, 58:282] - 0.5) / 0.5).transpose(2, 0, 1)
    out = preprocess(img, "wen224")
    assert out.shape == (1, 3, 224, 224) and np.allclose(out[0].numpy(), ref, atol=1e-6)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    a = np.asarray(img.resize((320, 320), Image.BILINEAR), dtype=np.float32) / 255.0
    assert np.allclose(preprocess(img, "sscd_square320")[0].numpy(), ((a - mean) / std).transpose(2, 0, 1), atol=1e-6)
    a = np.asarray(img.resize((384, 288), Image.BILINEAR), dtype=np.float32) / 255.0
    out = preprocess(img, "sscd_resize288")
    assert out.shape == (1, 3, 288, 384)
    assert np.allclose(out[0].numpy(), ((a - mean) / std).transpose(2, 0, 1), atol=1e-6)
    assert preprocess(img.rotate(90, expand=True), "sscd_resize288").shape == (1, 3, 384, 288)
    # the normalisation constants themselves, on a flat colour (no interpolation involved)
    flat = Image.new("RGB", (50, 70), (255, 0, 51))
    assert np.allclose(preprocess(flat, "wen224")[0, :, 0, 0].numpy(), [1.0, -1.0, -0.6], atol=1e-6)
    got = preprocess(flat, "sscd_square320")[0, :, 5, 5].numpy()
    assert np.allclose(got, ([1.0, 0.0, 0.2] - mean) / std, atol=1e-5)
    with pytest.raises(ValueError, match="group them"):
        preprocess([img, flat], "sscd_resize288")
    with pytest.raises(ValueError, match="wen224"):
        preprocess(img, "imagenet")


def test_pixel_fallback_is_named_and_normalised():
    d = load_descriptor("pixels", None, "wen224")
    info = d.describe()
    assert "fallback" in info["name"] and "not SSCD" in info["name"] and info["dim"] == 768
    assert info["preprocessing"] == "wen224" and info["path"] is None
    ims = [blocky(i) for i in range(5)]
    x = d(ims + [ims[3].copy()])
    assert x.shape == (6, 768) and torch.allclose(x.norm(dim=1), torch.ones(6), atol=1e-5)
    s, i = nearest_neighbours(x[5:], x[:5])
    assert i[0, 0] == 3 and s[0, 0] > 1 - 1e-5


def test_missing_weights_name_the_config_field(tmp_path):
    for path in (None, str(tmp_path / "nope.torchscript.pt")):
        with pytest.raises(FileNotFoundError) as err:
            load_descriptor("sscd", path)
        msg = str(err.value)
        assert "evaluation.sscd_path" in msg and "sscd_disc_mixup.torchscript.pt" in msg
        assert "sscd-copy-detection" in msg
    with pytest.raises(ValueError, match="sscd"):
        load_descriptor("clip")


class Counting(Descriptor):
    def __init__(self, preprocessing: str = "wen224"):
        super().__init__("counting", lambda x: x.mean(dim=(2, 3)) + 0.1, preprocessing, 3)  # [B,3,H,W] -> [B,3]
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return super().__call__(images)


def test_embedding_cache_hits_on_the_second_call(tmp_path):
    samples = [(f"k{i}", blocky(i)) for i in range(10)]
    d = Counting()
    keys, x = embed(d, iter(samples), cache_dir=tmp_path, chunk_size=4, progress=False)
    assert d.calls == 3 and keys == [k for k, _ in samples] and x.shape == (10, 3)
    keys2, x2 = embed(d, iter(samples), cache_dir=tmp_path, chunk_size=4, progress=False)
    assert d.calls == 3 and keys2 == keys and torch.equal(x2, x)              # all from the cache
    changed = samples[:8] + [("other", samples[8][1]), samples[9]]
    embed(d, changed, cache_dir=tmp_path, chunk_size=4, progress=False)
    assert d.calls == 4                                                       # only the last chunk again
    other = Counting("sscd_square320")
    embed(other, samples, cache_dir=tmp_path, chunk_size=4, progress=False)
    assert other.calls == 3                                                   # another preprocessing: a miss
    embed(d, samples, cache_dir=None, chunk_size=4, progress=False)
    assert d.calls == 7                                                       # no cache_dir: no cache


def test_stats_and_pictures(tmp_path):
    sims = np.linspace(0, 1, 101)                                            # 0.00, 0.01, ..., 1.00
    s = replication_stats(torch.tensor(sims), threshold=0.5)
    assert s["n"] == 101 and s["mean"] == pytest.approx(0.5) and s["max"] == pytest.approx(1.0)
    assert s["p95"] == pytest.approx(0.95) and s["frac_above"] == pytest.approx(50 / 101)   # strictly above
    assert replication_stats([], 0.5)["mean"] is None
    rows = [{"generated": blocky(0), "match": blocky(0), "similarity": 0.99, "prompt": "a very long prompt " * 10},
            {"generated": blocky(1), "match": None, "similarity": 0.12, "prompt": "short"}]
    grid = Image.open(match_grid(rows, tmp_path / "grid.png", cell=64))
    assert grid.width == 2 * 64 + 12 and grid.height > 2 * 64
    assert np.asarray(grid)[16 + 10, 4 + 10].tolist() == np.asarray(blocky(0).resize((64, 48)))[2, 10].tolist()
    hist = similarity_histogram({"duplicated": sims, "unique": torch.rand(20), "empty": []}, tmp_path / "h.png")
    assert Image.open(hist).size[0] > 100
