"""Thresholds calibrated on data known not to be memorized, at a target false-positive rate.

A calibration file (JSON, written by `memfilter-calibrate`) holds the threshold over all values and one per timestep
bucket (timesteps [0, num_train_timesteps) cut into num_buckets equal buckets, as filter=timestep cuts them). A value
is flagged (dropped, detected) when it is ABOVE its threshold, the rule of every training policy. The threshold is an
order statistic of the calibration values: with n values and target rate a, at most floor(a * n) of them lie above
it, so the false-positive rate on the calibration set is at most the target (below it when ties or a small n leave
no exact point). A bucket with no values has no threshold (null): the training policy keeps its samples and says so.

Accepted by `filter=fixed` (the overall threshold), `filter=timestep` (the per-bucket thresholds, frozen) and the
curation pass (`decide.calibration`: `calibrated` uses the overall threshold, `bucket` the buckets').
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

KIND = "memfilter-calibration"


def fpr_threshold(values, fpr: float) -> float:
    """The smallest order statistic with at most floor(fpr * n) values above it (+inf for no values)."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        return math.inf
    allowed = int(math.floor(fpr * v.size + 1e-9))
    return float(v[v.size - 1 - allowed]) if allowed < v.size else -math.inf


@dataclass
class Calibration:
    """A calibration file's content. `bucket_thresholds[b]` is None where bucket b had no values."""

    fpr: float
    threshold: float
    n: int
    num_buckets: int = 10
    num_train_timesteps: int = 1000
    bucket_thresholds: list = field(default_factory=list)
    bucket_n: list = field(default_factory=list)
    source: str = ""
    value: str = "magnitude"

    def bucket_of(self, timesteps) -> np.ndarray:
        t = np.asarray(timesteps, dtype=np.int64)
        return np.clip(t * self.num_buckets // self.num_train_timesteps, 0, self.num_buckets - 1)

    def thresholds_at(self, timesteps) -> np.ndarray:
        """Per-value thresholds of the timesteps' buckets (+inf where a bucket has none)."""
        table = np.array([math.inf if x is None else x for x in self.bucket_thresholds], dtype=np.float64)
        return table[self.bucket_of(timesteps)]


def calibrate(values, timesteps=None, *, fpr: float = 0.01, num_buckets: int = 10, num_train_timesteps: int = 1000,
              source: str = "", value: str = "magnitude") -> Calibration:
    """Thresholds at false-positive rate `fpr` from values of data known not to be memorized.

    Args:
        values: the calibration values (magnitudes, detection scores).
        timesteps: the timestep of each value, for the per-bucket thresholds; None: overall only.
        fpr: target false-positive rate in (0, 1). Default 0.01.
        num_buckets: equal timestep buckets. Default 10.
        num_train_timesteps: the model's training timesteps. Default 1000.
        source, value: what the values are, recorded in the file.
    """
    if not 0 < fpr < 1:
        raise ValueError(f"fpr={fpr}: must be in (0, 1), e.g. fpr=0.01")
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"calibration needs finite values; got {v.size} values, {int((~np.isfinite(v)).sum())} not "
                         "finite")
    cal = Calibration(fpr=fpr, threshold=fpr_threshold(v, fpr), n=int(v.size), num_buckets=num_buckets,
                      num_train_timesteps=num_train_timesteps, source=source, value=value)
    if timesteps is not None:
        b = cal.bucket_of(timesteps)
        if b.shape != v.shape:
            raise ValueError(f"{v.size} values but {b.size} timesteps")
        cal.bucket_n = [int((b == i).sum()) for i in range(num_buckets)]
        cal.bucket_thresholds = [fpr_threshold(v[b == i], fpr) if n else None for i, n in enumerate(cal.bucket_n)]
    return cal


def save_calibration(cal: Calibration, path: str | Path) -> Path:
    """Writes the file (refusing to replace an existing one)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"output={path}: a calibration file is already there; give another output")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": KIND, "version": 1, **asdict(cal)}, indent=1))
    return path


def load_calibration(path: str | Path, field_name: str = "filter.calibration") -> Calibration:
    """The file's Calibration; errors name `field_name` and the fix."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{field_name}={path}: no such file; write one with memfilter-calibrate")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{field_name}={path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise ValueError(f"{field_name}={path}: not a calibration file (no \"kind\": \"{KIND}\"); "
                         "write one with memfilter-calibrate")
    data.pop("kind"), data.pop("version", None)
    try:
        return Calibration(**data)
    except TypeError as e:
        raise ValueError(f"{field_name}={path}: {e}") from None
