"""Calibrate a threshold at a target false-positive rate from scores of data known not to be memorized.

    python launch/calibrate.py scores=detection/per_step.parquet fpr=0.01 output=calibration.json
    python launch/calibrate.py scores=outputs/train/<clean run>/records value=magnitude timestep=timestep

The file (filtering/calibration.py) is accepted by `filter=fixed filter.calibration=<file>` (its overall threshold),
`filter=timestep filter.calibration=<file>` (per timestep bucket) and the curation pass (`decide.calibration`).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from memfilter.launch.config_check import ConfigError, run_or_exit  # noqa: E402


def run(cfg: DictConfig) -> dict:
    import numpy as np

    from memfilter.evaluation.detection import _read_table
    from memfilter.filtering.calibration import calibrate, save_calibration

    out = Path(cfg.output)
    if out.exists():
        raise ConfigError(f"output={out} already exists: give another output (an earlier calibration is kept)")
    path = Path(cfg.scores)
    if not path.exists():
        raise ConfigError(f"scores={path}: no such file or folder (a detection per_step.parquet, training records "
                          "or a curation scores.parquet)")
    table = _read_table(path)
    cols = table.column_names
    for key in ("value", "timestep"):
        if cfg[key] is not None and cfg[key] not in cols:
            raise ConfigError(f"{key}={cfg[key]!r}: no such column in {path}; columns are {cols}")
    values = np.asarray(table.column(cfg.value).to_numpy(zero_copy_only=False), dtype=np.float64)
    keep = np.isfinite(values)
    if cfg.label in cols:                                  # labelled scores: calibrate on the non-memorized rows
        keep &= np.asarray(table.column(cfg.label).to_numpy(zero_copy_only=False)) == 0
    ts = (np.asarray(table.column(cfg.timestep).to_numpy(zero_copy_only=False))[keep]
          if cfg.timestep is not None else None)
    if not keep.any():
        raise ConfigError(f"scores={path}: no finite {cfg.value!r} value" + (f" with {cfg.label}=0" if cfg.label in
                                                                           cols else ""))
    try:
        cal = calibrate(values[keep], ts, fpr=cfg.fpr, num_buckets=cfg.num_buckets,
                        num_train_timesteps=cfg.num_train_timesteps, source=str(path), value=cfg.value)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    save_calibration(cal, out)
    print(f"calibration: {out}: threshold {cal.threshold:.4g} at FPR {cal.fpr} over {cal.n} values "
          f"({int((~keep).sum())} rows left out: not finite or labelled memorized)")
    if cal.bucket_thresholds:
        print("per bucket: " + ", ".join(f"{b}: {t:.4g} (n={n})" for b, (t, n) in
                                         enumerate(zip(cal.bucket_thresholds, cal.bucket_n)) if t is not None))
    return {"threshold": cal.threshold, "n": cal.n, "bucket_thresholds": cal.bucket_thresholds}


@hydra.main(version_base="1.3", config_path="../conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    main()
