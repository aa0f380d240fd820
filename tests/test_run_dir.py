"""Nothing an earlier run wrote is lost: a fresh run into a used output_dir and a resume of a directory that does
not exist stop at start, and touch nothing."""
from __future__ import annotations

import hashlib

import pytest

from memfilter.launch.config_check import ConfigError
from tests.conftest import compose, train_in_process


def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_rerun_without_resume_stops_and_leaves_every_file_byte_identical(tmp_path):
    run_dir, _ = train_in_process(tmp_path, ["max_train_steps=2", "checkpointing_steps=1"])
    before = _snapshot(run_dir)
    assert "config.yaml" in before and any(k.startswith("records/") for k in before)
    with pytest.raises(ConfigError, match=r"already holds a run .*resume_from_checkpoint=latest"):
        train_in_process(tmp_path, ["max_train_steps=3"])
    assert _snapshot(run_dir) == before
    # resuming it is what the message says: it continues, and keeps the first config beside the new one
    _, summary = train_in_process(tmp_path, ["max_train_steps=3", "checkpointing_steps=1",
                                             "resume_from_checkpoint=latest"])
    assert summary["steps"] == 3
    after = _snapshot(run_dir)
    assert after["config.yaml"] == before["config.yaml"] and "config-resume-1.yaml" in after


def test_resume_without_the_run_directory_stops_naming_output_dir(tmp_path):
    from memfilter.launch.train import run
    cfg = compose(["model=tiny", "logger=none", f"output_dir={tmp_path / 'nowhere'}", "resume_from_checkpoint=latest"])
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint=latest: output_dir=.*nowhere does not exist"):
        run(cfg)
    assert not (tmp_path / "nowhere").exists()
