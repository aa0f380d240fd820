"""Real processes: a 2-process `accelerate launch` run (gloo on CPU), SIGKILL and resume, bad overrides."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from memfilter.filtering.records import read_records
from tests.conftest import REPO, launch_cmd, run_cmd
from tests.test_wds import png, write_shards

pytestmark = pytest.mark.slow


def test_two_processes_record_every_sample_once_and_decide_globally(tmp_path):
    # 16 samples = 2 ranks x batch 4 x 2 steps: one epoch, every key exactly once. The default output_dir
    # is a timestamp each rank resolves itself: both must end up writing into rank 0's one directory.
    proc = run_cmd(launch_cmd(None, ["filter=batch_quantile", "filter.drop_fraction=0.25", "max_train_steps=2",
                                     "proportion_empty_prompts=0", "checkpointing_steps=2"], num_processes=2),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1
    run_dir = runs[0]
    rec = read_records(run_dir / "records").to_pandas()
    assert sorted(rec["rank"].unique()) == [0, 1]
    assert len(rec) == 16 and rec.key.is_unique                      # every sample once, none twice
    assert rec.groupby(["step", "rank"]).size().tolist() == [4, 4, 4, 4]
    # The decision is global: in each step the 2 dropped samples (25% of 8) are the 2 largest magnitudes
    # over BOTH ranks, which no rank could know from its own 4 samples.
    for step, g in rec.groupby("step"):
        top2 = set(g.nlargest(2, "magnitude").key)
        assert set(g[~g.kept].key) == top2, f"step {step}: decisions differ from the global top-2"
    assert (run_dir / "checkpoint-2" / "random_states_1.pkl").exists()   # both ranks took part in the save
    assert (run_dir / "model_index.json").exists()


def _unet_weights(run_dir):
    return load_file(run_dir / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("data", ["world", "webdataset"])
def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path, data):
    """Kill -9 mid-run, resume from the last checkpoint: same weights and same per-sample decisions, bitwise."""
    common = ["max_train_steps=12", "checkpointing_steps=3", "checkpoints_total_limit=2", "records_flush_every=1",
              "gradient_accumulation_steps=2", "use_ema=true", "ema_decay=0.9", "filter=running_quantile",
              "filter.warmup=8", "filter.window=24", "filter.quantile=0.7", "proportion_empty_prompts=0.2",
              "optim.lr_scheduler=cosine", "optim.lr_warmup_steps=2"]
    if data == "world":         # 22 samples: 5 batches an epoch, so steps straddle epochs
        common += ["data.num_unique=12", "data.repeats=5"]
    else:                       # 7 shards x 5 = 35 samples: 8 batches an epoch over 2 workers, resumed mid-epoch
        pattern = write_shards(tmp_path / "shards", n_shards=7, per_shard=5)
        common += ["data=webdataset", f"data.shards='{pattern}'", "data.shuffle_buffer=4",
                   "dataloader_num_workers=2"]
    full = tmp_path / "full"
    proc = run_cmd(launch_cmd(full, common))
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    p = subprocess.Popen(launch_cmd(killed, common), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    # wait until records of step 8 exist: past checkpoint-6, short of the next one (9)
    while not list((killed / "records").glob("rank-*/part-*-0000000008-*.parquet")):
        assert p.poll() is None, "run ended before it could be killed: " + p.stderr.read().decode()[-2000:]
        if time.time() > deadline:                          # a hang guard, not a speed check
            p.kill()
            pytest.fail("the run did not reach step 8 within the guard time")
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (killed / "model_index.json").exists()
    stale = read_records(killed / "records").to_pandas()
    assert stale.step.max() > 6                          # records past the last checkpoint exist, to be dropped

    proc = run_cmd(launch_cmd(killed, common + ["resume_from_checkpoint=latest"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr

    a, b = _unet_weights(full), _unet_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    # (a step of 2 micro-batches may straddle an epoch and hold a key twice, so compare whole sorted tables)
    order = ["step", "key", "timestep"]
    ra = read_records(full / "records").to_pandas().sort_values(order).reset_index(drop=True)
    rb = read_records(killed / "records").to_pandas().sort_values(order).reset_index(drop=True)
    assert len(ra) == len(rb) == 12 * 2 * 4               # nothing lost, nothing written twice
    assert (ra.key == rb.key).all() and (ra.kept == rb.kept).all() and (ra.timestep == rb.timestep).all()
    np.testing.assert_array_equal(ra.magnitude.to_numpy(), rb.magnitude.to_numpy())
    np.testing.assert_array_equal(ra.loss.to_numpy(), rb.loss.to_numpy())
    assert not ra.kept.all()                             # the policy did drop samples: decisions were tested
    assert len(list(killed.glob("checkpoint-*"))) == 2   # checkpoints_total_limit


@pytest.mark.parametrize("override, expected", [
    ("optim.learning_rate=-1", "optim.learning_rate=-1"),        # a value the settings' check refuses
    ("filter=nonexistent", "filter"),                            # an option Hydra cannot compose
])
def test_bad_override_stops_at_start_naming_the_key(tmp_path, override, expected):
    """The app as a process: exit status 2 and the key named, nothing written. (More bad values are checked in
    process by tests/test_settings.py.)"""
    proc = run_cmd(launch_cmd(tmp_path / "run", [override]), timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, expected", [("filter.k=abc", "filter.k"),
                                                ("optim.lerning_rate=1e-4", "lerning_rate")])
def test_bad_override_is_named_at_compose_or_check(override, expected):
    from hydra.errors import HydraException

    from memfilter.launch.config_check import ConfigError, check_train_config
    from tests.conftest import compose
    with pytest.raises((ConfigError, HydraException), match=expected):
        check_train_config(compose([override]), cuda_available=False)


def test_two_process_streaming_resume_with_a_bad_sample_on_one_rank(tmp_path):
    """Each rank's stream position is its own: resuming 2 ranks whose streams differ (a corrupt sample on one
    of them) continues both exactly."""
    import shutil

    import webdataset as wds
    from memfilter.train.data.wds import WebDatasetSource
    pattern = write_shards(tmp_path / "shards", n_shards=4, per_shard=6)
    for url in WebDatasetSource(pattern, seed=0)._epoch_shards(0)[1::2]:     # rank 1's shards in epoch 0
        with wds.TarWriter(url) as w:                                         # start with 3 corrupt members
            for i in range(6):
                w.write({"__key__": f"{Path(url).stem}-{i}", "jpg" if i < 3 else "png": b"broken" if i < 3 else png(),
                         "txt": f"sample {i}"})
    args = ["data=webdataset", f"data.shards='{pattern}'", "data.shuffle_buffer=3", "train_batch_size=2",
            "max_train_steps=4", "checkpointing_steps=2", "proportion_empty_prompts=0"]
    full = tmp_path / "full"
    proc = run_cmd(launch_cmd(full, args, num_processes=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((full / "data_report.json").read_text())
    assert report["skipped"]["undecodable"] >= 3           # rank 1's stream ran ahead of rank 0's
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    proc = run_cmd(launch_cmd(resumed, args + ["resume_from_checkpoint=latest"], num_processes=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _unet_weights(full), _unet_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = read_records(full / "records").to_pandas()
    rb = read_records(resumed / "records").to_pandas()
    late = ra[ra.step > 2].sort_values(["step", "rank", "key"]).reset_index(drop=True)
    rb = rb.sort_values(["step", "rank", "key"]).reset_index(drop=True)
    assert (late.key == rb.key).all() and (late["rank"] == rb["rank"]).all() and len(rb) == 2 * 2 * 2


def test_item_policy_two_ranks_stopped_mid_stream_resume_to_the_same_decisions(tmp_path):
    """filter=item (the default's base null and anchoring) on 2 processes: a run stopped at its step-4 checkpoint
    and resumed decides, sample by sample, and ends, weight by weight, as the uninterrupted one."""
    common = ["checkpointing_steps=4", "records_flush_every=1", "filter=item", "filter.num_buckets=1",
              "filter.warmup=4", "filter.min_count=2", "filter.z_crit=0", "proportion_empty_prompts=0",
              "optim.lr_scheduler=constant", "optim.lr_warmup_steps=0", "data.num_unique=12", "data.repeats=6"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = run_cmd(launch_cmd(full, common + ["max_train_steps=8"], num_processes=2), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cmd(launch_cmd(cut, common + ["max_train_steps=4"], num_processes=2), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cmd(launch_cmd(cut, common + ["max_train_steps=8", "resume_from_checkpoint=latest"], num_processes=2),
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    order = ["step", "rank", "key", "timestep"]
    ra = read_records(full / "records").to_pandas().sort_values(order).reset_index(drop=True)
    rb = read_records(cut / "records").to_pandas().sort_values(order).reset_index(drop=True)
    assert len(ra) == len(rb) and sorted(ra["rank"].unique()) == [0, 1]
    assert (ra.key == rb.key).all() and (ra.kept == rb.kept).all() and (ra.item_id == rb.item_id).all()
    np.testing.assert_array_equal(ra.base_loss.to_numpy(), rb.base_loss.to_numpy())
    late = ra[ra.step > 4]
    assert not late.kept.all() and late.base_loss.notna().all()      # the restored policy did drop samples
    a, b = _unet_weights(full), _unet_weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
