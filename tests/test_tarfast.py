"""The fast tar reader (train/data/tarfast.py) yields what webdataset's tarfile_to_samples yields: on shards as prep
and as webdataset's TarWriter write them (pax headers), long names, directories and meta files, compressed and
truncated shards."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import webdataset as wds

from memfilter.train.data.tarfast import tar_samples


def _samples(stage, urls):
    errors = []
    out = list(wds.DataPipeline(lambda: iter({"url": u} for u in urls), stage(lambda e: errors.append(e) or True)))
    return out, errors


def _member(tar, name, data: bytes, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_the_fast_reader_yields_what_webdataset_yields(tmp_path):
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 255, int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 3000, 12)]
    urls = []
    for mtime, compress in ((None, False), (0, False), (0, True)):      # pax headers (float mtime), prep's, gzip
        url = str(tmp_path / f"w-{mtime}-{compress}.tar") + (".gz" if compress else "")
        with wds.TarWriter(url, mtime=mtime, compress=compress) as w:
            for i in range(4):
                w.write({"__key__": f"dir/k{i}", "bin": blobs[i], "txt": f"caption {i}", "JSON": b"{}"})
        urls.append(url)
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        url = str(tmp_path / f"t-{fmt}.tar")
        long = "deep/" * (3 if fmt == tarfile.USTAR_FORMAT else 30) + "item"
        with tarfile.open(url, "w", format=fmt) as tar:
            _member(tar, "adir", b"", tarfile.DIRTYPE)
            _member(tar, "__meta__.json", b"{}")
            for i in range(3):
                _member(tar, f"{long}{i}.bin", blobs[4 + i])
                _member(tar, f"{long}{i}.txt", f"long {i} é".encode())
        urls.append(url)
    ours, our_errors = _samples(tar_samples, urls)
    theirs, their_errors = _samples(lambda h: wds.tarfile_to_samples(handler=h), urls)
    assert ours == theirs and len(ours) == 3 * 4 + 3 * 4 and not our_errors and not their_errors   # __meta__.json too


def test_a_truncated_shard_yields_the_members_before_the_cut_and_one_error(tmp_path):
    rng = np.random.default_rng(1)
    url = str(tmp_path / "cut.tar")
    with wds.TarWriter(url) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "bin": rng.integers(0, 255, 5000, dtype=np.uint8).tobytes(), "txt": "x"})
    raw = open(url, "rb").read()
    open(url, "wb").write(raw[: int(len(raw) * 0.55)])
    ours, our_errors = _samples(tar_samples, [url, url])
    theirs, _ = _samples(lambda h: wds.tarfile_to_samples(handler=h), [url, url])
    complete = [s for s in ours if "txt" in s]
    assert complete and complete == [s for s in theirs if "txt" in s]
    assert len(our_errors) == 2 and all(e.args[-1] == url for e in our_errors)     # one per shard, naming it
