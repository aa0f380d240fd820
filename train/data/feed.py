"""What the training loop needs from any data source, as one contract (open_clip's DataInfo idea):

    feed.batches_per_epoch(epoch)      micro-batches every rank yields in that epoch (the same on all ranks)
    feed.batches(epoch, skip, positions)   the epoch's micro-batches after the first `skip`, resumed exactly
    feed.check_resume(saved_num_workers)   refuse a resume whose data order would differ

Two feeds cover every source:
- MapFeed: a map-style dataset (HF dataset, image folder, toy world, duplication plan) through a DataLoader with
  accelerate's seedable sampler; the position is the number of batches consumed.
- a streaming source (webdataset shards) brings its own: it splits itself by rank and worker, batches itself,
  and resumes from the per-worker stream positions the loop keeps in its checkpoint (`source.feed(...)`).
`make_feed` asks the source for its feed and falls back to MapFeed, so the loop never asks which source it has.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from memfilter.train.data.collate import release_pixels
from memfilter.train.data.transforms import reuse_image_memory


class MapFeed:
    """A map-style dataset behind accelerate's prepared, seedable DataLoader (drop_last, shuffled per epoch)."""

    def __init__(self, accelerator, dataset, collate, *, batch_size: int, num_workers: int):
        self.accelerator, self.dataset = accelerator, dataset
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                            collate_fn=collate, worker_init_fn=reuse_image_memory)
        self.loader = accelerator.prepare(loader)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return len(self.loader)

    def check_resume(self, saved_num_workers: int) -> None:
        """Worker count does not change a map-style order (the sampler decides it)."""

    def batches(self, epoch: int, skip: int, positions: dict):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)       # workers are not persistent: each epoch copies the dataset
        self.loader.set_epoch(epoch)
        return self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader


def make_feed(accelerator, dataset, collate, *, batch_size: int, num_workers: int, max_samples: int | None = None,
              seed: int = 0):
    """The source's own feed (`dataset.feed(...)`, streaming sources) or a MapFeed; `max_samples` keeps that many
    samples of a map-style source, drawn with `seed` (diffusers' --max_train_samples)."""
    own = getattr(dataset, "feed", None)
    if own is not None:
        if max_samples:
            raise ValueError("max_train_samples works on map-style data (world, imagefolder, hf); a stream is sized "
                             "by its shards: set data.samples_per_epoch instead")
        return own(collate, rank=accelerator.process_index, world_size=accelerator.num_processes,
                   batch_size=batch_size, num_workers=num_workers)
    if max_samples and max_samples < len(dataset):
        dataset = SampleSubset(dataset, max_samples, seed)
    return MapFeed(accelerator, dataset, collate, batch_size=batch_size, num_workers=num_workers)


class SampleSubset(Dataset):
    """`n` samples of a map-style source, drawn with `seed` (the same ones on every rank and on resume)."""

    def __init__(self, dataset, n: int, seed: int):
        self.dataset = dataset
        self.indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.indices[i]]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def data_stream(feed, state):
    """Micro-batches forever, epoch after epoch, from the position in `state` (epoch, batches_in_epoch,
    positions): yields (epoch, batches consumed in that epoch, whether it was the epoch's last, batch)."""
    epoch, skip = state.epoch, state.batches_in_epoch
    if skip >= feed.batches_per_epoch(epoch):
        epoch, skip = epoch + 1, 0
    while True:
        n = feed.batches_per_epoch(epoch)          # once per epoch, not per micro-batch
        for i, batch in enumerate(feed.batches(epoch, skip, state.positions), start=skip + 1):
            yield epoch, i, i == n, batch
            release_pixels(batch)          # the loop asked for the next one: it holds nothing of this batch
        epoch, skip = epoch + 1, 0
