"""The curation pass (filtering/curate.py, filtering/curation.py, launch/curate.py): every sample scored exactly once
on any number of processes and workers, after a kill too; scores independent of batching; evidence per item;
decisions; keep-lists, shards and filter=precomputed in training."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memfilter.launch.config_check import ConfigError
from tests.conftest import REPO, app_cmd, compose, train_in_process

N_ITEMS = 18          # 17 good images (3 items x 3 copies, one image under two captions, 6 unique) + 1 corrupt


def _folder(root):
    """An imagefolder with duplicated items (dup_group), an image-only duplicate and a corrupt file."""
    root.mkdir(parents=True)
    rows, rng = [], np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(10)]
    plan = [(i, c) for i in range(3) for c in range(3)] + [(3, 0), (3, 1)] + [(i, 0) for i in range(4, 10)]
    for n, (item, copy) in enumerate(plan):
        Image.fromarray(images[item]).save(root / f"s{n:02d}.png")
        caption = f"item {item} shown in a picture" if item != 3 else f"item three, caption {copy}"
        rows.append({"file_name": f"s{n:02d}.png", "text": caption, "dup_group": item if item < 3 else -1})
    (root / "bad.png").write_bytes(b"not an image")
    rows.append({"file_name": "bad.png", "text": "a corrupt file"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from memfilter.train.data.imagefolder import ImageFolderSource
    from memfilter.train.data.prepare import prepare
    from memfilter.train.families import build_pipeline, build_tiny

    root = tmp_path_factory.mktemp("curate")
    build_pipeline(build_tiny(resolution=16, block_out_channels=(32, 32), vae_channels=(32, 32))).save_pretrained(
        root / "base")
    folder = _folder(root / "images")
    prepare(ImageFolderSource(folder), root / "shards", shard_size=5, progress=False)
    return root


def _overrides(world, out, *extra, data="folder"):
    src = ["data=imagefolder", f"data.path={world / 'images'}"] if data == "folder" else \
        ["data=webdataset", f"data.shards='{world / 'shards'}/shard-{{000000..000003}}.tar'"]
    return [f"model.pretrained={world / 'base'}", *src, f"output_dir={out}", "score.timesteps=[500,900]",
            "score.draws=2", "score.batch_size=4", "score.chunk_size=5", "decide.policy=top_fraction",
            "decide.fraction=0.2", *extra]


def _curate(world, out, *extra, data="folder"):
    from memfilter.launch.curate import run
    return run(compose(_overrides(world, out, *extra, data=data), config_name="curate"))


def _scores(out) -> pd.DataFrame:
    df = pd.read_parquet(out / "scores.parquet")
    return df[df.skip.isna()].set_index("key").sort_index()


def test_a_pass_scores_every_sample_once_accounts_for_the_bad_one_and_decides(world, tmp_path):
    out = tmp_path / "pass"
    summary = _curate(world, out)
    comp = summary["completeness"]
    assert comp["complete"] and comp["samples"] == N_ITEMS and comp["scored"] == N_ITEMS - 1
    assert sum(comp["skipped"].values()) == 1 and comp["unreadable"][0]["key"] == "bad"
    keep = (out / "decisions" / "top_fraction" / "keep.txt").read_text().split()
    drop = (out / "decisions" / "top_fraction" / "drop.txt").read_text().split()
    assert sorted(keep + drop) == sorted(_scores(out).index) and len(drop) >= math.ceil(0.2 * (N_ITEMS - 1))
    report = (out / "decisions" / "top_fraction" / "report.md").read_text()
    assert "against the source's duplication labels: AUC" in report and (out / "decisions/top_fraction/top.png").is_file()
    # a re-run of the finished pass has nothing to do and changes nothing
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _curate(world, out)["dropped"] == summary["dropped"]
    assert all(p.read_bytes() == data for p, data in before.items())          # earlier files untouched
    assert {p.name for p in out.rglob("*") if p.is_file()} - {p.name for p in before} == {"config-continue-1.yaml"}
    with pytest.raises(ConfigError, match="decided .*other settings|other settings"):
        _curate(world, out, "decide.fraction=0.5")
    assert _curate(world, out, "decide.fraction=0.5", "decide.name=half")["decision"]["name"] == "half"


def test_a_used_output_dir_or_a_changed_source_stops_the_pass(world, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a curation pass"):
        _curate(world, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    _curate(world, tmp_path / "p")
    with pytest.raises(ConfigError, match="another source or chunking"):
        _curate(world, tmp_path / "p", "score.chunk_size=3")


def test_scores_do_not_depend_on_batch_size_or_chunks(world, tmp_path):
    _curate(world, tmp_path / "a", "score.batch_size=3", "score.chunk_size=4")
    _curate(world, tmp_path / "b", "score.batch_size=8", "score.chunk_size=17")
    a, b = _scores(tmp_path / "a"), _scores(tmp_path / "b")
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(np.stack(a.magnitude), np.stack(b.magnitude), rtol=1e-4, atol=1e-5)


def test_two_ranks_with_two_workers_score_each_key_once_as_one_process_does(world, tmp_path):
    single = tmp_path / "one"
    _curate(world, single, data="shards")
    out = tmp_path / "two"
    args = _overrides(world, out, "score.num_workers=2", data="shards")
    proc = subprocess.run(app_cmd("curate.py", args, num_processes=2), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {p.name.split("-r")[1][:5] for p in (out / "parts").glob("part-*.parquet")}
    assert ranks == {"00000", "00001"}
    two, one = _scores(out), _scores(single)
    assert list(two.index) == list(one.index) and not two.index.duplicated().any()
    np.testing.assert_allclose(np.stack(two.magnitude), np.stack(one.magnitude), rtol=1e-4, atol=1e-5)


def test_a_killed_pass_continues_to_the_uninterrupted_result(world, tmp_path):
    out = tmp_path / "killed"
    cmd = app_cmd("curate.py", _overrides(world, out, "score.chunk_size=1"))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "parts").glob("part-*.parquet")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / "parts").glob("part-*.parquet")))
    assert 0 < done < N_ITEMS and not (out / "scores.parquet").exists()
    assert _curate(world, out, "score.chunk_size=1")["completeness"]["complete"]    # the same command, again
    _curate(world, tmp_path / "whole", "score.chunk_size=1")
    pd.testing.assert_frame_equal(_scores(out).drop(columns=["rank"]),
                                  _scores(tmp_path / "whole").drop(columns=["rank"]))
    assert json.loads((out / "completeness.json").read_text())["complete"]


def test_written_shards_hold_exactly_the_kept_keys(world, tmp_path):
    import webdataset as wds
    for data in ("shards", "folder"):
        out = tmp_path / data
        summary = _curate(world, out, "write_shards=true", data=data)
        keep = set((out / "decisions" / "top_fraction" / "keep.txt").read_text().split())
        shards = sorted((out / "decisions" / "top_fraction" / "shards").glob("shard-*.tar"))
        keys = [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList([str(p) for p in shards]),
                                                        wds.tarfile_to_samples())]
        assert sorted(keys) == sorted(keep) and summary["shards"]["samples"] == len(keep)


def test_the_shards_manifest_groups_copies_by_sha256_and_one_image_under_two_captions_is_one_item(world, tmp_path):
    out = tmp_path / "p"
    _curate(world, out, data="shards")
    d = pd.read_parquet(out / "decisions" / "top_fraction" / "decisions.parquet").set_index("key")
    both = d.loc[["s09", "s10"]]                 # item 3: the same image under two captions
    assert set(both.item_by) <= {"image", "sha256", "cluster"} and (both.item_size == 2).all()
    assert both.item_score.nunique() == 1
    copies = d.loc[["s00", "s01", "s02"]]
    assert (copies.item_size == 3).all() and copies.item_score.nunique() == 1


def _frame(scores_by_t: np.ndarray, captions=None, images=None) -> pd.DataFrame:
    n = len(scores_by_t)
    return pd.DataFrame({"key": [f"k{i}" for i in range(n)], "caption": captions or [f"c{i}" for i in range(n)],
                         "caption_id": np.arange(n) + 1 if captions is None else
                         pd.factorize(pd.Series(captions))[0] + 1,
                         "image_id": images if images is not None else np.arange(n) + 100,
                         "magnitude": list(scores_by_t), "score": scores_by_t.mean(1), "dup_group": -1})


def test_item_evidence_and_the_decision_policies(tmp_path):
    from memfilter.filtering.curation import DecideArgs, decide, item_evidence, timestep_matrix
    rng = np.random.default_rng(0)
    m = rng.normal(1.0, 0.1, (200, 2))                    # one draw, two timesteps
    m[:5] += 2.0
    scored = _frame(m, images=np.r_[np.full(5, 7), np.arange(195) + 100])
    vec = timestep_matrix(scored, [500, 900], 1)
    score, ivec, by, size = item_evidence(scored, vec)
    assert by[:5] == ["image"] * 5 and (size[:5] == 5).all() and np.allclose(score[:5], vec[:5].mean())
    drop, info = decide(DecideArgs(policy="top_fraction", fraction=0.025), scored, score, ivec, [500, 900], 1)
    assert drop.sum() == 5 and drop[:5].all()
    drop, _ = decide(DecideArgs(policy="threshold", threshold=1.5), scored, score, ivec, [500, 900], 1)
    assert np.array_equal(drop, score > 1.5)
    ref = _frame(rng.normal(1.0, 0.1, (1000, 2)))
    ref["skip"] = None
    ref.to_parquet(tmp_path / "scores.parquet")
    drop, info = decide(DecideArgs(policy="calibrated", fpr=0.05, reference=str(tmp_path)), scored, score, ivec,
                        [500, 900], 1)
    # at most 5% of the reference above the threshold: the 950th of 1000 sorted scores
    assert info["threshold"] == np.sort(ref.score)[949] and (ref.score > info["threshold"]).mean() <= 0.05
    assert drop[:5].all()
    drop, info = decide(DecideArgs(policy="bucket", fpr=0.05, reference=str(tmp_path / "scores.parquet")), scored,
                        score, ivec, [500, 900], 1)
    assert info["per_timestep"][900] == np.sort(np.stack(ref.magnitude)[:, 1])[974]     # 25 of 1000 above
    assert drop[:5].all() and drop[5:].mean() < 0.1
    scored.loc[0, "caption"] = "a Logo we asked for"
    drop, info = decide(DecideArgs(policy="top_fraction", fraction=0.025, protect_captions=["logo"]), scored,
                        score, ivec, [500, 900], 1)
    assert not drop[0] and drop[1:5].all() and info["protected"] == 1
    with pytest.raises(ValueError, match="decide.policy=calibrated needs decide.reference"):
        DecideArgs(policy="calibrated")
    # a calibration file gives the same thresholds as the reference it was made from
    from memfilter.filtering.calibration import calibrate, save_calibration
    ts = np.tile([500, 900], 1000)
    cal = save_calibration(calibrate(np.stack(ref.magnitude).ravel(), ts, fpr=0.025, num_buckets=10),
                           tmp_path / "cal.json")
    _, info = decide(DecideArgs(policy="bucket", fpr=0.05, calibration=str(cal)), scored, score, ivec, [500, 900], 1)
    assert info["per_timestep"][900] == np.sort(np.stack(ref.magnitude)[:, 1])[974]


def test_the_index_search_finds_the_same_near_duplicates_as_all_pairs():
    from memfilter.train.data.neardup import clusters, near_duplicate_pairs_indexed
    from memfilter.train.data.prepare import near_duplicate_pairs
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, size=600, dtype=np.uint64)
    copies = base[:200].copy()
    for i in range(200):
        for b in rng.choice(64, rng.integers(0, 10), replace=False):
            copies[i] ^= np.uint64(1) << np.uint64(b)
    h = np.concatenate([base, copies])
    for threshold in (0, 4, 8):
        expected = near_duplicate_pairs(h, threshold)
        expected = expected[np.lexsort((expected[:, 1], expected[:, 0]))]
        assert np.array_equal(near_duplicate_pairs_indexed(h, threshold), expected)
    c = clusters(5, np.array([[0, 3, 1], [3, 4, 2]]))
    assert list(c) == [0, 1, 2, 0, 0]


def test_keep_list_and_precomputed_drop_exactly_the_chosen_keys_in_training(world, tmp_path):
    from memfilter.filtering.records import read_records
    keys = [f"s{n:02d}" for n in range(16)]
    (tmp_path / "keep.txt").write_text("\n".join(keys[:8]) + "\n")
    data = ["data=imagefolder", f"data.path={world / 'images'}", "resolution=16"]
    run_dir, _ = train_in_process(tmp_path / "a", [*data, f"data.keep_list={tmp_path / 'keep.txt'}"])
    seen = set(read_records(run_dir / "records").to_pandas().key)
    assert seen == set(keys[:8])
    assert json.loads((run_dir / "data_report.json").read_text())["excluded_by_keep_list"] == N_ITEMS - 8
    decisions = tmp_path / "decisions"
    decisions.mkdir()
    (decisions / "drop.txt").write_text("s00\ns05\ns12\n")
    run_dir, _ = train_in_process(tmp_path / "b", [*data, "filter=precomputed", f"filter.decisions={decisions}"])
    rec = read_records(run_dir / "records").to_pandas()
    assert set(rec.key[~rec.kept]) == {"s00", "s05", "s12"} & set(rec.key)
    assert rec.kept[~rec.key.isin(["s00", "s05", "s12"])].all() and rec.magnitude.isna().all()
    with pytest.raises(ConfigError, match="filter.decisions"):
        from memfilter.launch.config_check import check_train_config
        check_train_config(compose(["filter=precomputed", f"filter.decisions={tmp_path / 'nope'}"]),
                           cuda_available=False)


def test_an_sdxl_model_scores_through_the_same_seam(world, tmp_path):
    """The pass conditions through the model family: SDXL's two text encoders, pooled embeddings and time ids."""
    args = [a for a in _overrides(world, tmp_path / "x") if not a.startswith("model.pretrained")]
    from memfilter.launch.curate import run
    summary = run(compose([*args, "model=tiny_sdxl", "model.tiny.resolution=16", "model.tiny.block_out_channels=[32,32]",
                           "model.tiny.vae_channels=[32,32]"], config_name="curate"))
    assert summary["completeness"]["scored"] == N_ITEMS - 1
    assert np.isfinite(np.stack(_scores(tmp_path / "x").magnitude)).all()
