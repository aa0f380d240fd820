"""Webdataset shards streamed from disk or `pipe:` URLs, resumable at the exact batch.

The pipeline of one dataloader worker is one ordered list of stages (open_clip's layout):

    shard list (seeded shuffle per epoch, or resampled) -> split by node -> split by worker
    -> tar to samples (a broken tar is counted, not fatal) -> seeded shuffle buffer
    -> position / resume skip -> decode with a handler (bad samples counted) -> batch + collate

Equal work on every rank: the batches of an epoch per rank are fixed in advance from the per-shard
sample counts (`shards.json` as the prep CLI writes it, or a scan of local tar headers): the minimum
over ranks of (samples of the rank's shards) // batch_size. A worker that runs out of samples before
its quota (bad samples, uneven shards) starts its shards again (counted as `refill`), so no rank ever
waits on another.

Exact resume: batch i of a rank's epoch is made by *logical* worker i mod W, from that worker's own
deterministic stream (seeded by seed, epoch, rank, logical worker). Each batch carries its worker's
stream position; the training loop keeps the latest per logical worker in its checkpoint. A resumed
loader rotates logical workers so that the physical worker the DataLoader asks first serves batch k,
and each worker fast-forwards its stream (tar reading, no decoding) to the saved position.
"""
from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import braceexpand
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from memfilter.train.data.tarfast import tar_samples
from memfilter.train.data.transforms import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, IMAGE_EXTS,
                                              BadSample, load_image, pick_caption, reuse_image_memory)

CAPTION_KEYS = ("txt", "caption", "json")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns and `::`-separated lists to a flat list of shard URLs (local paths or pipe:)."""
    if isinstance(urls, str):
        urls = urls.split("::")
    out = []
    for u in urls:
        out.extend(braceexpand.braceexpand(str(u)))
    return out


def shard_counts(urls: list[str], counts_file: str | None = None) -> dict[str, int]:
    """Samples per shard: from a shards.json ({file name: count}) or by reading local tar headers."""
    found = Path(counts_file) if counts_file else None
    if found is None and urls and not urls[0].startswith("pipe:"):
        candidate = Path(urls[0]).parent / "shards.json"
        found = candidate if candidate.exists() else None
    if found is not None:
        table = json.loads(found.read_text())
        missing = [u for u in urls if Path(u).name not in table and u not in table]
        if missing:
            raise ValueError(f"data.counts_file={found}: no count for {len(missing)} shard(s), e.g. {missing[0]}")
        return {u: int(table.get(Path(u).name, table.get(u))) for u in urls}
    if any(u.startswith("pipe:") for u in urls):
        raise ValueError("data.shards uses pipe: URLs and no shards.json was given: set data.counts_file "
                         "to a shards.json (the prep CLI writes one) so every rank knows the epoch length")
    counts = {}
    for u in urls:
        keys = set()
        try:
            with tarfile.open(u) as tf:
                for m in tf:
                    if m.isfile() and "." in Path(m.name).name:
                        keys.add(m.name.split(".", 1)[0])
        except (tarfile.TarError, OSError, EOFError):
            pass                                  # a broken tar counts what it has before the break
        counts[u] = len(keys)
    return counts


class WebDatasetSource(IterableDataset):
    """Batches from webdataset shards; see the module docstring for the guarantees.

    Args:
        urls: shard paths, brace patterns or pipe: URLs (list, or one string with `::` between).
        batch_size: samples per batch (per rank); the training loop sets it with `bind`.
        collate: turns a list of Samples into a batch (CollateForTraining); set by `bind`.
        rank, world_size: this process and the number of processes; set by `bind`. Defaults 0, 1.
        seed: seed of shard order and shuffle buffer. Default 0.
        shuffle_buffer: samples in the shuffle buffer; 0 disables it. Default 1000.
        resampled: draw shards with replacement each epoch (open_clip's mode for huge sets). Default False.
        samples_per_epoch: epoch length in samples over all ranks; required with pipe: URLs and no
            counts file. Default: the total count of the shards.
        counts_file: a shards.json with samples per shard. Default: <shard dir>/shards.json, else a scan.
        min_size, max_pixels: image limits (see load_image). Defaults load_image's (16 px, 16384^2 pixels).
        keep_list: a file of the keys to use (one per line, or Parquet with a `key` column; e.g. a curation
            pass's keep.txt); the others are left out and counted in `excluded`. Default None: every key.
    """

    def __init__(self, urls, batch_size: int | None = None, collate=None, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0,
                 shuffle_buffer: int = 1000, resampled: bool = False, samples_per_epoch: int | None = None,
                 counts_file: str | None = None, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                 keep_list: str | None = None):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError("data.shards matches no shard: give paths, a brace pattern like "
                             "data-{00000..00099}.tar, or pipe: URLs")
        missing = [u for u in self.urls if not u.startswith("pipe:") and not Path(u).exists()]
        if missing:
            raise FileNotFoundError(f"data.shards: {len(missing)} of {len(self.urls)} shard(s) do not exist, "
                                    f"e.g. {missing[0]}; check the path or brace pattern")
        self.batch_size, self.collate = batch_size, collate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.min_size = min_size
        self.max_pixels = max_pixels
        self.counts = None if (samples_per_epoch and resampled) else shard_counts(self.urls, counts_file)
        self.keep, self.excluded = None, 0
        if keep_list and any(u.startswith("pipe:") for u in self.urls):
            raise ValueError("data.keep_list with pipe: URLs: the kept keys per shard cannot be counted without "
                             "reading the shards; write the kept samples as shards instead (memfilter-curate "
                             "write_shards=true) and train on those")
        if keep_list:                 # only the listed keys: the epoch counts them alone (train.data.keeplist)
            from memfilter.train.data.keeplist import kept_counts, read_keep_list
            self.keep = read_keep_list(keep_list)
            kept = kept_counts([u for u in self.urls if not u.startswith("pipe:")], self.keep)
            self.excluded = sum((self.counts or {}).get(u, 0) - n for u, n in kept.items())
            self.counts = kept
        self.samples_per_epoch = samples_per_epoch
        self.epoch = 0
        self.start_batch = 0                    # batches of this epoch already consumed (resume)
        self.positions: dict[int, int] = {}     # logical worker -> stream position at start_batch
        self.num_workers = 1

    def bind(self, collate, *, rank: int, world_size: int, batch_size: int) -> None:
        """What only the training loop knows: the collate (tokenizer, transforms) and the process layout."""
        if len(self.urls) < world_size:
            raise ValueError(f"data.shards: {len(self.urls)} shard(s) for {world_size} processes; every process "
                             "needs at least one: write smaller shards (prep shard_size) or use fewer processes")
        self.collate, self.rank, self.world_size, self.batch_size = collate, rank, world_size, batch_size

    def feed(self, collate, *, rank: int, world_size: int, batch_size: int, num_workers: int) -> "StreamFeed":
        """The training loop's data contract (train.data.feed): this source splits and batches itself."""
        self.bind(collate, rank=rank, world_size=world_size, batch_size=batch_size)
        return StreamFeed(self, num_workers)

    # -- epoch plan ------------------------------------------------------------------------------
    def _epoch_shards(self, epoch: int) -> list[str]:
        rng = random.Random(f"{self.seed}/shards/{epoch}")
        if self.resampled:
            return [rng.choice(self.urls) for _ in self.urls]
        shards = list(self.urls)
        rng.shuffle(shards)
        return shards

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches every rank yields in an epoch (the same on all ranks)."""
        if self.samples_per_epoch:
            return self.samples_per_epoch // (self.batch_size * self.world_size)
        shards = self._epoch_shards(self.epoch if epoch is None else epoch)
        per_rank = [sum(self.counts[u] for u in shards[r::self.world_size]) for r in range(self.world_size)]
        return min(per_rank) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch, self.positions = epoch, 0, {}

    def set_resume(self, epoch: int, batches_done: int, positions: dict[int, int], num_workers: int) -> None:
        """Continue `epoch` after `batches_done` batches; `positions` as the batches reported them."""
        self.epoch, self.start_batch = epoch, batches_done
        self.positions = {int(k): int(v) for k, v in positions.items()}
        self.num_workers = max(1, num_workers)

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    # -- the stages -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        nw = info.num_workers if info else 1
        if nw != self.num_workers and self.start_batch:
            raise ValueError(f"resuming with dataloader_num_workers={nw}, the checkpoint was written with "
                             f"{self.num_workers}: use the same value")
        physical = info.id if info else 0
        reuse_image_memory()
        logical = (physical + self.start_batch) % nw          # physical worker 0 serves batch start_batch
        n = self.batches_per_epoch()
        quota = len(range(logical, n, nw))                     # batches i < n with i % nw == logical
        done = len(range(logical, self.start_batch, nw))
        if quota - done <= 0:
            return
        rank_shards = self._epoch_shards(self.epoch)[self.rank::self.world_size]   # split by node
        shards = rank_shards[logical::nw]                                           # split by worker
        refill_all = not shards        # more workers than shards: reuse the rank's, all counted as refill
        shards = shards or rank_shards
        skipped: list[tuple[str, str, str]] = []

        def on_tar_error(exn: Exception) -> bool:
            skipped.append((str(exn.args[-1]) if exn.args else "?", "tar_error", f"{type(exn).__name__}: {exn}"))
            return True

        def raw_stream():
            """(pass, raw sample) forever; each pass over the worker's shards is shuffled on its own, so
            a refill pass never mixes with the first one."""
            for n_pass in range(10**9):
                stages = [lambda: iter({"url": u} for u in shards), tar_samples(handler=on_tar_error)]
                if self.shuffle_buffer:
                    rng = random.Random(f"{self.seed}/buffer/{self.epoch}/{self.rank}/{logical}/{n_pass}")
                    # a full buffer before the first sample: the best mixing from the first batch on (with the fast
                    # tar reader the fill costs ~0.1 s per worker)
                    stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
                good_before, start = counts["good"], position
                for raw in wds.DataPipeline(*stages):
                    yield n_pass, raw
                if counts["good"] == good_before and start >= resume_at:     # a whole decoded pass, nothing usable
                    raise RuntimeError(f"data.shards: the shards of rank {self.rank} worker {logical} hold no "
                                       f"usable sample ({shards[:3]}...; problems: "
                                       f"{sorted({r for _, r, _ in skipped})})")

        resume_at = self.positions.get(logical, 0) if self.start_batch else 0
        position, seen_keys, batch, batches = 0, set(), [], done
        counts = {"good": 0}
        samples = raw_stream()
        while batches < quota:
            n_pass, raw = next(samples)
            position += 1
            key = raw.get("__key__", "?")
            refill = refill_all or n_pass > 0
            if position <= resume_at:                    # fast-forward: tar reading only, no decoding
                seen_keys.add(key)
                continue
            if self.keep is not None and key not in self.keep:   # data.keep_list: counted in `excluded`
                continue
            try:
                if key in seen_keys and not refill and not self.resampled:   # resampled: repeats are by design
                    raise BadSample("duplicate_key", str(raw.get("__url__", "")))
                seen_keys.add(key)
                batch.append(self._decode(raw))
                counts["good"] += 1
            except BadSample as e:
                skipped.append((key, e.reason, e.detail))
            if len(batch) == self.batch_size:
                out = self.collate(batch)
                out["skipped"] = out.get("skipped", []) + skipped
                out["position"] = (logical, position)
                out["refill"] = int(refill)
                skipped, batch = [], []
                batches += 1
                yield out

    def iter_samples(self) -> Iterator[dict]:
        """Every sample of every shard once, in shard order, decoded (bad ones as skip records).

        For passes over the whole set outside training (evaluation embeds the training images)."""
        from memfilter.train.data.collate import skip_record

        errors: list = []
        pipeline = wds.DataPipeline(lambda: iter({"url": u} for u in self.urls),
                                    tar_samples(handler=lambda e: errors.append(e) or True))
        for raw in pipeline:
            if self.keep is not None and raw.get("__key__") not in self.keep:
                continue
            try:
                yield self._decode(raw)
            except BadSample as e:
                yield skip_record(raw.get("__key__", "?"), e.reason, e.detail)

    def shard_samples(self, url: str) -> Iterator[dict]:
        """Every sample of one shard in order, decoded (a bad one, a repeated key or an unreadable tar member as a
        skip record with its reason), whatever the keep-list: for passes over a dataset (curation)."""
        from memfilter.train.data.collate import skip_record

        errors: list = []
        seen: set = set()
        pipeline = wds.DataPipeline(lambda: iter([{"url": url}]),
                                    tar_samples(handler=lambda e: errors.append(e) or True))

        def tar_errors():
            while errors:
                e = errors.pop(0)
                yield skip_record(str(e.args[-1]) if e.args else url, "tar_error", f"{type(e).__name__}: {e}")

        for raw in pipeline:
            yield from tar_errors()
            key = raw.get("__key__", "?")
            if key in seen:
                yield skip_record(key, "duplicate_key", url)
                continue
            seen.add(key)
            try:
                yield self._decode(raw)
            except BadSample as e:
                yield skip_record(key, e.reason, e.detail)
        yield from tar_errors()

    def _decode(self, raw: dict) -> dict:
        key = raw["__key__"]
        image_key = next((k for k in IMAGE_EXTS if k in raw), None)
        if image_key is None:
            raise BadSample("missing_image", ",".join(k for k in raw if not k.startswith("__")))
        kw = {"min_size": self.min_size}
        if self.max_pixels:
            kw["max_pixels"] = self.max_pixels
        image = load_image(raw[image_key], **kw)
        meta = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
        if not isinstance(meta, dict):
            meta = {}
        if meta.get("captions"):          # every caption of a multi-caption item: one is drawn per epoch
            cap = meta["captions"]
        else:
            cap = next((raw[k] for k in CAPTION_KEYS if k in raw), None)
            cap = meta if cap is raw.get("json") else cap
        caption = pick_caption(cap, seed=self.seed, epoch=self.epoch, key=key)
        item = meta.get("item_id")            # an item id the shard's writer knew (the collate's item_ids)
        meta = {"dup_group": int(meta.get("dup_group", -1)), "dup_copy": int(meta.get("dup_copy", 0)),
                "source": str(raw.get("__url__", "")), "epoch": self.epoch}
        if isinstance(item, (str, int)) and not isinstance(item, bool) and str(item).strip():
            meta["item_id"] = item
        return {"key": key, "image": image, "caption": caption, "meta": meta}



class StreamFeed:
    """The loop's view of a WebDatasetSource (train.data.feed): the source batches itself (batch_size=None) and
    resumes an epoch from the per-worker stream positions saved in the checkpoint."""

    def __init__(self, source: WebDatasetSource, num_workers: int):
        self.source, self.num_workers = source, num_workers
        self.loader = DataLoader(source, batch_size=None, num_workers=num_workers)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return self.source.batches_per_epoch(epoch)

    def check_resume(self, saved_num_workers: int) -> None:
        if saved_num_workers != self.num_workers:
            raise ValueError(f"the checkpoint was written with dataloader_num_workers={saved_num_workers}: "
                             f"a stream's order depends on it; resume with dataloader_num_workers={saved_num_workers}")

    def batches(self, epoch: int, skip: int, positions: dict):
        if skip:
            self.source.set_resume(epoch, skip, positions, self.num_workers)
        else:
            self.source.set_epoch(epoch)
        return self.loader
