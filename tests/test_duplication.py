"""Duplication plans: deterministic, exact counts, exact ground truth; DuplicatedDataset applies them by index."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import Dataset

from tests.test_sources import smooth
from memfilter.train.data.duplication import DuplicatedDataset, copy_key, make_plan, somepalli_plan, wen_plan
from memfilter.train.data.imagefolder import ImageFolderSource


class Toy(Dataset):
    """n items with distinct captions and a tiny image; counts __getitem__ calls."""

    def __init__(self, n: int):
        self.n, self.calls, self.epoch = n, 0, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        self.calls += 1
        if i == 3:
            return {"key": "item3", "skip": "undecodable", "detail": ""}
        return {"key": f"item{i}", "image": Image.new("RGB", (2, 2), (i, 0, 0)), "caption": f"caption {i}",
                "meta": {"dup_group": 99 if i == 0 else -1, "epoch": self.epoch}}


def test_wen_plan_counts_and_determinism():
    plan = wen_plan(1000, num_duplicated=10, repeats=7, nondup_ratio=3.0, seed=1)
    assert len(plan) == 10 * 7 + 210
    counts = Counter(plan.source.tolist())
    dup = {s for s, n in counts.items() if n > 1}
    assert len(dup) == 10 and all(counts[s] == 7 for s in dup) and len(counts) == 10 + 210
    for s, c, g in plan:
        assert g == (s if s in dup else -1)
    for s in dup:
        assert sorted(plan.copy[plan.source == s].tolist()) == list(range(7))
    assert (plan.copy[plan.dup_group < 0] == 0).all() and (plan.caption_from == -1).all()
    same = wen_plan(1000, num_duplicated=10, repeats=7, nondup_ratio=3.0, seed=1)
    other = wen_plan(1000, num_duplicated=10, repeats=7, nondup_ratio=3.0, seed=2)
    assert all(np.array_equal(getattr(plan, f), getattr(same, f)) for f in ("source", "copy", "dup_group"))
    assert not np.array_equal(plan.source, other.source)
    assert len(wen_plan(1000, num_duplicated=10, repeats=7, nondup_ratio=None)) == 70 + 990
    with pytest.raises(ValueError, match="num_duplicated"):
        wen_plan(100, num_duplicated=10, repeats=7, nondup_ratio=3.0)
    assert plan.summary()["duplicated_items"] == 10 and plan.summary()["duplicated_entries"] == 70


def test_somepalli_plan_counts_and_image_only_donors():
    plan = somepalli_plan(400, fraction=0.05, weight=5, seed=3)
    counts = Counter(plan.source.tolist())
    assert len(counts) == 400 and len(plan) == 400 + 20 * 4
    assert sorted(Counter(counts.values()).items()) == [(1, 380), (5, 20)]
    assert (plan.caption_from == -1).all()
    io = somepalli_plan(400, fraction=0.05, weight=5, mode="image_only", seed=3)
    assert np.array_equal(io.source, plan.source)              # same items; only captions differ
    extra = io.copy > 0
    assert (io.caption_from[extra] >= 0).all() and (io.caption_from[~extra] == -1).all()
    assert (io.caption_from[extra] != io.source[extra]).all()  # never the item's own caption
    for s in np.unique(io.source[extra]):                      # the copies of one item get different captions
        donors = io.caption_from[extra & (io.source == s)]
        assert len(set(donors.tolist())) == 4
    pooled = somepalli_plan(400, fraction=0.05, weight=5, mode="image_only", num_captions=3, seed=3)
    assert pooled.caption_from.max() < 3
    assert np.array_equal(somepalli_plan(400, seed=9).source, somepalli_plan(400, seed=9).source)
    with pytest.raises(ValueError, match="mode"):
        somepalli_plan(10, mode="captions")


def test_ground_truth_marks_exactly_the_duplicated_keys():
    keys = [f"k{i}" for i in range(300)]
    plan = wen_plan(300, num_duplicated=4, repeats=5, nondup_ratio=2.0, seed=0)
    truth = plan.ground_truth(keys)
    dup = {k for k, v in truth.items() if v["duplicated"]}
    assert dup == {keys[s] for s in plan.duplicated_sources} and len(dup) == 4
    assert len(truth) == 4 + 40                                # items outside the plan are absent
    assert all(v["appearances"] == (5 if v["duplicated"] else 1) for v in truth.values())
    assert all(v["dup_group"] == keys.index(k) for k, v in truth.items() if v["duplicated"])
    truth = somepalli_plan(300, fraction=0.1, weight=3).ground_truth(keys)
    assert len(truth) == 300 and sum(v["duplicated"] for v in truth.values()) == 30


def test_make_plan_dispatch():
    assert make_plan(None, 10) is None
    assert make_plan("wen", 50, num_duplicated=2, repeats=3, nondup_ratio=1.0, fraction=0.9).protocol == "wen"
    assert len(make_plan("somepalli", 100, fraction=0.1, weight=2, num_duplicated=10**6)) == 110
    with pytest.raises(ValueError, match="protocol"):
        make_plan("laion", 10)


def test_duplicated_dataset_keys_meta_and_captions():
    toy = Toy(40)
    plan = somepalli_plan(40, fraction=0.25, weight=3, mode="image_only", seed=0)
    ds = DuplicatedDataset(toy, plan)
    assert len(ds) == 40 + 10 * 2
    samples = [ds[i] for i in range(len(ds))]
    assert len({s["key"] for s in samples}) == len(samples)
    by_key = {s["key"]: s for s in samples}
    for i, (src, copy, group) in enumerate(plan):
        s = samples[i]
        assert s["key"] == copy_key(f"item{src}", copy)
        if src == 3:
            assert s["skip"] == "undecodable"
            continue
        assert s["meta"]["dup_group"] == group and s["meta"]["dup_copy"] == copy
        donor = int(plan.caption_from[i])
        if copy == 0:
            assert s["caption"] == f"caption {src}"
        elif donor != 3:
            assert s["caption"] == f"caption {donor}" != f"caption {src}"
        else:
            assert s["caption"] == f"caption {src}"             # an unusable donor: own caption kept
    assert sorted(k for k in by_key if "#dup" in k) == sorted(
        f"item{s}#dup{c:04d}" for s, c, _ in plan if c > 0)
    item0 = by_key["item0"]["meta"]                            # the source's own group moves aside
    assert item0["source_dup_group"] == 99 and item0["dup_group"] == int(plan.dup_group[plan.source == 0][0])
    same = DuplicatedDataset(toy, somepalli_plan(40, fraction=0.25, weight=3, mode="image_and_caption", seed=0))
    for i in range(len(same)):
        s = same[i]
        if "skip" not in s:
            assert s["caption"] == f"caption {int(same.plan.source[i])}"
    pool = ["p0", "p1"]
    pooled = DuplicatedDataset(toy, somepalli_plan(40, fraction=0.25, weight=3, mode="image_only",
                                                   num_captions=2, seed=0), captions=pool)
    is_copy = (pooled.plan.copy > 0) & (pooled.plan.source != 3)
    captions = [pooled[i]["caption"] for i in np.flatnonzero(is_copy)]
    assert len(captions) == 20 and set(captions) == set(pool)
    ds.set_epoch(4)
    assert toy.epoch == 4 and ds[0]["meta"]["epoch"] == 4
    with pytest.raises(ValueError, match="num_items"):
        DuplicatedDataset(Toy(10), plan)
    with pytest.raises(ValueError, match="num_captions"):
        DuplicatedDataset(toy, plan, captions=["only one"])


def test_duplicated_imagefolder_uses_caption_lookup(tmp_path):
    for i in range(6):
        smooth(i, (16, 16)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"cap {i}")
    src = ImageFolderSource(tmp_path)
    plan = wen_plan(len(src), num_duplicated=2, repeats=3, nondup_ratio=None, seed=5)
    ds = DuplicatedDataset(src, plan)
    keys = [ds[i]["key"] for i in range(len(ds))]
    truth = plan.ground_truth(src.keys)
    for k, v in truth.items():
        assert sum(1 for x in keys if x.split("#")[0] == k) == v["appearances"]
    assert sorted(k for k in keys if "#dup" in k) == sorted(
        f"{k}#dup{c:04d}" for k, v in truth.items() if v["duplicated"] for c in (1, 2))
    io = DuplicatedDataset(src, somepalli_plan(len(src), fraction=0.34, weight=2, mode="image_only", seed=1))
    copies = [io[i] for i in range(len(io)) if io.plan.copy[i] > 0]
    assert len(copies) == 2
    for s in copies:
        assert s["caption"] == f"cap {s['meta']['caption_from']}" and s["caption"] != f"cap {s['meta']['dup_group']}"
