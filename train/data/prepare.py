"""Dataset prep: any map-style source -> webdataset shards, a manifest and a report of what was dropped.

Training at scale streams tar shards; this writes them once, from a folder, a table of image paths or a
Hugging Face dataset, checking every sample on the way (the same `load_image`/`pick_caption` as training,
so a sample that prep accepts never fails later). Per sample, a shard holds `<key>.jpg|png` (the original
bytes unless `resize` is set, or the source is neither JPEG nor PNG), `<key>.txt` and `<key>.json` (meta:
dup_group, dup_copy, source key). Next to the shards: `manifest.parquet` (one row per written sample,
with the sha256 of the image bytes), `shards.json` (samples per shard, so the streaming pipeline knows
epoch lengths without opening tars), `duplicates.parquet` (pairs of near/exact duplicates) and
`prep_report.json`.

A duplication plan (train/data/duplication.py) makes physical copies; entries are then written in a
seeded random order so copies of one item do not sit next to each other in a shard.

Near-duplicates: 64-bit DCT perceptual hashes, searched with a multi-index hashing index (train/data/neardup.py,
faiss): exact, the same pairs as the blockwise all-pairs search `near_duplicate_pairs` (kept as the reference,
O(n^2): ~1 h at 10^6 items), at a cost that grows with the candidates found. The manifest's `cluster` column
holds each sample's near-duplicate cluster (connected pairs within `near_dup_threshold`), which the curation pass
uses as an item id.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from memfilter.train.data.duplication import DuplicationPlan, copy_key
from memfilter.train.data.imagefolder import DataConfigError, MapSource
from memfilter.train.data.neardup import NearDuplicateIndex, clusters, near_duplicate_pairs_indexed
from memfilter.train.data.transforms import BadSample, load_image, pick_caption

SHARD_PATTERN = "shard-%06d.tar"
OUTPUT_FILES = ("manifest.parquet", "shards.json", "prep_report.json", "duplicates.parquet")
MANIFEST = pa.schema([("key", pa.string()), ("source_key", pa.string()), ("caption", pa.string()),
                      ("source", pa.string()), ("sha256", pa.string()), ("width", pa.int64()),
                      ("height", pa.int64()), ("dup_group", pa.int64()), ("dup_copy", pa.int64()),
                      ("shard", pa.string()), ("ext", pa.string()), ("phash", pa.string()),
                      ("cluster", pa.int64())])


def _dct_matrix(n: int = 32) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


_DCT32 = _dct_matrix(32)


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (as imagehash.phash): 32x32 grey, 2-D DCT, 8x8 lowest frequencies > median."""
    x = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ x @ _DCT32.T)[:8, :8]
    bits = np.packbits((low > np.median(low)).ravel())
    return int.from_bytes(bits.tobytes(), "big")


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):          # numpy >= 2.0
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def near_duplicate_pairs(hashes: np.ndarray, threshold: int = 6, block: int = 2048) -> np.ndarray:
    """All pairs (i, j, hamming) with i < j and hamming(hashes[i], hashes[j]) <= threshold.

    Blockwise all-pairs: memory O(block^2), time O(n^2) vector work (no Python loop per pair).

    Args:
        hashes: uint64 array [n].
        threshold: largest Hamming distance counted. Default 6.
        block: rows and columns per block. Default 2048.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    out = [np.zeros((0, 3), np.int64)]
    for a in range(0, len(h), block):
        ha = h[a:a + block]
        for b in range(a, len(h), block):
            d = _popcount(ha[:, None] ^ h[None, b:b + block])              # [A, B]
            if a == b:
                d = np.where(np.triu(np.ones(d.shape, bool), k=1), d, 255)
            i, j = np.nonzero(d <= threshold)
            out.append(np.stack([i + a, j + b, d[i, j]], axis=1).astype(np.int64))
    return np.concatenate(out)


def tar_key(key: str) -> str:
    """A key webdataset splits back unchanged: it cuts member names at the first dot of the basename."""
    return key.replace("\\", "/").lstrip("/").replace(".", "_")


def _read_bytes(data) -> bytes:
    if isinstance(data, Image.Image):
        buf = io.BytesIO()
        data.save(buf, "PNG")
        return buf.getvalue()
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    try:
        return Path(data).read_bytes()
    except OSError as e:
        raise BadSample("unreadable", str(e)) from None


def _sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def _encode(image: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        image.save(buf, "JPEG", quality=95)
    else:
        image.save(buf, "PNG")
    return buf.getvalue()


class _Entries(Dataset):
    """Entry n of the write order -> a ready-to-write sample or a skip; runs in dataloader workers."""

    def __init__(self, source: MapSource, order: np.ndarray, plan: DuplicationPlan | None, resize: int | None,
                 captions: Sequence | None, seed: int):
        self.source, self.order, self.plan, self.resize = source, order, plan, resize
        self.captions, self.seed = captions, seed

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, n: int) -> dict:
        e = int(self.order[n])
        src, copy, group, donor = (e, 0, -1, -1) if self.plan is None else (
            int(self.plan.source[e]), int(self.plan.copy[e]), int(self.plan.dup_group[e]),
            int(self.plan.caption_from[e]))
        item = {"src": src, "copy": copy, "skip": None}
        key = self.source.key(src)
        try:
            rec = self.source.raw(src)
            key = rec.key
            if rec.skip:
                raise BadSample(*rec.skip)
            caption = pick_caption(rec.caption, seed=self.seed, key=key)
            data = _read_bytes(rec.data)
            image = load_image(data, min_size=self.source.min_size, max_pixels=self.source.max_pixels)
        except BadSample as err:
            return {**item, "source_key": key, "skip": (err.reason, err.detail)}
        if donor >= 0:
            caption = self._donor_caption(donor, copy_key(key, copy), caption)
        ext = _sniff(data)
        if self.resize and min(image.size) > self.resize:
            s = self.resize / min(image.size)
            image = image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.LANCZOS)
            ext = "png" if ext == "png" else "jpg"
            data = _encode(image, ext)
        elif ext is None:                               # webp, gif, bmp, tiff: lossless re-encode
            ext = "png"
            data = _encode(image, ext)
        options = None          # every caption of a multi-caption item, so a reader can draw one per epoch
        if donor < 0 and isinstance(rec.caption, (list, tuple)):
            options = [c for c in rec.caption if isinstance(c, str) and c.strip()] or None
        return {**item, "source_key": key, "key": tar_key(copy_key(key, copy)),
                "group": rec.dup_group if self.plan is None else group, "ext": ext, "data": data,
                "caption": caption, "captions": options, "caption_from": donor,
                "sha256": hashlib.sha256(data).hexdigest(), "phash": phash(image),
                "width": image.width, "height": image.height}

    def _donor_caption(self, donor: int, key: str, own: str) -> str:
        try:
            if self.captions is not None:
                return pick_caption(self.captions[donor], seed=self.seed, key=key)
            rec = self.source.raw(donor)
            return pick_caption(rec.caption, seed=self.seed, key=rec.key)
        except BadSample:
            return own


def _identity(x):
    return x


class _Shards:
    """Tar shards of `shard_size` samples, each written to .tmp and renamed when complete."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.counts: dict[str, int] = {}
        self.writer, self.stream, self.name = None, None, None

    def write(self, sample: dict) -> str:
        import webdataset as wds

        if self.writer is None:
            self.name = SHARD_PATTERN % len(self.counts)
            self.stream = open(self.out / f"{self.name}.tmp", "wb")
            self.writer = wds.TarWriter(self.stream, encoder=False, mtime=0)   # mtime 0: same input, same bytes
            self.counts[self.name] = 0
        self.writer.write(sample)
        self.counts[self.name] += 1
        name = self.name
        if self.counts[name] == self.shard_size:
            self.close()
        return name

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.stream.close()
            (self.out / f"{self.name}.tmp").rename(self.out / self.name)
            self.writer = None


class _Skips:
    """Bad input counted once per source item: a bad item planned 200 times is one bad input."""

    def __init__(self, max_examples: int):
        self.counts, self.examples, self.sources, self.appearances = Counter(), defaultdict(list), set(), 0
        self.max_examples = max_examples

    def add(self, item: dict) -> None:
        self.appearances += 1
        if item["src"] in self.sources:
            return
        self.sources.add(item["src"])
        reason, detail = item["skip"]
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(f"{item['source_key']}: {detail}" if detail else item["source_key"])

    def report(self) -> dict:
        return {"skipped": dict(sorted(self.counts.items())), "skipped_total": sum(self.counts.values()),
                "skipped_appearances": self.appearances, "examples": dict(self.examples)}


DEDUP = ("none", "exact", "near")


def _dedup_reason(item: dict, written_sha: dict, written: NearDuplicateIndex | None, dedup: str):
    """(reason, detail) when `item` duplicates a sample already written, else None (pHash: a lookup in the index
    of the written samples' hashes)."""
    if item["sha256"] in written_sha:
        return "duplicate_exact", f"same bytes as {written_sha[item['sha256']]}"
    if dedup == "near" and written is not None:
        hits = written.query(np.array([item["phash"]], dtype=np.uint64))
        if len(hits):
            return "duplicate_near", f"pHash within {int(hits[:, 2].min())} bits of an earlier sample"
    return None


def _prepare_output(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("shard-*.tar*")) + [out / f for f in OUTPUT_FILES if (out / f).exists()]
    if old and not overwrite:
        raise DataConfigError(f"output_dir={str(out)!r} already holds prep output ({old[0].name}, ...); choose an "
                              "empty folder or set overwrite=true to replace it")
    for p in old:
        p.unlink()


def _duplicates(keys: list[str], shas: list[str], hashes: list[int], threshold: int, max_examples: int):
    """Exact (same sha256) groups and near-duplicate pairs among the distinct source items written."""
    by_sha = defaultdict(list)
    for k, s in zip(keys, shas):
        by_sha[s].append(k)
    groups = [g for g in by_sha.values() if len(g) > 1]
    pairs = near_duplicate_pairs_indexed(np.array(hashes, dtype=np.uint64), threshold)
    sha = np.array(shas, dtype=object)
    exact = np.asarray(sha[pairs[:, 0]] == sha[pairs[:, 1]], dtype=bool)
    near = pairs[~exact]
    table = pa.table({"key_a": [keys[i] for i in pairs[:, 0]], "key_b": [keys[j] for j in pairs[:, 1]],
                      "hamming": pairs[:, 2].astype(np.int32), "exact": exact})
    report_exact = {"groups": len(groups), "items": sum(len(g) for g in groups), "examples": groups[:max_examples]}
    report_near = {"threshold": threshold, "pairs": len(near), "items": len(np.unique(near[:, :2])),
                   "examples": [{"a": keys[i], "b": keys[j], "hamming": int(d)} for i, j, d in near[:max_examples]],
                   "method": "64-bit DCT pHash, multi-index hashing (faiss IndexBinaryMultiHash), exact"}
    return report_exact, report_near, table


def prepare(source: MapSource, output_dir: str | Path, *, shard_size: int = 1000, resize: int | None = None,
            plan: DuplicationPlan | None = None, captions: Sequence | None = None, near_dup_threshold: int = 6,
            seed: int = 0, num_workers: int = 0, overwrite: bool = False, input_info: dict | None = None,
            max_examples: int = 5, progress: bool = True, dedup: str = "none") -> dict:
    """Write `source` (through `plan`, if given) as webdataset shards; returns the prep report.

    Args:
        source: a MapSource (ImageFolderSource, HFSource); its min_size/max_pixels decide what is skipped.
        output_dir: folder for shards, manifest.parquet, shards.json, duplicates.parquet, prep_report.json.
        shard_size: samples per shard. Default 1000.
        resize: scale images whose shorter side exceeds this down to it (re-encoded: PNG stays PNG, others
            JPEG quality 95). Default None: original bytes.
        plan: duplication plan over len(source) items; copies are written physically. Default None.
        captions: caption list for image_only donors (plan built with num_captions). Default None.
        near_dup_threshold: largest pHash Hamming distance reported as a near-duplicate. Default 6.
        seed: caption choice among several and the write order of a plan. Default 0.
        num_workers: dataloader workers that decode, hash and encode. Default 0 (in process).
        overwrite: replace existing prep output in output_dir. Default False.
        input_info: what the input was (kind, path), copied into the report. Default None.
        max_examples: example keys kept per skip reason and duplicate kind. Default 5.
        progress: show a tqdm bar. Default True.
        dedup: the deduplication baseline: "exact" skips a sample whose image bytes (sha256) were already
            written, "near" also one whose pHash is within `near_dup_threshold` bits of a written one, "none"
            writes all. Skipped samples are counted by reason (duplicate_exact, duplicate_near). Default "none".
    """
    if dedup not in DEDUP:
        raise DataConfigError(f"dedup={dedup!r}: choose one of {', '.join(DEDUP)}")
    t0 = time.time()
    out = Path(output_dir)
    _prepare_output(out, overwrite)
    n_entries = len(plan) if plan is not None else len(source)
    # Without a plan keep the source order; with one, shuffle so copies spread over shards.
    order = np.random.default_rng(seed).permutation(n_entries) if plan is not None else np.arange(n_entries)
    loader = DataLoader(_Entries(source, order, plan, resize, captions, seed), batch_size=None,
                        num_workers=num_workers, collate_fn=_identity)
    shards, skips = _Shards(out, shard_size), _Skips(max_examples)
    items = tqdm(loader, total=n_entries, unit="img", desc="prep", disable=not progress)
    rows, phashes, deduped = _write_samples(items, source.source_name, shards, skips, dedup, near_dup_threshold)
    shards.close()

    exact, near = _write_index(out, rows, phashes, shards.counts, near_dup_threshold, max_examples)
    report = {"input": {**(input_info or {}), "source": source.source_name, "items": len(source)},
              "output_dir": str(out.resolve()), "shard_size": shard_size, "resize": resize,
              "written": len(rows["key"]), "shards": len(shards.counts), **skips.report(),
              "duplication": None, "exact_duplicates": exact, "near_duplicates": near,
              "dedup": {"mode": dedup, "skipped": dict(deduped)},
              "seconds": round(time.time() - t0, 2)}
    if plan is not None:
        report["duplication"] = _duplication_written(plan, rows["dup_group"])
    (out / "prep_report.json").write_text(json.dumps(report, indent=1))
    return report


def _write_samples(items, source_name: str, shards: _Shards, skips: _Skips, dedup: str, threshold: int):
    """Writes every acceptable item to the shards, in the order they come; skips the rest (bad input into
    `skips`, the dedup baseline's drops counted by reason). Returns the manifest columns, the pHash of each
    written sample and the dedup counts."""
    rows, phashes, written_keys, written_sha, deduped = defaultdict(list), [], set(), {}, Counter()
    index = NearDuplicateIndex(threshold) if dedup == "near" else None
    for item in items:
        if item["skip"] is None and item["key"] in written_keys:
            item["skip"] = ("duplicate_key", f"{item['key']} (after replacing '.' by '_') is already written")
        if item["skip"] is None and dedup != "none":
            reason = _dedup_reason(item, written_sha, index, dedup)
            if reason:                              # every appearance counts (a bad input counts once per item)
                deduped[reason[0]] += 1
                continue
        if item["skip"] is not None:
            skips.add(item)
            continue
        key = item["key"]
        written_sha[item["sha256"]] = key
        written_keys.add(key)
        shard = shards.write(_tar_sample(item, source_name))
        row = {**item, "key": key, "source": source_name, "dup_group": item["group"], "dup_copy": item["copy"],
               "shard": shard, "phash": f"{item['phash']:016x}"}
        for col in MANIFEST.names[:-1]:                    # the cluster is known once every sample is written
            rows[col].append(row[col])
        phashes.append(item["phash"])
        if index is not None:
            index.add(np.array([item["phash"]], dtype=np.uint64))
    return rows, phashes, deduped


def _tar_sample(item: dict, source_name: str) -> dict:
    """The shard members of one sample: image bytes, caption and meta json."""
    meta = {"dup_group": item["group"], "dup_copy": item["copy"], "source": source_name,
            "source_key": item["source_key"]}
    if item["captions"]:
        meta["captions"] = item["captions"]
    if item["caption_from"] >= 0:
        meta["caption_from"] = item["caption_from"]
    return {"__key__": item["key"], item["ext"]: item["data"], "txt": item["caption"].encode("utf-8"),
            "json": json.dumps(meta).encode("utf-8")}


def _write_index(out: Path, rows: dict, phashes: list[int], shard_counts: dict[str, int], threshold: int,
                 max_examples: int) -> tuple[dict, dict]:
    """manifest.parquet, shards.json and duplicates.parquet; returns the exact and near duplicate reports."""
    hashes = np.array(phashes, dtype=np.uint64)
    rows["cluster"] = clusters(len(hashes), near_duplicate_pairs_indexed(hashes, threshold)).tolist()
    pq.write_table(pa.table({c: rows[c] for c in MANIFEST.names}, schema=MANIFEST), out / "manifest.parquet")
    (out / "shards.json").write_text(json.dumps(shard_counts, indent=1))
    firsts = [n for n, c in enumerate(rows["dup_copy"]) if c == 0]     # distinct source items
    exact, near, pairs = _duplicates([rows["key"][n] for n in firsts], [rows["sha256"][n] for n in firsts],
                                     [phashes[n] for n in firsts], threshold, max_examples)
    pq.write_table(pairs, out / "duplicates.parquet")
    return exact, near


def _duplication_written(plan: DuplicationPlan, dup_groups: list[int]) -> dict:
    """The plan's summary and how much of its duplication made it into the shards (bad input loses copies)."""
    groups = Counter(g for g in dup_groups if g >= 0)
    return {**plan.summary(), "written_duplicated_items": len(groups),
            "written_duplicated_entries": sum(groups.values()),
            "duplicated_items_lost": int(len(plan.duplicated_sources)) - len(groups)}


def format_summary(report: dict) -> str:
    """The one-screen summary of a prep report."""
    lines = [f"memfilter prep: {report['output_dir']}",
             f"  input      {report['input'].get('kind', report['input']['source'])} "
             f"{report['input'].get('path', '')} ({report['input']['items']} items)",
             f"  written    {report['written']} samples in {report['shards']} shard(s) of <= {report['shard_size']}"
             + (f", resized to <= {report['resize']} px" if report["resize"] else ", original bytes"),
             f"  skipped    {report['skipped_total']} input item(s)"
             + "".join(f"\n    {r:<16} {n:>8}   e.g. {report['examples'][r][0]}" for r, n in report["skipped"].items())]
    dup = report["duplication"]
    if dup:
        lines.append(f"  duplicated {dup['protocol']}: {dup['written_duplicated_items']} item(s) x copies = "
                     f"{dup['written_duplicated_entries']} samples ({dup['duplicated_items_lost']} lost to bad input)")
    ex, near = report["exact_duplicates"], report["near_duplicates"]
    lines.append(f"  exact dups {ex['groups']} group(s), {ex['items']} item(s) with identical bytes")
    lines.append(f"  near dups  {near['pairs']} pair(s) within Hamming {near['threshold']} (pHash), "
                 f"{near['items']} item(s)")
    for e in near["examples"][:3]:
        lines.append(f"    {e['a']} ~ {e['b']} ({e['hamming']})")
    lines.append(f"  files      shard-*.tar, manifest.parquet, shards.json, duplicates.parquet, prep_report.json "
                 f"({report['seconds']} s)")
    return "\n".join(lines)
