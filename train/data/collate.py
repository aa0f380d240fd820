"""Samples -> training batch.

Batch: pixel_values [B,3,H,W] in [-1,1], input_ids [B,L], keys, captions, dup_group [B], and skipped:
the (key, reason, detail) of samples the source marked bad, so the training process can count them.
A source marks a bad sample by returning {"key": ..., "skip": reason, "detail": ...} instead of a Sample.
"""
from __future__ import annotations

import torch

from train.data.transforms import BadSample, ImageTransform


def skip_record(key, reason: str, detail: str = "") -> dict:
    """What a map-style source returns for a sample it cannot use."""
    return {"key": str(key), "skip": reason, "detail": detail}


class CollateForTraining:
    """Picklable collate (it runs in dataloader workers).

    Args:
        tokenizer: the model's tokenizer (pads to its model_max_length).
        transform: ImageTransform (resize, crop, flip, normalise); its randomness uses meta["epoch"].
    """

    def __init__(self, tokenizer, transform: ImageTransform):
        self.tokenizer, self.transform = tokenizer, transform

    def __call__(self, samples: list[dict]) -> dict:
        good, skipped = [], []
        for s in samples:
            if "skip" in s:
                skipped.append((s["key"], s["skip"], s.get("detail", "")))
                continue
            try:
                pixels = self.transform(s["image"], s["key"], s["meta"].get("epoch", 0))
            except BadSample as e:
                skipped.append((s["key"], e.reason, e.detail))
                continue
            good.append((s, pixels))
        captions = [s["caption"] for s, _ in good]
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids if good else \
            torch.zeros(0, self.tokenizer.model_max_length, dtype=torch.long)
        res = self.transform.resolution
        return {
            "pixel_values": torch.stack([p for _, p in good]) if good else torch.zeros(0, 3, res, res),
            "input_ids": ids,
            "keys": [s["key"] for s, _ in good],
            "captions": captions,
            "dup_group": torch.tensor([int(s["meta"].get("dup_group", -1)) for s, _ in good], dtype=torch.long),
            "skipped": skipped,
        }
