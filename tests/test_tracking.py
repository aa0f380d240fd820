"""Trackers as diffusers' --report_to offers them: wandb (its environment respected, one run across a resume) and
TensorBoard, through real offline runs."""
from __future__ import annotations

import json

from tests.conftest import train_in_process


def test_wandb_respects_its_environment_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-7")
    run_dir, _ = train_in_process(tmp_path, ["logger=wandb", "max_train_steps=2", "checkpointing_steps=1"])
    first = json.loads((run_dir / "tracker.json").read_text())["wandb_id"]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(first)
    train_in_process(tmp_path, ["logger=wandb", "max_train_steps=3", "checkpointing_steps=1",
                                "resume_from_checkpoint=latest"])
    assert json.loads((run_dir / "tracker.json").read_text())["wandb_id"] == first
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert ids == {first}                      # the resumed attempt logged into the same run


def test_wandb_environment_wins_over_defaults_and_the_config_over_both(tmp_path, monkeypatch):
    from memfilter.train.tracking import WandbTracker
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-7")
    t = WandbTracker(tmp_path / "a")
    assert (t.run.project, t.run.group, t.run.name) == ("from-env", "sweep-7", "a")
    t.finish()
    t = WandbTracker(tmp_path / "b", project="from-config", group="g", name="n")
    assert (t.run.project, t.run.group, t.run.name) == ("from-config", "g", "n")
    t.finish()


def test_tensorboard_and_all_write_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, _ = train_in_process(tmp_path, ["logger=all", "max_train_steps=2", "logging_steps=1"])
    acc = EventAccumulator(str(run_dir / "logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss_all")] == [1, 2]
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_a_policy_that_measures_no_magnitude_logs_to_wandb(tmp_path):
    """filter=count and filter=agc measure no m (NaN in the stats): the logs leave m's histogram out instead of
    failing on it (a run of the demo's count baseline stopped at its first log)."""
    for name in ("count", "agc"):
        run_dir, summary = train_in_process(tmp_path / name, ["logger=wandb", f"filter={name}", "max_train_steps=3",
                                                              "filter.max_count=1" if name == "count" else
                                                              "filter.warmup=2"])
        assert (run_dir / "model_index.json").is_file()
