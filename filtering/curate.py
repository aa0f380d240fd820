"""The curation pass: score every sample of a data source with the magnitude signal, on any number of processes,
resumable after a kill at any point.

    plan   the source is cut into chunks: index ranges of a map-style source (`chunk_size` samples), one chunk per
           shard of a webdataset source; the plan (`plan.json`) is fixed at the first start and checked at every
           restart (a changed source stops the pass);
    split  the chunks that have no part file yet are dealt to the ranks (chunk i of the pending list to rank
           i % world), and a rank's chunks to its dataloader workers;
    score  per sample: the latent mean of its image (deterministic), its caption's conditioning and the empty
           prompt's, and for every draw d (and every timestep of `timesteps`, or one timestep drawn per draw) the
           noise drawn from a generator seeded by (seed, key, d): m = ||eps(x_t, c) - eps(x_t, 0)|| (the one
           function `filtering.signal.text_noise_magnitude`). A sample's scores depend on nothing but its key,
           image and caption: not on the batch, the workers or the world size;
    write  a chunk's rows (scored samples, and skipped ones with their reason) go to one Parquet part,
           `parts/part-c<chunk>-r<rank>.parquet`, written to a temporary name and renamed: a part exists whole or
           not at all, so a restart redoes only the chunks without one, and every sample is scored exactly once.

Merging, item evidence, decisions and outputs: filtering/curation.py.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from memfilter.filtering.policies import item_groups
from memfilter.filtering.records import CURATION_SCHEMA
from memfilter.filtering.settings import int_at_least, is_int, setting
from memfilter.filtering.signal import text_noise_magnitude

PARTS = "parts"


@dataclass
class ScoreArgs:
    """How the pass scores (curate.yaml's `score` block)."""

    timesteps: list | None = setting(
        must="null (one timestep drawn per draw) or a list of integers in [0, num_train_timesteps), e.g. "
             "score.timesteps=[800,900,999]", check=lambda v: v is None or (
            len(v) > 0 and all(is_int(t) and t >= 0 for t in v)),
        doc="the timesteps every draw is scored at: high noise, where a caption that is not memorized cannot "
            "tell the model much (docs/curation.md: AUC 0.98 at t >= 750 against 0.67-0.75 at t <= 400)",
        factory=lambda: [800, 900, 999])
    draws: int = setting(2, "an integer >= 1", int_at_least(1), "noise draws per sample")
    batch_size: int = setting(16, "an integer >= 1", int_at_least(1), "samples per forward")
    chunk_size: int = setting(1024, "an integer >= 1", int_at_least(1),
                              "samples of a map-style source per part file (a webdataset chunk is one shard)")
    num_workers: int = setting(0, "an integer >= 0", int_at_least(0), "dataloader workers per process")
    seed: int = setting(0, "an integer", is_int, "seed of the noise and timestep draws (per key and draw)")

    def __post_init__(self):
        from memfilter.filtering.settings import check_settings
        check_settings(self, "score.")


def key_seed(seed: int, key: str, draw: int) -> int:
    """A 63-bit seed of (seed, key, draw), the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/{draw}".encode()).digest()[:8], "big") >> 1


# --- the plan --------------------------------------------------------------------------------------------------
def make_plan(source, chunk_size: int) -> dict:
    """The chunks of a source: {"kind": "map", "size": n, "chunk_size": c, "chunks": k} or
    {"kind": "shards", "urls": [...], "chunks": k}."""
    if hasattr(source, "urls"):          # a pass reads whole shards: their counts, not a keep-list's
        counts = {} if getattr(source, "keep", None) is not None else (source.counts or {})
        return {"kind": "shards", "urls": list(source.urls), "chunks": len(source.urls),
                "counts": {u: int(n) for u, n in counts.items()}}
    n = len(source)
    return {"kind": "map", "size": n, "chunk_size": chunk_size, "chunks": (n + chunk_size - 1) // chunk_size,
            "source": type(source).__name__}


def check_plan(out: Path, plan: dict) -> None:
    """Write plan.json at the first start; at a restart, the same source must be planned the same way."""
    path = out / "plan.json"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan, indent=1))
        os.replace(tmp, path)
        return
    old = json.loads(path.read_text())
    fields = ("kind", "size", "chunk_size", "urls", "chunks")
    if any(old.get(f) != plan.get(f) for f in fields):
        raise ValueError(f"{out}: this pass was started on another source or chunking ({path} differs: "
                         f"{ {f: old.get(f) for f in fields if old.get(f) != plan.get(f)} }); score it into a new "
                         "output_dir, or restore the source and score.chunk_size")


def done_chunks(out: Path) -> set[int]:
    """Chunks with a finished part file (any rank's)."""
    return {int(p.name.split("-")[1][1:]) for p in (out / PARTS).glob("part-c*-r*.parquet")}


def pending_chunks(out: Path, plan: dict, rank: int, world: int) -> list[int]:
    todo = sorted(set(range(plan["chunks"])) - done_chunks(out))
    return todo[rank::world]


# --- reading ---------------------------------------------------------------------------------------------------
class ChunkBatches(IterableDataset):
    """Collated batches of the given chunks, never mixing two chunks: ("chunk", "last" and the collate's fields).
    Each dataloader worker reads its own chunks."""

    def __init__(self, source, plan: dict, chunks: list[int], collate, batch_size: int):
        self.source, self.plan, self.chunks, self.collate, self.batch_size = source, plan, chunks, collate, batch_size

    def __iter__(self):
        info = get_worker_info()
        mine = self.chunks[info.id::info.num_workers] if info else self.chunks
        for c in mine:
            batch, seen = [], 0
            for pos, sample in self._samples(c):
                batch.append((pos, sample))
                seen += 1
                if len(batch) == self.batch_size:
                    yield self._out(c, batch, False, seen)
                    batch = []
            yield self._out(c, batch, True, seen)

    def _out(self, chunk: int, samples: list, last: bool, seen: int) -> dict:
        out = self.collate([s for _, s in samples])
        where = {s["key"]: pos for pos, s in samples}
        out["index"] = [where[k] for k in out["keys"]] + [where.get(k, -1) for k, _, _ in out["skipped"]]
        return {**out, "chunk": chunk, "last": last, "seen": seen}

    def _samples(self, c: int):
        """(position, sample): the source index of a map-style source, the ordinal in a shard."""
        if self.plan["kind"] == "map":
            size, start = self.plan["chunk_size"], c * self.plan["chunk_size"]
            for i in range(start, min(start + size, self.plan["size"])):
                yield i, self.source[i]
            return
        yield from enumerate(self.source.shard_samples(self.plan["urls"][c]))


# --- scoring ---------------------------------------------------------------------------------------------------
class Scorer:
    """Scores collated batches through a model family (train.families), on `device`."""

    def __init__(self, family, args: ScoreArgs, resolution: int, device, dtype=torch.float32):
        self.family, self.args, self.resolution, self.dev, self.dtype = family, args, resolution, device, dtype
        c = family.c
        self.unet, self.sched = c.unet, c.noise_scheduler
        self.num_t = int(self.sched.config.num_train_timesteps)
        if args.timesteps is not None and max(args.timesteps) >= self.num_t:
            raise ValueError(f"score.timesteps={list(args.timesteps)}: the model has {self.num_t} training "
                             f"timesteps; use values below {self.num_t}")
        family.prepare_frozen(device, dtype)
        self.unet.to(device, dtype=dtype).eval().requires_grad_(False)
        self.empty = family.empty_text(device)
        self.tokenizers = family.tokenize_fn().tokenizers

    def _draws(self, keys: list[str], latent_shape) -> tuple[torch.Tensor, torch.Tensor]:
        """Per draw k: noise [K, B, C, h, w] and timesteps [K, B], from generators seeded per (key, draw)."""
        a = self.args
        fixed = a.timesteps
        noise, ts = [], []
        for d in range(a.draws):
            gens = [torch.Generator().manual_seed(key_seed(a.seed, k, d)) for k in keys]
            t_d = [int(torch.randint(0, self.num_t, (1,), generator=g)) for g in gens] if fixed is None else None
            eps = torch.stack([torch.randn(latent_shape, generator=g) for g in gens])
            for t in (fixed if fixed is not None else [None]):
                noise.append(eps)
                ts.append(torch.tensor(t_d if t is None else [t] * len(keys)))
        return torch.stack(noise), torch.stack(ts)

    @torch.no_grad()
    def score(self, batch: dict) -> dict:
        """{"timestep": [B, K], "magnitude": [B, K]} numpy arrays of a collated batch."""
        b = len(batch["keys"])
        fam, dev = self.family, self.dev
        latents = fam.encode_images(batch["pixel_values"].to(dev), sample=False)
        text = fam.encode_text({k: batch[k].to(dev) for k in self.tokenizers})
        sizes = {"resolution": self.resolution, "original_sizes": batch["original_sizes"],
                 "crop_top_lefts": batch["crop_top_lefts"]}
        cond, uncond = fam.unet_kwargs(text, **sizes), fam.uncond_like(self.empty, b, **sizes)
        noise, ts = self._draws(batch["keys"], tuple(latents.shape[1:]))
        mags = []
        for eps, t in zip(noise, ts):
            t = t.to(dev)
            x_t = self.sched.add_noise(latents, eps.to(dev, latents.dtype), t)
            mags.append(text_noise_magnitude(
                self.unet, x_t.to(self.dtype), t, uncond, cond=cond,
                prediction_type=self.sched.config.prediction_type, alphas_cumprod=self.sched.alphas_cumprod))
        return {"timestep": ts.T.numpy(), "magnitude": torch.stack(mags, 1).float().cpu().numpy()}


def batch_rows(batch: dict, scored: dict | None, rank: int) -> dict[str, list]:
    """Rows of one batch in CURATION_SCHEMA: its scored samples, then its skipped ones."""
    b = len(batch["keys"])
    ids = item_groups(("caption", "image"), batch["captions"], batch["pixel_values"],
                      item_ids=batch.get("item_ids")).tolist() if b else []
    skipped = batch.get("skipped", [])
    n = b + len(skipped)
    mags = scored["magnitude"] if b else np.zeros((0, 0))
    return {
        "chunk": [batch["chunk"]] * n, "index": batch["index"], "rank": [rank] * n,
        "key": list(batch["keys"]) + [str(k) for k, _, _ in skipped],
        "caption": list(batch["captions"]) + [None] * len(skipped),
        "timestep": [list(map(int, r)) for r in (scored["timestep"] if b else [])] + [None] * len(skipped),
        "magnitude": [list(map(float, r)) for r in mags] + [None] * len(skipped),
        "score": [float(r.mean()) for r in mags] + [None] * len(skipped),
        "caption_id": [i[0] for i in ids] + [None] * len(skipped),
        "image_id": [i[1] for i in ids] + [None] * len(skipped),
        "dup_group": batch["dup_group"].tolist() + [None] * len(skipped),
        "skip": [None] * b + [r for _, r, _ in skipped],
        "skip_detail": [None] * b + [d for _, _, d in skipped],
    }


def write_part(out: Path, chunk: int, rank: int, rows: list[dict]) -> Path:
    """A chunk's rows as one Parquet part, whole or not at all (temporary name, then rename)."""
    cols = {name: [v for r in rows for v in r[name]] for name in CURATION_SCHEMA.names}
    path = out / PARTS / f"part-c{chunk:07d}-r{rank:05d}.parquet"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.table(cols, schema=CURATION_SCHEMA), tmp)
    os.replace(tmp, path)
    return path


def score_chunks(source, plan: dict, chunks: list[int], scorer: Scorer, collate, out: Path, *, rank: int = 0,
                 progress=None) -> int:
    """Score the given chunks of this rank; each finished chunk is written at once. Returns the samples read.

    `collate` turns a list of samples into a batch as training's does (train.data.collate.CollateForTraining with
    the family's tokenizer and a deterministic centre-crop transform at the scoring resolution)."""
    a = scorer.args
    data = ChunkBatches(source, plan, chunks, collate, a.batch_size)
    loader = DataLoader(data, batch_size=None, num_workers=min(a.num_workers, len(chunks)),
                        persistent_workers=False)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    open_rows: dict[int, list] = {}
    read = 0
    for batch in loader:
        scored = scorer.score(batch) if batch["keys"] else None
        open_rows.setdefault(batch["chunk"], []).append(batch_rows(batch, scored, rank))
        if progress is not None:
            progress(len(batch["keys"]) + len(batch.get("skipped", [])))
        if batch["last"]:
            write_part(out, batch["chunk"], rank, open_rows.pop(batch["chunk"]))
            read += batch["seen"]
    return read
