"""Samples -> training batch.

Batch: pixel_values [B,3,H,W] uint8 (the family's encode_images makes the VAE's [-1,1]), the family's token ids
([B,L] each: input_ids, SDXL's input_ids_2),
original_sizes and crop_top_lefts [B,2] (SDXL's time ids), keys, captions, dup_group [B], item_ids [B] (the
sample's item: `sample_item_id`, from the source picture before any crop or flip), and skipped: the (key, reason,
detail) of samples the source marked bad, so the training process can count them.
A source marks a bad sample by returning {"key": ..., "skip": reason, "detail": ...} instead of a Sample.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import get_worker_info

from memfilter.filtering.items import item_id_of_value, source_item_id
from memfilter.train.data.transforms import BadSample, ImageTransform


def skip_record(key, reason: str, detail: str = "") -> dict:
    """What a map-style source returns for a sample it cannot use."""
    return {"key": str(key), "skip": reason, "detail": detail}


class Tokenize:
    """captions -> {name: [B, L] token ids}, one entry per tokenizer, each padded to its model_max_length.
    Picklable, so the collate can run it in dataloader workers."""

    def __init__(self, **tokenizers):
        self.tokenizers = tokenizers
        self._backends: dict = {}

    def __getstate__(self) -> dict:
        return {"tokenizers": self.tokenizers, "_backends": {}}     # each worker configures its own

    def _backend(self, name: str, tok):
        """A fast tokenizer's Rust backend, set once to pad and truncate to model_max_length as the tokenizer's
        __call__ does per call (the same ids, without transformers' per-call set-up); None for a slow one."""
        if name not in self._backends:
            be = getattr(tok, "_tokenizer", None)
            if be is not None and tok.pad_token_id is not None:
                be = copy.deepcopy(be)
                be.enable_truncation(tok.model_max_length)
                be.enable_padding(length=tok.model_max_length, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
            self._backends[name] = be
        return self._backends[name]

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tok in self.tokenizers.items():
            if not captions:
                out[name] = torch.zeros(0, tok.model_max_length, dtype=torch.long)
            elif (be := self._backend(name, tok)) is not None:
                # one encode per caption: encode_batch hands a batch to the Rust thread pool, whose threads spin
                # for work on a loaded machine (about 2x the CPU per caption in a dataloader worker)
                out[name] = torch.from_numpy(np.array([be.encode(c).ids for c in captions], dtype=np.int64))
            else:
                out[name] = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                                return_tensors="pt").input_ids
        return out


def sample_item_id(sample: dict) -> int:
    """The 48-bit item id of a sample: the id its source provides in meta["item_id"] (a prep manifest's sha256 of the
    image bytes or near-duplicate cluster: `item_id_of_value`), else `source_item_id` of its decoded picture. Taken
    from the picture as the source gave it, before the transform's random crop and flip, so every appearance of one
    picture gets one id whatever the epoch's augmentation (and a mirrored or re-encoded copy mostly the same)."""
    given = sample["meta"].get("item_id")
    if given is not None and str(given).strip():
        return item_id_of_value(given)
    return source_item_id(sample["image"])


def _longs(values: list) -> torch.Tensor:
    """int64 tensor of a list of ints or int pairs (through numpy: torch.tensor on Python lists is slow)."""
    return torch.from_numpy(np.array(values, dtype=np.int64))


def one_storage(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int64 tensors -> views of one tensor, the same values and shapes. A batch leaves a dataloader worker with one
    shared-memory segment per storage, and each segment costs about as much as decoding a 256 px JPEG; the small
    fields of a batch (token ids, sizes, groups) then cost one segment, not one each."""
    flat = torch.cat([t.reshape(-1) for t in fields.values()])
    out, start = {}, 0
    for name, t in fields.items():
        out[name] = flat[start:start + t.numel()].view(t.shape)
        start += t.numel()
    return out


class PixelRing:
    """A dataloader worker's reusable shared-memory pixel batches. A fresh segment per batch costs its page faults
    (~0.1 ms per 256 px sample, a quarter of a JPEG decode); a segment the consumer has released is refilled
    without any. Each segment ends in one flag byte, 1 while a batch in it is out: the worker sets it when it
    fills the segment, the consumer clears it with `release_pixels` when it is done with the batch (the loop's
    data stream does, when the next batch is asked for). A segment is refilled only once released; with none
    free the worker takes a fresh one, so a consumer that never releases gets today's behaviour, never a batch
    overwritten under it. SLOTS covers the batches a worker has out at once (the DataLoader's prefetch of 2, the
    one the consumer holds, accelerate's one-batch lookahead)."""

    SLOTS = 6

    def __init__(self):
        self.slots: list[tuple[torch.Tensor, torch.Tensor]] = []      # (flag [1], pixels [B, H, W, C])

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        for flag, buf in self.slots:
            if tuple(buf.shape) == shape and int(flag[0]) == 0:
                flag[0] = 1
                return buf
        n = int(np.prod(shape))
        whole = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n + 1))
        flag, buf = whole[n:], whole[:n].view(shape)
        flag[0] = 1
        if len(self.slots) < self.SLOTS:
            self.slots.append((flag, buf))
        return buf


_RING: PixelRing | None = None           # this worker's (a forked worker starts from the main process's None)


def release_pixels(batch: dict) -> None:
    """The consumer is done with `batch`: the worker that sent it may refill its pixel memory (PixelRing). Call it
    only when nothing refers to the batch's pixel_values any more."""
    pixels = batch.get("pixel_values")
    if not batch.get("pixel_ring") or pixels.device.type != "cpu":   # a copy (to a device, pinned) holds no flag
        return
    storage = pixels.untyped_storage()
    if storage.is_shared() and storage.nbytes() == pixels.numel() + 1:
        torch.empty(0, dtype=torch.uint8).set_(storage, storage.nbytes() - 1, (1,)).zero_()


def stack_pixels(pixels: list[torch.Tensor], resolution: int) -> tuple[torch.Tensor, bool]:
    """[3, H, W] uint8 views of HWC images -> one [B, 3, H, W] batch in channels-last memory: each image is one
    contiguous copy (a planar stack is a strided gather, several times slower), written straight into shared
    memory inside a dataloader worker (the batch then crosses to the main process without another copy), there
    into the worker's PixelRing. `to_model_range` makes the planar float batch on the device. Returns the batch
    and whether it lies in a PixelRing (to be released)."""
    global _RING
    if not pixels:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8), False
    c, h, w = pixels[0].shape
    in_worker = get_worker_info() is not None
    if in_worker:
        _RING = _RING or PixelRing()
        out = _RING.take((len(pixels), h, w, c))
    else:
        out = torch.empty(len(pixels), h, w, c, dtype=torch.uint8)
    torch.stack([p.permute(1, 2, 0) for p in pixels], out=out)
    return out.permute(0, 3, 1, 2), in_worker


class CollateForTraining:
    """Picklable collate (it runs in dataloader workers).

    Args:
        tokenize: the model family's Tokenize (train.families: captions -> token ids by name), or one tokenizer
            (its ids become input_ids).
        transform: ImageTransform (resize, crop, flip; uint8 out); its randomness uses meta["epoch"].
    """

    def __init__(self, tokenize, transform: ImageTransform):
        self.tokenize = tokenize if isinstance(tokenize, Tokenize) else Tokenize(input_ids=tokenize)
        self.transform = transform

    def __call__(self, samples: list[dict]) -> dict:
        good, skipped = [], []
        for s in samples:
            if "skip" in s:
                skipped.append((s["key"], s["skip"], s.get("detail", "")))
                continue
            try:
                pixels, original, crop = self.transform.apply(s["image"], s["key"], s["meta"].get("epoch", 0))
            except BadSample as e:
                skipped.append((s["key"], e.reason, e.detail))
                continue
            good.append((s, pixels, original, crop, sample_item_id(s)))
        captions = [g[0]["caption"] for g in good]
        pixels, ring = stack_pixels([g[1] for g in good], self.transform.resolution)
        return {
            "pixel_values": pixels, "pixel_ring": ring,
            **one_storage({
                **self.tokenize(captions),
                "original_sizes": _longs([g[2] for g in good]).reshape(-1, 2),
                "crop_top_lefts": _longs([g[3] for g in good]).reshape(-1, 2),
                "dup_group": _longs([int(g[0]["meta"].get("dup_group", -1)) for g in good]),
                "item_ids": _longs([g[4] for g in good])}),
            "keys": [g[0]["key"] for g in good],
            "captions": captions,
            "skipped": skipped,
        }
