"""Injected duplication with ground truth: the two protocols the memorization literature trains on.

- Wen et al. (ICLR 2024): `num_duplicated` items each appear `repeats` times (paper: 200 x 200), mixed
  with `nondup_ratio` x (num_duplicated x repeats) items that appear once (paper: 3x, so 40k duplicated
  draws among 160k; 20k steps at batch 8 is one pass).
- Somepalli et al. (NeurIPS 2023): a fraction `fraction` of the items is seen `weight` times as often
  (paper: 5%, 5x). Mode "image_and_caption" repeats image and caption together; "image_only" gives each
  extra copy the caption of another item (or of an entry of a caption list), so only the image repeats.

A plan is a deterministic function of (protocol, parameters, number of items, seed): one entry per
appearance, (source index, copy index, dup_group), plus the caption donor of image_only copies.
`DuplicatedDataset` applies a plan to any map-style source by indexing, so nothing is copied on disk;
the prep CLI writes physical copies from the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Dataset

from memfilter.train.data.transforms import BadSample, pick_caption

PROTOCOLS = ("wen", "somepalli")
MODES = ("image_and_caption", "image_only")


def copy_key(key: str, copy: int) -> str:
    """Key of appearance `copy` of an item: the original key for copy 0, f"{key}#dup{copy:04d}" after."""
    return key if copy == 0 else f"{key}#dup{copy:04d}"


@dataclass(eq=False)
class DuplicationPlan:
    """One entry per appearance, in (source, copy) order; arrays of equal length (int64).

    dup_group is the source index of a duplicated item (stable as long as the source's order is) and
    -1 for items that appear once. caption_from is -1 (own caption) or, for image_only copies, the index
    of the item (or caption-list entry) whose caption the copy takes.
    """
    source: np.ndarray
    copy: np.ndarray
    dup_group: np.ndarray
    caption_from: np.ndarray
    protocol: str
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.source.tolist(), self.copy.tolist(), self.dup_group.tolist())

    @property
    def duplicated_sources(self) -> np.ndarray:
        return np.unique(self.source[self.dup_group >= 0])

    def ground_truth(self, keys: Sequence[str]) -> dict[str, dict]:
        """Per source key in the plan: {"dup_group", "appearances", "duplicated"}.

        Args:
            keys: the source's keys, indexable by source index (e.g. `source.keys`).
        """
        sources, first, counts = np.unique(self.source, return_index=True, return_counts=True)
        groups = self.dup_group[first]
        return {keys[s]: {"dup_group": int(g), "appearances": int(n), "duplicated": bool(g >= 0)}
                for s, g, n in zip(sources.tolist(), groups.tolist(), counts.tolist())}

    def summary(self) -> dict:
        dup = self.dup_group >= 0
        return {"protocol": self.protocol, **self.params, "entries": len(self),
                "duplicated_items": int(len(self.duplicated_sources)), "duplicated_entries": int(dup.sum()),
                "single_items": int((~dup).sum()), "varied_captions": int((self.caption_from >= 0).sum())}


def _plan(source, copy, group, caption_from, protocol, params) -> DuplicationPlan:
    order = np.lexsort((copy, source))
    arrays = (np.asarray(a, dtype=np.int64)[order] for a in (source, copy, group, caption_from))
    return DuplicationPlan(*arrays, protocol=protocol, params=params)


def wen_plan(num_items: int, *, num_duplicated: int = 200, repeats: int = 200, nondup_ratio: float | None = 3.0,
             seed: int = 0) -> DuplicationPlan:
    """Wen et al.: `num_duplicated` random items x `repeats`, plus round(nondup_ratio x num_duplicated x repeats)
    other items once each.

    Args:
        num_items: items in the source.
        num_duplicated: items that are repeated. Default 200.
        repeats: appearances of each repeated item. Default 200.
        nondup_ratio: single items per duplicated appearance. Default 3.0; None: every remaining item.
        seed: seed of the item choice. Default 0.
    """
    if num_duplicated < 0 or repeats < 2:
        raise ValueError(f"wen plan: num_duplicated={num_duplicated} must be >= 0 and repeats={repeats} >= 2")
    n_single = num_items - num_duplicated if nondup_ratio is None else round(nondup_ratio * num_duplicated * repeats)
    if n_single < 0 or num_duplicated + n_single > num_items:
        raise ValueError(f"wen plan needs num_duplicated + nondup_ratio x num_duplicated x repeats = "
                         f"{num_duplicated} + {max(n_single, 0)} items but the source has {num_items}; lower "
                         "num_duplicated, repeats or nondup_ratio (nondup_ratio=null uses every remaining item)")
    perm = np.random.default_rng(seed).permutation(num_items)
    dup, single = perm[:num_duplicated], perm[num_duplicated:num_duplicated + n_single]
    source = np.concatenate([np.repeat(dup, repeats), single])
    copy = np.concatenate([np.tile(np.arange(repeats), num_duplicated), np.zeros(len(single), np.int64)])
    group = np.concatenate([np.repeat(dup, repeats), np.full(len(single), -1)])
    params = {"num_duplicated": num_duplicated, "repeats": repeats, "nondup_ratio": nondup_ratio, "seed": seed}
    return _plan(source, copy, group, np.full(len(source), -1), "wen", params)


def somepalli_plan(num_items: int, *, fraction: float = 0.05, weight: int = 5, mode: str = "image_and_caption",
                   num_captions: int | None = None, seed: int = 0) -> DuplicationPlan:
    """Somepalli et al.: round(fraction x num_items) random items appear `weight` times, all others once.

    Args:
        num_items: items in the source.
        fraction: fraction of items that are duplicated. Default 0.05.
        weight: appearances of each duplicated item. Default 5.
        mode: "image_and_caption" (copies keep the caption) or "image_only" (copy k > 0 takes another
            caption). Default "image_and_caption".
        num_captions: image_only: size of a caption list the donors index into. Default None: donors are
            other items of the source.
        seed: seed of the item and donor choice. Default 0.
    """
    if not 0 <= fraction <= 1 or weight < 2:
        raise ValueError(f"somepalli plan: fraction={fraction} must be in [0, 1] and weight={weight} >= 2")
    if mode not in MODES:
        raise ValueError(f"somepalli plan: mode={mode!r}; choose one of {MODES}")
    rng = np.random.default_rng(seed)
    k = round(fraction * num_items)
    chosen = np.sort(rng.choice(num_items, size=k, replace=False))
    counts = np.ones(num_items, np.int64)
    counts[chosen] = weight
    source = np.repeat(np.arange(num_items), counts)
    copy = np.arange(len(source)) - np.repeat(np.cumsum(counts) - counts, counts)
    group = np.where(counts[source] > 1, source, -1)
    caption_from = np.full(len(source), -1, np.int64)
    if mode == "image_only" and k:
        pool = num_items - 1 if num_captions is None else num_captions
        if pool < 1:
            raise ValueError("somepalli plan: image_only needs at least one other caption")
        extra = np.flatnonzero(copy > 0).reshape(k, weight - 1)     # rows follow `chosen` (source order)
        for row, item in zip(extra, chosen):
            donors = rng.choice(pool, size=weight - 1, replace=pool < weight - 1)
            if num_captions is None:
                donors = donors + (donors >= item)                  # skip the item itself
            caption_from[row] = donors
    params = {"fraction": fraction, "weight": weight, "mode": mode, "seed": seed}
    return _plan(source, copy, group, caption_from, "somepalli", params)


def make_plan(protocol: str | None, num_items: int, *, seed: int = 0, num_duplicated: int = 200, repeats: int = 200,
              nondup_ratio: float | None = 3.0, fraction: float = 0.05, weight: int = 5,
              mode: str = "image_and_caption", num_captions: int | None = None) -> DuplicationPlan | None:
    """The plan of `protocol` ("wen", "somepalli" or None: no duplication), taking only its own parameters.

    Args: as `wen_plan` (num_duplicated, repeats, nondup_ratio) and `somepalli_plan` (fraction, weight,
        mode, num_captions), with the same defaults; seed: Default 0.
    """
    if protocol is None:
        return None
    if protocol == "wen":
        return wen_plan(num_items, num_duplicated=num_duplicated, repeats=repeats, nondup_ratio=nondup_ratio,
                        seed=seed)
    if protocol == "somepalli":
        return somepalli_plan(num_items, fraction=fraction, weight=weight, mode=mode, num_captions=num_captions,
                              seed=seed)
    raise ValueError(f"duplication protocol={protocol!r}: choose null, wen or somepalli")


class DuplicatedDataset(Dataset):
    """A map-style source seen through a plan: item i is appearance i of the plan.

    Keys of copies are `copy_key(key, copy)`; meta gets the plan's dup_group and dup_copy (a
    source's own dup_group, if any, moves to meta["source_dup_group"]). An image_only copy whose donor
    caption is unusable keeps its own caption.

    Args:
        dataset: map-style source of Samples (ideally with `caption_of(i)`, which avoids decoding donors).
        plan: a DuplicationPlan built for len(dataset) items.
        captions: caption list that image_only donors index into (plan built with num_captions=len(captions)).
            Default None: donors are items of `dataset`.
    """

    def __init__(self, dataset, plan: DuplicationPlan, captions: Sequence | None = None):
        if len(plan) and int(plan.source.max()) >= len(dataset):
            raise ValueError(f"the duplication plan indexes item {int(plan.source.max())} but the source has "
                             f"{len(dataset)} items; build the plan with num_items=len(source)")
        donors = plan.caption_from[plan.caption_from >= 0]
        limit = len(captions) if captions is not None else len(dataset)
        if len(donors) and int(donors.max()) >= limit:
            raise ValueError(f"the plan's caption donors go up to {int(donors.max())} but only {limit} captions "
                             "exist; build it with num_captions=len(captions)")
        self.dataset, self.plan, self.captions = dataset, plan, captions
        self.seed = int(plan.params.get("seed", 0))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict:
        src, copy = int(self.plan.source[i]), int(self.plan.copy[i])
        group, donor = int(self.plan.dup_group[i]), int(self.plan.caption_from[i])
        sample = self.dataset[src]
        key = copy_key(sample["key"], copy)
        if "skip" in sample:
            return {**sample, "key": key}
        meta = dict(sample["meta"])
        if meta.get("dup_group", -1) != -1:
            meta["source_dup_group"] = meta["dup_group"]
        meta.update(dup_group=group, dup_copy=copy)
        caption = sample["caption"]
        if donor >= 0:
            try:
                caption = self._donor_caption(donor, key)
                meta["caption_from"] = donor
            except BadSample:
                pass
        return {"key": key, "image": sample["image"], "caption": caption, "meta": meta}

    def _donor_caption(self, donor: int, key: str) -> str:
        if self.captions is not None:
            return pick_caption(self.captions[donor], seed=self.seed, epoch=self.epoch, key=key)
        if hasattr(self.dataset, "caption_of"):
            return self.dataset.caption_of(donor)
        sample = self.dataset[donor]
        if "skip" in sample:
            raise BadSample(sample["skip"])
        return sample["caption"]
