"""The training images of a run, once each, for replication search.

A duplicated item appears many times in training (as copies with `#dup` keys, or as repeats of the
drawn data); its image is embedded once, under its first key, with every caption the item carries.
Works with map-style sources (imagefolder, hf, the world, duplicated wrappers) and with streaming
webdataset sources (through `iter_samples`).
"""
from __future__ import annotations

from collections.abc import Iterator


def iter_samples(dataset) -> Iterator[dict]:
    """Every sample of a source once, skip records included (they carry a "skip" reason)."""
    if hasattr(dataset, "iter_samples"):
        yield from dataset.iter_samples()
        return
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    for i in range(len(dataset)):
        yield dataset[i]


def unique_training_samples(dataset) -> Iterator[dict]:
    """Samples with duplicated items collapsed to their first appearance (meta["keys"] lists them all)."""
    seen_groups: set[int] = set()
    for s in iter_samples(dataset):
        if "skip" in s:
            continue
        g = int(s["meta"].get("dup_group", -1))
        if g >= 0:
            if g in seen_groups:
                continue
            seen_groups.add(g)
        yield s


def fetch_images(dataset, keys: set[str]) -> dict:
    """PIL images of the training samples with these keys (one pass, stops when all are found)."""
    out, want = {}, set(keys)
    for s in iter_samples(dataset):
        if "skip" not in s and s["key"] in want:
            out[s["key"]] = s["image"]
            if len(out) == len(want):
                break
    return out
