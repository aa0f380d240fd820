"""Map-style sources: image folders and HF datasets yield Samples, skip every bad kind with its reason."""
from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from memfilter.train.data.hf import HFSource
from memfilter.train.data.imagefolder import DataConfigError, ImageFolderSource


def smooth(seed: int, size=(40, 32)) -> Image.Image:
    """A random smooth RGB image: distinct seeds give distinct (and perceptually distant) images."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.BICUBIC)


def encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    return b"\xff\xd8\xff\xe0" + np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()


def truncated_png() -> bytes:
    data = encode(smooth(99, (64, 64)), "PNG")
    return data[: len(data) // 2]


def split(source) -> tuple[dict, list]:
    """Good samples by key, and (key, reason) of skips, over one pass."""
    good, skipped = {}, []
    for i in range(len(source)):
        s = source[i]
        if "skip" in s:
            skipped.append((s["key"], s["skip"]))
        else:
            good[s["key"]] = s
    return good, sorted(skipped)


def bad_folder(root):
    """Three good images and one of every bad kind (ImageFolderSource with min_size=2, max_pixels=10000)."""
    (root / "sub").mkdir(parents=True)
    (root / "g0.jpg").write_bytes(encode(smooth(0)))
    (root / "g0.txt").write_text("good zero")
    (root / "g0.png").write_bytes(encode(smooth(5), "PNG"))        # same key as g0.jpg
    (root / "g1.png").write_bytes(encode(smooth(1), "PNG"))
    (root / "g1.txt").write_text("good one")
    (root / "sub" / "g2.jpg").write_bytes(encode(smooth(2)))
    (root / "sub" / "g2.json").write_text(json.dumps({"caption": "good two", "dup_group": 4}))
    for name, data, caption in [("corrupt.jpg", corrupt_jpeg(), "x"), ("trunc.png", truncated_png(), "x"),
                                ("empty.jpg", encode(smooth(3)), "  \n"), ("nocap.jpg", encode(smooth(4)), None),
                                ("tiny.png", encode(Image.new("RGB", (1, 1)), "PNG"), "x"),
                                ("big.jpg", encode(smooth(6, (200, 120))), "x")]:
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption)
    return {"good": {"g0": "good zero", "g1": "good one", "sub/g2": "good two"},
            "skipped": sorted([("g0", "duplicate_key"), ("corrupt", "undecodable"), ("trunc", "undecodable"),
                               ("empty", "empty_caption"), ("nocap", "missing_caption"), ("tiny", "too_small"),
                               ("big", "too_large")])}


def test_imagefolder_metadata_jsonl_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    smooth(0).save(tmp_path / "a.jpg")
    smooth(1, (24, 20)).convert("RGBA").save(tmp_path / "sub" / "b.png")
    smooth(2).save(tmp_path / "sub" / "c.jpg")
    rows = [{"file_name": "a.jpg", "text": "an a"}, {"file_name": "sub/b.png", "text": ["b1", "b2"], "dup_group": 7}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "c.jpg", "caption": "a c"}))
    src = ImageFolderSource(tmp_path)
    assert src.keys == ["a", "sub/b", "sub/c"] and len(src) == 3
    good, skipped = split(src)
    assert skipped == []
    assert good["a"]["caption"] == "an a" and good["sub/c"]["caption"] == "a c"
    assert good["sub/b"]["caption"] in ("b1", "b2")
    assert {k: s["meta"]["dup_group"] for k, s in good.items()} == {"a": -1, "sub/b": 7, "sub/c": -1}
    b = good["sub/b"]
    assert b["image"].mode == "RGB" and b["image"].size == (24, 20)
    assert b["meta"]["source"] == "imagefolder" and b["meta"]["epoch"] == 0
    src.set_epoch(3)
    assert src[0]["meta"]["epoch"] == 3


def test_imagefolder_metadata_csv(tmp_path):
    for i in range(3):
        smooth(i).save(tmp_path / f"im{i}.jpg")
    (tmp_path / "metadata.csv").write_text('file_name,caption,dup_group\nim0.jpg,"zero, with comma",2\n'
                                           'im1.jpg,one,\nim2.jpg,,\n')
    good, skipped = split(ImageFolderSource(tmp_path, caption_column="caption"))
    assert {k: (s["caption"], s["meta"]["dup_group"]) for k, s in good.items()} == {
        "im0": ("zero, with comma", 2), "im1": ("one", -1)}
    assert skipped == [("im2", "empty_caption")]


def test_imagefolder_sidecars_and_every_bad_kind(tmp_path):
    expected = bad_folder(tmp_path)
    src = ImageFolderSource(tmp_path, min_size=2, max_pixels=100 * 100)
    good, skipped = split(src)
    assert {k: s["caption"] for k, s in good.items()} == expected["good"]
    assert skipped == expected["skipped"]
    assert good["sub/g2"]["meta"]["dup_group"] == 4 and good["g0"]["meta"]["dup_group"] == -1
    assert np.array_equal(np.asarray(good["g0"]["image"]), np.asarray(Image.open(tmp_path / "g0.jpg").convert("RGB")))
    # without the size limits (min_size=0; the default max_pixels), tiny and big are good samples
    good, _ = split(ImageFolderSource(tmp_path, min_size=0))
    assert {"tiny", "big"} <= set(good)


def _hf_dataset() -> tuple[datasets.Dataset, dict, list]:
    """Eight rows: two good, then corrupt, truncated, empty caption, no caption, 1x1, no image."""
    images = [smooth(0), smooth(1), {"bytes": corrupt_jpeg(), "path": None}, {"bytes": truncated_png(), "path": None},
              smooth(4), smooth(5), Image.new("RGB", (1, 1)), None]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "group": datasets.Value("int64"), "other": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": images, "text": ["zero", "one", "x", "x", "", None, "x", "x"],
                                     "group": [3, None, -1, -1, -1, -1, -1, -1], "other": list(range(8))},
                                    features=features)
    reasons = ["undecodable", "undecodable", "empty_caption", "missing_caption", "too_small", "missing_image"]
    skipped = [(f"train-{i + 2:08d}", r) for i, r in enumerate(reasons)]
    return ds, {"train-00000000": ("zero", 3), "train-00000001": ("one", -1)}, skipped


def test_hf_from_save_to_disk_skips_bad_rows(tmp_path):
    ds, good_expected, skipped_expected = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "ds"))
    src = HFSource(str(tmp_path / "ds"), dup_group_column="group", min_size=2)
    good, skipped = split(src)
    assert {k: (s["caption"], s["meta"]["dup_group"]) for k, s in good.items()} == good_expected
    assert skipped == skipped_expected
    assert np.abs(np.asarray(good["train-00000000"]["image"], dtype=int) - np.asarray(smooth(0), dtype=int)).max() == 0
    assert good["train-00000000"]["meta"]["source"] == "hf"
    # the same rows work in dataloader workers (the source pickles, decoding happens there)
    keys = [s["key"] for s in DataLoader(src, batch_size=None, num_workers=1, collate_fn=lambda s: s)]
    assert keys == [f"train-{i:08d}" for i in range(8)]


def test_hf_from_parquet_with_key_column_and_paths(tmp_path):
    smooth(7).save(tmp_path / "seven.png")
    table = pa.table({"id": ["a", "b", "a", "c", "d"],
                      "image": [encode(smooth(0)), encode(smooth(1), "PNG"), encode(smooth(2)), None, None],
                      "path": ["x", "x", "x", "seven.png", "missing.png"],
                      "captions": [["a1", "a2"], ["b1"], ["z"], ["c1"], ["d1"]]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    src = HFSource(str(tmp_path / "part-0.parquet"), caption_column="captions", key_column="id",
                   cache_dir=str(tmp_path / "cache"))
    good, skipped = split(src)
    assert set(good) == {"a", "b"} and good["a"]["caption"] in ("a1", "a2") and good["b"]["caption"] == "b1"
    assert skipped == [("a", "duplicate_key"), ("c", "missing_image"), ("d", "missing_image")]
    # a column of relative paths resolves against the table's folder
    src = HFSource(str(tmp_path / "part-0.parquet"), image_column="path", caption_column="captions",
                   key_prefix="t", cache_dir=str(tmp_path / "cache"))
    good, skipped = split(src)
    assert set(good) == {"t-00000003"} and good["t-00000003"]["image"].size == (40, 32)
    assert ("t-00000004", "unreadable") in skipped and ("t-00000000", "unreadable") in skipped


def test_list_captions_vary_by_epoch_and_are_stable_within_one(tmp_path):
    options = [f"caption {i}" for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": [smooth(0)], "text": [options]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Sequence(datasets.Value("string"))}))
    src = HFSource(dataset=ds, seed=1)
    picks = []
    for epoch in range(8):
        src.set_epoch(epoch)
        first = src[0]["caption"]
        assert src[0]["caption"] == first == src.caption_of(0)     # stable within an epoch
        assert src[0]["meta"]["epoch"] == epoch
        picks.append(first)
    assert set(picks) <= set(options) and len(set(picks)) > 1
    again = HFSource(dataset=ds, seed=1)
    again.set_epoch(5)
    assert again[0]["caption"] == picks[5]                         # a function of (seed, epoch, key)


def test_construction_errors_name_the_field(tmp_path):
    with pytest.raises(DataConfigError, match=r"data\.path=.*no such folder"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataConfigError, match=r"data\.path=.*no images found"):
        ImageFolderSource(tmp_path / "empty")
    with pytest.raises(DataConfigError, match=r"input\.path="):
        ImageFolderSource(tmp_path / "nope", config_prefix="input")
    with pytest.raises(DataConfigError, match=r"data\.path=.*no such file or folder"):
        HFSource(str(tmp_path / "nope.parquet"), format="parquet")
    ds, _, _ = _hf_dataset()
    with pytest.raises(DataConfigError, match=r"data\.image_column='img'.*available columns: \['image', 'text'"):
        HFSource(dataset=ds, image_column="img")
    with pytest.raises(DataConfigError, match=r"data\.caption_column='caption'"):
        HFSource(dataset=ds, caption_column="caption")
    with pytest.raises(DataConfigError, match=r"data\.key_column='id'"):
        HFSource(dataset=ds, key_column="id")


@pytest.mark.parametrize("name", ["imagefolder", "hf"])
def test_data_configs_match_the_constructors(tmp_path, name):
    """Every key of conf/data/<name>.yaml (but name, duplication and keep_list) is a constructor argument."""
    from omegaconf import OmegaConf

    from tests.conftest import compose
    from memfilter.train.data.duplication import make_plan

    bad_folder(tmp_path)
    if name == "hf":
        _hf_dataset()[0].save_to_disk(str(tmp_path / "ds"))
    path = tmp_path / "ds" if name == "hf" else tmp_path
    cfg = compose([f"data={name}", f"data.path={path}", "data.duplication.protocol=somepalli",
                   "data.duplication.fraction=0.5", "data.duplication.weight=2"])
    kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    assert kwargs.pop("name") == name
    dup = kwargs.pop("duplication")
    assert kwargs.pop("keep_list") is None                  # applied by the builder around any source
    src = (HFSource if name == "hf" else ImageFolderSource)(**kwargs)
    assert len(src) == 8 + (name == "imagefolder") * 2
    dup.pop("caption_file")
    plan = make_plan(dup.pop("protocol"), len(src), **dup)
    assert len(plan) == len(src) + round(len(src) / 2)


def test_degenerate_images_are_skipped_by_default_and_the_worlds_pass(tmp_path):
    """min_size defaults to 16 px: a 1x1 or 8x12 image is a counted `too_small` skip, the toy world's 16 px and
    larger images are used."""
    for name, size in (("dot", (1, 1)), ("thin", (8, 12)), ("world", (16, 16)), ("photo", (40, 32))):
        smooth(3, size).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a {name}")
    src = ImageFolderSource(tmp_path)
    got = {src.key(i): src[i].get("skip") for i in range(len(src))}
    assert got == {"dot": "too_small", "thin": "too_small", "world": None, "photo": None}


def test_tokenize_gives_the_tokenizers_own_ids_through_its_backend():
    """Tokenize pads and truncates through the fast tokenizer's backend, set once: the ids of the tokenizer's own
    __call__ (padding to model_max_length, truncation keeping the end token), also in a worker's copy."""
    import copy
    import random

    import torch

    from memfilter.train.data.collate import Tokenize
    from memfilter.train.families import build_tiny_sdxl, get_family
    words = "a photo of red blue circle square near sea dog zorvik the ,.!? émigré 東京".split()
    rng = random.Random(0)
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 120))) for _ in range(30)] + ["", "A"]
    tokenize = get_family(build_tiny_sdxl(resolution=16, block_out_channels=(32, 32), vae_channels=(32, 32))
                          ).tokenize_fn()
    for t in (tokenize, copy.deepcopy(tokenize)):      # a worker's copy: through __getstate__, as pickling
        got = t(captions)
        for name, tok in tokenize.tokenizers.items():
            want = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
            assert torch.equal(got[name], want) and tokenize._backend(name, tok) is not None


def test_pillow_block_cache_is_turned_on_unless_the_user_chose(monkeypatch):
    from memfilter.train.data.collate import stack_pixels
    from memfilter.train.data.transforms import IMAGE_BLOCKS, reuse_image_memory, to_model_range

    before = Image.core.get_blocks_max()
    try:
        monkeypatch.delenv("PILLOW_BLOCKS_MAX", raising=False)
        Image.core.set_blocks_max(0)
        reuse_image_memory()
        assert Image.core.get_blocks_max() == IMAGE_BLOCKS
        Image.core.set_blocks_max(3)                         # the user's own value stays
        reuse_image_memory()
        assert Image.core.get_blocks_max() == 3
        Image.core.set_blocks_max(0)
        monkeypatch.setenv("PILLOW_BLOCKS_MAX", "0")         # so does an explicit 0 through the environment
        reuse_image_memory()
        assert Image.core.get_blocks_max() == 0
    finally:
        Image.core.set_blocks_max(before)
    # the channels-last batch holds the planar images, and the model range comes out planar and equal
    import torch
    hwc = [np.random.default_rng(i).integers(0, 256, (5, 7, 3), dtype=np.uint8) for i in range(3)]
    planar = [torch.from_numpy(a).permute(2, 0, 1) for a in hwc]
    batch, ring = stack_pixels(planar, 5)
    assert not ring                                          # outside a worker: private memory, nothing to release
    assert batch.shape == (3, 3, 5, 7) and torch.equal(batch, torch.stack(planar))
    out = to_model_range(batch)
    assert out.is_contiguous() and torch.equal(out, torch.stack(planar).float() / 127.5 - 1.0)
