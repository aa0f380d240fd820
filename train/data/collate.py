"""Samples -> training batch: pixel_values [B,3,H,W] in [-1,1], input_ids [B,L], keys, captions, dup_group."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pixel_values(image: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """RGB [3,H,W] float in [-1,1]: resize the short side to `resolution` (bicubic) and crop."""
    image = image.convert("RGB")
    w, h = image.size
    s = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        image = image.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = image.size
    left, top = ((w - resolution) // 2, (h - resolution) // 2) if center_crop else (0, 0)
    image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0       # [H,W,3]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class CollateForTraining:
    """Picklable collate (it runs in dataloader workers).

    Args:
        tokenizer: the model's tokenizer (pads to its model_max_length).
        resolution: training resolution in pixels.
        center_crop: centre crop (True) or top-left crop. Default True.
    """

    def __init__(self, tokenizer, resolution: int, center_crop: bool = True):
        self.tokenizer, self.resolution, self.center_crop = tokenizer, resolution, center_crop

    def __call__(self, samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return {
            "pixel_values": torch.stack([to_pixel_values(s["image"], self.resolution, self.center_crop)
                                         for s in samples]),
            "input_ids": ids,
            "keys": [s["key"] for s in samples],
            "captions": captions,
            "dup_group": torch.tensor([int(s["meta"].get("dup_group", -1)) for s in samples]),
        }
