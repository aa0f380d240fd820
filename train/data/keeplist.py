"""`data.keep_list`: train on (or write) only the listed keys of any source, e.g. a curation pass's keep.txt.

A map-style source is wrapped (`KeepList`: indexing, no copies); a webdataset source skips the other keys while it
reads, and its epoch length counts only the listed keys (from the tar headers, without decoding). The samples left
out are counted (`excluded`), so every sample of the source is accounted for.
"""
from __future__ import annotations

import tarfile

from memfilter.filtering.protect import read_key_list
from memfilter.train.data.imagefolder import DataConfigError, MapSource


def read_keep_list(path: str, config_prefix: str = "data") -> set[str]:
    try:
        return read_key_list(path, f"{config_prefix}.keep_list")
    except (FileNotFoundError, ValueError) as e:
        raise DataConfigError(str(e)) from None


def _key_of(source, i: int) -> str:
    return source.key(i) if hasattr(source, "key") else source[i]["key"]


class KeepList(MapSource):
    """The samples of a map-style source whose keys are listed, in the source's order.

    Args:
        source: any map-style source (MapSource, a duplication plan's view, the toy world).
        keys: the keys to keep.
    """

    def __init__(self, source, keys: set[str]):
        super().__init__(getattr(source, "min_size", 0), getattr(source, "max_pixels", 1), getattr(source, "seed", 0))
        self.source = source
        self.index = [i for i in range(len(source)) if _key_of(source, i) in keys]
        self.excluded = len(source) - len(self.index)
        self.source_name = getattr(source, "source_name", "map")
        if hasattr(source, "resolution"):
            self.resolution = source.resolution
        if not self.index:
            raise DataConfigError(f"data.keep_list: none of its {len(keys)} keys is a key of the data source "
                                  f"({len(source)} samples); check that the list was written for this data")

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def key(self, i: int) -> str:
        return _key_of(self.source, self.index[i])

    def raw(self, i: int):
        return self.source.raw(self.index[i])

    def caption_of(self, i: int) -> str:
        return self.source.caption_of(self.index[i])

    def __getitem__(self, i: int) -> dict:
        return self.source[self.index[self._check_index(i)]]


def kept_counts(urls: list[str], keys: set[str]) -> dict[str, int]:
    """Listed keys per shard, from the tar headers (webdataset's key: the member name up to its first dot)."""
    from webdataset.tariterators import base_plus_ext

    counts = {}
    for url in urls:
        with tarfile.open(url) as tar:
            found = {base_plus_ext(m.name)[0] for m in tar if m.isfile()}
        counts[url] = len(found & keys)
    return counts


def write_kept_shards(urls: list[str], keys: set[str], out, shard_size: int = 1000) -> dict[str, int]:
    """The listed samples of webdataset shards copied member by member (no re-encoding) into new shards of
    `shard_size` samples in `out`, with shards.json and a manifest (key, shard, source shard). Returns the
    samples per new shard."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from memfilter.train.data.prepare import SHARD_PATTERN
    from memfilter.train.data.tarfast import tar_samples

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    rows: dict[str, list] = {"key": [], "shard": [], "source_shard": []}
    writer, name = None, None
    for url in urls:
        for raw in wds.DataPipeline(lambda u=url: iter([{"url": u}]), tar_samples(handler=wds.reraise_exception)):
            if raw["__key__"] not in keys:
                continue
            if writer is None or counts[name] == shard_size:
                if writer is not None:
                    writer.close()
                name = SHARD_PATTERN % len(counts)
                # mtime 0 as prep writes: the same bytes every time, and no per-member pax header to parse
                writer, counts[name] = wds.TarWriter(str(out / name), encoder=False, mtime=0), 0
            writer.write({k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")})
            counts[name] += 1
            for col, v in (("key", raw["__key__"]), ("shard", name), ("source_shard", url)):
                rows[col].append(v)
    if writer is not None:
        writer.close()
    (out / "shards.json").write_text(__import__("json").dumps(counts, indent=1))
    pq.write_table(pa.table(rows), out / "manifest.parquet")
    return counts
