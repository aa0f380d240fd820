"""The webdataset streaming source: epoch coverage across ranks and workers, exact resume, bad samples."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from memfilter.train.data.collate import CollateForTraining
from memfilter.train.data.report import DataReport
from memfilter.train.data.transforms import ImageTransform
from memfilter.train.data.wds import WebDatasetSource
from memfilter.train.tokenizer import build_tiny_tokenizer

COLLATE = CollateForTraining(build_tiny_tokenizer(), ImageTransform(16))


def png(color=(200, 30, 30), size=(20, 20), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def write_shards(folder, n_shards=8, per_shard=6, counts=True):
    folder.mkdir(parents=True, exist_ok=True)
    table = {}
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as w:
            for i in range(per_shard):
                w.write({"__key__": f"s{s}-{i}", "png": png((s * 30, i * 40, 0)), "txt": f"a red circle {s} {i}",
                         "json": json.dumps({"dup_group": s if i == 0 else -1})})
        table[name] = per_shard
    if counts:
        (folder / "shards.json").write_text(json.dumps(table))
    return str(folder / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def epoch_batches(pattern, rank, world, workers, epoch=0, resume=None, batch_size=4, **kw):
    src = WebDatasetSource(pattern, seed=1, shuffle_buffer=5, **kw)
    src.bind(COLLATE, rank=rank, world_size=world, batch_size=batch_size)
    src.set_epoch(epoch)
    if resume:
        src.set_resume(epoch, resume[0], resume[1], num_workers=max(1, workers))
    return list(DataLoader(src, batch_size=None, num_workers=workers))


@pytest.mark.parametrize("workers", [0, 2])
def test_every_key_once_per_epoch_across_ranks_and_workers(tmp_path, workers):
    pattern = write_shards(tmp_path / "shards")
    for epoch in (0, 1):
        keys = []
        for rank in (0, 1):
            batches = epoch_batches(pattern, rank, 2, workers, epoch=epoch)
            assert len(batches) == 6                      # 48 samples / (2 ranks x 4)
            keys += [k for b in batches for k in b["keys"]]
            assert all(b["pixel_values"].shape == (4, 3, 16, 16) for b in batches)
        assert len(keys) == 48 and len(set(keys)) == 48
        if epoch == 0:
            first = keys
    assert first != keys                                  # a new shuffle each epoch


def test_shard_counts_from_a_header_scan_match_shards_json(tmp_path):
    a = WebDatasetSource(write_shards(tmp_path / "a"), seed=0)
    b = WebDatasetSource(write_shards(tmp_path / "b", counts=False), seed=0)
    assert list(a.counts.values()) == list(b.counts.values()) == [6] * 8


@pytest.mark.parametrize("workers, k", [(0, 2), (2, 3), (2, 4)])
def test_resume_mid_epoch_continues_exactly(tmp_path, workers, k):
    pattern = write_shards(tmp_path / "shards")
    full = epoch_batches(pattern, 1, 2, workers)
    positions = {}
    for b in full[:k]:                                    # what the loop keeps in its checkpoint
        positions[b["position"][0]] = b["position"][1]
    resumed = epoch_batches(pattern, 1, 2, workers, resume=(k, positions))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[k:]]
    assert all(np.array_equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(resumed, full[k:]))


def test_bad_samples_are_skipped_and_accounted_for(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    good = {}
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(cmyk, "JPEG")
    i16 = io.BytesIO()
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(i16, "PNG")
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([255, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal_buf = io.BytesIO()
    pal.save(pal_buf, "PNG", transparency=0)
    truncated_png = png()[:-30]
    samples = [
        ({"__key__": "cmyk", "jpg": cmyk.getvalue(), "txt": "a cmyk image"}, None),
        ({"__key__": "sixteen", "png": i16.getvalue(), "txt": "a 16-bit image"}, None),
        ({"__key__": "palette", "png": pal_buf.getvalue(), "txt": "a palette image"}, None),
        ({"__key__": "rgba", "png": png((10, 20, 30, 0), mode="RGBA"), "json": json.dumps({"caption": "x"})}, None),
        ({"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 not a jpeg at all", "txt": "broken"}, "undecodable"),
        ({"__key__": "truncated", "png": truncated_png, "txt": "cut"}, "undecodable"),
        ({"__key__": "empty", "png": png(), "txt": "   "}, "empty_caption"),
        ({"__key__": "nocap", "png": png()}, "missing_caption"),
        ({"__key__": "tiny", "png": png(size=(1, 1)), "txt": "one pixel"}, "too_small"),
        ({"__key__": "huge", "png": png(size=(300, 300)), "txt": "too many pixels"}, "too_large"),
        ({"__key__": "noimage", "txt": "caption only"}, "missing_image"),
    ]
    expected_bad = {}
    with wds.TarWriter(str(folder / "shard-000000.tar")) as w:
        for sample, reason in samples:
            w.write(sample)
            (expected_bad if reason else good)[sample["__key__"]] = reason
        for i in range(5):
            w.write({"__key__": f"ok{i}", "png": png(), "txt": f"fine {i}"})
            good[f"ok{i}"] = None

    src = WebDatasetSource(str(folder / "shard-000000.tar"), seed=0, shuffle_buffer=0, min_size=2,
                           max_pixels=200 * 200, samples_per_epoch=len(good))
    src.bind(COLLATE, rank=0, world_size=1, batch_size=1)
    report = DataReport()
    keys = []
    for b in DataLoader(src, batch_size=None, num_workers=0):
        report.add_skipped(b["skipped"])
        report.add_used(len(b["keys"]))
        keys += b["keys"]
        assert b["pixel_values"].shape == (1, 3, 16, 16) and not b["refill"]
    assert sorted(keys) == sorted(good)                    # every good sample once, none of the bad
    assert dict(report.skipped) == {r: list(expected_bad.values()).count(r) for r in set(expected_bad.values())}
    for key, reason in expected_bad.items():               # each bad one is named under its reason
        assert any(ex == key or ex.startswith(key + ":") for ex in report.examples[reason]), (key, reason)
    assert report.seen == len(samples) + 5


def test_truncated_tar_yields_what_precedes_the_cut(tmp_path):
    folder = tmp_path / "cut"
    folder.mkdir()
    with wds.TarWriter(str(folder / "shard-000000.tar")) as w:
        rng = np.random.default_rng(0)
        for i in range(4):       # noise: incompressible, so the cut lands inside a member
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
            w.write({"__key__": f"t{i}", "png": buf.getvalue(), "txt": f"in a truncated tar {i}"})
    raw = (folder / "shard-000000.tar").read_bytes()
    (folder / "shard-000000.tar").write_bytes(raw[: int(len(raw) * 0.6)])
    src = WebDatasetSource(str(folder / "shard-000000.tar"), seed=0, shuffle_buffer=0)
    src.bind(COLLATE, rank=0, world_size=1, batch_size=1)
    batches = list(DataLoader(src, batch_size=None, num_workers=0))
    first_pass = [b["keys"][0] for b in batches if not b["refill"]]
    assert first_pass and set(first_pass) < {"t0", "t1", "t2", "t3"}
    assert first_pass == sorted(first_pass)                # in tar order, up to the cut
    reasons = [r for b in batches for _, r, _ in b["skipped"]]
    assert "tar_error" in reasons


def test_missing_shards_stop_at_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.shards"):
        WebDatasetSource(str(tmp_path / "nothing-{000..003}.tar"))
    with pytest.raises(ValueError, match="data.shards"):
        WebDatasetSource([])


def test_shards_without_a_usable_sample_stop_instead_of_looping(tmp_path):
    folder = tmp_path / "unusable"
    folder.mkdir()
    with wds.TarWriter(str(folder / "shard-000000.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"u{i}", "png": png()})          # no caption anywhere
    src = WebDatasetSource(str(folder / "shard-000000.tar"), seed=0, shuffle_buffer=0, samples_per_epoch=2)
    src.bind(COLLATE, rank=0, world_size=1, batch_size=1)
    with pytest.raises(RuntimeError, match="no usable sample.*missing_caption"):
        list(DataLoader(src, batch_size=None, num_workers=0))


def test_batch_fields_from_workers_hold_each_samples_values_in_one_storage(tmp_path):
    """The small fields of a batch leave a worker as views of one tensor (one shared-memory segment, not one per
    field), and still hold each sample's own values: its tokens, its size and its dup_group."""
    import torch

    batches = epoch_batches(write_shards(tmp_path / "shards", n_shards=2, per_shard=6), 0, 1, 2, batch_size=3)
    fields = ("input_ids", "original_sizes", "crop_top_lefts", "dup_group")
    tok = build_tiny_tokenizer()
    for b in batches:
        storages = {b[f].untyped_storage().data_ptr() for f in fields}
        assert len(storages) == 1 and b["pixel_values"].untyped_storage().data_ptr() not in storages
        want = tok(b["captions"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
        assert torch.equal(b["input_ids"], want) and b["input_ids"].dtype == torch.long
        assert b["original_sizes"].tolist() == [[20, 20]] * len(b["keys"])
        assert b["dup_group"].tolist() == [int(k.split("-")[0][1:]) if k.endswith("-0") else -1 for k in b["keys"]]
    assert sorted(k for b in batches for k in b["keys"]) == sorted(f"s{s}-{i}" for s in range(2) for i in range(6))


def _segment(batch) -> int:
    """The shared-memory file a received batch's pixels lie in (its inode), as the main process maps it."""
    import os
    return os.fstat(batch["pixel_values"].untyped_storage()._share_fd_cpu_()[0]).st_ino


def test_pixel_memory_is_refilled_only_after_the_stream_released_it(tmp_path):
    """The loop's data stream releases each batch when it asks for the next, and the workers refill those few
    shared-memory segments for the whole epoch (PixelRing) instead of faulting in a fresh one per batch; a consumer
    that keeps every batch without releasing gets each intact. Both see exactly a worker-less read's pixels."""
    import torch

    from memfilter.train.data.collate import PixelRing
    from memfilter.train.data.feed import data_stream
    from memfilter.train.data.wds import StreamFeed
    from memfilter.train.loop import TrainState

    pattern = write_shards(tmp_path / "shards", n_shards=8, per_shard=6)         # 48 samples: 16 batches of 3
    ref = {k: px for b in epoch_batches(pattern, 0, 1, 0, batch_size=3) for k, px in zip(b["keys"], b["pixel_values"])}
    assert len({tuple(px[:, 0, 0].tolist()) for px in ref.values()}) == 48        # every sample its own colour
    src = WebDatasetSource(pattern, seed=1, shuffle_buffer=5)
    src.bind(COLLATE, rank=0, world_size=1, batch_size=3)
    stream, segments, keys = data_stream(StreamFeed(src, num_workers=2), TrainState()), [], []
    for _ in range(16):
        epoch, _, _, b = next(stream)
        assert epoch == 0 and all(torch.equal(px, ref[k]) for k, px in zip(b["keys"], b["pixel_values"]))
        segments.append(_segment(b))
        keys += b["keys"]
    assert sorted(keys) == sorted(ref)
    assert len(set(segments)) <= 2 * PixelRing.SLOTS < 16 and len(set(segments[-8:])) < 8     # refilled in place
    held = epoch_batches(pattern, 0, 1, 2, batch_size=3)                                      # never released
    assert all(torch.equal(px, ref[k]) for b in held for k, px in zip(b["keys"], b["pixel_values"]))
    assert len({_segment(b) for b in held}) == 16
