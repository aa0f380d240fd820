"""Calibration at a target false-positive rate, its file, the policies that take it, and the detect/calibrate apps."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memfilter.filtering.calibration import (Calibration, calibrate, fpr_threshold, load_calibration,
                                             save_calibration)
from memfilter.filtering.policies import build_policy
from tests.conftest import compose


def test_the_threshold_gives_the_target_rate_on_its_calibration_set():
    rng = np.random.default_rng(0)
    v = rng.lognormal(size=1000)
    for fpr in (0.01, 0.05, 0.1):
        thr = fpr_threshold(v, fpr)
        assert (v > thr).sum() == int(fpr * 1000)                        # distinct values: exactly the target
    ties = np.r_[np.ones(50), np.arange(950) / 1000]                      # the top 5% tied: none can be let through
    assert (ties > fpr_threshold(ties, 0.01)).mean() <= 0.01
    ts = rng.integers(0, 1000, 1000)
    cal = calibrate(v * (1 + ts / 100), ts, fpr=0.05, num_buckets=4)
    for b in range(4):
        sel = ts * 4 // 1000 == b
        assert ((v * (1 + ts / 100))[sel] > cal.bucket_thresholds[b]).mean() <= 0.05
        assert cal.bucket_n[b] == sel.sum()
    with pytest.raises(ValueError, match="fpr=1.5"):
        calibrate(v, fpr=1.5)


def test_the_file_round_trips_and_never_overwrites(tmp_path):
    cal = calibrate(np.arange(100.0), np.arange(100) * 10, fpr=0.1, num_buckets=2)
    path = save_calibration(cal, tmp_path / "c.json")
    assert load_calibration(path) == cal
    with pytest.raises(FileExistsError, match="already there"):
        save_calibration(cal, path)
    (tmp_path / "other.json").write_text(json.dumps({"threshold": 1}))
    with pytest.raises(ValueError, match="filter.calibration=.*not a calibration file"):
        load_calibration(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="memfilter-calibrate"):
        load_calibration(tmp_path / "missing.json")


def test_training_policies_take_the_calibrated_thresholds(tmp_path):
    ts = np.tile(np.arange(0, 1000, 10), 20)
    vals = np.random.default_rng(1).normal(1 + ts / 1000, 0.05)
    path = save_calibration(calibrate(vals, ts, fpr=0.01, num_buckets=10), tmp_path / "c.json")
    cal = load_calibration(path)
    fixed = build_policy("fixed", threshold=None, calibration=str(path))
    assert fixed.threshold == cal.threshold
    m = torch.tensor([cal.threshold - 1e-3, cal.threshold + 1e-3])
    assert fixed.decide(m, torch.tensor([5, 5])).tolist() == [True, False]
    pol = build_policy("timestep", calibration=str(path), num_buckets=10)
    t = torch.tensor([50, 950, 950, 50])
    thr = torch.tensor(cal.thresholds_at(t.numpy()), dtype=torch.float32)
    m = torch.stack([thr[0] * 0.99, thr[1] * 0.99, thr[2] * 1.01, thr[3] * 1.01])
    assert pol.decide(m, t).tolist() == [True, True, False, False]          # no warm-up: frozen from the file
    with pytest.raises(ValueError, match="filter.num_buckets=10"):
        build_policy("timestep", calibration=str(path), num_buckets=5)
    flat = save_calibration(calibrate(vals, fpr=0.01), tmp_path / "flat.json")
    with pytest.raises(ValueError, match="no per-timestep thresholds"):
        build_policy("timestep", calibration=str(flat))
    with pytest.raises(ValueError, match="filter.threshold=<number> or filter.calibration"):
        build_policy("fixed", threshold=None)


def test_detect_then_calibrate_then_train_policy(tmp_path):
    from memfilter.launch.calibrate import run as calibrate_app
    from memfilter.launch.config_check import ConfigError
    from memfilter.launch.detect import run as detect_app
    from memfilter.train.families import build_tiny, get_family

    c = build_tiny(resolution=16, block_out_channels=(32, 32), vae_channels=(32, 32))
    get_family(c).pipeline().save_pretrained(tmp_path / "pipe")
    (tmp_path / "mem.txt").write_text("a red circle\na blue square\na green ring\n")
    (tmp_path / "non.jsonl").write_text("".join(json.dumps({"caption": f"a photo {i}"}) + "\n" for i in range(5)))
    over = [f"pipeline={tmp_path / 'pipe'}", f"memorized={tmp_path / 'mem.txt'}",
            f"nonmemorized={tmp_path / 'non.jsonl'}", "detectors=[magnitude,sharpness,bright_ending]",
            "num_generations=2", "num_steps=2", "grid_steps=[1,2]", "grid_generations=[1,2]",
            "num_inference_steps=3", "device=cpu", f"output={tmp_path / 'det'}"]
    result = detect_app(compose(over, "detect"))
    assert len(result["grid"]) == 3 * 2 * 2 and all(0 <= r["auc"] <= 1 for r in result["grid"])
    report = (tmp_path / "det" / "report.md").read_text()
    assert report.count("| bright_ending |") == 4 and "(Wen)" in report and "(closest)" in report
    for name in ("roc.png", "scores_hist.png", "scores.parquet", "per_step.parquet", "metrics.json"):
        assert (tmp_path / "det" / name).is_file()
    with pytest.raises(ConfigError, match="already holds a detection run"):
        detect_app(compose(over, "detect"))
    with pytest.raises(ConfigError, match="grid_steps"):
        detect_app(compose([o for o in over if "output" not in o] + ["grid_steps=[3]",
                                                                     f"output={tmp_path / 'x'}"], "detect"))
    out = tmp_path / "cal.json"
    calibrate_app(compose([f"scores={tmp_path / 'det' / 'per_step.parquet'}", "fpr=0.2", f"output={out}"],
                          "calibrate"))
    cal = load_calibration(out)
    assert cal.n == 5 * 2 * 2                                   # the non-memorized rows only: 5 prompts x n x k
    assert sum(cal.bucket_n) == cal.n and isinstance(cal, Calibration)
    assert build_policy("timestep", calibration=str(out)).thresholds() != {}
    with pytest.raises(ConfigError, match="already exists"):
        calibrate_app(compose([f"scores={tmp_path / 'det' / 'per_step.parquet'}", f"output={out}"], "calibrate"))


def test_bundled_prompt_sets_are_found_by_name():
    from memfilter.evaluation.prompts import load_prompt_file, prompt_set

    rows = load_prompt_file(prompt_set("sdv1_500_memorized.jsonl"))
    assert len(rows) == 500 and all(r["prompt"] for r in rows)
    assert len(load_prompt_file(prompt_set("sd1_nonmemorized_500.txt"))) == 500
    assert load_prompt_file("sets:sdv1_500_memorized.jsonl", limit=3) == rows[:3]     # every app takes sets:<name>
    with pytest.raises(FileNotFoundError, match="known"):
        prompt_set("nope.txt")


def test_the_training_config_takes_filter_calibration(tmp_path):
    from memfilter.launch.builders import build_filter

    ts = np.tile(np.arange(0, 1000, 10), 5)
    path = save_calibration(calibrate(np.linspace(1, 2, ts.size), ts, fpr=0.05), tmp_path / "c.json")
    fixed = build_filter(compose(["filter=fixed", f"filter.calibration={path}"]).filter, 1000)
    assert fixed.threshold == load_calibration(path).threshold                      # replaces the yaml's 2.0
    bucketed = build_filter(compose(["filter=timestep", f"filter.calibration={path}"]).filter, 1000)
    assert set(bucketed.thresholds()) == {f"threshold/bucket{b}" for b in range(10)}
