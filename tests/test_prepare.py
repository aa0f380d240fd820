"""Prep: shards agree with the manifest, bad inputs and planted duplicates are reported, the Hydra app runs."""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.conftest import REPO, run_cmd
from tests.test_sources import corrupt_jpeg, encode, smooth
from memfilter.train.data.duplication import wen_plan
from memfilter.train.data.hf import HFSource
from memfilter.train.data.imagefolder import DataConfigError, ImageFolderSource
from memfilter.train.data.prepare import near_duplicate_pairs, phash, prepare


def read_shards(out) -> tuple[dict, dict]:
    """{key: {ext: bytes}} over every shard, and {shard: number of samples}."""
    samples, counts = defaultdict(dict), {}
    for path in sorted(out.glob("shard-*.tar")):
        keys = set()
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                samples[key][m.name[len(key) + 1:]] = tar.extractfile(m).read()
                keys.add(key)
        counts[path.name] = len(keys)
    return samples, counts


def folder(root, n_good: int = 8):
    """n_good distinct images (jpg and png), an exact copy of im0, a re-encoded near copy of im1, 3 bad inputs."""
    (root / "sub").mkdir(parents=True)
    for i in range(n_good):
        name = f"sub/im{i}.png" if i % 3 == 2 else f"im{i}.jpg"
        data = encode(smooth(i, (64, 48)), "PNG" if name.endswith("png") else "JPEG", quality=90)
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"caption {i}")
    (root / "copy_of_0.jpg").write_bytes((root / "im0.jpg").read_bytes())
    (root / "copy_of_0.txt").write_text("another caption")
    (root / "near_1.jpg").write_bytes(encode(Image.open(root / "im1.jpg").resize((60, 45)), quality=60))
    (root / "near_1.txt").write_text("near")
    (root / "corrupt.jpg").write_bytes(corrupt_jpeg())
    (root / "corrupt.txt").write_text("x")
    (root / "empty.jpg").write_bytes(encode(smooth(50)))
    (root / "empty.txt").write_text(" ")
    (root / "nocap.png").write_bytes(encode(smooth(51), "PNG"))


def check_against_manifest(out) -> tuple[dict, "pd.DataFrame"]:  # noqa: F821
    manifest = pq.read_table(out / "manifest.parquet").to_pandas()
    samples, counts = read_shards(out)
    assert json.loads((out / "shards.json").read_text()) == counts
    assert sum(counts.values()) == len(manifest) == len(samples)
    assert Counter(manifest.shard) == counts
    for row in manifest.itertuples():
        s = samples[row.key]
        assert set(s) == {row.ext, "txt", "json"}
        assert hashlib.sha256(s[row.ext]).hexdigest() == row.sha256
        assert s["txt"].decode() == row.caption
        meta = json.loads(s["json"])
        assert meta["dup_group"] == row.dup_group and meta["dup_copy"] == row.dup_copy
        assert Image.open(io.BytesIO(s[row.ext])).size == (row.width, row.height)
    return samples, manifest


def test_shards_match_manifest_and_duplicates_are_reported(tmp_path):
    folder(tmp_path / "in")
    out = tmp_path / "out"
    report = prepare(ImageFolderSource(tmp_path / "in"), out, shard_size=3, progress=False)
    samples, manifest = check_against_manifest(out)
    assert sorted(manifest.key) == sorted(["im0", "im1", "sub/im2", "im3", "im4", "sub/im5", "im6", "im7",
                                           "copy_of_0", "near_1"])
    assert list(json.loads((out / "shards.json").read_text()).values()) == [3, 3, 3, 1]
    assert samples["im0"]["jpg"] == (tmp_path / "in" / "im0.jpg").read_bytes()      # original bytes kept
    assert samples["sub/im2"]["png"] == (tmp_path / "in" / "sub" / "im2.png").read_bytes()
    assert report["written"] == 10 and report["skipped"] == {"empty_caption": 1, "missing_caption": 1,
                                                             "undecodable": 1}
    assert report["examples"]["undecodable"][0].startswith("corrupt")
    assert report["exact_duplicates"]["groups"] == 1 and sorted(report["exact_duplicates"]["examples"][0]) == [
        "copy_of_0", "im0"]
    near = report["near_duplicates"]
    assert near["pairs"] == 1 and {near["examples"][0]["a"], near["examples"][0]["b"]} == {"im1", "near_1"}
    pairs = pq.read_table(out / "duplicates.parquet").to_pandas()
    assert sorted(map(sorted, zip(pairs.key_a, pairs.key_b))) == [["copy_of_0", "im0"], ["im1", "near_1"]]
    assert json.loads((out / "prep_report.json").read_text())["written"] == 10
    with pytest.raises(DataConfigError, match="overwrite=true"):
        prepare(ImageFolderSource(tmp_path / "in"), out, progress=False)
    first = [p.read_bytes() for p in sorted(out.glob("shard-*.tar"))]
    again = prepare(ImageFolderSource(tmp_path / "in"), out, shard_size=3, overwrite=True, progress=False)
    assert again["written"] == 10 and [p.read_bytes() for p in sorted(out.glob("shard-*.tar"))] == first


def test_webdataset_reads_the_shards_back(tmp_path):
    import webdataset as wds

    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "b.v2.png", "sub/im2.jpg"]):
        smooth(i).save(root / name)
        (root / name).with_suffix(".txt").write_text(f"caption {i}")
    out = tmp_path / "out"
    prepare(ImageFolderSource(root), out, shard_size=2, progress=False,
            plan=wen_plan(3, num_duplicated=1, repeats=3, nondup_ratio=None, seed=0))
    manifest = pq.read_table(out / "manifest.parquet").to_pandas().set_index("key")
    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    got = {s["__key__"]: s["txt"].decode() for s in wds.WebDataset(urls, shardshuffle=False)}
    assert got == manifest.caption.to_dict() and len(got) == 5
    assert {"sub/im2", "b_v2"} <= set(got) and sum("#dup" in k for k in got) == 2     # '.' in a key becomes '_'


def test_streaming_source_reads_prep_output(tmp_path):
    """The training loop's WebDatasetSource sees every written sample once, with caption and dup_group."""
    from memfilter.train.data.wds import WebDatasetSource

    folder(tmp_path / "in", n_good=5)
    src = ImageFolderSource(tmp_path / "in")
    prepare(src, tmp_path / "out", shard_size=3, progress=False,
            plan=wen_plan(len(src), num_duplicated=2, repeats=2, nondup_ratio=None, seed=0))
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas().set_index("key")
    stream = WebDatasetSource(sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar")), shuffle_buffer=0)
    stream.bind(lambda samples: {"samples": samples}, rank=0, world_size=1, batch_size=1)
    got = {s["key"]: (s["caption"], s["meta"]["dup_group"]) for b in stream for s in b["samples"]}
    assert got == {k: (r.caption, r.dup_group) for k, r in manifest.iterrows()}


def test_physical_duplication_writes_every_copy(tmp_path):
    folder(tmp_path / "in")
    src = ImageFolderSource(tmp_path / "in")
    good = [i for i in range(len(src)) if "skip" not in src[i]]
    plan = wen_plan(len(src), num_duplicated=3, repeats=4, nondup_ratio=0.5, seed=2)
    report = prepare(src, tmp_path / "out", shard_size=5, plan=plan, progress=False)
    _, manifest = check_against_manifest(tmp_path / "out")
    planned_good = [(s, c) for s, c, _ in plan if s in good]
    assert len(manifest) == report["written"] == len(planned_good)
    dup = manifest[manifest.dup_group >= 0]
    expected_groups = {s for s, c, g in plan if g >= 0 and s in good}
    assert set(dup.dup_group) == expected_groups
    for g, rows in dup.groupby("dup_group"):
        assert sorted(rows.dup_copy) == [0, 1, 2, 3] and rows.sha256.nunique() == 1
        assert sorted(rows.key) == sorted([src.key(g)] + [f"{src.key(g)}#dup{c:04d}" for c in (1, 2, 3)])
    assert report["duplication"]["written_duplicated_entries"] == 4 * len(expected_groups)
    assert report["duplication"]["duplicated_items_lost"] == 3 - len(expected_groups)
    # planned copies are not reported as found duplicates; the copies are spread, not written in a row
    assert report["exact_duplicates"]["groups"] <= 1
    positions = {k: n for n, k in enumerate(manifest.key)}
    assert any(abs(positions[f"{src.key(g)}#dup0001"] - positions[src.key(g)]) > 1 for g in expected_groups)


def test_resize_and_table_input(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    smooth(0, (64, 48)).save(root / "a.jpg", quality=90)
    smooth(1, (48, 64)).save(root / "b.png")
    smooth(2, (16, 16)).save(root / "c.jpg")
    pq.write_table(pa.table({"file": ["a.jpg", "b.png", "c.jpg", "gone.jpg"], "caption": ["A", "B", "C", "G"]}),
                   root / "pairs.parquet")
    src = HFSource(str(root / "pairs.parquet"), image_column="file", caption_column="caption",
                   cache_dir=str(tmp_path / "cache"))
    report = prepare(src, tmp_path / "out", resize=16, progress=False)
    samples, manifest = check_against_manifest(tmp_path / "out")
    rows = manifest.set_index("caption")
    assert (rows.loc["A", "width"], rows.loc["A", "height"], rows.loc["A", "ext"]) == (21, 16, "jpg")
    assert (rows.loc["B", "width"], rows.loc["B", "height"], rows.loc["B", "ext"]) == (16, 21, "png")
    assert samples[rows.loc["C", "key"]]["jpg"] == (root / "c.jpg").read_bytes()    # small: not resized
    assert report["skipped"] == {"unreadable": 1}


def test_near_duplicate_pairs_and_phash():
    h = np.array([0, 0b111, 2**64 - 1, 0b1, 2**63], dtype=np.uint64)
    pairs = near_duplicate_pairs(h, threshold=3, block=2)      # blocks smaller than n: crosses block edges
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1, 3), (0, 3, 1), (0, 4, 1), (1, 3, 2), (3, 4, 2)]
    a, b = smooth(0, (64, 48)), smooth(1, (64, 48))
    blurred = Image.open(io.BytesIO(encode(a.resize((50, 38)), quality=50)))
    assert bin(phash(a) ^ phash(blurred)).count("1") <= 6 < bin(phash(a) ^ phash(b)).count("1")


def _compose(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="prepare", overrides=overrides)


def test_app_config_errors_name_the_field(tmp_path):
    from memfilter.launch.config_check import ConfigError
    from memfilter.launch.prepare import run

    folder(tmp_path / "in", n_good=3)
    with pytest.raises(DataConfigError, match=r"input\.path=.*no such folder"):
        run(_compose([f"input.path={tmp_path / 'nope'}", f"output_dir={tmp_path / 'o'}"]))
    with pytest.raises(ConfigError, match=r"shard_size=0 is invalid"):
        run(_compose([f"input.path={tmp_path / 'in'}", f"output_dir={tmp_path / 'o'}", "shard_size=0"]))
    with pytest.raises(ConfigError, match=r"output_dir"):
        run(_compose([f"input.path={tmp_path / 'in'}"]))
    with pytest.raises(DataConfigError, match=r"input\.image_column='img'.*available columns"):
        pq.write_table(pa.table({"file": ["im0.jpg"], "text": ["x"]}), tmp_path / "in" / "t.parquet")
        run(_compose(["input.kind=table", f"input.path={tmp_path / 'in' / 't.parquet'}", "input.image_column=img",
                      f"output_dir={tmp_path / 'o'}", "num_workers=0"]))
    with pytest.raises(ConfigError, match=r"duplication: wen plan needs"):
        run(_compose([f"input.path={tmp_path / 'in'}", f"output_dir={tmp_path / 'o'}", "num_workers=0",
                      "duplication.protocol=wen"]))


def test_app_runs_end_to_end(tmp_path):
    folder(tmp_path / "in", n_good=6)
    (tmp_path / "captions.txt").write_text("pool one\npool two\n")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "launch" / "prepare.py"), "input.kind=imagefolder",
           f"input.path={tmp_path / 'in'}", f"output_dir={out}", "shard_size=4", "resize=32", "num_workers=2",
           "duplication.protocol=somepalli", "duplication.fraction=0.25", "duplication.weight=3",
           "duplication.mode=image_only", f"duplication.caption_file={tmp_path / 'captions.txt'}"]
    proc = run_cmd(cmd, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memfilter prep" in proc.stdout and "near dups" in proc.stdout
    _, manifest = check_against_manifest(out)
    report = json.loads((out / "prep_report.json").read_text())
    assert report["written"] == len(manifest) and report["duplication"]["protocol"] == "somepalli"
    copies = manifest[manifest.dup_copy > 0]
    assert len(copies) == 2 * report["duplication"]["written_duplicated_items"] > 0
    assert set(copies.caption) <= {"pool one", "pool two"}
    assert (np.minimum(manifest.width, manifest.height) == 32).all()
    proc = run_cmd(cmd, timeout=120)                            # output exists: refused, names the fix
    assert proc.returncode == 2 and "overwrite=true" in proc.stderr


@pytest.mark.parametrize("variant", ["exact", "near"])
def test_dedup_baselines_skip_exact_and_near_copies_and_count_them(tmp_path, variant):
    """dedup=exact drops byte-identical copies only; dedup=near also the near copies sha256 misses; every skipped
    appearance is counted by reason, and what is written plus what was skipped is every appearance."""
    import pyarrow.parquet as pq

    from memfilter.toyworld.world import ToyWorld, prepare_world

    world = ToyWorld(num_unique=12, num_duplicated=2, repeats=5, seed=1, variant=variant)
    total = 12 + 2 * 5
    written = {}
    for mode in ("none", "exact", "near"):
        report = prepare_world(world, tmp_path / mode, shard_size=8, dedup=mode, progress=False)
        manifest = pq.read_table(tmp_path / mode / "manifest.parquet").to_pandas()
        skipped = sum(report["dedup"]["skipped"].values())
        assert len(manifest) + skipped == total and report["dedup"]["mode"] == mode
        written[mode] = manifest
    dup = lambda m: m[m.dup_group >= 0]  # noqa: E731
    assert len(dup(written["none"])) == 10
    assert len(dup(written["near"])) == 2                                   # one copy of each duplicated item
    assert len(dup(written["exact"])) == (2 if variant == "exact" else 10)  # near copies differ in bytes
    assert written["exact"].sha256.is_unique
